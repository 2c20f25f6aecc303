"""Demo: a small decoder-only transformer built on ``jaxmha`` learns to
reverse sequences.

Run it with ``python -m jaxmha.demo`` (``--help`` for the flags).

Shape letters: B batch, L tokens to reverse, T = 2L model input length,
D model features, N heads, V model vocabulary (``--vocab`` symbols plus the
separator).

The task needs attention: each example is ``x_1 .. x_L SEP x_L .. x_1``. The
model reads it with a causal mask (teacher forcing) and is trained to predict
the next token on the target half only, so the query at position ``L + i``
must fetch the source token at position ``L - 1 - i``: an anti-diagonal in
the attention map. Training data are drawn on device inside the jitted step
from an explicit PRNG key; evaluation uses fresh sequences from a different
seed and reports

* token accuracy: greedy argmax under teacher forcing, target half;
* sequence accuracy: autoregressive greedy generation (no cache: the full
  prefix is recomputed each step in a fixed-size padded buffer, under
  ``jit``), counting a sequence right only if every token is.

Outputs: ``loss_curve.png`` and ``attention_map.png`` in ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import time
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import numpy as np
import optax
from tqdm import tqdm

import jaxmha

SEP = 0  # The separator token; the symbols to reverse are 1 .. vocab.

# Model and optimiser settings; the flags cover the task and the run.
D_MODEL = 64
NUM_HEADS = 4
NUM_LAYERS = 2
MLP_RATIO = 4
ATTENTION_DROPOUT = 0.1
PEAK_LR = 3e-3
WEIGHT_DECAY = 0.01
EVAL_TOKEN_SEQUENCES = 1024
EVAL_GENERATE_SEQUENCES = 256
# The demo's keys use XLA's RngBitGenerator: XLA compiles threefry's hash
# anew for every distinct random shape (each initializer, each batch), which
# on CPU about doubles the compile time of initialisation. Same statistics,
# other numbers than the default threefry keys.
PRNG_IMPL = "rbg"


def make_batch(rng, batch_size: int, seq_len: int, vocab: int) -> jax.Array:
  """Draws reversal examples ``x_1 .. x_L SEP x_L .. x_1``.

  Args:
    rng: a PRNG key.
    batch_size: B.
    seq_len: L, the number of tokens to reverse.
    vocab: the number of distinct symbols; tokens are ``1 .. vocab``.

  Returns:
    ``tokens: (B, 2L + 1)`` int32. The model input is ``tokens[:, :-1]``
    and the next-token targets are ``tokens[:, 1:]``; positions ``>= L`` of
    either are the target half.

  >>> tokens = make_batch(jax.random.key(0), 2, 3, 5)
  >>> tokens.shape
  (2, 7)
  >>> bool((tokens[:, 3] == SEP).all())
  True
  >>> bool((tokens[:, 4:] == tokens[:, 2::-1]).all())
  True
  """
  source = jax.random.randint(rng, (batch_size, seq_len), 1, vocab + 1,
                              dtype=jnp.int32)  # (B, L)
  sep = jnp.full((batch_size, 1), SEP, jnp.int32)
  return jnp.concatenate([source, sep, source[:, ::-1]], axis=1)


class _Block(nn.Module):
  """Pre-LayerNorm causal self-attention and MLP, each residual."""
  d_model: int
  num_heads: int
  mlp_ratio: int
  dropout: float

  @nn.compact
  def __call__(self, x, *, training: bool, return_attention_scores: bool):
    h = nn.LayerNorm(name="ln_attention")(x)
    attention = jaxmha.MultiHeadAttention(
        num_heads=self.num_heads, key_dim=self.d_model // self.num_heads,
        dropout=self.dropout, name="attention")
    out = attention(h, h, use_causal_mask=True, training=training,
                    return_attention_scores=return_attention_scores)
    scores = None
    if return_attention_scores:
      out, scores = out  # scores: (B, N, T, T)
    x = x + out
    h = nn.LayerNorm(name="ln_mlp")(x)
    h = nn.Dense(self.mlp_ratio * self.d_model, name="mlp_in")(h)
    h = nn.Dense(self.d_model, name="mlp_out")(nn.gelu(h))
    return x + h, scores


class ReversalTransformer(nn.Module):
  """A decoder-only transformer: token and learned position embeddings,
  pre-LayerNorm blocks of ``jaxmha.MultiHeadAttention`` (causal) and MLP,
  a final LayerNorm and a linear read-out.

  Attributes:
    vocab_size: V, including the separator.
    max_len: the longest input the position table covers.
    d_model: D.
    num_heads: N; each head has ``D // N`` features.
    num_layers: the number of blocks.
    mlp_ratio: the MLP's hidden width over D.
    dropout: attention-probability dropout, active with ``training=True``
      (pass ``rngs={"dropout": rng}``).

  Shapes only (``jax.eval_shape`` traces without compiling):

  >>> model = ReversalTransformer(vocab_size=6, max_len=8, d_model=16,
  ...                             num_heads=2)
  >>> tokens = jnp.zeros((3, 8), jnp.int32)
  >>> variables = jax.eval_shape(model.init, jax.random.key(0), tokens)
  >>> logits, scores = jax.eval_shape(
  ...     functools.partial(model.apply, return_attention_scores=True),
  ...     variables, tokens)
  >>> logits.shape, len(scores), scores[-1].shape
  ((3, 8, 6), 2, (3, 2, 8, 8))
  """
  vocab_size: int
  max_len: int
  d_model: int = D_MODEL
  num_heads: int = NUM_HEADS
  num_layers: int = NUM_LAYERS
  mlp_ratio: int = MLP_RATIO
  dropout: float = ATTENTION_DROPOUT

  @nn.compact
  def __call__(self, tokens, *, training: bool = False,
               return_attention_scores: bool = False):
    """Next-token logits.

    Args:
      tokens: ``(B, T)`` int, ``T <= max_len``.
      training: apply attention dropout.
      return_attention_scores: also return each layer's attention
        probabilities.

    Returns:
      ``logits: (B, T, V)``, or ``(logits, [scores: (B, N, T, T)] * layers)``.
    """
    T = tokens.shape[1]
    if T > self.max_len:
      raise ValueError(f"`tokens` is longer than the position table: "
                       f"{T=} > max_len={self.max_len}.")
    x = nn.Embed(self.vocab_size, self.d_model, name="token_embedding")(
        tokens)  # (B, T, D)
    positions = self.param("position_embedding",
                           nn.initializers.normal(stddev=0.02),
                           (self.max_len, self.d_model))
    x = x + positions[:T]  # (B, T, D)
    all_scores = []
    for i in range(self.num_layers):
      x, scores = _Block(self.d_model, self.num_heads, self.mlp_ratio,
                         self.dropout, name=f"block_{i}")(
                             x, training=training,
                             return_attention_scores=return_attention_scores)
      all_scores.append(scores)
    x = nn.LayerNorm(name="ln_final")(x)
    logits = nn.Dense(self.vocab_size, name="readout")(x)  # (B, T, V)
    if return_attention_scores:
      return logits, all_scores
    return logits


def _target_loss(logits, tokens, seq_len: int):
  """Mean cross-entropy on the target half; logits: (B, 2L, V)."""
  targets = tokens[:, 1:]  # (B, 2L)
  return optax.softmax_cross_entropy_with_integer_labels(
      logits[:, seq_len:], targets[:, seq_len:]).mean()


def generate(model: ReversalTransformer, params, source) -> jax.Array:
  """Greedy autoregressive decoding of the reversal, without a cache.

  Each step recomputes the whole prefix in a fixed-size buffer (one shape,
  so one compilation under ``jit``); the causal mask keeps the unwritten
  slots, which hold SEP, from influencing the positions already decoded.

  Args:
    model: the model (its ``max_len`` is at least ``2L``).
    params: its ``"params"``.
    source: ``(B, L)`` int, the tokens to reverse.

  Returns:
    ``(B, L)`` int32, the generated target half.

  >>> model = ReversalTransformer(vocab_size=5, max_len=6, d_model=8,
  ...                             num_heads=2)
  >>> variables = jax.eval_shape(model.init, jax.random.key(0),
  ...                            jnp.zeros((1, 6), jnp.int32))
  >>> jax.eval_shape(functools.partial(generate, model),
  ...                variables["params"], jnp.ones((2, 3), jnp.int32))
  ShapeDtypeStruct(shape=(2, 3), dtype=int32)
  """
  B, L = source.shape
  buffer = jnp.full((B, 2 * L), SEP, jnp.int32).at[:, :L].set(source)

  def body(i, carry):
    buffer, out = carry
    logits = model.apply({"params": params}, buffer)  # (B, 2L, V)
    logits_i = jax.lax.dynamic_index_in_dim(logits, L + i, axis=1,
                                            keepdims=False)  # (B, V)
    next_token = logits_i.argmax(-1).astype(jnp.int32)  # (B,)
    out = out.at[:, i].set(next_token)
    # The last token has no slot in the 2L input; it is only output.
    buffer = buffer.at[:, L + 1 + i].set(next_token, mode="drop")
    return buffer, out

  out = jnp.zeros((B, L), jnp.int32)
  _, out = jax.lax.fori_loop(0, L, body, (buffer, out))
  return out


def _make_init(model, tx, seq_len: int):
  """The jitted ``rng -> (params, opt_state)``: one compilation instead of
  one per parameter and optimiser slot, as eager initialisation costs."""

  @jax.jit
  def init(rng):
    params = model.init(rng, jnp.zeros((1, 2 * seq_len), jnp.int32))
    return params["params"], tx.init(params["params"])

  return init


def _make_train_step(model, tx, batch_size: int, seq_len: int, vocab: int):
  """The jitted step: ``(params, opt_state, rng) -> (..., rng', loss)``.

  The batch is drawn on device from the step's key, so a step moves no data
  from the host.
  """

  @jax.jit
  def train_step(params, opt_state, rng):
    rng, data_rng, dropout_rng = jax.random.split(rng, 3)
    tokens = make_batch(data_rng, batch_size, seq_len, vocab)  # (B, 2L + 1)

    def loss_fn(p):
      logits = model.apply({"params": p}, tokens[:, :-1], training=True,
                           rngs={"dropout": dropout_rng})  # (B, 2L, V)
      return _target_loss(logits, tokens, seq_len)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, rng, loss

  return train_step


def _make_evaluate(model, seq_len: int, vocab: int):
  """The jitted held-out evaluation: ``(params, rng) -> dict``.

  Fresh sequences from ``rng``: teacher-forced token accuracy on
  ``EVAL_TOKEN_SEQUENCES``, greedy exact-sequence accuracy on
  ``EVAL_GENERATE_SEQUENCES``, and every layer's attention probabilities
  ``(layers, N, 2L, 2L)`` for the first teacher-forced sequence.
  """
  L = seq_len

  @jax.jit
  def evaluate(params, rng):
    tf_rng, gen_rng = jax.random.split(rng)
    tokens = make_batch(tf_rng, EVAL_TOKEN_SEQUENCES, L, vocab)
    logits, scores = model.apply({"params": params}, tokens[:, :-1],
                                 return_attention_scores=True)
    predicted = logits[:, L:].argmax(-1)  # (B, L)
    tokens_gen = make_batch(gen_rng, EVAL_GENERATE_SEQUENCES, L, vocab)
    generated = generate(model, params, tokens_gen[:, :L])  # (B, L)
    return {
        "token_accuracy": (predicted == tokens[:, L + 1:]).mean(),
        "sequence_accuracy": (generated == tokens_gen[:, L + 1:]).all(
            -1).mean(),
        "example": tokens[0, :-1],  # (2L,)
        "scores": jnp.stack([s[0] for s in scores]),  # (layers, N, 2L, 2L)
    }

  return evaluate


def _save_loss_curve(losses: np.ndarray, path: str) -> None:
  fig = Figure(figsize=(6, 4), dpi=120)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  steps = np.arange(1, len(losses) + 1)
  ax.plot(steps, losses, lw=0.8, alpha=0.4, label="per step")
  window = max(1, min(50, len(losses) // 10))
  if window > 1:
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    ax.plot(steps[window - 1:], smooth, lw=1.6,
            label=f"moving average ({window} steps)")
  ax.set_yscale("log")
  ax.set_xlabel("training step")
  ax.set_ylabel("train loss (cross-entropy, target half)")
  ax.set_title("Sequence reversal: training loss")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path)


def _save_attention_map(probs: np.ndarray, tokens: np.ndarray, layer: int,
                        head: int, mirror_mass: float, seq_len: int,
                        path: str) -> None:
  """probs: (2L, 2L) one head's attention; tokens: (2L,) its input."""
  fig = Figure(figsize=(6.4, 5.6), dpi=120)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  image = ax.imshow(probs, cmap="viridis", vmin=0.0, vmax=1.0,
                    interpolation="nearest")
  fig.colorbar(image, ax=ax, label="attention probability")
  labels = ["SEP" if t == SEP else str(t) for t in tokens]
  ticks = np.arange(len(tokens))
  ax.set_xticks(ticks, [f"{i}:{s}" for i, s in zip(ticks, labels)],
                rotation=90, fontsize=6)
  ax.set_yticks(ticks, [f"{i}:{s}" for i, s in zip(ticks, labels)],
                fontsize=6)
  ax.axhline(seq_len - 0.5, color="white", lw=0.6, ls="--")
  ax.axvline(seq_len - 0.5, color="white", lw=0.6, ls="--")
  ax.set_xlabel("key position (position:token)")
  ax.set_ylabel("query position (position:token)")
  ax.set_title(f"Layer {layer} of {NUM_LAYERS}, head {head}: attention on a "
               f"held-out example\n(mean mass on the mirrored source token: "
               f"{mirror_mass:.2f})", fontsize=10)
  fig.tight_layout()
  fig.savefig(path)


def _positive_int(text: str) -> int:
  value = int(text)
  if value <= 0:
    raise argparse.ArgumentTypeError(f"must be a positive integer; got "
                                     f"{value}")
  return value


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m jaxmha.demo",
      description="Train a small transformer built on "
      "jaxmha.MultiHeadAttention to reverse sequences; write a loss curve "
      "and an attention map.")
  parser.add_argument("--steps", type=_positive_int, default=400,
                      help="training steps (default: %(default)s)")
  parser.add_argument("--seq-len", type=_positive_int, default=12,
                      help="tokens to reverse, L (default: %(default)s)")
  parser.add_argument("--vocab", type=_positive_int, default=16,
                      help="distinct symbols to reverse, plus a separator "
                      "(default: %(default)s)")
  parser.add_argument("--batch-size", type=_positive_int, default=64,
                      help="sequences per step (default: %(default)s)")
  parser.add_argument("--seed", type=int, default=0,
                      help="seed of every PRNG key; evaluation uses seed + 1 "
                      "(default: %(default)s)")
  parser.add_argument("--out", default="demo_out",
                      help="output folder (default: ./%(default)s)")
  parser.add_argument("--quiet", action="store_true",
                      help="no progress bar")
  return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict:
  """Trains, evaluates, plots; prints a summary.

  Args:
    argv: command-line arguments (default ``sys.argv[1:]``).

  Returns:
    A dict of metrics: ``losses`` (list of floats, one per step),
    ``token_accuracy``, ``sequence_accuracy``, ``loss_curve_path``,
    ``attention_map_path``, ``seconds`` (total wall time, compilation
    included), ``first_step_seconds`` (compilation included),
    ``attention_layer`` and ``attention_head`` (the head drawn: the one that
    puts the most attention on the mirrored source token).

  >>> metrics = main(["--steps", "200", "--quiet"])  # doctest: +SKIP
  """
  start = time.perf_counter()
  args = _parse_args(argv)

  L = args.seq_len
  model = ReversalTransformer(vocab_size=args.vocab + 1, max_len=2 * L)
  warmup = max(1, min(100, args.steps // 10))
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=PEAK_LR, warmup_steps=warmup,
      decay_steps=max(args.steps, warmup + 1), end_value=PEAK_LR / 20)
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adamw(schedule, weight_decay=WEIGHT_DECAY))

  init_rng, train_rng = jax.random.split(
      jax.random.key(args.seed, impl=PRNG_IMPL))
  params, opt_state = _make_init(model, tx, L)(init_rng)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  train_step = _make_train_step(model, tx, args.batch_size, L, args.vocab)

  show_bar = not args.quiet and sys.stderr.isatty()
  if not args.quiet:
    print(f"Reversing {L} tokens over {args.vocab} symbols: "
          f"{NUM_LAYERS}-layer transformer, d_model={D_MODEL}, "
          f"{NUM_HEADS} heads, {n_params:,} parameters; "
          f"{args.steps} steps of batch {args.batch_size} on "
          f"{jax.default_backend()}.", flush=True)
  losses = []
  first_step_seconds = math.nan
  with tqdm(total=args.steps, disable=not show_bar, unit="step",
            dynamic_ncols=True, desc="train") as bar:
    for step in range(args.steps):
      step_start = time.perf_counter()
      params, opt_state, train_rng, loss = train_step(params, opt_state,
                                                      train_rng)
      losses.append(loss)  # stays on device: read back once, at the end
      if step == 0:
        loss.block_until_ready()
        first_step_seconds = time.perf_counter() - step_start
      if show_bar:
        # Wait for the step, or the bar would count dispatches, not steps.
        loss.block_until_ready()
        if step % 25 == 0 or step == args.steps - 1:
          bar.set_postfix(loss=f"{float(loss):.4f}")
        bar.update(1)
  losses = np.asarray(jax.device_get(losses), np.float64)

  held_out = jax.device_get(_make_evaluate(model, L, args.vocab)(
      params, jax.random.key(args.seed + 1, impl=PRNG_IMPL)))
  token_accuracy = float(held_out["token_accuracy"])
  sequence_accuracy = float(held_out["sequence_accuracy"])
  scores = np.asarray(held_out["scores"])  # (layers, N, 2L, 2L)
  # Draw the head that reverses most clearly: the most mass, over the
  # target-half queries L + i, on their mirrored keys L - 1 - i. Search all
  # layers, last first: training decides which layer does the lookup (with
  # learned positions it is often the first, the last then reading the
  # answer from the residual stream).
  queries = np.arange(L, 2 * L)
  mirror_mass = scores[:, :, queries, 2 * L - 1 - queries].mean(-1)
  best = int(mirror_mass[::-1].ravel().argmax())  # ties: the later layer
  layer, head = NUM_LAYERS - 1 - best // NUM_HEADS, best % NUM_HEADS

  os.makedirs(args.out, exist_ok=True)
  loss_curve_path = os.path.abspath(os.path.join(args.out, "loss_curve.png"))
  attention_map_path = os.path.abspath(
      os.path.join(args.out, "attention_map.png"))
  _save_loss_curve(losses, loss_curve_path)
  _save_attention_map(scores[layer, head], np.asarray(held_out["example"]),
                      layer, head, float(mirror_mass[layer, head]), L,
                      attention_map_path)
  seconds = time.perf_counter() - start

  tail = losses[-min(10, len(losses)):].mean()
  print(f"final train loss (mean of last {min(10, len(losses))} steps): "
        f"{tail:.4f}")
  print(f"held-out token accuracy (teacher forcing, "
        f"{EVAL_TOKEN_SEQUENCES} sequences): {token_accuracy:.4f}")
  print(f"held-out sequence accuracy (greedy generation, "
        f"{EVAL_GENERATE_SEQUENCES} sequences): {sequence_accuracy:.4f}")
  print(f"loss curve: {loss_curve_path}")
  print(f"attention map (layer {layer}, head {head}; mean mass on the "
        f"mirrored source token {mirror_mass[layer, head]:.2f}, by layer: "
        f"{', '.join(f'{m:.2f}' for m in mirror_mass.max(-1))}): "
        f"{attention_map_path}")
  print(f"elapsed: {seconds:.1f} s (of which the first step, compilation "
        f"included: {first_step_seconds:.1f} s)", flush=True)
  return {
      "losses": losses.tolist(),
      "token_accuracy": token_accuracy,
      "sequence_accuracy": sequence_accuracy,
      "loss_curve_path": loss_curve_path,
      "attention_map_path": attention_map_path,
      "seconds": seconds,
      "first_step_seconds": first_step_seconds,
      "attention_layer": layer,
      "attention_head": head,
  }


if __name__ == "__main__":
  main()
