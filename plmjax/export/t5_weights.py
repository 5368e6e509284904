"""plmjax T5 parameter tree <-> Hugging Face T5ForConditionalGeneration state dict.

The flax tree mirrors HF's module names (plmjax/models/t5.py): `block_3` <-> `block.3`,
`layer_0` <-> `layer.0`, leaves `kernel`/`embedding`/`scale` <-> `weight`. Every dense
layer is a torch.nn.Linear ([out, in]): kernels are transposed, nothing is reshaped.

Tied weights: HF keeps one `shared.weight` for the input embeddings of both stacks
(`encoder.embed_tokens.weight`, `decoder.embed_tokens.weight`, written by old versions)
and, for T5 1.0, for the output projection (`lm_head.weight`). Stored copies are checked
for being equal and dropped. transformers 5 ties `lm_head` to `shared` even in T5 1.1
configs (`tie_word_embeddings: false`, read as "no d_model ** -0.5 rescale") unless the
file holds a different `lm_head.weight`; plmjax's untied model then gets a copy of
`shared.weight`, which gives the same logits.
"""

import numpy as np

from plmjax.errors import CheckpointError
from plmjax.export.hf_weights import DTYPES, flatten, hf_name, unwrap

EMBED_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
# Written by old versions; HF ignores it on load (cross-attention has no position bias).
IGNORED = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)
SHARED, LM_HEAD = "shared.weight", "lm_head.weight"


def to_hf_state_dict(params, dtype: str = "float32") -> dict[str, np.ndarray]:
  """The HF state dict (numpy, contiguous, in `dtype`) of a plmjax T5 tree."""
  if dtype not in DTYPES:
    raise CheckpointError(f"--dtype {dtype!r} is not supported; use {', '.join(DTYPES)}")
  out = {}
  for path, value in flatten(unwrap(params)).items():
    array = np.asarray(value)
    if path[-1] == "kernel":
      array = array.T
    out[hf_name(path)] = np.ascontiguousarray(array.astype(np.float32).astype(DTYPES[dtype]))
  return out


def normalise_hf_names(state_dict: dict, tied: bool, source: str) -> tuple[dict, list[str]]:
  """Drops tied copies (checked equal to shared.weight) and ignored buffers; fills an
  untied model's lm_head from shared.weight when the file has none. Returns (state dict,
  notes on what was dropped or copied)."""
  out, notes = dict(state_dict), []
  shared = out.get(SHARED)
  copies = EMBED_COPIES + ((LM_HEAD,) if tied else ())
  for name in copies:
    if name not in out:
      continue
    copy = out.pop(name)
    if shared is None:  # a file with only the per-stack copy: it is the shared table
      shared = out[SHARED] = copy
    elif not np.array_equal(np.asarray(copy), np.asarray(shared)):
      what = ("the output projection is scaled by d_model ** -0.5 (tie_word_embeddings is "
              "not false) but differs from the input embeddings" if name == LM_HEAD else
              "the stacks' input embeddings must be the shared table")
      raise CheckpointError(f"{source}: {name} differs from {SHARED}; {what}, which plmjax "
                            "cannot represent")
    notes.append(name)
  for name in IGNORED:
    if out.pop(name, None) is not None:
      notes.append(name)
  if not tied and LM_HEAD not in out and shared is not None:
    out[LM_HEAD] = np.array(shared)
    notes.append(f"{LM_HEAD} (copied from {SHARED}: the file ties them)")
  return out, notes


def from_hf_state_dict(state_dict: dict, abstract_params, source: str = "weights"):
  """Fills the T5 tree `abstract_params` (shapes/dtypes) from a normalised state dict.

  Returns (flat params {path: np.ndarray}, missing HF names, unused HF names); a shape
  that does not match raises CheckpointError naming the tensor.
  """
  found, missing = {}, []
  expected = flatten(unwrap(abstract_params))
  names = {hf_name(path): path for path in expected}
  for name, path in names.items():
    if name not in state_dict:
      missing.append(name)
      continue
    array = np.asarray(state_dict[name])
    if path[-1] == "kernel":
      array = array.T
    want = tuple(expected[path].shape)
    if array.shape != want:
      raise CheckpointError(
          f"{source}: tensor {name} has shape {tuple(np.asarray(state_dict[name]).shape)}, "
          f"but config.json implies {want[::-1] if path[-1] == 'kernel' else want}: the config "
          "and the weights do not match")
    found[path] = array.astype(expected[path].dtype)
  unused = sorted(set(state_dict) - set(names))
  return found, sorted(missing), unused
