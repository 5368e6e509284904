"""Transformer building blocks shared by BERT and GPT-2, and the precision policy.

Every parameter is created here (through `dense`, `embed`, `layer_norm`), so
the policy lives in one place: weights in `cfg.weights_dtype`, compute in
`cfg.compute_dtype`, LayerNorm statistics in float32 (flax's default), logits in
float32, and logical axis names on every parameter for sharding
(plmjax/config.py DEFAULT_AXIS_RULES maps them to the mesh).

Module and parameter names mirror Hugging Face's (BertLayer, GPT2Block) so that
checkpoint conversion is a rename. With model.scan_layers the layer stack runs under
nn.scan (`layer_stack`), its parameters stacked on a leading "layers" axis;
`unstack_layers` / `stack_layers` convert between that tree and the per-layer one.
"""

import re

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from plmjax.models import attention
from plmjax.models.config import ModelConfig
from plmjax.models.dropout import Dropout

ACT_EMBED = ("batch", "length", "act_embed")
ACT_MLP = ("batch", "length", "act_mlp")


def dense(cfg: ModelConfig, features: int, axes: tuple[str, str], name: str,
          stddev: float | None = None) -> nn.Dense:
  """nn.Dense with the precision policy; kernel [in, out] named `axes`."""
  stddev = cfg.initializer_range if stddev is None else stddev
  return nn.Dense(
      features, dtype=cfg.compute_dtype, param_dtype=cfg.weights_dtype,
      kernel_init=nn.with_logical_partitioning(nn.initializers.normal(stddev), axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[1:]),
      name=name)


class DenseGeneral(nn.Module):
  """`dense` for kernels of more than two axes: contracts x's trailing dims with the kernel's
  leading ones; kernel [in..., out...] named `axes`, bias [out...] named as the out dims.

  Unlike nn.DenseGeneral it initialises the kernel in its own shape, so the logical names
  fit while a mesh is active; the values equal `dense`'s of the flat [in, out] matrix.
  """
  cfg: ModelConfig
  features: tuple[int, ...]
  axes: tuple[str, ...]
  stddev: float

  @nn.compact
  def __call__(self, x):
    cfg, n_out = self.cfg, len(self.features)
    n_in = len(self.axes) - n_out
    kernel = self.param(
        "kernel", nn.with_logical_partitioning(nn.initializers.normal(self.stddev), self.axes),
        x.shape[x.ndim - n_in:] + tuple(self.features), cfg.weights_dtype)
    bias = self.param(
        "bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), self.axes[n_in:]),
        tuple(self.features), cfg.weights_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=cfg.compute_dtype)
    contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
    return jax.lax.dot_general(x, kernel, (contract, ((), ()))) + bias


def dense_general(cfg: ModelConfig, features: tuple[int, ...], axes: tuple[str, ...], name: str,
                  stddev: float | None = None) -> DenseGeneral:
  stddev = cfg.initializer_range if stddev is None else stddev
  return DenseGeneral(cfg, tuple(features), tuple(axes), stddev, name=name)


def embed(cfg: ModelConfig, num: int, axes: tuple[str, str], name: str) -> nn.Embed:
  return nn.Embed(
      num, cfg.hidden_size, dtype=cfg.compute_dtype, param_dtype=cfg.weights_dtype,
      embedding_init=nn.with_logical_partitioning(
          nn.initializers.normal(cfg.initializer_range), axes),
      name=name)


def layer_norm(cfg: ModelConfig, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=cfg.layer_norm_eps, dtype=cfg.compute_dtype, param_dtype=cfg.weights_dtype,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
      name=name)


def tied_logits(x_BxLxD: jax.Array, table_VxD: jax.Array, cfg: ModelConfig) -> jax.Array:
  """x @ table.T in the compute dtype, accumulated and returned in float32."""
  dtype = cfg.compute_dtype
  return jnp.einsum("...d,vd->...v", x_BxLxD.astype(dtype), table_VxD.astype(dtype),
                    preferred_element_type=jnp.float32)


def maybe_remat(layer_cls, cfg: ModelConfig, static_argnums: tuple[int, ...]):
  """Wraps a layer class in nn.remat per cfg.remat ("none", "full", "dots").

  static_argnums count `self` as 0 (flax's lifted-transform convention). Under scan the
  loop already keeps XLA from merging the recomputation away, so prevent_cse is off.
  """
  if cfg.remat == "none":
    return layer_cls
  policy = None if cfg.remat == "full" else jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  return nn.remat(layer_cls, policy=policy, static_argnums=static_argnums,
                  prevent_cse=not cfg.scan_layers)


