"""Scaled dot-product attention: which kernel, its mask, and the softmax(QK^T)V core.

Three kernels compute the same attention (config.model.attention_impl):
- xla: jax.nn.dot_product_attention's XLA path (an einsum path when training with
  attention dropout) under a boolean mask Bx1xLqxLk, True where a query may attend
  to a key, broadcast over heads.
- splash: the Pallas TPU splash-attention kernel under segment ids (a query attends
  to keys of its own id), shard_mapped over batch and heads. Off TPU it runs in
  Pallas interpret mode (tests).
- cudnn: cuDNN flash attention (GPU), padding passed as sequence lengths, which is
  right only when each row's real tokens come first.
`auto` (the default) picks one by the devices the model runs on (`resolve_impl`).
The fused kernels (splash, cudnn) have no attention-probability dropout.

A model builds one `Mask` per forward pass (`make_mask`), in the form its kernel
takes. Causality is kept apart from the mask (`causal=True`) so each kernel uses
its own causal path (splash's CausalMask, cuDNN's `is_causal`).
"""

import math
import warnings

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec as P

from plmjax.errors import ConfigError
from plmjax.models import dropout
from plmjax.models.config import ModelConfig

SPLASH_BLOCK = 128  # splash's q and kv tiles; sequences are padded to a multiple
CUDNN_DTYPES = ("bfloat16", "float16")
CUDNN_MAX_HEAD_DIM = 128  # (256 from Hopper on; 128 holds on every cuDNN GPU)


# ------------------------------------------------------------ choosing a kernel


def device_platform(mesh: jax.sharding.Mesh | None = None) -> str:
  """'tpu', 'gpu', 'cpu', ... of `mesh`'s devices; by default of the devices the model is
  traced for: the context mesh's (the trainer's; `plmjax compile`'s abstract TPU
  devices), else the default device's."""
  if mesh is not None:
    platform = mesh.devices.flat[0].platform
  else:
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    platform = device.platform if device is not None else jax.devices()[0].platform
  return "gpu" if platform == "cuda" else platform


def resolve_impl(cfg: ModelConfig, platform: str, packed: bool) -> tuple[str, str]:
  """(implementation, one-line reason) for cfg.attention_impl on `platform`;
  packed: rows carry segment ids (data.packing)."""
  want, rate = cfg.attention_impl, cfg.attention_dropout_rate
  if cfg.arch == "t5":
    return "xla", "T5's relative position bias: xla (splash and cuDNN take no bias)"
  if want == "xla":
    return "xla", "config.model.attention_impl=xla"
  if want == "splash":
    if platform == "tpu":
      return "splash", "config.model.attention_impl=splash"
    return "splash", (f"config.model.attention_impl=splash, in Pallas interpret mode on "
                      f"{platform} (slow)")
  if want == "cudnn":
    if platform != "gpu":
      raise ConfigError(f"config.model.attention_impl=cudnn needs a GPU but the model runs on "
                        f"{platform}; use attention_impl=auto")
    if packed:
      return "xla", "config.model.attention_impl=cudnn takes no segment ids: packed rows use xla"
    unsupported = _cudnn_unsupported(cfg, packed)
    if unsupported:
      raise ConfigError(f"config.model.attention_impl=cudnn cannot run this model: "
                        f"{unsupported}; use attention_impl=auto")
    return "cudnn", "config.model.attention_impl=cudnn (padding as lengths: real tokens first)"
  if rate > 0:
    return "xla", (f"auto: config.model.attention_dropout_rate={rate} > 0 and the fused "
                   "kernels have no attention dropout")
  if platform == "tpu":
    return "splash", "auto: splash attention on TPU"
  if platform == "gpu":
    unsupported = _cudnn_unsupported(cfg, packed)
    if unsupported:
      return "xla", f"auto: cuDNN cannot run this model ({unsupported})"
    return "cudnn", "auto: cuDNN flash attention on GPU (padding as lengths: real tokens first)"
  return "xla", f"auto: no fused attention kernel on {platform}"


