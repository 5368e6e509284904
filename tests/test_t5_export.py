"""T5 export/import: HF -> import-hf -> export is bit-exact (T5 1.0 and 1.1 layouts, as
transformers 5 and 4 save them), the export loads in transformers with the same logits,
and T5 tokenizers (trained here or Hugging Face's) give the same ids on both sides."""

import json
import os
import shutil

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from hf_helpers import trained_sentencepiece
from plmjax import cli
from plmjax.data.tokenizer import load_tokenizer
from plmjax.errors import CheckpointError
from plmjax.export import export as export_lib
from plmjax.export import import_hf
from plmjax.models import build_model
from plmjax.models.config import ModelConfig
from plmjax.train import checkpoint
from plmjax import config as config_lib
from test_t5 import hf_t5

TEXTS = ["The quick brown fox jumped over 12 lazy dogs.", "  Hello   world.  ",
         "Zürich, ∑ and a <extra_id_0> sentinel <extra_id_7>inside."]


@pytest.fixture
def spm_model(wiki_sample, tmp_path_factory):
  """Trained once per session (hf_helpers caches it)."""
  return trained_sentencepiece(wiki_sample, tmp_path_factory.mktemp("tok"), kind="t5",
                               vocab_size=700)


def hf_tokenizer(spm_model, where):
  """transformers' own T5 tokenizer built from the sentencepiece model (spiece.model)."""
  os.makedirs(where, exist_ok=True)
  shutil.copyfile(spm_model, os.path.join(where, "spiece.model"))
  return transformers.T5Tokenizer.from_pretrained(where)


def save_hf(model, tokenizer, path):
  model.save_pretrained(path)
  if tokenizer is not None:
    tokenizer.save_pretrained(path)
  return path


def import_export(src, tmp_path):
  workdir, out = tmp_path / "run", tmp_path / "hf_out"
  assert cli.main(["import-hf", "--model", str(src), "--workdir", str(workdir)]) == 0
  export_lib.export(str(workdir), str(out))
  return workdir, out


def logits(model, ids):
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids), decoder_input_ids=torch.tensor(ids[:, :5])).logits


def assert_loads_with_same_logits(out, reference):
  model, info = transformers.T5ForConditionalGeneration.from_pretrained(
      out, output_loading_info=True, attn_implementation="eager")
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
  ids = np.random.default_rng(0).integers(3, 80, (2, 9))
  # Same weights (checked bit for bit elsewhere); attention kernels may differ in rounding.
  np.testing.assert_allclose(logits(model.eval(), ids).numpy(), logits(reference, ids).numpy(),
                             atol=1e-5, rtol=0)
  return model


@pytest.mark.parametrize("ff, tied", [("relu", True), ("gated-gelu", False)])
def test_hf_import_export_is_bit_exact(ff, tied, spm_model, tmp_path, capsys):
  """T5 1.0 (relu, tied) and 1.1 (gated-gelu, untied) as transformers 5 saves them."""
  source_model = hf_t5(ff, tied, vocab_size=700)
  tokenizer = hf_tokenizer(spm_model, tmp_path / "tok")
  src = save_hf(source_model, tokenizer, tmp_path / "src")
  assert "spiece.model" not in os.listdir(src)  # transformers 5: tokenizer.json only
  source = load_file(src / "model.safetensors")
  assert ("lm_head.weight" in source) == (not tied)
  workdir, out = import_export(src, tmp_path)
  assert "of T5ForConditionalGeneration from" in capsys.readouterr().out
  exported = load_file(out / "model.safetensors")
  assert set(exported) == set(source)
  for name, value in source.items():
    assert exported[name].dtype == value.dtype and exported[name].tobytes() == value.tobytes()
  hf = json.loads((out / "config.json").read_text())
  assert hf["feed_forward_proj"] == ff and hf["tie_word_embeddings"] == tied
  assert_loads_with_same_logits(out, source_model)
  exported_tok = transformers.AutoTokenizer.from_pretrained(out)
  ours = load_tokenizer(str(workdir / "tokenizer"))
  assert ours.kind == "t5" and ours.sentinel_id == 699 and ours.vocab_size == 700
  for text in TEXTS:
    want = tokenizer(text).input_ids
    assert exported_tok(text).input_ids == want
    assert ours.encode(text) + [ours.eos_id] == want


def test_transformers_4_layout_with_copies_and_spiece(spm_model, tmp_path):
  """A T5 1.1 file as transformers 4 wrote it: tie_word_embeddings false, the stacks'
  embed_tokens copies, spiece.model and no tokenizer.json."""
  source_model = hf_t5("gated-gelu", False, vocab_size=700)
  src = tmp_path / "src"
  source_model.save_pretrained(src)
  state = load_file(src / "model.safetensors")
  state["encoder.embed_tokens.weight"] = state["decoder.embed_tokens.weight"] = \
      state["shared.weight"]
  save_file(state, src / "model.safetensors", metadata={"format": "pt"})
  hf = json.loads((src / "config.json").read_text())
  hf.pop("scale_decoder_outputs")
  hf["tie_word_embeddings"] = False
  (src / "config.json").write_text(json.dumps(hf))
  shutil.copyfile(spm_model, src / "spiece.model")
  workdir, out = import_export(src, tmp_path)
  exported = load_file(out / "model.safetensors")
  for name in set(state) - {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}:
    assert exported[name].tobytes() == state[name].tobytes(), name
  assert_loads_with_same_logits(out, source_model)
  theirs = hf_tokenizer(spm_model, tmp_path / "tok")
  exported_tok = transformers.AutoTokenizer.from_pretrained(out)
  for text in TEXTS:
    assert exported_tok(text).input_ids == theirs(text).input_ids


