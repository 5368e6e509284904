"""`plmjax embed` against sentence-transformers, `plmjax fill-mask` against transformers,
on the same tiny random weights."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
import transformers
from sentence_transformers import SentenceTransformer

try:  # sentence-transformers >= 5.2
  from sentence_transformers.sentence_transformer import modules as models
except ImportError:
  from sentence_transformers import models

from plmjax import cli, embed, fill_mask
from plmjax.export.export import export
from plmjax.export.import_hf import import_hf
from plmjax.models import bert
from plmjax.models.config import ModelConfig
from plmjax import workdir as workdir_lib
from plmjax.train import checkpoint
from finetune_helpers import make_init_workdir

WORDS = ("the cat dog sat ran on a mat rug house boat red blue big small and paris france "
         "capital of is was city river old new").split()
TEXTS = ["the cat sat on the mat.", "a dog", "paris is the capital of france.",
         "the old red boat was on the river and the big blue house was by the old city " * 2,
         "", "new", "the small dog ran."]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  """A random BertForMaskedLM (WordPiece vocab.txt), the sentence-transformers model made
  from it (mean pooling, normalised, 16 tokens), and their imported workdirs."""
  root = tmp_path_factory.mktemp("embed")
  hf = root / "hf"
  hf.mkdir()
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ","] + WORDS + ["##s", "##er"]
  (hf / "vocab.txt").write_text("".join(v + "\n" for v in vocab))
  transformers.BertTokenizerFast(str(hf / "vocab.txt"), do_lower_case=True).save_pretrained(hf)
  torch.manual_seed(0)
  cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=4, intermediate_size=48,
                                max_position_embeddings=64, initializer_range=0.2)
  transformers.BertForMaskedLM(cfg).save_pretrained(hf)
  st = SentenceTransformer(modules=[models.Transformer(str(hf), max_seq_length=16),
                                    models.Pooling(32, pooling_mode="mean"), models.Normalize()],
                           device="cpu")
  st.save(str(root / "st"))
  import_hf(str(root / "st"), str(root / "wd_st"))
  import_hf(str(hf), str(root / "wd_mlm"))
  return root


def st_encode(path, texts, **kw):
  model = SentenceTransformer(str(path), device="cpu")
  return model.encode(texts, convert_to_numpy=True, batch_size=4, **kw)


def cosine(a, b):
  return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_embed_cli_matches_sentence_transformers(dirs, tmp_path, capsys):
  settings = json.loads((dirs / "wd_st" / embed.SETTINGS_FILE).read_text())
  assert settings == dict(pooling="mean", normalize=True, max_seq_len=16, unsupported=[])
  inp = tmp_path / "texts.txt"
  inp.write_text("\n".join(TEXTS) + "\n")
  out = tmp_path / "emb.npy"
  # batch 3 on 8 devices: batches of 8 rows, the last one partly padding.
  assert cli.main(["embed", "--workdir", str(dirs / "wd_st"), "--input", str(inp),
                   "--output", str(out), "--batch-size", "3"]) == 0
  assert "wrote 7 x 32 embeddings" in capsys.readouterr().out
  ours, ref = np.load(out), st_encode(dirs / "st", TEXTS)
  assert ours.shape == ref.shape == (7, 32) and ours.dtype == np.float32
  assert cosine(ours, ref).min() >= 0.9999
  np.testing.assert_allclose(ours, ref, atol=1e-5)
  assert np.allclose(np.linalg.norm(ours, axis=-1), 1.0, atol=1e-5)


def test_embed_with_weights_split_over_fsdp_and_tensor(dirs, tmp_path, capsys):
  """--config.mesh.fsdp=2 --config.mesh.tensor=2 on the 8 devices: the weights really split,
  the vectors those of sentence-transformers still."""
  inp, out = tmp_path / "texts.txt", tmp_path / "emb.npy"
  inp.write_text("\n".join(TEXTS) + "\n")
  assert cli.main(["embed", "--workdir", str(dirs / "wd_st"), "--input", str(inp), "--output",
                   str(out), "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]) == 0
  np.testing.assert_allclose(np.load(out), st_encode(dirs / "st", TEXTS), atol=1e-5)
  config = workdir_lib.read_config(str(dirs / "wd_st"))
  model = bert.BertModel(ModelConfig.from_config(config.model), add_pooling_layer=False)
  place = embed.Placement(config, model, ["--config.mesh.fsdp=2", "--config.mesh.tensor=2"])
  assert dict(place.mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  query = place.params["encoder"]["layer_0"]["attention"]["self"]["query"]["kernel"]
  assert query.shard_shape((32, 32)) == (16, 16)  # embed over fsdp, heads over tensor
  for bad, message in [("--config.mesh.tensor=3", "must divide the model's 4 heads"),
                       ("--config.train.steps=3", "only --config.mesh.* overrides")]:
    capsys.readouterr()
    assert cli.main(["embed", "--workdir", str(dirs / "wd_st"), "--input", str(inp),
                     "--output", str(tmp_path / "bad.npy"), bad]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "bad.npy").exists()


def test_old_layout_with_cls_pooling_in_a_subfolder(dirs, tmp_path):
  """sentence-transformers 2.x files: the model in 0_Transformer/, one flag per pooling mode,
  max_seq_length in sentence_bert_config.json, no Normalize."""
  old = tmp_path / "old"
  shutil.copytree(dirs / "st", old / "0_Transformer",
                  ignore=shutil.ignore_patterns("1_Pooling", "2_Normalize", "modules.json"))
  (old / "0_Transformer" / "sentence_bert_config.json").write_text(
      json.dumps({"max_seq_length": 12, "do_lower_case": False}))
  (old / "1_Pooling").mkdir()
  (old / "1_Pooling" / "config.json").write_text(json.dumps(
      {"word_embedding_dimension": 32, "pooling_mode_cls_token": True,
       "pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": False}))
  (old / "modules.json").write_text(json.dumps([
      {"idx": 0, "name": "0", "path": "0_Transformer",
       "type": "sentence_transformers.models.Transformer"},
      {"idx": 1, "name": "1", "path": "1_Pooling",
       "type": "sentence_transformers.models.Pooling"}]))
  import_hf(str(old), str(tmp_path / "wd"))
  assert embed.read_settings(str(tmp_path / "wd")) == dict(
      pooling="cls", normalize=False, max_seq_len=12, unsupported=[])
  ours = embed.embed(str(tmp_path / "wd"), TEXTS, batch_size=8)
  ref = st_encode(old, TEXTS)
  assert cosine(ours, ref).min() >= 0.9999
  np.testing.assert_allclose(ours, ref, atol=1e-5)


def per_text_mean(workdir, texts, max_len):
  """Mean-pooled last hidden states, one unpadded text at a time."""
  config, model_cfg, tok, params = embed.load_bert(workdir)
  model = bert.BertModel(model_cfg, add_pooling_layer=False)
  out = []
  for ids in embed.rows(tok, texts, max_len):
    hidden = model.apply({"params": embed.encoder_params(params)}, np.array([ids]))["hidden"]
    out.append(np.asarray(hidden[0]).mean(0))
  return np.stack(out)


def test_any_bert_workdir_mean_pooling_ignores_padding(tmp_path):
  """A pretrained workdir (sentencepiece, pretraining head): batched, padded and sharded
  equals one text at a time; .jsonl input with --field; cls pooling is row 0's state."""
  workdir = make_init_workdir(tmp_path)
  texts = [" ".join(WORDS[:n]) for n in (1, 3, 9, 20, 2)]
  inp = tmp_path / "in.jsonl"
  inp.write_text("".join(json.dumps({"sentence": t}) + "\n" for t in texts))
  out = tmp_path / "e.npy"
  assert cli.main(["embed", "--workdir", workdir, "--input", str(inp), "--output", str(out),
                   "--field", "sentence", "--batch-size", "8"]) == 0
  want = per_text_mean(workdir, texts, 32)
  np.testing.assert_allclose(np.load(out), want, atol=2e-5)
  cls = embed.embed(workdir, texts, pooling="cls", normalize=True)
  assert np.allclose(np.linalg.norm(cls, axis=-1), 1.0, atol=1e-5)
  assert not np.allclose(cls, want / np.linalg.norm(want, axis=-1, keepdims=True), atol=1e-3)
  inp.write_text('{"text": "a"}\n{"other": 1}\n')
  assert cli.main(["embed", "--workdir", workdir, "--input", str(inp), "--output", str(out)]) == 2


