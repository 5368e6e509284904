"""`plmjax export`: workdir -> Hugging Face directory that transformers loads and agrees with."""

import json
import os
import stat

import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from hf_helpers import (hf_outputs, max_diffs, plmjax_outputs, random_inputs, random_params,
                        tiny_config, trained_sentencepiece, wiki_lines)
from plmjax import workdir as workdir_lib
from plmjax import cli
from plmjax.config import base_config
from plmjax.data.tokenizer import load_tokenizer
from plmjax.errors import CheckpointError, UserError
from plmjax.export import export as export_lib
from plmjax.export import hf_weights
from plmjax.train import checkpoint


def make_workdir(path, cfg, head, params, tokenizer_model=None, step=7):
  config = base_config(cfg.arch)
  config.model.update(cfg.to_dict())
  config.task.head = head
  tok_dir = None
  if tokenizer_model:
    tok_dir = path.parent / f"{path.name}_tok"
    tok_dir.mkdir()
    load_tokenizer(tokenizer_model).save(str(tok_dir))
  checkpoint.write_params_workdir(str(path), config, params, step=step,
                                  tokenizer_dir=str(tok_dir) if tok_dir else None)
  return path


def run_cli(*argv):
  return cli.main(list(argv))


def _loading_info(cls, out):
  model, info = cls.from_pretrained(out, output_loading_info=True)
  return model.eval(), {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}


def _real_text_batch(tok, lines):
  batch = tok(lines, padding=True, truncation=True, max_length=32, return_tensors="np")
  return batch["input_ids"], batch.get("token_type_ids"), batch["attention_mask"]


def test_bert_export_loads_and_matches(wiki_sample, tmp_path, capsys):
  spm = trained_sentencepiece(wiki_sample, tmp_path)
  cfg = tiny_config("bert", vocab_size=load_tokenizer(spm).vocab_size)
  params = random_params(cfg, "pretraining")
  workdir = make_workdir(tmp_path / "run", cfg, "pretraining", params, spm)
  out = tmp_path / "hf"
  assert run_cli("export", "--workdir", str(workdir), "--out", str(out)) == 0
  assert "BertForPreTraining" in capsys.readouterr().out
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors",
                                     "special_tokens_map.json", "tokenizer.json",
                                     "tokenizer_config.json"]

  model, info = _loading_info(transformers.AutoModelForPreTraining, out)
  assert isinstance(model, transformers.BertForPreTraining) and info == {}
  mlm, info = _loading_info(transformers.AutoModelForMaskedLM, out)
  assert isinstance(mlm, transformers.BertForMaskedLM)
  # The pretraining checkpoint's NSP head and pooler are not part of BertForMaskedLM.
  assert not info.get("missing_keys")
  base, info = _loading_info(transformers.BertModel, out)
  assert not info.get("missing_keys")

  # Real text through the exported tokenizer, padded, into both implementations.
  tok = transformers.AutoTokenizer.from_pretrained(out)
  paragraphs = wiki_lines(wiki_sample, slice(70, 71))
  lines = paragraphs[:3] + [paragraphs[3][:60]]  # the short one is padded
  ids, types, mask = _real_text_batch(tok, lines)
  assert mask.min() == 0  # some padding
  assert list(ids[0][1:mask[0].sum() - 1]) == load_tokenizer(spm).encode(lines[0])[:30]
  ours = plmjax_outputs(cfg, "pretraining", params, ids, types, mask)
  for hf_model, head in ((model, "pretraining"), (mlm, "mlm")):
    diffs = max_diffs(ours, hf_outputs(hf_model, "bert", head, ids, types, mask), mask)
    assert len(diffs) >= 2 and max(diffs.values()) <= 1e-5, (head, diffs)
  with torch.no_grad():
    pooled = base(input_ids=torch.tensor(ids), token_type_ids=torch.tensor(types),
                  attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
  np.testing.assert_allclose(pooled[mask.astype(bool)], ours["hidden"][mask.astype(bool)],
                             atol=1e-5)


def test_gpt_export_loads_and_matches(wiki_sample, tmp_path):
  spm = trained_sentencepiece(wiki_sample, tmp_path, kind="gpt")
  cfg = tiny_config("gpt", vocab_size=load_tokenizer(spm).vocab_size)
  params = random_params(cfg, "lm", seed=3)
  workdir = make_workdir(tmp_path / "run", cfg, "lm", params, spm)
  out = tmp_path / "hf"
  assert run_cli("export", "--workdir", str(workdir), "--out", str(out)) == 0
  model, info = _loading_info(transformers.AutoModelForCausalLM, out)
  assert isinstance(model, transformers.GPT2LMHeadModel) and info == {}
  assert model.config.eos_token_id == 0  # <|endoftext|> of plmjax's GPT tokenizer
  tok = transformers.AutoTokenizer.from_pretrained(out)
  tok.pad_token = tok.eos_token
  paragraphs = wiki_lines(wiki_sample, slice(80, 81))
  ids, _, mask = _real_text_batch(tok, paragraphs[:2] + [paragraphs[2][:50]])
  assert mask.min() == 0
  ours = plmjax_outputs(cfg, "lm", params, ids, None, mask)
  diffs = max_diffs(ours, hf_outputs(model, "gpt", "lm", ids, None, mask), mask)
  assert max(diffs.values()) <= 1e-5, diffs


@pytest.mark.parametrize("head,auto", [
    ("sequence_classification", "AutoModelForSequenceClassification"),
    ("token_classification", "AutoModelForTokenClassification"),
    ("question_answering", "AutoModelForQuestionAnswering"),
    ("mlm", "AutoModelForMaskedLM")])
def test_finetuning_heads_export(tmp_path, head, auto):
  cfg = tiny_config("bert")
  params = random_params(cfg, head, seed=4)
  workdir = make_workdir(tmp_path / "run", cfg, head, params)  # no tokenizer: still exports
  summary = export_lib.export(str(workdir), str(tmp_path / "hf"))
  assert summary["tokenizer_files"] == [] and summary["step"] == 7
  model, info = _loading_info(getattr(transformers, auto), tmp_path / "hf")
  assert info == {}
  if "classification" in head:
    assert model.config.num_labels == 3
  ids, types, mask = random_inputs(cfg, seed=5)
  diffs = max_diffs(plmjax_outputs(cfg, head, params, ids, types, mask),
                    hf_outputs(model, "bert", head, ids, types, mask), mask)
  assert len(diffs) >= 2 and max(diffs.values()) <= 1e-5, diffs


def test_bf16_checkpoint_exports_float32_by_default(tmp_path):
  cfg = tiny_config("bert", param_dtype="bfloat16", dtype="bfloat16")
  params = hf_weights.unflatten({p: np.asarray(v).astype(ml_dtypes.bfloat16) for p, v in
                                 hf_weights.flatten(random_params(cfg, "mlm")).items()})
  workdir = make_workdir(tmp_path / "run", cfg, "mlm", params)
  export_lib.export(str(workdir), str(tmp_path / "f32"))
  export_lib.export(str(workdir), str(tmp_path / "bf16"), dtype="bfloat16")
  f32 = load_file(tmp_path / "f32" / "model.safetensors")
  bf16 = load_file(tmp_path / "bf16" / "model.safetensors")
  assert {v.dtype for v in f32.values()} == {np.dtype(np.float32)}
  assert {v.dtype for v in bf16.values()} == {np.dtype(ml_dtypes.bfloat16)}
  for name in f32:
    np.testing.assert_array_equal(f32[name], bf16[name].astype(np.float32))
  assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
  model = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "bf16")
  assert model.bert.embeddings.word_embeddings.weight.dtype == torch.bfloat16