def test_head_tied_in_file_but_unscaled_imports_as_copy(tmp_path):
  """transformers 5's fresh T5 1.1 model: no rescale, lm_head tied (not in the file)."""
  source_model = hf_t5("gated-gelu", True, tie_word_embeddings=False)
  assert source_model.lm_head.weight is source_model.shared.weight
  src = save_hf(source_model, None, tmp_path / "src")
  assert "lm_head.weight" not in load_file(src / "model.safetensors")
  report = import_hf.import_hf(str(src), str(tmp_path / "run"))
  assert any("copied from shared.weight" in n for n in report["ignored"])
  export_lib.export(str(tmp_path / "run"), str(tmp_path / "out"))
  assert_loads_with_same_logits(tmp_path / "out", source_model)


def test_untied_head_with_rescale_is_refused(tmp_path):
  source_model = hf_t5("relu", True)
  src = save_hf(source_model, None, tmp_path / "src")
  state = load_file(src / "model.safetensors")
  state["lm_head.weight"] = state["shared.weight"] + 1
  save_file(state, src / "model.safetensors", metadata={"format": "pt"})
  with pytest.raises(CheckpointError, match="lm_head.weight differs from shared.weight"):
    import_hf.import_hf(str(src), str(tmp_path / "run"))


def test_plmjax_workdir_exports_with_trained_tokenizer(spm_model, tmp_path):
  """A plmjax T5 workdir (random weights, a `tokenizer train --kind t5` model) loads in
  transformers: same logits as plmjax, and AutoTokenizer gives plmjax's ids + </s>."""
  config = config_lib.base_config("t5")
  config.model.update(vocab_size=700, hidden_size=32, num_heads=4, num_layers=2,
                      num_decoder_layers=1, intermediate_size=48)
  cfg = ModelConfig.from_config(config.model)
  model = build_model(cfg, "seq2seq")
  params = jax.jit(lambda k: model.init(k, np.ones((1, 4), np.int32))["params"])(
      jax.random.key(3))
  params = jax.tree.map(np.asarray, nn.meta.unbox(params))
  tok_dir = tmp_path / "tok"
  tok_dir.mkdir()
  shutil.copyfile(spm_model, tok_dir / "tokenizer.model")
  checkpoint.write_params_workdir(str(tmp_path / "run"), config, params, tokenizer_dir=tok_dir)
  run, out = str(tmp_path / "run"), str(tmp_path / "out")
  assert cli.main(["export", "--workdir", run, "--out", out]) == 0
  hf_model, info = transformers.T5ForConditionalGeneration.from_pretrained(
      tmp_path / "out", output_loading_info=True, attn_implementation="eager")
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
  ids = np.random.default_rng(1).integers(3, 690, (2, 11))
  want = model.apply({"params": params}, ids, ids[:, :5])["logits"]
  np.testing.assert_allclose(logits(hf_model.eval(), ids).numpy(), np.asarray(want), atol=1e-5,
                             rtol=0)
  hf = json.loads((tmp_path / "out" / "config.json").read_text())
  assert (hf["pad_token_id"], hf["eos_token_id"], hf["decoder_start_token_id"]) == (0, 1, 0)
  exported_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
  ours = load_tokenizer(spm_model)
  assert exported_tok.convert_tokens_to_ids("<extra_id_0>") == 699
  assert exported_tok.convert_tokens_to_ids("<extra_id_99>") == 600
  for text in TEXTS:
    assert exported_tok(text).input_ids == ours.encode(text) + [1]


def test_cli_tokenizer_train_kind_t5(wiki_sample, tmp_path, capsys):
  """`plmjax tokenizer train --kind t5`: <pad>=0 </s>=1 <unk>=2, --vocab-size counting the
  100 sentinels above the pieces; the same ids as transformers' T5 tokenizer; sentinels
  decode as text. A size too large for the corpus names the largest one that works."""
  prefix = tmp_path / "t5tok"
  argv = ["tokenizer", "train", "--input", str(wiki_sample), "--vocab-size", "400", "--kind",
          "t5", "--out", str(prefix), "--max-sentences", "800"]
  assert cli.main(argv) == 0
  assert "400 pieces, t5 special tokens" in capsys.readouterr().out
  tok = load_tokenizer(f"{prefix}.model")
  assert (tok.pad_id, tok.eos_id, tok.unk_id, tok.vocab_size) == (0, 1, 2, 400)
  assert [tok.sentinel(i) for i in (0, 1, 99)] == [399, 398, 300]
  assert [tok.id_to_piece(i) for i in (0, 1, 2, 300, 399)] == [
      "<pad>", "</s>", "<unk>", "<extra_id_99>", "<extra_id_0>"]
  assert tok.special_ids >= {0, 1, 2, 300, 399}
  theirs = hf_tokenizer(f"{prefix}.model", tmp_path / "hf")
  assert len(theirs) == 400
  for text in TEXTS:
    assert tok.encode(text) + [1] == theirs(text).input_ids
  ids = tok.encode("The history <extra_id_1> alphabet")
  assert 398 in ids and tok.decode(ids) == "The history <extra_id_1> alphabet"
  argv[5] = "100000"
  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip()
  most = int(err.split("at most ")[1].split()[0])
  assert cli.main(argv[:5] + [str(most)] + argv[6:]) == 0
  assert load_tokenizer(f"{prefix}.model").vocab_size == most
