"""Two processes, one mesh: the layer sharded across ``jax.distributed``.

Shape letters: B batch, T sequence length, D model features.

:func:`launch` starts two worker processes on localhost (2 CPU devices each,
gloo collectives), which join one 4-device mesh ``("data", "seq")`` whose
``seq`` axis spans the two processes. Each runs the same jitted forward and
backward of the layer with context parallelism over ``seq`` (so the ring's
``ppermute`` crosses processes) and data parallelism over ``data``, and
checks its addressable shards against a single-process run of the plain
layer on its own CPU. JAX's runtime does all of it: ``jax.distributed``
for the cluster, ``NamedSharding`` and ``shard_map`` for the program.

Run: ``python -m tests.multidevice.multiprocess_checks`` (the launcher);
``--worker ID PORT`` is how the launcher starts each process.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

from tests.multidevice.harness import REPO, env

MODULE = "tests.multidevice.multiprocess_checks"
NUM_PROCESSES = 2
LOCAL_DEVICES = 2


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def launch(timeout: float = 240.0) -> list[tuple[int, str]]:
  """Runs the workers; returns ``[(exit status, output)]`` per process.

  A worker still running after ``timeout`` seconds is killed (with its
  process group) and reported with status -9.
  """
  port = free_port()
  procs, logs = [], []
  try:
    for i in range(NUM_PROCESSES):
      log = tempfile.TemporaryFile(mode="w+")
      logs.append(log)
      procs.append(subprocess.Popen(
          [sys.executable, "-m", MODULE, "--worker", str(i), str(port)],
          cwd=REPO, env=env(devices=LOCAL_DEVICES), stdout=log,
          stderr=subprocess.STDOUT, start_new_session=True))
    deadline = time.monotonic() + timeout
    for p in procs:
      try:
        p.wait(timeout=max(0.0, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        pass
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
  results = []
  for p, log in zip(procs, logs):
    log.seek(0)
    results.append((p.returncode, log.read()))
    log.close()
  return results


def worker(process_id: int, port: int) -> None:
  """One process of the cluster: sharded step vs. a local one."""
  # Imported here: the launcher and the main test process need none of it.
  # pylint: disable=g-import-not-at-top
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.config.update("jax_default_matmul_precision", "highest")
  jax.distributed.initialize(coordinator_address=f"localhost:{port}",
                             num_processes=NUM_PROCESSES,
                             process_id=process_id,
                             initialization_timeout=120)
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P

  import jaxmha
  from tests.tolerances import GRAD, assert_close
  # pylint: enable=g-import-not-at-top

  assert jax.process_count() == NUM_PROCESSES, jax.process_count()
  assert jax.local_device_count() == LOCAL_DEVICES
  # Rows of jax.devices() are processes; make "seq" span them.
  by_process = np.array(sorted(jax.devices(), key=lambda d: (
      d.process_index, d.id))).reshape(NUM_PROCESSES, LOCAL_DEVICES)
  mesh = Mesh(by_process.T, ("data", "seq"),
              axis_types=(jax.sharding.AxisType.Auto,) * 2)

  B, T, D = 4, 32, 16
  rng = np.random.default_rng(0)  # the same data in every process
  x = rng.standard_normal((B, T, D), np.float32)
  w = rng.standard_normal((B, T, D), np.float32)
  cfg = jaxmha.MHAConfig(num_heads=4, key_dim=8)
  params = jax.tree.map(np.asarray, jaxmha.init_params(
      jax.random.key(0), cfg, x.shape, x.shape))

  def loss(cfg, params, x, w):
    out = jaxmha.apply(params, cfg, x, x, use_causal_mask=True)
    return jnp.sum(out * w), out

  step = lambda cfg: jax.jit(jax.value_and_grad(
      lambda p, x, w: loss(cfg, p, x, w), argnums=(0, 1), has_aux=True))
  # The single-process run, on this process's own first device.
  (want, want_out), (want_gp, want_gx) = step(cfg)(params, x, w)

  def put(a, spec):
    sharding = NamedSharding(mesh, spec)
    return jax.make_array_from_callback(a.shape, sharding, lambda i: a[i])

  with jax.set_mesh(mesh):
    gx, gw = put(x, P("data", "seq")), put(w, P("data", "seq"))
    gp = jax.tree.map(lambda a: put(a, P()), params)
    (got, out), (grad_p, grad_x) = step(
        cfg.replace(context_parallel_axis="seq"))(gp, gx, gw)

  assert_close(got.addressable_data(0), want, err_msg="loss")
  for name, sharded, full in (("out", out, want_out),
                              ("dx", grad_x, want_gx)):
    assert not sharded.is_fully_addressable
    for shard in sharded.addressable_shards:
      assert_close(shard.data, np.asarray(full)[shard.index], GRAD,
                   err_msg=f"{name}{shard.index}")
  for g, want_g in zip(jax.tree.leaves(grad_p), jax.tree.leaves(want_gp)):
    assert_close(g.addressable_data(0), want_g, GRAD, err_msg="dparams")
  print(f"process {process_id}: ok ({len(out.addressable_shards)} of "
        f"{len(out.sharding.device_set)} shards checked)", flush=True)
  jax.distributed.shutdown()


if __name__ == "__main__":
  if len(sys.argv) == 4 and sys.argv[1] == "--worker":
    worker(int(sys.argv[2]), int(sys.argv[3]))
  else:
    results = launch()
    for i, (code, output) in enumerate(results):
      print(f"--- process {i}: exit {code}\n{output}")
    sys.exit(0 if all(code == 0 for code, _ in results) else 1)