def hf_fill_mask(model_dir, text, top_k):
  pipe = transformers.pipeline("fill-mask", model=str(model_dir), tokenizer=str(model_dir),
                               device="cpu")
  return pipe(text, top_k=top_k)


def check_guesses(ours, ref):
  assert [g["token"] for g in ours] == [g["token"] for g in ref]
  np.testing.assert_allclose([g["score"] for g in ours], [g["score"] for g in ref], atol=1e-5)
  assert [g["token_str"] for g in ours] == [g["token_str"] for g in ref]


def test_fill_mask_matches_the_transformers_pipeline(dirs, capsys):
  text = "paris is the [MASK] of france."
  assert cli.main(["fill-mask", "--workdir", str(dirs / "wd_mlm"), text, "--top-k", "5",
                   "--json"]) == 0
  ours = json.loads(capsys.readouterr().out)
  ref = hf_fill_mask(dirs / "hf", text, 5)
  check_guesses(ours, ref)
  assert [g["sequence"] for g in ours] == [g["sequence"] for g in ref]
  assert cli.main(["fill-mask", "--workdir", str(dirs / "wd_mlm"), text, "--top-k", "3"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 3 and lines[0].split()[:2] == [f"{ref[0]['score']:.4f}",
                                                       ref[0]["token_str"]]


def test_fill_mask_on_a_pretrained_workdir_and_refusals(tmp_path, capsys):
  """plmjax pretraining workdir (sentencepiece): the same guesses as transformers on its export."""
  workdir = make_init_workdir(tmp_path)
  config = workdir_lib.read_config(workdir)
  params, _ = checkpoint.load_params(workdir)  # sharpen the random MLM head a little
  params["cls"]["predictions"]["bias"] = np.linspace(-3, 3, config.model.vocab_size,
                                                     dtype=np.float32)
  checkpoint.write_params_workdir(str(tmp_path / "sharp"), config, params,
                                  tokenizer_dir=workdir_lib.tokenizer_dir(workdir))
  workdir = str(tmp_path / "sharp")
  export(workdir, str(tmp_path / "hf"))
  text = "ka lo [MASK] mi."
  ours = guesses(workdir, text, 4)
  ref = hf_fill_mask(tmp_path / "hf", text, 4)
  check_guesses(ours, ref)
  two = guesses(workdir, "[MASK] lo [MASK]", 2, expect_blocks=2)
  assert len(two) == 2 and all(len(g) == 2 for g in two)
  assert cli.main(["fill-mask", "--workdir", workdir, "no mask here"]) == 2
  assert "has no [MASK]" in capsys.readouterr().err
  qa = tmp_path / "qa"
  config.task.head = "question_answering"
  checkpoint.write_params_workdir(str(qa), config, {"bert": params["bert"]},
                                  tokenizer_dir=workdir_lib.tokenizer_dir(workdir))
  assert cli.main(["fill-mask", "--workdir", str(qa), text]) == 2
  assert "has no MLM head" in capsys.readouterr().err


def guesses(workdir, text, top_k, expect_blocks=1):
  out = fill_mask.fill_mask(workdir, text, top_k=top_k)
  assert len(out) == expect_blocks
  return out[0] if expect_blocks == 1 else out


def test_import_report_names_the_sentence_transformers_settings(dirs, tmp_path, capsys):
  from plmjax.export.import_hf import format_report  # pylint: disable=g-import-not-at-top
  report = import_hf(str(dirs / "st"), str(tmp_path / "w"))
  text = format_report(report, str(dirs / "st"), str(tmp_path / "w"))
  assert "sentence-transformers: pooling mean, normalize True, max_seq_len 16" in text
  # Re-importing a plain model over it drops the settings file.
  import_hf(str(dirs / "hf"), str(tmp_path / "w"), overwrite=True)
  assert not os.path.exists(tmp_path / "w" / embed.SETTINGS_FILE)
  # Its MLM head was initialised at import: fill-mask says so.
  assert cli.main(["fill-mask", "--workdir", str(dirs / "wd_st"), "a [MASK]"]) == 0
  assert "sentence-transformers model, which has no MLM head" in capsys.readouterr().err