def test_bad_targets_and_checkpoints(tmp_path, capsys):
  cfg = tiny_config("gpt")
  workdir = make_workdir(tmp_path / "run", cfg, "lm", random_params(cfg, "lm"))
  out = tmp_path / "hf"
  out.mkdir()
  (out / "keep.txt").write_text("user data")
  assert run_cli("export", "--workdir", str(workdir), "--out", str(out)) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "exists and is not empty" in err and "--overwrite" in err
  assert (out / "keep.txt").exists()
  assert run_cli("export", "--workdir", str(workdir), "--out", str(out), "--overwrite") == 0
  assert "model.safetensors" in os.listdir(out) and "keep.txt" not in os.listdir(out)

  with pytest.raises(CheckpointError, match="step 3"):
    export_lib.export(str(workdir), str(tmp_path / "a"), step=3)
  with pytest.raises(UserError, match="int4"):
    export_lib.export(str(workdir), str(tmp_path / "b"), dtype="int4")
  with pytest.raises(CheckpointError, match="not a plmjax workdir"):
    export_lib.export(str(tmp_path / "nothing"), str(tmp_path / "c"))
  # A config that no longer matches the weights: one clear error, nothing written.
  config = workdir_lib.read_config(str(workdir))
  config.model.num_layers = 3
  workdir_lib.write_config(str(workdir), config)
  with pytest.raises(CheckpointError, match="missing transformer/h_2"):
    export_lib.export(str(workdir), str(tmp_path / "d"))
  assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_export_permissions_follow_the_umask(wiki_sample, tmp_path, umask):
  spm = trained_sentencepiece(wiki_sample, tmp_path)
  cfg = tiny_config("bert", vocab_size=load_tokenizer(spm).vocab_size)
  workdir = make_workdir(tmp_path / "run", cfg, "mlm", random_params(cfg, "mlm"), spm)
  out = tmp_path / "hf"
  old = os.umask(umask)
  try:
    export_lib.export(str(workdir), str(out))
  finally:
    os.umask(old)
  assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
  names = sorted(os.listdir(out))
  assert "model.safetensors" in names and "tokenizer.json" in names
  assert {n: stat.S_IMODE((out / n).stat().st_mode) for n in names} == {
      n: 0o666 & ~umask for n in names}