def layer_stack(cfg: ModelConfig, layer_cls, name: str, x, *args, remat_argnums=None):
  """Runs x through cfg.num_layers layers `layer_cls(cfg)(x, *args)` (remat per cfg.remat
  when remat_argnums, the static ones, are given).

  Unscanned: modules {name}_0 .. {name}_{N-1}. With cfg.scan_layers: one module `name`
  under nn.scan, its parameters (and KV cache) stacked on a leading "layers" axis; each
  layer draws its own dropout rng from the split stream. Call inside a compact method.
  """
  if remat_argnums is not None:
    layer_cls = maybe_remat(layer_cls, cfg, remat_argnums)
  if not cfg.scan_layers:
    for i in range(cfg.num_layers):
      x = layer_cls(cfg, name=f"{name}_{i}")(x, *args)
    return x
  scan = nn.scan(lambda layer, carry, *rest: (layer(carry, *rest), None),
                 variable_axes={"params": 0, "cache": 0},
                 split_rngs={"params": True, "dropout": True},
                 in_axes=(nn.broadcast,) * len(args), length=cfg.num_layers,
                 metadata_params={nn.PARTITION_NAME: "layers"})
  x, _ = scan(layer_cls(cfg, name=name), x, *args)
  return x


# Stacked (scanned) modules and their per-layer names: `layer` [N, ...] <-> layer_0..layer_{N-1}.
STACKS = ("layer", "h")
_PER_LAYER = re.compile(r"(" + "|".join(STACKS) + r")_(\d+)")


def _is_node(value) -> bool:
  return hasattr(value, "items")


def _layer_slice(leaf, i: int):
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype)
  return leaf[i]


def unstack_layers(tree) -> dict:
  """Splits each stacked `layer`/`h` subtree (leading axis N) into per-layer subtrees
  layer_0..layer_{N-1} / h_0..h_{N-1}: the unscanned model's tree. Per-layer trees come back
  as they are. Leaves: unboxed arrays or jax.ShapeDtypeStructs."""
  out = {}
  for key, value in tree.items():
    if not _is_node(value):
      out[key] = value
    elif key in STACKS:
      n = jax.tree.leaves(value)[0].shape[0]
      for i in range(n):
        out[f"{key}_{i}"] = jax.tree.map(lambda leaf, i=i: _layer_slice(leaf, i), dict(value))
    else:
      out[key] = unstack_layers(value)
  return out


def stack_layers(tree) -> dict:
  """The inverse of unstack_layers: layer_0..layer_{N-1} -> `layer` with a leading axis N
  (numpy arrays). Stacked trees come back as they are; a set of per-layer subtrees that does
  not run 0..N-1 or whose trees differ stays per layer."""
  groups, out = {}, {}
  for key, value in tree.items():
    m = _PER_LAYER.fullmatch(key)
    if m and _is_node(value):
      groups.setdefault(m.group(1), {})[int(m.group(2))] = value
    else:
      out[key] = stack_layers(value) if _is_node(value) else value
  for name, layers in groups.items():
    subtrees = [dict(layers[i]) for i in sorted(layers)]
    if (sorted(layers) == list(range(len(layers)))
        and len({jax.tree.structure(t) for t in subtrees}) == 1):
      out[name] = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *subtrees)
    else:
      out.update({f"{name}_{i}": stack_layers(layers[i]) for i in sorted(layers)})
  return out


def is_stacked(tree) -> bool:
  """Whether the tree holds a scanned layer stack anywhere."""
  return any(_is_node(v) and (k in STACKS or is_stacked(v)) for k, v in tree.items())


def match_layer_layout(tree, like) -> dict:
  """`tree` stacked or per layer as `like` is (e.g. a checkpoint for a model whose
  model.scan_layers differs from the run that wrote it)."""
  return stack_layers(tree) if is_stacked(like) else unstack_layers(tree)


def split_heads(x_BxLxD: jax.Array, cfg: ModelConfig) -> jax.Array:
  """BxLxD -> BxLxHxK with each head's K features contiguous (as Hugging Face)."""
  return x_BxLxD.reshape(*x_BxLxD.shape[:-1], cfg.num_heads, cfg.head_dim)


def merge_heads(x_BxLxHxK: jax.Array) -> jax.Array:
  return x_BxLxHxK.reshape(*x_BxLxHxK.shape[:-2], -1)


# --------------------------------------------------------------------- BERT


class BertSelfAttention(nn.Module):
  """query/key/value projections and bidirectional attention."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, mask, deterministic: bool):
    cfg = self.cfg
    q, k, v = (split_heads(dense(cfg, cfg.hidden_size, ("embed", "heads"), n)(x_BxLxD), cfg)
               for n in ("query", "key", "value"))
    rng = None if deterministic or cfg.attention_dropout_rate == 0 else self.make_rng("dropout")
    out_BxLxHxK = attention.dot_product_attention(
        q, k, v, mask, causal=False, cfg=cfg, deterministic=deterministic, dropout_rng=rng)
    return merge_heads(out_BxLxHxK)


class BertResidualOutput(nn.Module):
  """dense -> dropout -> LayerNorm(x + residual): BertSelfOutput and BertOutput."""
  cfg: ModelConfig
  in_axis: str

  @nn.compact
  def __call__(self, x, residual_BxLxD, deterministic: bool):
    cfg = self.cfg
    x = dense(cfg, cfg.hidden_size, (self.in_axis, "embed"), "dense")(x)
    x = Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    return layer_norm(cfg, "LayerNorm")(x + residual_BxLxD)


class BertAttention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, mask, deterministic: bool):
    h = BertSelfAttention(self.cfg, name="self")(x_BxLxD, mask, deterministic)
    return BertResidualOutput(self.cfg, "heads", name="output")(h, x_BxLxD, deterministic)


class BertIntermediate(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD):
    h = dense(self.cfg, self.cfg.intermediate_size, ("embed", "mlp"), "dense")(x_BxLxD)
    h_BxLxI = nn.with_logical_constraint(h, ACT_MLP)
    return nn.gelu(h_BxLxI, approximate=False)


class BertLayer(nn.Module):
  """Post-LN encoder layer: LN(x + attn(x)), then LN(x + mlp(x))."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, mask, deterministic: bool):
    x = BertAttention(self.cfg, name="attention")(x_BxLxD, mask, deterministic)
    h_BxLxI = BertIntermediate(self.cfg, name="intermediate")(x)
    x = BertResidualOutput(self.cfg, "mlp", name="output")(h_BxLxI, x, deterministic)
    return nn.with_logical_constraint(x, ACT_EMBED)


