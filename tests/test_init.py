"""`plmjax pretrain --init DIR`: continued pretraining from another workdir's weights.

The new run starts at step 0 with DIR's weights (its first loss is DIR's evaluation of
the same batch), a fresh optimizer and data position, and DIR's tokenizer; a resumed run
continues from its own checkpoint. A wrong tokenizer or model shape is one clear error
that leaves nothing behind.
"""

import json
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers
from tokenizers import BertWordPieceTokenizer

from conftest import SHARED_DATA
from hf_helpers import trained_sentencepiece, wiki_lines
from plmjax import cli
from plmjax import workdir as workdir_lib
from plmjax.config import base_config
from plmjax.data import pipeline
from plmjax.data.tokenizer import load_tokenizer
from plmjax.errors import CheckpointError, ConfigError, DataError
from plmjax.models import build_model
from plmjax.models.config import ModelConfig
from plmjax.train import checkpoint, pretrain
from plmjax.train.hooks import Hook
from plmjax.train.objectives import PRETRAINING
from plmjax.train.optimizer import make_optimizer
from plmjax.train.step import make_eval_step

WIKI = SHARED_DATA / "wiki_sample.jsonl"


class Capture(Hook):
  """The state a run starts from, and the loss of each of its steps."""

  def start(self, loop):
    self.step = loop.step
    self.params = jax.device_get(loop.state["params"])
    self.opt_state = jax.device_get(loop.state["opt_state"])
    self.losses = []

  def after_step(self, loop):
    self.losses.append(float(jax.device_get(loop.metrics["batch_loss"])))


def _tiny(arch, train, tokenizer, seq_len=32, steps=2):
  c = base_config(arch)
  c.model.update(num_layers=1, hidden_size=32, num_heads=2, intermediate_size=64,
                 vocab_size=1000, max_position_embeddings=64, dropout_rate=0.0,
                 attention_dropout_rate=0.0)
  c.data.update(train=train, eval="", tokenizer=tokenizer, max_seq_len=seq_len,
                max_predictions_per_seq=8)
  c.train.update(steps=steps, batch_size=8, learning_rate=1e-3, warmup_steps=1,
                 log_every_steps=1)
  c.checkpoint.update(every_steps=steps, async_save=False)
  return c


def _equal_trees(a, b):
  flat_a, flat_b = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)
  assert len(flat_a) == len(flat_b)
  for (path, x), y in zip(flat_a, flat_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


def _assert_fresh_optimizer(config, capture):
  fresh = make_optimizer(config.train).init(capture.params)
  _equal_trees(capture.opt_state, fresh)
  assert capture.step == 0


def _eval_loss(config, params, tokenizer) -> tuple[float, dict]:
  """(loss, batch): `params`' loss on the first batch of a fresh iterator over
  config.data.train."""
  arch = config.model.arch
  model = build_model(ModelConfig.from_config(config.model), config.task.head)
  batch = next(pipeline.make_pretrain_iterator(config, tokenizer,
                                               batch_size=config.train.batch_size))
  sums = jax.jit(make_eval_step(model, PRETRAINING[arch]))(params, batch)
  return PRETRAINING[arch].finalize(jax.device_get(sums))["loss"], batch


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  path = tmp_path_factory.mktemp("corpus") / "wiki.jsonl"
  with open(WIKI) as f, open(path, "w") as out:
    out.writelines(line for _, line in zip(range(20), f))
  return str(path)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory, corpus):
  """A tiny BERT pretrained for 2 steps at seq 32 (phase 1)."""
  tmp = tmp_path_factory.mktemp("bert")
  spm = trained_sentencepiece(WIKI, tmp)
  config = _tiny("bert", corpus, spm)
  pretrain.run(config, str(tmp / "p1"))
  return config, str(tmp / "p1")


