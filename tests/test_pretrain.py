"""End-to-end pretraining on real text (wiki_sample): the loss falls, MLM accuracy rises."""

import json

import pytest

from plmjax import workdir as workdir_lib
from plmjax import cli
from plmjax.config import base_config
from plmjax.train import pretrain


def _subset(wiki_sample, path, n=30):
  with open(wiki_sample) as f, open(path, "w") as out:
    out.writelines(line for _, line in zip(range(n), f))
  return str(path)


def _records(workdir):
  with open(workdir / "metrics.jsonl") as f:
    return [json.loads(line) for line in f]


def _tiny(arch, train, steps):
  c = base_config(arch)
  c.model.update(num_layers=1, hidden_size=64, num_heads=2, intermediate_size=128,
                 vocab_size=1000, max_position_embeddings=64, dropout_rate=0.0,
                 attention_dropout_rate=0.0)
  c.data.update(train=train, eval=train, max_seq_len=64, max_predictions_per_seq=10,
                tokenizer_model_type="bpe")
  c.train.update(steps=steps, batch_size=16, learning_rate=3e-3, warmup_steps=5,
                 log_every_steps=10, eval_steps=2)
  c.checkpoint.update(every_steps=steps, async_save=False)
  return c


def test_bert_loss_falls_and_mlm_accuracy_rises(tmp_path, wiki_sample):
  train = _subset(wiki_sample, tmp_path / "wiki.jsonl")
  config = _tiny("bert", train, 100)
  config.train.update(log_every_steps=5, learning_rate=5e-3)
  result = pretrain.run(config, str(tmp_path / "run"))
  assert result.step == 100
  lines = [r for r in _records(tmp_path / "run") if "split" not in r]
  first, last = lines[0], lines[-1]
  # Steps 1-5 predict at about chance (0.1% of a 1000-token vocabulary).
  assert last["mlm_loss"] < first["mlm_loss"] - 0.6
  assert last["mlm_accuracy"] > max(3 * first["mlm_accuracy"], 0.02)
  for key in ("step", "loss", "mlm_accuracy", "nsp_accuracy", "tokens_per_sec", "mfu",
              "learning_rate"):
    assert key in last
  evals = [r for r in _records(tmp_path / "run") if r.get("split") == "eval"]
  assert len(evals) == 1 and evals[0]["step"] == 100 and "mlm_accuracy" in evals[0]
  assert (tmp_path / "run" / "tokenizer").is_dir()
  assert list((tmp_path / "run" / "tb").iterdir())


def _gpt_config_file(tmp_path):
  config_file = tmp_path / "gpt.py"
  config_file.write_text(
      "from plmjax.config import base_config\n"
      "def get_config():\n"
      "  c = base_config('gpt')\n"
      "  c.model.update(num_layers=1, hidden_size=64, num_heads=2, intermediate_size=128,\n"
      "                 vocab_size=1000, max_position_embeddings=64)\n"
      "  c.data.update(tokenizer_model_type='bpe', max_seq_len=64, packing=True)\n"
      "  c.train.update(batch_size=16, learning_rate=5e-3, warmup_steps=5, log_every_steps=5)\n"
      "  c.checkpoint.async_save = False\n"
      "  return c\n")
  return str(config_file)


def test_gpt_loss_falls_via_cli(tmp_path, wiki_sample, capsys):
  train = _subset(wiki_sample, tmp_path / "wiki.jsonl", n=20)
  config_file = _gpt_config_file(tmp_path)
  code = cli.main(["pretrain", "--config", config_file, "--workdir", str(tmp_path / "gpt"),
                   f"--config.data.train={train}", "--config.train.steps=60",
                   "--config.checkpoint.every_steps=30"])
  assert code == 0
  lines = _records(tmp_path / "gpt")
  assert lines[-1]["loss"] < lines[0]["loss"] - 0.6
  assert lines[-1]["perplexity"] == pytest.approx(2.718281828 ** lines[-1]["loss"], rel=1e-6)
  steps = sorted(int(p.name) for p in (tmp_path / "gpt" / "checkpoints").iterdir()
                 if p.name.isdigit())
  assert steps == [30, 60]
  out = capsys.readouterr().out  # the closing lines: where things are, what to run next
  done = [line for line in out.splitlines() if line.startswith("plmjax: done: ")]
  assert len(done) == 1 and "step 60" in done[0] and "train loss" in done[0]
  assert f"checkpoint {tmp_path / 'gpt' / 'checkpoints' / '60'}" in done[0]
  assert f"next: plmjax export --workdir {tmp_path / 'gpt'}" in out
  # The attention kernel is named at start, with why (here: CPU, so xla).
  [kernel] = [line for line in out.splitlines() if line.startswith("plmjax: attention ")]
  assert kernel.startswith("plmjax: attention xla: ") and len(kernel) > 30


def test_checkpoints_can_live_outside_the_workdir(tmp_path, wiki_sample, capsys):
  """config.checkpoint.dir (a gs:// URL on TPU VMs; a local path here) holds the
  checkpoints; resume and load_params find them through the workdir's config.json."""
  train = _subset(wiki_sample, tmp_path / "wiki.jsonl", n=20)
  args = ["pretrain", "--config", _gpt_config_file(tmp_path), "--workdir", str(tmp_path / "w"),
          f"--config.data.train={train}", "--config.train.steps=4",
          "--config.checkpoint.every_steps=2", f"--config.checkpoint.dir={tmp_path / 'ckpt'}"]
  assert cli.main(args + ["--config.train.stop_after_steps=2"]) == 0
  assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["2"]
  assert not (tmp_path / "w" / "checkpoints").exists()
  assert cli.main(args) == 0
  assert "resumed from step 2" in capsys.readouterr().out
  from plmjax.train import checkpoint
  assert workdir_lib.checkpoint_steps(str(tmp_path / "w")) == [2, 4]
  assert checkpoint.load_params(str(tmp_path / "w"))[1] == 4


@pytest.mark.parametrize("override, message", [
    ("--config.train.stpes=5", "unknown config key config.train.stpes"),
    ("--config.train.steps=abc", "config.train.steps='abc' is not a valid int"),
    ("--config.model.num_heads=3", "not divisible by config.model.num_heads=3"),
    ("--config.model.dtype=float8", "config.model.dtype='float8' is not allowed"),
    ("--config.model.attention_impl=flash", "use auto, splash, xla or cudnn"),
])
def test_bad_config_is_one_clear_line(tmp_path, capsys, override, message):
  code = cli.main(["pretrain", "--config", "configs/bert_tiny.py", "--workdir",
                   str(tmp_path / "w"), override])
  err = capsys.readouterr().err
  assert code == 2
  assert message in err and "Traceback" not in err
  assert len(err.strip().splitlines()) == 1
