"""plmjax parameter tree <-> Hugging Face PyTorch state dict, for every head.

The flax tree mirrors Hugging Face's module names (see plmjax/models), so the
mapping is mechanical: `layer_3` <-> `layer.3`, `h_3` <-> `h.3`, and the leaf
names `kernel`/`embedding`/`scale` <-> `weight`. Two layout facts:
  * BERT uses torch.nn.Linear, whose weight is [out, in]: our [in, out] kernels
    are transposed.
  * GPT-2 uses its own Conv1D, whose weight is already [in, out]: no transpose. Its
    attention projections keep the heads as an axis here (so they shard over `tensor`):
    c_attn [D, 3, H, K] (bias [3, H, K]) and c_proj [H, K, D] are HF's [D, 3D], [3D] and
    [D, D] reshaped, the same bytes in the same order.
A scanned model (model.scan_layers) stacks its layers on a leading axis (`layer`,
`h`); it is unstacked to the per-layer tree before the mapping and imports are stacked
after it (plmjax.models.transformer.unstack_layers / match_layer_layout): one
conversion path and Hugging Face sees the same names either way.
Tied weights (the MLM decoder, GPT-2's lm_head) are not stored by Hugging Face
and not stored by us; old checkpoints that do store them are checked for being
tied and dropped, and old buffers (position_ids, GPT-2's attn.bias) are ignored.
"""

import math
import re

import ml_dtypes
import numpy as np

from plmjax.errors import CheckpointError
from plmjax.models.transformer import match_layer_layout, unstack_layers

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}

_LEAF_TO_HF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}
_INDEXED = re.compile(r"(layer|h|block)_(\d+)")  # layer_3 -> layer.3 (T5: block_3)
# Buffers Hugging Face (now or in older versions) writes next to the weights.
_BUFFERS = re.compile(r"(^|\.)(position_ids|token_type_ids)$|\.attn\.(masked_)?bias$"
                      r"|\.crossattention\.(masked_)?bias$")
