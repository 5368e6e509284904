"""`plmjax import-hf`: Hugging Face directory -> workdir; HF -> import -> export is bit-exact."""

import json
import os

import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file
from tokenizers import BertWordPieceTokenizer

from hf_helpers import wiki_lines
from plmjax import workdir as workdir_lib
from plmjax import cli
from plmjax.data.tokenizer import load_tokenizer
from plmjax.errors import CheckpointError, UserError
from plmjax.export import export as export_lib
from plmjax.export import import_hf
from plmjax.train import checkpoint

TINY_BERT = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=48, max_position_embeddings=32)
TINY_GPT = dict(vocab_size=120, n_embd=32, n_layer=2, n_head=4, n_positions=32)


def hf_model(cls_name: str, seed: int = 0, **config):
  """A Hugging Face model with every parameter randomised (biases and LN too)."""
  torch.manual_seed(seed)
  cls = getattr(transformers, cls_name)
  base = TINY_BERT if cls_name.startswith("Bert") else TINY_GPT
  config = transformers.AutoConfig.for_model("bert" if cls_name.startswith("Bert") else "gpt2",
                                             **{**base, **config})
  model = cls(config)
  with torch.no_grad():
    for p in model.parameters():  # tied parameters appear once and stay tied
      p.add_(torch.randn_like(p) * 0.1)
  return model.eval()


def save(model, path, **kw):
  model.save_pretrained(path, **kw)
  return path


def import_export(src, tmp_path, *extra, dtype="float32"):
  workdir, out = tmp_path / "run", tmp_path / "hf_out"
  assert cli.main(["import-hf", "--model", str(src), "--workdir", str(workdir), *extra]) == 0
  export_lib.export(str(workdir), str(out), dtype=dtype)
  return workdir, out


def assert_bit_exact(src_tensors: dict, out_dir, prefix=""):
  exported = load_file(os.path.join(out_dir, "model.safetensors"))
  for name, value in src_tensors.items():
    got = exported[prefix + name]
    assert got.dtype == value.dtype and got.shape == value.shape, name
    assert got.tobytes() == value.tobytes(), name
  return exported


@pytest.mark.parametrize("cls_name", [
    "BertForPreTraining", "BertForMaskedLM", "BertForSequenceClassification",
    "BertForTokenClassification", "BertForQuestionAnswering", "GPT2LMHeadModel"])
def test_import_export_is_bit_exact(tmp_path, cls_name, capsys):
  extra = dict(id2label={0: "neg", 1: "neu", 2: "pos"}) if "Classification" in cls_name else {}
  src = save(hf_model(cls_name, **extra), tmp_path / "src")
  source = load_file(src / "model.safetensors")
  workdir, out = import_export(src, tmp_path)
  report = capsys.readouterr().out
  assert f"of {cls_name} from" in report and "initialised" not in report
  exported = assert_bit_exact(source, out)
  assert set(exported) == set(source)  # nothing added, nothing lost
  hf_config = json.loads((out / "config.json").read_text())
  assert hf_config["architectures"] == [cls_name]
  if extra:
    assert hf_config["id2label"] == {"0": "neg", "1": "neu", "2": "pos"}
  model, info = getattr(transformers, cls_name).from_pretrained(out, output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))


@pytest.mark.parametrize("cls_name,exported_cls", [("BertModel", "BertForPreTraining"),
                                                   ("GPT2Model", "GPT2LMHeadModel")])
def test_base_model_gets_its_head_initialised(tmp_path, cls_name, exported_cls, capsys):
  src = save(hf_model(cls_name), tmp_path / "src")
  source = load_file(src / "model.safetensors")
  workdir, out = import_export(src, tmp_path)
  report = capsys.readouterr().out
  prefix = "bert." if cls_name == "BertModel" else "transformer."
  exported = assert_bit_exact(source, out, prefix)
  added = sorted(set(exported) - {prefix + n for n in source})
  if cls_name == "BertModel":  # the MLM and NSP heads are new, and reported
    assert added and all(n.startswith("cls.") for n in added)
    assert "initialised (absent in the source): " + ", ".join(added) in report
    assert np.abs(exported["cls.predictions.transform.dense.weight"]).max() > 0
  else:  # GPT-2's LM head is the tied embedding: nothing to add
    assert added == [] and "initialised" not in report
  assert json.loads((out / "config.json").read_text())["architectures"] == [exported_cls]


def test_head_choice_drops_unused_head_weights(tmp_path, capsys):
  src = save(hf_model("BertForPreTraining"), tmp_path / "src")
  source = load_file(src / "model.safetensors")
  _, out = import_export(src, tmp_path, "--head", "mlm")
  report = capsys.readouterr().out
  assert "dropped (unused by head 'mlm'): bert.pooler.dense.bias" in report
  kept = {n: v for n, v in source.items() if "pooler" not in n and "seq_relationship" not in n}
  assert set(assert_bit_exact(kept, out)) == set(kept)


