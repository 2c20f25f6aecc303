"""Every notebook in ``notebooks/`` executes top to bottom on CPU.

Each notebook runs in a fresh ``python3`` kernel (the interpreter running the
tests, see ``test_kernel_is_this_interpreter``) with a temporary working
directory, so nothing is written into the repository. A cell that raises, a
cell that runs past ``CELL_TIMEOUT_S`` or a notebook that runs past
``NOTEBOOK_TIMEOUT_S`` fails the test. The stored outputs are checked to stay
small and free of machine-specific paths.
"""

import pathlib
import re
import sys
import time

import nbclient
import nbformat
import pytest

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 120
NOTEBOOK_TIMEOUT_S = 180  # about 40 s of CPU each; room for a loaded machine
MAX_NOTEBOOK_BYTES = 1_000_000
_MACHINE_PATH = re.compile(r"/(home|root|tmp|work|usr|opt|Users)/")
_PY_WARNING = re.compile(r"\b\w*Warning: ")


def _execute(nb, cwd) -> float:
  """Runs ``nb`` in place; returns the wall time in seconds."""
  start = time.monotonic()

  def cell_timeout(cell):
    # Each cell gets CELL_TIMEOUT_S, capped by what is left of the
    # notebook's budget.
    del cell
    remaining = NOTEBOOK_TIMEOUT_S - (time.monotonic() - start)
    return max(1, int(min(CELL_TIMEOUT_S, remaining)))

  client = nbclient.NotebookClient(
      nb, kernel_name="python3", timeout=CELL_TIMEOUT_S,
      timeout_func=cell_timeout, resources={"metadata": {"path": str(cwd)}})
  client.execute()
  return time.monotonic() - start


def _code_outputs(nb):
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == "code":
      for out in cell.outputs:
        yield i, out


@pytest.fixture(autouse=True)
def _cpu_kernel(monkeypatch):
  # The kernel inherits this environment: the suite runs on CPU.
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")


def test_notebooks_exist():
  assert [p.name for p in NOTEBOOKS] == [
      "01_quickstart.ipynb", "02_training_loop.ipynb",
      "03_flash_attention.ipynb", "04_scale_out.ipynb"]


def test_kernel_is_this_interpreter(tmp_path):
  nb = nbformat.v4.new_notebook()
  nb.cells = [nbformat.v4.new_code_cell("import sys; print(sys.prefix)")]
  _execute(nb, tmp_path)
  assert nb.cells[0].outputs[0].text.strip() == sys.prefix


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_stored_outputs_are_clean(path):
  """The committed outputs: small, error- and warning-free, and without
  paths of the machine that produced them."""
  text = path.read_text()
  assert len(text.encode()) < MAX_NOTEBOOK_BYTES, path.name
  nb = nbformat.reads(text, as_version=4)
  nbformat.validate(nb)
  assert any(out for _, out in _code_outputs(nb)), f"{path.name}: no outputs"
  for i, out in _code_outputs(nb):
    where = f"{path.name}, cell {i}"
    assert out.output_type != "error", f"{where}: stored an error"
    assert not (out.output_type == "stream" and out.name == "stderr"), (
        f"{where}: stored stderr: {out.text[:300]}")
    text = out.get("text", "") + out.get("data", {}).get("text/plain", "")
    assert not _MACHINE_PATH.search(text), f"{where}: stores a local path"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path):
  nb = nbformat.read(path, as_version=4)
  seconds = _execute(nb, tmp_path)
  assert seconds <= NOTEBOOK_TIMEOUT_S, (
      f"{path.name} took {seconds:.0f} s > {NOTEBOOK_TIMEOUT_S} s")
  for i, out in _code_outputs(nb):
    # Warnings are errors in this suite; the kernel is another process, so
    # check what it printed.
    if out.output_type == "stream" and out.name == "stderr":
      assert not _PY_WARNING.search(out.text), (
          f"{path.name}, cell {i}: {out.text[:500]}")
