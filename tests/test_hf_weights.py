"""plmjax params <-> Hugging Face state dicts: names, layouts, and numerical parity."""

import ml_dtypes
import numpy as np
import pytest
import torch

from hf_helpers import (BERT_HEADS, hf_config_for, hf_model_from_config, hf_outputs, max_diffs,
                        plmjax_outputs, random_config, random_inputs, random_params,
                        tiny_config)
from plmjax.errors import CheckpointError
from plmjax.export import hf_weights

ALL_HEADS = [("bert", h) for h in BERT_HEADS] + [("gpt", "lm")]
# Hugging Face parameters tied to ours (not stored by either side).
TIED = {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias", "lm_head.weight"}


def _load_into_hf(cfg, head, params):
  model = hf_model_from_config(hf_config_for(cfg, head))
  state = hf_weights.to_hf_state_dict(params, cfg.arch)
  result = model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
  return model, state, result


@pytest.mark.parametrize("arch,head", ALL_HEADS)
def test_names_shapes_and_outputs_match_hugging_face(arch, head):
  cfg = random_config(arch, seed=len(head))
  params = random_params(cfg, head, seed=1)
  model, state, result = _load_into_hf(cfg, head, params)
  # Every tensor has its Hugging Face name and shape; only tied ones are left to HF.
  assert result.unexpected_keys == []
  assert set(result.missing_keys) <= TIED
  hf_state = model.state_dict()
  assert set(hf_state) - TIED == set(state)
  for name, value in state.items():
    assert tuple(hf_state[name].shape) == value.shape, name

  ids, types, mask = random_inputs(cfg, seed=2)
  ours = plmjax_outputs(cfg, head, params, ids, types, mask)
  theirs = hf_outputs(model, arch, head, ids, types, mask)
  assert "hidden" in theirs and len(theirs) >= 2, theirs.keys()
  diffs = max_diffs(ours, theirs, mask)
  assert max(diffs.values()) <= 1e-5, diffs


@pytest.mark.parametrize("arch,head", [("bert", "pretraining"), ("gpt", "lm")])
def test_round_trip_is_exact(arch, head):
  cfg = tiny_config(arch)
  params = random_params(cfg, head)
  state = hf_weights.to_hf_state_dict(params, arch)
  found, missing, unused = hf_weights.from_hf_state_dict(state, params, arch)
  assert missing == [] and unused == []
  flat = hf_weights.flatten(params)
  assert set(found) == set(flat)
  for path, value in flat.items():
    np.testing.assert_array_equal(found[path], value)


def test_bert_kernels_are_transposed_gpt_kernels_are_not():
  bert, gpt = tiny_config("bert"), tiny_config("gpt")
  pb, pg = random_params(bert, "mlm"), random_params(gpt, "lm")
  sb, sg = hf_weights.to_hf_state_dict(pb, "bert"), hf_weights.to_hf_state_dict(pg, "gpt")
  query = pb["bert"]["encoder"]["layer_1"]["attention"]["self"]["query"]["kernel"]
  np.testing.assert_array_equal(sb["bert.encoder.layer.1.attention.self.query.weight"], query.T)
  c_fc = pg["transformer"]["h_0"]["mlp"]["c_fc"]["kernel"]  # [D, I] both sides
  np.testing.assert_array_equal(sg["transformer.h.0.mlp.c_fc.weight"], c_fc)
  # Attention keeps heads as an axis (for tensor parallelism); HF's Conv1D is that, flat:
  # c_attn [D, 3, H, K] -> [D, 3D] (columns q | k | v, each head's K contiguous), c_proj
  # [H, K, D] -> [D, D].
  attn = pg["transformer"]["h_0"]["attn"]
  assert attn["c_attn"]["kernel"].shape == (32, 3, 4, 8)
  c_attn = sg["transformer.h.0.attn.c_attn.weight"]
  assert c_attn.shape == (32, 96)
  np.testing.assert_array_equal(c_attn[:, 32 + 2 * 8:32 + 3 * 8], attn["c_attn"]["kernel"][:, 1, 2])
  np.testing.assert_array_equal(sg["transformer.h.0.attn.c_attn.bias"],
                                attn["c_attn"]["bias"].reshape(96))
  np.testing.assert_array_equal(sg["transformer.h.0.attn.c_proj.weight"][8:16],
                                attn["c_proj"]["kernel"][1])


def test_export_dtypes():
  cfg = tiny_config("bert")
  params = random_params(cfg, "mlm")
  bf16 = hf_weights.to_hf_state_dict(params, "bert", "bfloat16")
  f32 = hf_weights.to_hf_state_dict(params, "bert")
  name = "bert.embeddings.word_embeddings.weight"
  assert bf16[name].dtype == ml_dtypes.bfloat16 and f32[name].dtype == np.float32
  np.testing.assert_array_equal(bf16[name], f32[name].astype(ml_dtypes.bfloat16))
  # A bf16-trained tree exports to float32 exactly.
  params_bf16 = hf_weights.unflatten({p: np.asarray(v).astype(ml_dtypes.bfloat16)
                                      for p, v in hf_weights.flatten(params).items()})
  up = hf_weights.to_hf_state_dict(params_bf16, "bert")
  assert up[name].dtype == np.float32
  np.testing.assert_array_equal(up[name], bf16[name].astype(np.float32))
  with pytest.raises(CheckpointError, match="int8"):
    hf_weights.to_hf_state_dict(params, "bert", "int8")


def test_legacy_and_base_model_names_are_normalised():
  cfg = tiny_config("bert")
  params = random_params(cfg, "pretraining")
  state = hf_weights.to_hf_state_dict(params, "bert")
  legacy = {}
  for name, value in state.items():
    name = name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias",
                                                                       "LayerNorm.beta")
    legacy[name[len("bert."):] if name.startswith("bert.") else name] = value  # BertModel style
  legacy["embeddings.position_ids"] = np.arange(32)[None]
  legacy["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"]
  legacy["cls.predictions.decoder.bias"] = state["cls.predictions.bias"]
  normal, dropped = hf_weights.normalise_hf_names(legacy, "bert")
  assert dropped == ["embeddings.position_ids"]
  hf_weights.check_tied(normal, "bert", "test")
  assert set(normal) == set(state)

  untied = dict(normal, **{"cls.predictions.decoder.weight":
                           state["bert.embeddings.word_embeddings.weight"] + 1})
  with pytest.raises(CheckpointError, match="cls.predictions.decoder.weight differs"):
    hf_weights.check_tied(untied, "bert", "test")


