"""Flash-attention kernels for TPU (Mosaic) and GPU (Triton) in Pallas.

Shape letters: B batch, T query length, S key/value length, N query heads,
K key/value heads, H head dim, Hv value head dim. One layout on every target:
``q (B, T, N, H)``, ``k (B, S, K, H)``, ``v (B, S, K, Hv)``.

``pallas_kernels.reference.attention`` is the specification; every kernel is
tested against it. This package depends on ``jax`` only.
"""

from pallas_kernels import dropout as dropout
from pallas_kernels import masks as masks
from pallas_kernels import reference as reference
from pallas_kernels.api import flash_attention as flash_attention
from pallas_kernels.common import UnsupportedCallError as UnsupportedCallError
from pallas_kernels.masks import EMPTY_ROW_LSE as EMPTY_ROW_LSE
from pallas_kernels.masks import MASK_VALUE as MASK_VALUE
from pallas_kernels.masks import MaskSpec as MaskSpec

__all__ = [
    "EMPTY_ROW_LSE",
    "MASK_VALUE",
    "MaskSpec",
    "UnsupportedCallError",
    "dropout",
    "flash_attention",
    "masks",
    "reference",
]
