"""One registry of attention shapes, used by the tests and the benchmarks.

Shape letters: B batch, T query length, S key/value length, N query heads,
K key/value heads, H head dim, Hv value head dim, D model features.
"""

from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class AttentionShape:
  B: int
  T: int
  S: int
  N: int
  K: int
  H: int
  Hv: Optional[int] = None

  @property
  def value_head_dim(self) -> int:
    return self.H if self.Hv is None else self.Hv

  @property
  def id(self) -> str:
    B, T, S, N, K, H, Hv = (self.B, self.T, self.S, self.N, self.K, self.H,
                            self.value_head_dim)
    return f"{B=}_{T=}_{S=}_{N=}_{K=}_{H=}_{Hv=}"


# Small kernel-conformance shapes: ragged T and S, T != S, T = 1, GQA/MQA,
# H not a multiple of 128, Hv != H. Small enough for interpret mode on CPU.
CONFORMANCE = (
    AttentionShape(B=2, T=128, S=128, N=2, K=2, H=64),
    AttentionShape(B=1, T=7, S=200, N=4, K=2, H=32),
    AttentionShape(B=2, T=200, S=7, N=2, K=1, H=80),
    AttentionShape(B=1, T=1, S=513, N=4, K=1, H=32, Hv=64),
    AttentionShape(B=1, T=513, S=128, N=2, K=2, H=128, Hv=32),
    AttentionShape(B=1, T=200, S=200, N=4, K=4, H=64),
)

# The benchmarks' layer shapes (DESIGN: N=8, H=64, D=512).
LAYER_D = 512
LAYER_N = 8
LAYER_H = 64
LAYER_SEQ_LENGTHS = (128, 256, 512, 1024, 2048, 4096)

# GPU timing shapes (bf16): B=4, N=16, H=128, T=S.
GPU_TIMING = tuple(AttentionShape(B=4, T=t, S=t, N=16, K=16, H=128)
                   for t in (1024, 4096, 16384))

# benchmarks/compare.py: its batches, its quick and smoke grids (smoke: tiny
# D, for CI), and the longest-trainable-sequence sweep (B=1, T doubling from
# SWEEP_START_LENGTH up to SWEEP_MAX_LENGTH; SWEEP_REQUIRED_LENGTH must run).
LAYER_BATCHES = (1, 4)
LAYER_QUICK_SEQ_LENGTHS = (256, 1024, 2048)
LAYER_SMOKE_SEQ_LENGTHS = (64, 128)
SMOKE_D = 32
SMOKE_N = 2
SMOKE_H = 16
SWEEP_START_LENGTH = 4096
SWEEP_MAX_LENGTH = 262144
SWEEP_REQUIRED_LENGTH = 65536