def test_gpt2_attention_buffers_are_ignored():
  state = {"transformer.h.0.attn.bias": np.ones((1, 1, 4, 4)),
           "h.1.attn.masked_bias": np.ones(()),
           "h.0.attn.c_attn.bias": np.ones(6)}
  normal, dropped = hf_weights.normalise_hf_names(state, "gpt")
  assert sorted(dropped) == ["h.1.attn.masked_bias", "transformer.h.0.attn.bias"]
  assert list(normal) == ["transformer.h.0.attn.c_attn.bias"]


def test_shape_mismatch_names_the_tensor():
  cfg = tiny_config("bert")
  params = random_params(cfg, "mlm")
  state = hf_weights.to_hf_state_dict(params, "bert")
  state["bert.encoder.layer.0.intermediate.dense.weight"] = np.zeros((50, 32), np.float32)
  with pytest.raises(CheckpointError, match=r"layer\.0\.intermediate\.dense\.weight.*\(50, 32\)"):
    hf_weights.from_hf_state_dict(state, params, "bert", "model.safetensors")
  gpt = tiny_config("gpt")
  params = random_params(gpt, "lm")
  state = hf_weights.to_hf_state_dict(params, "gpt")
  state["transformer.h.1.attn.c_attn.weight"] = np.zeros((32, 64), np.float32)
  with pytest.raises(CheckpointError, match=r"h\.1\.attn\.c_attn\.weight.*\(32, 64\).*"
                     r"implies \(32, 96\)"):
    hf_weights.from_hf_state_dict(state, params, "gpt", "model.safetensors")