# --------------------------------------------------------------------- GPT-2


class GPT2Attention(nn.Module):
  """Causal attention with fused c_attn (q, k, v) and an optional KV cache.

  With decode=True and an initialised cache, the new keys/values are written at
  the layer's `cache_index` and the queries attend over the whole cache under
  `mask` (built by the model from the cached key mask and the query positions).
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, mask, deterministic: bool, decode: bool):
    cfg = self.cfg
    d = cfg.hidden_size
    resid_std = cfg.initializer_range / (2 * cfg.num_layers) ** 0.5
    # Heads are an axis of their own so that they, not the fused 3D columns, split over
    # `tensor`: each shard computes whole heads (Megatron). HF's [D, 3D] is this, reshaped.
    c_attn = dense_general(cfg, (3, cfg.num_heads, cfg.head_dim), ("embed", "qkv", "heads", "kv"),
                           "c_attn")
    qkv_BxLx3xHxK = c_attn(x_BxLxD)
    q, k, v = (qkv_BxLx3xHxK[:, :, i] for i in range(3))
    causal = True
    if decode:
      k, v, causal = self._update_cache(k, v)
    rng = None if deterministic or cfg.attention_dropout_rate == 0 else self.make_rng("dropout")
    out_BxLxHxK = attention.dot_product_attention(
        q, k, v, mask, causal=causal, cfg=cfg, deterministic=deterministic, dropout_rng=rng)
    c_proj = dense_general(cfg, (d,), ("heads", "kv", "embed"), "c_proj", stddev=resid_std)
    out = c_proj(out_BxLxHxK)  # partial sums per head shard: one all-reduce over `tensor`
    return Dropout(cfg.dropout_rate)(out, deterministic=deterministic)

  def _update_cache(self, k_BxLxHxK, v_BxLxHxK):
    """Appends k, v to the cache; returns (keys, values, causal) to attend over.

    At the init call that creates the cache: the new k, v, causal. Afterwards: the
    whole cache, with causality left to the model's decode mask.
    """
    initialised = self.has_variable("cache", "cached_key")
    cached_k = self.variable("cache", "cached_key", jnp.zeros, k_BxLxHxK.shape, k_BxLxHxK.dtype)
    cached_v = self.variable("cache", "cached_value", jnp.zeros, v_BxLxHxK.shape, v_BxLxHxK.dtype)
    index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
    if not initialised:
      # model.init(..., decode=True): the input's shape sets the cache size.
      return k_BxLxHxK, v_BxLxHxK, True
    start = (0, index.value, 0, 0)
    for cached, new in ((cached_k, k_BxLxHxK), (cached_v, v_BxLxHxK)):
      cached.value = jax.lax.dynamic_update_slice(cached.value, new.astype(cached.value.dtype),
                                                  start)
    index.value = index.value + k_BxLxHxK.shape[1]
    return cached_k.value, cached_v.value, False


class GPT2MLP(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, deterministic: bool):
    cfg = self.cfg
    resid_std = cfg.initializer_range / (2 * cfg.num_layers) ** 0.5
    h = dense(cfg, cfg.intermediate_size, ("embed", "mlp"), "c_fc")(x_BxLxD)
    h_BxLxI = nn.gelu(nn.with_logical_constraint(h, ACT_MLP), approximate=True)
    out = dense(cfg, cfg.hidden_size, ("mlp", "embed"), "c_proj", stddev=resid_std)(h_BxLxI)
    return Dropout(cfg.dropout_rate)(out, deterministic=deterministic)


class GPT2Block(nn.Module):
  """Pre-LN decoder block: x + attn(LN(x)), then x + mlp(LN(x))."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, mask, deterministic: bool, decode: bool = False):
    cfg = self.cfg
    h = layer_norm(cfg, "ln_1")(x_BxLxD)
    x = x_BxLxD + GPT2Attention(cfg, name="attn")(h, mask, deterministic, decode)
    h = layer_norm(cfg, "ln_2")(x)
    x = x + GPT2MLP(cfg, name="mlp")(h, deterministic)
    return nn.with_logical_constraint(x, ACT_EMBED)
