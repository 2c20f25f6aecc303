"""jaxmha: Keras 3's MultiHeadAttention as a JAX-native library.

Shape letters: B batch, T query length, S key/value length, N query heads,
K key/value heads, H key head dim, Hv value head dim, D query features,
E output features.

Pure functions (:func:`init_params`, :func:`apply`), a Flax module
(:class:`MultiHeadAttention`), and Pallas flash-attention kernels underneath
(``pallas_kernels``).
"""

from jaxmha import config as config
from jaxmha.config import MHAConfig as MHAConfig
from jaxmha.dispatch import Explanation as Explanation
from jaxmha.functional import apply as apply
from jaxmha.functional import explain as explain
from jaxmha.functional import init_params as init_params
from jaxmha.functional import param_shapes as param_shapes
from jaxmha.regularizers import apply_constraints as apply_constraints
from jaxmha.regularizers import constraints_transform as constraints_transform
from jaxmha.regularizers import regularization_loss as regularization_loss

__version__ = "0.1.0"
from jaxmha.linen import MultiHeadAttention as MultiHeadAttention
from jaxmha.interop import from_keras as from_keras
from jaxmha.interop import to_keras as to_keras
from jaxmha import decode as decode
from jaxmha.decode import KVCache as KVCache
from jaxmha.decode import init_cache as init_cache
from jaxmha import nnx as nnx
from jaxmha import ring as ring
from jaxmha import sharding as sharding
from jaxmha.ring import context_parallel as context_parallel
from jaxmha.ring import ring_attention as ring_attention
from jaxmha.sharding import param_partition_specs as param_partition_specs
from jaxmha.sharding import shard_params as shard_params
from pallas_kernels.common import UnsupportedCallError as UnsupportedCallError