def _cudnn_unsupported(cfg: ModelConfig, packed: bool) -> str:
  if packed:
    return "packed rows: jax.nn.dot_product_attention passes no segment ids to cuDNN"
  if cfg.dtype not in CUDNN_DTYPES:
    return f"config.model.dtype={cfg.dtype}; cuDNN takes bfloat16 or float16"
  if cfg.head_dim > CUDNN_MAX_HEAD_DIM or cfg.head_dim % 8:
    return f"head dim {cfg.head_dim}; cuDNN takes a multiple of 8 up to {CUDNN_MAX_HEAD_DIM}"
  return ""


# ------------------------------------------------------------------------ masks


def padding_mask(attention_mask_BxL: jax.Array, query_len: int | None = None) -> jax.Array:
  """Key-padding mask from a 1 (real) / 0 (pad) mask: Bx1xLqxLk."""
  valid_BxL = attention_mask_BxL.astype(bool)
  batch, length = valid_BxL.shape
  query_len = length if query_len is None else query_len
  return jnp.broadcast_to(valid_BxL[:, None, None, :], (batch, 1, query_len, length))


def segment_mask(segment_ids_BxL: jax.Array) -> jax.Array:
  """Packed rows: a token attends only to keys of its own nonzero segment id."""
  same_BxLxL = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
  real_key_Bx1xL = (segment_ids_BxL != 0)[:, None, :]
  return (same_BxLxL & real_key_Bx1xL)[:, None]


def build_mask(attention_mask_BxL: jax.Array | None = None,
               segment_ids_BxL: jax.Array | None = None) -> jax.Array | None:
  """Bx1xLxL mask from segment ids (which supersede) or a padding mask; None if neither."""
  if segment_ids_BxL is not None:
    return segment_mask(segment_ids_BxL)
  if attention_mask_BxL is not None:
    return padding_mask(attention_mask_BxL)
  return None


def causal_mask(query_len: int, key_len: int, offset: jax.Array | int = 0) -> jax.Array:
  """1x1xLqxLk: query t (at absolute position offset + t) sees keys j <= offset + t."""
  q_pos = jnp.arange(query_len)[:, None] + offset
  k_pos = jnp.arange(key_len)[None, :]
  return (k_pos <= q_pos)[None, None]


def combine(*masks: jax.Array | None) -> jax.Array | None:
  """Logical AND of the masks that are not None."""
  out = None
  for mask in masks:
    if mask is not None:
      out = mask if out is None else out & mask
  return out


@flax.struct.dataclass
class Mask:
  """A forward pass's mask in the form its kernel (`impl`) takes; None fields: no mask."""
  impl: str = flax.struct.field(pytree_node=False)
  dense: jax.Array | None = None  # xla: Bx1xLxS, True = may attend
  q_ids_BxL: jax.Array | None = None  # splash: a query attends to keys of its id
  kv_ids_BxL: jax.Array | None = None
  lengths_B: jax.Array | None = None  # cudnn: real tokens, which come first


def make_mask(cfg: ModelConfig, attention_mask_BxL: jax.Array | None = None,
              segment_ids_BxL: jax.Array | None = None, impl: str | None = None) -> Mask:
  """The Mask for cfg's kernel on this trace's devices (or for `impl`); segment ids
  (packed rows) supersede attention_mask."""
  packed = segment_ids_BxL is not None
  if impl is None:
    impl, reason = resolve_impl(cfg, device_platform(), packed)
    if cfg.attention_impl not in ("auto", impl):
      warnings.warn(f"plmjax: {reason}", stacklevel=2)
  if impl == "splash":
    if packed:  # padding (0) attends to padding: no row is empty
      ids = segment_ids_BxL.astype(jnp.int32)
      return Mask("splash", q_ids_BxL=ids, kv_ids_BxL=ids)
    if attention_mask_BxL is None:
      return Mask("splash")
    # As xla's key-padding mask: every query (padding too) attends to the real keys.
    kv_ids = attention_mask_BxL.astype(jnp.int32)
    return Mask("splash", q_ids_BxL=jnp.ones_like(kv_ids), kv_ids_BxL=kv_ids)
  if impl == "cudnn":
    lengths = None if attention_mask_BxL is None else attention_mask_BxL.astype(jnp.int32).sum(-1)
    return Mask("cudnn", lengths_B=lengths)
  return Mask("xla", dense=build_mask(attention_mask_BxL, segment_ids_BxL))