def test_legacy_pytorch_bin_with_buffers(tmp_path, capsys):
  model = hf_model("GPT2LMHeadModel", seed=1)
  state = {k: v.clone() for k, v in model.state_dict().items()}
  for i in range(2):  # buffers old GPT-2 checkpoints carry
    state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32))
    state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
  state = {k.removeprefix("transformer."): v for k, v in state.items()
           if k != "lm_head.weight"} | {"lm_head.weight": state["lm_head.weight"]}
  src = tmp_path / "src"
  src.mkdir()
  torch.save(state, src / "pytorch_model.bin")
  config = model.config.to_dict()
  config["architectures"] = ["GPT2LMHeadModel"]
  (src / "config.json").write_text(json.dumps(config))
  _, out = import_export(src, tmp_path)
  assert "h.0.attn.masked_bias" in capsys.readouterr().out
  want = {k: v.numpy() for k, v in model.state_dict().items() if k != "lm_head.weight"}
  assert_bit_exact(want, out)


def test_bf16_source_round_trips_in_bf16(tmp_path):
  src = save(hf_model("BertForMaskedLM").to(torch.bfloat16), tmp_path / "src")
  source = load_file(src / "model.safetensors")
  assert next(iter(source.values())).dtype == ml_dtypes.bfloat16
  workdir, out = import_export(src, tmp_path, dtype="bfloat16")
  assert_bit_exact(source, out)
  params, step = checkpoint.load_params(str(workdir))
  assert step == 0
  assert params["bert"]["embeddings"]["word_embeddings"]["embedding"].dtype == np.float32


def test_wordpiece_tokenizer_is_carried_along(wiki_sample, tmp_path):
  src = save(hf_model("BertForMaskedLM", vocab_size=500), tmp_path / "src")
  trainer = BertWordPieceTokenizer(lowercase=True)
  trainer.train_from_iterator(wiki_lines(wiki_sample, slice(0, 20)), vocab_size=500,
                              special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
  trainer.save_model(str(src))  # vocab.txt only, like bert-base-uncased
  assert trainer.get_vocab_size() == 500
  (src / "tokenizer_config.json").write_text(json.dumps(
      {"tokenizer_class": "BertTokenizer", "do_lower_case": True}))
  workdir, out = import_export(src, tmp_path)
  ours = load_tokenizer(workdir_lib.tokenizer_dir(str(workdir)))  # plmjax's data code
  assert ours.vocab_size == 500 and ours.kind == "bert"
  theirs = transformers.AutoTokenizer.from_pretrained(src)
  exported = transformers.AutoTokenizer.from_pretrained(out)
  lines = wiki_lines(wiki_sample, slice(50, 95))[:300]
  for text in lines:
    ids = ours.encode(text)
    assert ids == theirs(text, add_special_tokens=False)["input_ids"], text
    assert exported(text)["input_ids"] == [2] + ids + [3]


def test_unsupported_architecture(tmp_path, capsys):
  src = tmp_path / "src"
  src.mkdir()
  (src / "config.json").write_text(json.dumps(
      {"model_type": "roberta", "architectures": ["RobertaForMaskedLM"]}))
  assert cli.main(["import-hf", "--model", str(src), "--workdir", str(tmp_path / "w")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "model_type='roberta'" in err[0] and "plmjax imports BERT" in err[0]
  (src / "config.json").write_text(json.dumps(
      {"model_type": "bert", "architectures": ["BertForMultipleChoice"]}))
  with pytest.raises(UserError, match="BertForMultipleChoice"):
    import_hf.import_hf(str(src), str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("change,match", [
    (dict(num_hidden_layers=3), r"missing \d+ tensor\(s\).*layer\.2"),
    (dict(num_hidden_layers=1), r"no place for.*layer\.1"),
    (dict(intermediate_size=64), r"intermediate\.dense\.(weight|bias) has shape \(48"),
    (dict(vocab_size=100), r"word_embeddings\.weight has shape \(120, 32\)"),
])
def test_config_weights_mismatch(tmp_path, change, match):
  src = save(hf_model("BertForMaskedLM"), tmp_path / "src")
  config = json.loads((src / "config.json").read_text())
  (src / "config.json").write_text(json.dumps({**config, **change}))
  with pytest.raises(CheckpointError, match=match):
    import_hf.import_hf(str(src), str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_bad_directories(tmp_path):
  with pytest.raises(UserError, match="not a directory"):
    import_hf.import_hf(str(tmp_path / "nope"), str(tmp_path / "w"))
  src = save(hf_model("BertForMaskedLM"), tmp_path / "src")
  os.rename(src / "model.safetensors", src / "weights.bak")
  with pytest.raises(UserError, match="has no weights"):
    import_hf.import_hf(str(src), str(tmp_path / "w"))
  os.rename(src / "weights.bak", src / "model.safetensors")
  taken = tmp_path / "taken"  # a workdir that has trained on to step 5
  import_hf.import_hf(str(src), str(taken))
  params, _ = checkpoint.load_params(str(taken))
  checkpoint.write_params_workdir(str(taken), workdir_lib.read_config(str(taken)), params, step=5)
  with pytest.raises(UserError, match="not empty; pass --overwrite"):
    import_hf.import_hf(str(src), str(taken))
  import_hf.import_hf(str(src), str(taken), overwrite=True)
  assert checkpoint.load_params(str(taken))[1] == 0  # the stale step 5 is gone