def test_bert_phase_two_starts_from_phase_one(bert_dir, tmp_path, capsys):
  """Phase 2 at a longer sequence: DIR's weights, step 0, fresh optimizer and data."""
  config1, p1 = bert_dir
  config = _tiny("bert", config1.data.train, config1.data.tokenizer, seq_len=64)
  config.data.max_predictions_per_seq = 12
  new = tmp_path / "p2"
  capture = Capture()
  result = pretrain.run(config, str(new), init=p1, hooks=[capture])
  assert result.step == 2
  dir_params, dir_step = checkpoint.load_params(p1)
  assert dir_step == 2
  _equal_trees(capture.params, dir_params)
  _assert_fresh_optimizer(config, capture)
  tokenizer = load_tokenizer(workdir_lib.tokenizer_dir(p1))
  expected, batch = _eval_loss(config, dir_params, tokenizer)
  assert batch["input_ids"].shape == (8, 64)
  assert capture.losses[0] == pytest.approx(expected, rel=1e-5)
  assert "tensors from" in capsys.readouterr().out
  assert json.loads((new / "init.json").read_text()) == {"init": p1, "step": 2}
  assert (new / "tokenizer" / "tokenizer.model").read_bytes() == \
      open(tokenizer.path, "rb").read()
  assert workdir_lib.checkpoint_steps(str(new)) == [2]

  # Resuming (with --init, or without it) continues from NEW's checkpoint, not from DIR.
  own, _ = checkpoint.load_params(str(new))
  for init in (p1, None):
    config.train.steps += 1
    capture = Capture()
    pretrain.run(config, str(new), init=init, hooks=[capture])
    assert capture.step == config.train.steps - 1
    _equal_trees(capture.params, own)
    own, _ = checkpoint.load_params(str(new))
  out = capsys.readouterr().out
  assert "resuming from them; --init" in out and "resumed from step 3" in out

  # A run stopped before its first checkpoint starts again from the --init it recorded.
  shutil.rmtree(workdir_lib.checkpoint_dir(str(new)))
  capture = Capture()
  pretrain.run(config, str(new), hooks=[capture])
  assert capture.step == 0 and "the --init recorded in" in capsys.readouterr().out
  _equal_trees(capture.params, dir_params)


def test_gpt_init_via_cli(tmp_path, corpus):
  spm = trained_sentencepiece(WIKI, tmp_path, kind="gpt")
  config = _tiny("gpt", corpus, spm)
  pretrain.run(config, str(tmp_path / "dir"))
  config_file = tmp_path / "gpt.py"
  config_file.write_text(
      "from plmjax.config import base_config\n"
      "def get_config():\n"
      "  c = base_config('gpt')\n"
      "  c.model.update(num_layers=1, hidden_size=32, num_heads=2, intermediate_size=64,\n"
      "                 vocab_size=1000, max_position_embeddings=64, dropout_rate=0.0,\n"
      "                 attention_dropout_rate=0.0)\n"
      "  c.data.update(max_seq_len=32)\n"
      "  c.train.update(steps=1, batch_size=8, warmup_steps=1)\n"
      "  c.checkpoint.async_save = False\n"
      "  return c\n")
  capture = Capture()
  code = cli.main(["pretrain", "--config", str(config_file), "--workdir", str(tmp_path / "new"),
                   "--init", str(tmp_path / "dir"), f"--config.data.train={corpus}"],
                  hooks=[capture])
  assert code == 0
  dir_params, _ = checkpoint.load_params(str(tmp_path / "dir"))
  _equal_trees(capture.params, dir_params)
  new_config = workdir_lib.read_config(str(tmp_path / "new"))
  _assert_fresh_optimizer(new_config, capture)
  tokenizer = load_tokenizer(workdir_lib.tokenizer_dir(str(tmp_path / "new")))
  assert tokenizer.kind == "gpt" and tokenizer.vocab_size == 1000
  expected, _ = _eval_loss(new_config, dir_params, tokenizer)
  assert capture.losses[0] == pytest.approx(expected, rel=1e-5)