# ---------------------------------------------------------------------- kernels


def dot_product_attention(q_BxLxHxK: jax.Array, k_BxSxHxK: jax.Array, v_BxSxHxK: jax.Array,
                          mask: Mask | jax.Array | None, *, causal: bool, cfg: ModelConfig,
                          deterministic: bool = True,
                          dropout_rng: jax.Array | None = None) -> jax.Array:
  """softmax(q k^T / sqrt(K) + mask) v with the softmax in float32; returns BxLxHxK.

  `mask`: a Mask (its impl picks the kernel) or a boolean Bx1xLxS array (xla).
  The xla path computes logits with preferred_element_type=float32 and the softmax in
  float32 even for bfloat16 inputs; training with attention dropout takes the explicit
  einsum path (same math), which the fused kernels do not have.
  """
  use_dropout = not deterministic and cfg.attention_dropout_rate > 0.0
  if isinstance(mask, Mask):
    if mask.impl != "xla" and use_dropout:
      raise ConfigError(f"attention_impl {mask.impl} has no attention dropout; set "
                        "config.model.attention_dropout_rate=0")
    if mask.impl == "splash":
      return splash_attention(q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, mask.q_ids_BxL, mask.kv_ids_BxL,
                              causal=causal)
    if mask.impl == "cudnn":
      return cudnn_attention(q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, mask.lengths_B, causal=causal)
    mask = mask.dense
  # float16 takes the einsum path too: the fused xla path asks for an F16 x F16 -> F32 dot
  # that XLA:CPU refuses at compile time.
  if not use_dropout and q_BxLxHxK.dtype != jnp.float16:
    return jax.nn.dot_product_attention(q_BxLxHxK, k_BxSxHxK, v_BxSxHxK, mask=mask,
                                        is_causal=causal, implementation="xla")
  if use_dropout and dropout_rng is None:
    raise ValueError("attention dropout needs dropout_rng when deterministic=False")
  if causal:
    mask = combine(mask, causal_mask(q_BxLxHxK.shape[1], k_BxSxHxK.shape[1]))
  scale = 1.0 / np.sqrt(q_BxLxHxK.shape[-1])
  logits_BxHxLxS = jnp.einsum("blhk,bshk->bhls", q_BxLxHxK, k_BxSxHxK,
                              preferred_element_type=jnp.float32) * scale
  if mask is not None:
    # Same fill value as jax.nn.dot_product_attention, so fully masked rows
    # (padding queries) become uniform instead of NaN.
    logits_BxHxLxS = jnp.where(mask, logits_BxHxLxS, -0.7 * jnp.finfo(jnp.float32).max)
  probs_BxHxLxS = jax.nn.softmax(logits_BxHxLxS, axis=-1)
  if use_dropout:
    probs_BxHxLxS = dropout.apply(probs_BxHxLxS, dropout_rng, cfg.attention_dropout_rate)
  return jnp.einsum("bhls,bshk->blhk", probs_BxHxLxS.astype(v_BxSxHxK.dtype), v_BxSxHxK)


def cudnn_attention(q_BxLxHxK: jax.Array, k_BxLxHxK: jax.Array, v_BxLxHxK: jax.Array,
                    lengths_B: jax.Array | None, *, causal: bool,
                    implementation: str = "cudnn") -> jax.Array:
  """cuDNN flash attention with padding as lengths: query and key t < lengths[b] are real.

  Right only when each row's real tokens come first (the pipelines pad on the right);
  query rows past the length are padding, and cuDNN leaves them at zero.
  implementation="xla" runs the very same arguments through XLA (tests, off GPU).
  """
  return jax.nn.dot_product_attention(
      q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, query_seq_lengths=lengths_B,
      key_value_seq_lengths=lengths_B, is_causal=causal, implementation=implementation)