# Tensors that belong to a head (or the pooler) rather than the base model.
HEAD_PREFIXES = ("cls.", "classifier.", "qa_outputs.", "bert.pooler.", "lm_head.")
TIED = {"bert": {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight"},
        "gpt": {"lm_head.weight": "transformer.wte.weight"}}


def flatten(tree, prefix=()) -> dict[tuple[str, ...], object]:
  """Nested dict -> {path tuple: leaf}."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict) or hasattr(value, "items"):
      out.update(flatten(value, prefix + (key,)))
    else:
      out[prefix + (key,)] = value
  return out


def unflatten(flat: dict[tuple[str, ...], object]) -> dict:
  out = {}
  for path, value in flat.items():
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return out


def hf_name(path: tuple[str, ...]) -> str:
  """('bert','encoder','layer_0','attention','self','query','kernel') ->
  'bert.encoder.layer.0.attention.self.query.weight'."""
  parts = []
  for key in path[:-1]:
    m = _INDEXED.fullmatch(key)
    parts.extend(m.groups() if m else (key,))
  if path[-1] not in _LEAF_TO_HF:
    raise ValueError(f"parameter {'/'.join(path)} has no Hugging Face counterpart")
  parts.append(_LEAF_TO_HF[path[-1]])
  return ".".join(parts)


def _transposed(arch: str, path: tuple[str, ...]) -> bool:
  return arch == "bert" and path[-1] == "kernel"


def hf_shape(arch: str, path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
  """Hugging Face's shape for our tensor at `path` of `shape` (before any transpose):
  GPT-2's attention projections merge the (3, heads, head_dim) or (heads, head_dim) axes."""
  if arch != "gpt" or path[-3:-1] not in (("attn", "c_attn"), ("attn", "c_proj")):
    return tuple(shape)
  if path[-2] == "c_attn":  # [D, 3, H, K] -> [D, 3D]; [3, H, K] -> [3D]
    return (shape[0], math.prod(shape[1:])) if path[-1] == "kernel" else (math.prod(shape),)
  if path[-1] == "kernel":  # c_proj [H, K, D] -> [D, D]
    return (math.prod(shape[:-1]), shape[-1])
  return tuple(shape)


def unwrap(params):
  """Accepts {'params': tree} as well as the bare tree."""
  if hasattr(params, "keys") and set(params.keys()) == {"params"}:
    return params["params"]
  return params


def to_hf_state_dict(params, arch: str, dtype: str = "float32") -> dict[str, np.ndarray]:
  """The Hugging Face state dict (numpy, contiguous, in `dtype`) of a plmjax tree."""
  if dtype not in DTYPES:
    raise CheckpointError(f"--dtype {dtype!r} is not supported; use {', '.join(DTYPES)}")
  out = {}
  for path, value in flatten(unstack_layers(unwrap(params))).items():
    array = np.asarray(value)
    array = array.reshape(hf_shape(arch, path, array.shape))
    if _transposed(arch, path):
      array = array.T
    # Cast via float32 so bf16 -> f16 (and any other pair) is well defined.
    out[hf_name(path)] = np.ascontiguousarray(array.astype(np.float32).astype(DTYPES[dtype]))
  return out


def normalise_hf_names(state_dict: dict, arch: str) -> tuple[dict, list[str]]:
  """Renames legacy and base-model keys to the head-model names; drops buffers.

  Returns (state dict, dropped buffer names).
  """
  out, dropped = {}, []
  base_prefix = "bert." if arch == "bert" else "transformer."
  base_roots = (("embeddings.", "encoder.", "pooler.") if arch == "bert"
                else ("wte.", "wpe.", "h.", "ln_f."))
  for name, value in state_dict.items():
    if _BUFFERS.search(name):
      dropped.append(name)
      continue
    new = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", name)
    new = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", new)
    if new.startswith(base_roots):
      new = base_prefix + new  # a BertModel / GPT2Model checkpoint
    out[new] = value
  # Old checkpoints store the MLM decoder bias twice (tied); keep one.
  if arch == "bert" and "cls.predictions.decoder.bias" in out:
    bias = out.pop("cls.predictions.decoder.bias")
    out.setdefault("cls.predictions.bias", bias)
  return out, dropped


def check_tied(state_dict: dict, arch: str, source: str):
  """Drops stored copies of tied weights; an untied copy cannot be represented."""
  for tied, owner in TIED[arch].items():
    if tied not in state_dict:
      continue
    copy = state_dict.pop(tied)
    if owner in state_dict and not np.array_equal(np.asarray(copy), np.asarray(state_dict[owner])):
      raise CheckpointError(
          f"{source}: {tied} differs from {owner}; plmjax ties the output projection to "
          "the input embeddings and cannot import untied weights")


def from_hf_state_dict(state_dict: dict, abstract_params, arch: str, source: str = "weights"):
  """Fills the plmjax tree `abstract_params` (shapes/dtypes) from a normalised state dict.

  Returns (flat params found {path: np.ndarray}, missing HF names, unused HF names); the
  paths are those of `abstract_params`, stacked layers included, once no layer tensor is
  missing. Shapes that do not match raise CheckpointError naming the tensor.
  """
  found, missing = {}, []
  expected = flatten(unstack_layers(unwrap(abstract_params)))
  names = {hf_name(path): path for path in expected}
  for name, path in names.items():
    if name not in state_dict:
      missing.append(name)
      continue
    array = np.asarray(state_dict[name])
    if _transposed(arch, path):
      array = array.T
    want = tuple(expected[path].shape)
    if array.shape != hf_shape(arch, path, want):
      layout = " (stored [out, in], transposed on import)" if _transposed(arch, path) else ""
      raise CheckpointError(
          f"{source}: tensor {name} has shape {tuple(np.asarray(state_dict[name]).shape)}"
          f"{layout}, but config.json implies {hf_shape(arch, path, want)}: the config and the "
          "weights do not match")
    found[path] = array.reshape(want).astype(expected[path].dtype)
  unused = sorted(set(state_dict) - set(names))
  found = flatten(match_layer_layout(unflatten(found), unwrap(abstract_params)))
  return found, sorted(missing), unused


def is_head_name(name: str) -> bool:
  return name.startswith(HEAD_PREFIXES)