def _imported_bert(tmp_path, wiki_sample):
  """import-hf of a tiny random BertForPreTraining with a WordPiece vocab.txt."""
  src = tmp_path / "hf"
  trainer = BertWordPieceTokenizer(lowercase=True)
  trainer.train_from_iterator(wiki_lines(wiki_sample, slice(0, 20)), vocab_size=400,
                              special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
  torch.manual_seed(0)
  hf_config = transformers.BertConfig(
      vocab_size=trainer.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
      num_attention_heads=4, intermediate_size=48, max_position_embeddings=32,
      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  model = transformers.BertForPreTraining(hf_config)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.1)
  model.eval().save_pretrained(src)
  trainer.save_model(str(src))
  (src / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
  assert cli.main(["import-hf", "--model", str(src), "--workdir", str(tmp_path / "dir")]) == 0
  return model, src, str(tmp_path / "dir")


def test_domain_adaptation_of_an_imported_hf_bert(tmp_path, wiki_sample, capsys):
  """The first loss is Hugging Face's BertForPreTraining loss on the same batch."""
  model, src, init = _imported_bert(tmp_path, wiki_sample)
  train = tmp_path / "domain.jsonl"
  with open(wiki_sample) as f, open(train, "w") as out:
    out.writelines(line for _, line in zip(range(40), f) if _ >= 20)
  config = base_config("bert")
  config.model.update(workdir_lib.read_config(init).model)  # the shape of the imported model
  config.model.update(dropout_rate=0.0, attention_dropout_rate=0.0)
  # The source's vocab.txt is the same vocabulary as the workdir's tokenizer.json: accepted.
  assert load_tokenizer(workdir_lib.tokenizer_dir(init)).path.endswith("tokenizer.json")
  config.data.update(train=str(train), max_seq_len=32, max_predictions_per_seq=6,
                     tokenizer=str(src / "vocab.txt"))
  config.train.update(steps=1, batch_size=8, warmup_steps=1)
  config.checkpoint.async_save = False
  capture = Capture()
  pretrain.run(config, str(tmp_path / "new"), init=init, hooks=[capture])
  assert "newly initialised: none" in capsys.readouterr().out
  _equal_trees(capture.params, checkpoint.load_params(init)[0])
  _assert_fresh_optimizer(config, capture)

  tokenizer = load_tokenizer(workdir_lib.tokenizer_dir(str(tmp_path / "new")))
  batch = next(pipeline.make_pretrain_iterator(config, tokenizer, batch_size=8))
  labels = np.full(batch["input_ids"].shape, -100, np.int64)
  rows, cols = np.nonzero(batch["masked_weights"])
  labels[rows, batch["masked_positions"][rows, cols]] = batch["masked_labels"][rows, cols]
  as_torch = lambda k: torch.tensor(np.asarray(batch[k], np.int64))
  with torch.no_grad():
    hf_loss = model(input_ids=as_torch("input_ids"), token_type_ids=as_torch("token_type_ids"),
                    attention_mask=as_torch("attention_mask"), labels=torch.tensor(labels),
                    next_sentence_label=as_torch("nsp_labels")).loss.item()
  assert capture.losses[0] == pytest.approx(hf_loss, rel=1e-4)


def test_another_tokenizer_is_an_error_that_writes_nothing(bert_dir, tmp_path):
  config1, p1 = bert_dir
  other = trained_sentencepiece(WIKI, tmp_path, model_type="bpe")  # also 1000 pieces
  new = tmp_path / "new"
  config = _tiny("bert", config1.data.train, other)
  with pytest.raises(DataError, match=r"is not the tokenizer of --init"):
    pretrain.run(config, str(new), init=p1)
  assert not new.exists()


def test_shape_mismatch_names_both_shapes(bert_dir, tmp_path, capsys):
  config1, p1 = bert_dir
  new = tmp_path / "new"
  new.mkdir()  # an existing empty workdir stays empty
  config = _tiny("bert", config1.data.train, config1.data.tokenizer)
  config.model.max_position_embeddings = 128
  with pytest.raises(CheckpointError) as e:
    pretrain.run(config, str(new), init=p1)
  message = str(e.value)
  assert "bert/embeddings/position_embeddings/embedding" in message
  assert "(64, 32) there but (128, 32) under this config" in message
  assert "config.model.max_position_embeddings=64" in message
  assert list(new.iterdir()) == []
  config = _tiny("gpt", config1.data.train, config1.data.tokenizer)
  with pytest.raises(ConfigError, match="holds a 'bert' model but config.model.arch='gpt'"):
    pretrain.run(config, str(new), init=p1)
  assert list(new.iterdir()) == []
  code = cli.main(["pretrain", "--config", "configs/bert_tiny.py", "--workdir", str(new),
                   "--init", p1, f"--config.data.train={config1.data.train}"])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and "under this config" in err[0], err
  assert list(new.iterdir()) == []
