"""2 processes x 4 CPU devices (gloo) pretrain like 1 process x 8 devices, resume, and stop
together on a signal to one of them."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys

import numpy as np

from plmjax import config as config_lib
from plmjax.data import pipeline
from plmjax.data.tokenizer import load_tokenizer
from plmjax.models import build_model
from plmjax.train.flops import flops_per_token
from plmjax.train.objectives import PRETRAINING
from plmjax.train.trainer import Trainer

CONFIG = '''
from plmjax.config import base_config

def get_config():
  c = base_config("bert")
  c.model.update(num_layers=1, hidden_size=32, num_heads=2, intermediate_size=64,
                 vocab_size=300, max_position_embeddings=32, dropout_rate=0.0,
                 attention_dropout_rate=0.0)
  c.data.update(train={train!r}, max_seq_len=32, max_predictions_per_seq=5)
  c.train.update(steps=6, batch_size=16, learning_rate=1e-3, warmup_steps=1, log_every_steps=1)
  c.checkpoint.update(every_steps=3, async_save=False)
  return c
'''


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _write_corpus(path, wiki_sample):
  with open(wiki_sample) as f, open(path, "w") as out:
    out.writelines(line for _, line in zip(range(12), f))


HOOKED_CLI = str(pathlib.Path(__file__).with_name("hooked_cli.py"))


def _start_two_processes(config_path, workdir, extra=(), hooks=((), ())):
  port = _free_port()
  procs = []
  for i in range(2):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu", PLMJAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
               PLMJAX_NUM_PROCESSES="2", PLMJAX_PROCESS_ID=str(i))
    procs.append(subprocess.Popen(
        [sys.executable, HOOKED_CLI, *hooks[i], "--", "pretrain", "--config", str(config_path),
         "--workdir", str(workdir), *extra], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True))
  return procs


def _run_two_processes(config_path, workdir, extra=()):
  procs = _start_two_processes(config_path, workdir, extra)
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode in (0, 128 + 15), out[-3000:]
  return outs


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if "split" not in r}


class _TwoShards:
  """The global batch of a 2-process run, built in one process: rows of shard 0 then 1."""

  def __init__(self, its):
    self.its = its

  def __next__(self):
    parts = [next(it) for it in self.its]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def get_state(self):
    return [it.get_state() for it in self.its]

  def set_state(self, states):
    for it, s in zip(self.its, states):
      it.set_state(s)


def test_two_processes_match_one_process_and_resume(tmp_path, wiki_sample):
  corpus = tmp_path / "corpus.jsonl"
  _write_corpus(corpus, wiki_sample)
  config_path = tmp_path / "tiny.py"
  config_path.write_text(CONFIG.format(train=str(corpus)))

  # 2 processes, stopped after 4 steps (a checkpoint), then resumed to the end.
  multi = tmp_path / "multi"
  outs = _run_two_processes(config_path, multi, ["--config.train.stop_after_steps=4"])
  assert "stopped by train.stop_after_steps=4 after step 4" in outs[0]
  outs = _run_two_processes(config_path, multi)
  assert "resumed from step 4" in outs[0]
  multi_losses = _losses(multi)
  assert sorted(multi_losses) == [1, 2, 3, 4, 5, 6]

  # 1 process x 8 devices on the same global batches (both shards' rows, same order).
  config = config_lib.load_config_file(str(config_path))
  model_cfg = config_lib.validate(config)
  tokenizer = load_tokenizer(str(multi / "tokenizer"))
  its = [pipeline.make_pretrain_iterator(config, tokenizer, split="train", batch_size=8,
                                         process_index=i, process_count=2) for i in range(2)]
  single = tmp_path / "single"
  source = _TwoShards(its)
  state0 = source.get_state()
  example = next(source)
  source.set_state(state0)
  trainer = Trainer(config, str(single), build_model(model_cfg, "pretraining"),
                    PRETRAINING["bert"], example, flops_per_token=flops_per_token(model_cfg, 32, 5),
                    tokens_per_example=32)
  trainer.fit(source)
  single_losses = _losses(single)
  np.testing.assert_allclose([multi_losses[s] for s in range(1, 7)],
                             [single_losses[s] for s in range(1, 7)], rtol=1e-6, atol=0)


def test_sigterm_to_one_process_stops_both_at_the_same_step_with_a_checkpoint(
    tmp_path, wiki_sample):
  corpus = tmp_path / "corpus.jsonl"
  _write_corpus(corpus, wiki_sample)
  config_path = tmp_path / "tiny.py"
  config_path.write_text(CONFIG.format(train=str(corpus)))
  workdir = tmp_path / "run"
  # Processes agree on signals at log steps only (every 2 here): process 1 is signalled
  # after step 1, and both stop after step 2.
  procs = _start_two_processes(config_path, workdir, ["--config.train.log_every_steps=2"],
                               hooks=((), ("--pause-after", "1")))
  lines = []
  while not any("paused after step 1" in line for line in lines):
    line = procs[1].stdout.readline()
    assert line, "".join(lines)
    lines.append(line)
  procs[1].send_signal(signal.SIGTERM)
  outs = [p.communicate(timeout=600)[0] for p in procs]
  assert [p.returncode for p in procs] == [128 + 15, 128 + 15], outs
  assert "stopped by SIGTERM after step 2" in outs[0]
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()
                if p.name.isdigit()) == [2]
  assert sorted(_losses(workdir)) == [2]