def splash_attention(q_BxLxHxK: jax.Array, k_BxLxHxK: jax.Array, v_BxLxHxK: jax.Array,
                     q_ids_BxL: jax.Array | None, kv_ids_BxL: jax.Array | None, *,
                     causal: bool, interpret: bool | None = None) -> jax.Array:
  """Self-attention with the Pallas splash kernel; returns BxLxHxK.

  A query attends to the keys whose id equals its own (ids None: all to all). A query
  row with no such key (a row of padding only) averages all the values, as xla's.
  L is padded up to a multiple of SPLASH_BLOCK with ids 0 (never a real key's).
  Inside a mesh the kernel runs per shard (shard_map) over the mesh axes the logical
  rules give 'batch' and 'act_heads'. interpret (default: off TPU) runs the kernel in
  Pallas interpret mode.
  """
  batch, length, heads, head_dim = q_BxLxHxK.shape
  if interpret is None:
    interpret = device_platform() != "tpu"
  padded = -(-length // SPLASH_BLOCK) * SPLASH_BLOCK
  if padded != length:
    extra = padded - length
    ones = jnp.ones((batch, length), jnp.int32)
    q_ids_BxL, kv_ids_BxL = (jnp.pad(ones if ids is None else ids, ((0, 0), (0, extra)))
                             for ids in (q_ids_BxL, kv_ids_BxL))
    q_BxLxHxK, k_BxLxHxK, v_BxLxHxK = (
        jnp.pad(x, ((0, 0), (0, extra), (0, 0), (0, 0)))
        for x in (q_BxLxHxK, k_BxLxHxK, v_BxLxHxK))
  # The kernel does not scale the logits.
  q_BxLxHxK = q_BxLxHxK * jnp.asarray(1.0 / math.sqrt(head_dim), q_BxLxHxK.dtype)

  def per_shard(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, q_ids_BxL, kv_ids_BxL):
    shape = (padded, padded)
    one_head = splash.CausalMask(shape) if causal else splash.FullMask(shape)
    kernel = splash.make_splash_mha(
        splash.MultiHeadMask([one_head] * q_BxLxHxK.shape[2]), head_shards=1, q_seq_shards=1,
        block_sizes=splash.BlockSizes.get_default(), interpret=interpret)
    ids = None if q_ids_BxL is None else splash.SegmentIds(q_ids_BxL, kv_ids_BxL)
    q_BxHxLxK, k_BxHxLxK, v_BxHxLxK = (jnp.swapaxes(x, 1, 2)
                                       for x in (q_BxLxHxK, k_BxLxHxK, v_BxLxHxK))
    out_BxHxLxK = jax.vmap(kernel)(q_BxHxLxK, k_BxHxLxK, v_BxHxLxK, segment_ids=ids)
    return jnp.swapaxes(out_BxHxLxK, 1, 2)

  specs = _splash_specs(batch, heads)
  if specs is not None:
    qkv_spec, ids_spec = specs
    per_shard = jax.shard_map(per_shard, in_specs=(qkv_spec,) * 3 + (ids_spec,) * 2,
                              out_specs=qkv_spec, check_vma=False)
  return per_shard(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, q_ids_BxL, kv_ids_BxL)[:, :length]


def _splash_specs(batch: int, heads: int):
  """(BxLxHxK spec, BxL spec) in the context mesh, or None outside one. A dimension
  its mesh axes do not divide (model.init's one-row batch) stays whole."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  batch_axes, head_axes = nn.logical_to_mesh_axes(("batch", "act_heads"),
                                                  nn.get_logical_axis_rules())

  def usable(axes, size):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return axes if names and size % math.prod(mesh.shape[a] for a in names) == 0 else None

  batch_axes, head_axes = usable(batch_axes, batch), usable(head_axes, heads)
  return P(batch_axes, None, head_axes, None), P(batch_axes, None)
