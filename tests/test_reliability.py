"""Reliability: preemption, kill -9, corrupt checkpoints, non-finite losses, bad input.

The training runs are `python -m plmjax.cli pretrain` subprocesses of one tiny BERT
(hidden 32, 1 layer, vocab 300, seq 32; 6 steps, a checkpoint every 2) on three
Wikipedia articles, on one CPU device; they share compilations through conftest's
JAX_COMPILATION_CACHE_DIR. They run through tests/hooked_cli.py, whose hooks make a run
wait after a chosen step until the test has sent its signal (so every interruption lands
at a known step) or compute one step on NaN parameters.
"""

import hashlib
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

import plmjax
from plmjax import cli
from plmjax.data import sources
from plmjax.data.tokenizer_train import train_tokenizer
from plmjax.train import checkpoint
from plmjax import workdir as workdir_lib

HOOKED_CLI = str(pathlib.Path(__file__).with_name("hooked_cli.py"))
WIKI = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "wiki_sample.jsonl"
STEPS = 6
CONFIG = """
from plmjax.config import base_config


def get_config():
  c = base_config("bert")
  c.model.update(num_layers=1, hidden_size=32, num_heads=2, intermediate_size=64,
                 vocab_size=300, max_position_embeddings=32)
  c.data.update(train={train!r}, tokenizer={tokenizer!r}, max_seq_len=32,
                max_predictions_per_seq=5, prefetch=1)
  c.train.update(steps=6, batch_size=8, learning_rate=1e-3, warmup_steps=2,
                 log_every_steps=1, peak_flops_per_device=1e12)
  c.checkpoint.update(every_steps=2, keep=10)
  return c
"""


class Run:
  """A pretrain subprocess; stdout is read by a thread so the test can wait for a line."""

  def __init__(self, setup, workdir, *overrides, pause_after=None, nan_at=None,
               background=False):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    hooks = []
    if pause_after is not None:
      hooks += ["--pause-after", str(pause_after)]
    if nan_at is not None:
      hooks += ["--nan-at-step", str(nan_at)]
    self._stderr = open(f"{workdir}.stderr", "w+")
    argv = [sys.executable, HOOKED_CLI, *hooks, "--", "pretrain", "--config", setup.config,
            "--workdir", str(workdir), *overrides]
    if background:  # SIGINT ignored, as a shell starts `cmd &` in a script
      argv = ["sh", "-c", 'trap "" INT; exec "$@"', "sh", *argv]
    self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self._stderr, text=True,
                                 env=env)
    self.lines = []
    self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout),
                                    daemon=True)
    self._reader.start()

  def stderr(self) -> str:
    self._stderr.seek(0)
    return self._stderr.read()

  def wait_for(self, text: str, where: str = "stdout", timeout: float = 240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      found = "".join(self.lines) if where == "stdout" else self.stderr()
      if text in found:
        return
      if self.proc.poll() is not None and where == "stdout" and not self._reader.is_alive():
        break
      time.sleep(0.01)
    self.proc.kill()
    rc, out, err = self.finish()
    pytest.fail(f"{text!r} never appeared on {where} (rc {rc})\nstdout:\n{out}\nstderr:\n{err}")

  def finish(self, timeout: float = 240):
    rc = self.proc.wait(timeout)
    self._reader.join(timeout)
    err = self.stderr()
    self._stderr.close()
    return rc, "".join(self.lines), err


def run(setup, workdir, *overrides):
  return Run(setup, workdir, *overrides).finish()


def steps_in(workdir) -> list[int]:
  return workdir_lib.checkpoint_steps(str(workdir))


def metrics(workdir) -> list[dict]:
  with open(pathlib.Path(workdir) / "metrics.jsonl") as f:
    return [json.loads(line) for line in f]


def assert_same_params(workdir, reference):
  got, got_step = checkpoint.load_params(str(workdir))
  want, want_step = checkpoint.load_params(str(reference))
  assert got_step == want_step == STEPS
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)  # bitwise: same data order, rng and updates
  assert [m["loss"] for m in metrics(workdir)] == [m["loss"] for m in metrics(reference)]


def plmjax_lines(err: str) -> list[str]:
  """stderr's lines, all of them plmjax's own. Orbax left alone would also print the
  reads it abandoned after a failed restore ("Event loop is closed", over our lines);
  plmjax checks local checkpoints before orbax reads them, so stderr holds nothing else."""
  lines = err.splitlines()
  assert all(line.startswith("plmjax: ") for line in lines), err
  return lines


def truncate_largest(directory):
  files = [p for p in pathlib.Path(directory).rglob("*") if p.is_file()]
  largest = max(files, key=lambda p: p.stat().st_size)
  with open(largest, "r+b") as f:
    f.truncate(largest.stat().st_size // 2)


class Setup:
  """Corpus, tokenizer, config file and the uninterrupted reference run."""

  def __init__(self, root: pathlib.Path):
    self.root = root
    corpus = root / "corpus.jsonl"
    with open(WIKI) as f:
      corpus.write_text("".join(line for _, line in zip(range(3), f)))
    docs = sources.read_documents(str(corpus))
    train_tokenizer((line for doc in docs for line in doc), 300, "unigram",
                    str(root / "tok" / "tokenizer"), kind="bert")
    self.tokenizer = str(root / "tok" / "tokenizer.model")
    self.corpus = str(corpus)
    self.config = str(root / "tiny.py")
    pathlib.Path(self.config).write_text(CONFIG.format(train=self.corpus,
                                                       tokenizer=self.tokenizer))
    self.reference_dir = root / "reference"
    self._reference = Run(self, self.reference_dir)  # runs while the first test starts its own

  @property
  def reference(self) -> pathlib.Path:
    if self._reference is not None:
      rc, out, err = self._reference.finish()
      assert rc == 0, err
      self._reference = None
    return self.reference_dir


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  made = Setup(tmp_path_factory.mktemp("reliability"))
  yield made
  if made._reference is not None and made._reference.proc.poll() is None:
    made._reference.proc.kill()  # no test needed it
    made._reference.finish()


# ---- preemption and crashes ------------------------------------------------------------------


def test_sigterm_saves_a_checkpoint_and_the_resumed_run_is_bitwise_identical(setup, tmp_path):
  workdir = tmp_path / "run"
  preempted = Run(setup, workdir, pause_after=3)
  preempted.wait_for("paused after step 3")
  preempted.proc.send_signal(signal.SIGTERM)
  rc, out, err = preempted.finish()
  assert rc == 128 + signal.SIGTERM, err
  assert "SIGTERM received: finishing the step, saving a checkpoint" in err
  assert "stopped by SIGTERM after step 3" in out and "run the same command to resume" in out
  assert steps_in(workdir) == [2, 3]  # step 3 is not a checkpoint step: saved for the signal

  rc, out, err = run(setup, workdir)
  assert rc == 0, err
  assert "resumed from step 3" in out
  assert_same_params(workdir, setup.reference)


def test_second_signal_exits_at_once_and_keeps_the_last_good_checkpoint(setup, tmp_path):
  workdir = tmp_path / "run"
  interrupted = Run(setup, workdir, pause_after=3, background=True)
  interrupted.wait_for("paused after step 3")
  interrupted.proc.send_signal(signal.SIGINT)
  interrupted.wait_for("SIGINT received", where="stderr")
  interrupted.proc.send_signal(signal.SIGINT)
  rc, out, err = interrupted.finish()
  assert rc == 128 + signal.SIGINT, err
  assert "second SIGINT: exiting now" in err and "Traceback" not in err
  assert "stopped by" not in out  # it did not wait for the step-3 save
  kept = steps_in(workdir)
  assert kept[0] == 2 and set(kept) <= {2, 3}  # step 3 only if its save beat the signal

  rc, out, err = run(setup, workdir)
  assert rc == 0, err
  assert f"resumed from step {kept[-1]}" in out
  assert_same_params(workdir, setup.reference)


def test_kill_9_resumes_from_the_last_complete_checkpoint(setup, tmp_path):
  workdir = tmp_path / "run"
  killed = Run(setup, workdir, pause_after=3)
  killed.wait_for("paused after step 3")
  killed.proc.kill()
  rc, _, _ = killed.finish()
  assert rc == -signal.SIGKILL
  assert steps_in(workdir) == [2]
  # What a kill during a save leaves: orbax's temporary directory, never committed.
  ckpts = workdir / "checkpoints"
  shutil.copytree(ckpts / "2", ckpts / "4.orbax-checkpoint-tmp-1700000000")
  (ckpts / "4.orbax-checkpoint-tmp-1700000000" / "commit_success.txt").unlink(missing_ok=True)
  assert steps_in(workdir) == [2]

  rc, out, err = run(setup, workdir)
  assert rc == 0, err
  assert "resumed from step 2" in out
  assert_same_params(workdir, setup.reference)  # incl. metrics.jsonl: step 3 logged once


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(setup, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(setup.reference, workdir)
  truncate_largest(workdir / "checkpoints" / "6" / "params")

  rc, out, err = run(setup, workdir)
  assert rc == 0, err
  warning = [line for line in err.splitlines() if "is unreadable" in line]
  assert len(warning) == 1, err
  ckpts = workdir / "checkpoints"
  assert f"step 6 ({ckpts / '6'})" in warning[0]
  assert f"falling back to the previous one, step 4 ({ckpts / '4'})" in warning[0]
  assert "resumed from step 4" in out
  assert (workdir / "unreadable_checkpoints" / "6" / "params").is_dir()  # kept, set aside
  assert steps_in(workdir) == [2, 4, 6]
  assert_same_params(workdir, setup.reference)


def test_refuses_to_start_only_when_no_checkpoint_is_readable(setup, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(setup.reference, workdir)
  for step in (2, 4, 6):
    truncate_largest(workdir / "checkpoints" / str(step) / "params")
  before = snapshot(workdir)

  rc, _, err = run(setup, workdir)
  assert rc == 2, err
  ours = plmjax_lines(err)
  errors = [line for line in ours if line.startswith("plmjax: error:")]
  assert len(errors) == 1 and ours[-1] == errors[0], err
  assert len(ours) == 4, err  # 3 warnings, then the error
  assert re.search(r"no readable checkpoint in .*checkpoints: step 6 \(.*/6\) is unreadable "
                   r"\(.+\) \| step 4 .* \| step 2 .*Move .* away to start from scratch",
                   errors[0]), errors[0]
  assert snapshot(workdir) == before  # nothing set aside, nothing written


# ---- non-finite loss ---------------------------------------------------------------------------


def test_nonfinite_stop_reports_step_and_metric_and_saves_nothing_new(setup, tmp_path):
  workdir = tmp_path / "run"
  # The hook poisons step 4 (a checkpoint step).
  rc, _, err = Run(setup, workdir, nan_at=4).finish()
  assert rc == 2, err
  errors = [line for line in err.splitlines() if line.startswith("plmjax: error:")]
  assert errors == [line for line in err.splitlines() if "error" in line.lower()]
  assert len(errors) == 1 and "Traceback" not in err
  assert ("non-finite loss at step 4; stopped at step 4 without writing a new checkpoint"
          in errors[0])
  assert "the newest checkpoint is step 2" in errors[0]
  assert "config.train.nonfinite=skip" in errors[0]
  assert steps_in(workdir) == [2]


def test_nonfinite_skip_counts_skipped_updates_and_stops_after_n_in_a_row(setup, tmp_path):
  skip = ("--config.train.nonfinite=skip",)
  skipping = Run(setup, tmp_path / "skip", *skip, nan_at=4)
  limited = Run(setup, tmp_path / "limit", *skip, "--config.train.max_nonfinite_in_a_row=1",
                nan_at=4)
  rc, _, err = skipping.finish()
  assert rc == 0, err
  lines = metrics(tmp_path / "skip")
  assert [m["nonfinite_skipped"] for m in lines] == [0, 0, 0, 1, 1, 1]
  assert lines[3]["loss"] is None and lines[3]["grad_norm"] is None  # nothing to average
  assert all(np.isfinite(m["loss"]) for i, m in enumerate(lines) if i != 3)
  assert steps_in(tmp_path / "skip") == [2, 4, 6]

  rc, _, err = limited.finish()
  assert rc == 2, err
  assert ("1 non-finite update(s) in a row up to step 4 (limit "
          "config.train.max_nonfinite_in_a_row=1") in err
  assert steps_in(tmp_path / "limit") == [2]


# ---- bad input ---------------------------------------------------------------------------------


def snapshot(*paths) -> dict:
  """Every file and directory under `paths`: size, mtime and content hash."""
  state = {}
  for root in map(pathlib.Path, paths):
    if not root.exists():
      state[str(root)] = "absent"
      continue
    for p in sorted([root, *root.rglob("*")]):
      if p.is_dir():
        state[str(p)] = ("dir", p.stat().st_mtime_ns)
      else:
        state[str(p)] = (p.stat().st_size, p.stat().st_mtime_ns,
                         hashlib.sha256(p.read_bytes()).hexdigest())
  return state


@pytest.fixture(scope="module")
def existing(setup):
  """A finished run's workdir that every bad-input case points at."""
  workdir = setup.root / "existing"
  shutil.copytree(setup.reference, workdir)
  return workdir


def _config_file(setup, tmp_path, line):
  """The tiny config with `line` added at the end of get_config()."""
  text = CONFIG.format(train=setup.corpus, tokenizer=setup.tokenizer)
  text = text.replace("  return c\n", f"  {line}\n  return c\n")
  path = tmp_path / "bad_config.py"
  path.write_text(text)
  return str(path)


def _hf_llama(tmp_path):
  path = tmp_path / "llama"
  path.mkdir()
  (path / "config.json").write_text(json.dumps(
      {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 32}))
  return str(path)


def _corrupt_workdir_tokenizer(existing, tmp_path):
  workdir = tmp_path / "copy"
  shutil.copytree(existing, workdir)
  (workdir / "tokenizer" / "tokenizer.model").write_bytes(b"\x00not a sentencepiece model")
  return workdir


def _other_tokenizer(setup, tmp_path):
  """A BPE tokenizer of the same size (300) as the unigram one the existing run used."""
  docs = sources.read_documents(setup.corpus)
  prefix = tmp_path / "bpe" / "tokenizer"
  prefix.parent.mkdir()
  train_tokenizer((line for doc in docs for line in doc), 300, "bpe", str(prefix), kind="bert")
  return str(prefix) + ".model"


def _nonempty(tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  return out


def _garbage(tmp_path):
  path = tmp_path / "garbage.model"
  path.write_bytes(b"\x08\x01garbage, not a model proto")
  return path


def _a_file(tmp_path):
  path = tmp_path / "not_a_dir"
  path.write_text("x")
  return path


# id -> (callable(setup, existing, tmp_path) -> (argv, paths that must not change), message)
PRETRAIN = ["pretrain", "--config", "{config}", "--workdir", "{workdir}"]
CASES = {
    "unknown_key_override": (PRETRAIN + ["--config.train.stepz=5"],
                             r"unknown config key config\.train\.stepz; known keys of "
                             r"config\.train: .*steps"),
    "mistyped_key_in_file": ("file:c.train.stepz = 5", r"unknown config key config\.train\.stepz "
                             r"\(did you mean config\.train\.steps\?\)"),
    "wrong_type_override": (PRETRAIN + ["--config.train.batch_size=four"],
                            r"config\.train\.batch_size='four' is not a valid int"),
    "wrong_type_in_file": ("file:c.train.update(steps='six')",
                           r"config file .*bad_config\.py, line 14: TypeError: .*'steps'"),
    "zero_steps": (PRETRAIN + ["--config.train.steps=0"],
                   r"config\.train\.steps=0 must be a positive integer"),
    "negative_batch": (PRETRAIN + ["--config.train.batch_size=-4"],
                       r"config\.train\.batch_size=-4 must be a positive integer"),
    "missing_data": (PRETRAIN + ["--config.data.train={tmp}/nowhere/*.jsonl"],
                     r"nowhere/\*\.jsonl' matches no files"),
    "empty_data": (PRETRAIN + ["--config.data.train={tmp}/empty.jsonl"],
                   r"empty\.jsonl holds no text"),
    "vocab_mismatch": (["pretrain", "--config", "{config}", "--workdir", "{tmp}/new",
                        "--config.model.vocab_size=400"],
                       r"tokenizer .*tokenizer\.model has 300 tokens but "
                       r"config\.model\.vocab_size=400"),
    "vocab_too_large_for_the_corpus": (["pretrain", "--config", "{config}", "--workdir",
                                        "{tmp}/new", "--config.data.tokenizer=",
                                        "--config.model.vocab_size=9000"],
                                       r"config\.model\.vocab_size=9000 is too large for this "
                                       r"corpus: sentencepiece can make at most \d+ pieces"),
    "mesh_larger_than_the_devices_new_workdir": (["pretrain", "--config", "{config}",
                                                  "--workdir", "{tmp}/new",
                                                  "--config.data.tokenizer=",
                                                  "--config.mesh.data=64"],
                                                 r"config\.mesh=.* needs 64 devices but 8 are "
                                                 r"available"),
    "seq_len_above_positions": (PRETRAIN + ["--config.data.max_seq_len=64"],
                                r"max_seq_len=64 is above the model's position table "
                                r"\(config\.model\.max_position_embeddings=32\)"),
    "workdir_of_another_model": (PRETRAIN + ["--config.model.hidden_size=64"],
                                 r"holds checkpoints of another model \(model\.hidden_size: "
                                 r"workdir has 32, this run has 64\)"),
    "workdir_is_a_file": (["pretrain", "--config", "{config}", "--workdir", "{a_file}"],
                          r"not_a_dir exists and is not a directory"),
    "corrupt_tokenizer_file": (PRETRAIN + ["--config.data.tokenizer={garbage}"],
                               r"tokenizer file .*garbage\.model is not a sentencepiece model"),
    "other_tokenizer_same_vocab_size": (PRETRAIN + ["--config.data.tokenizer={other_tok}"],
                                        r"config\.data\.tokenizer=.*bpe/tokenizer\.model differs "
                                        r"from .*existing/tokenizer/tokenizer\.model, the "
                                        r"tokenizer this workdir .* was trained with"),
    "corrupt_tokenizer_in_workdir": (["pretrain", "--config", "{config}", "--workdir",
                                      "{corrupt_tokenizer}", "--config.data.tokenizer="],
                                     r"copy/tokenizer/tokenizer\.model is not a sentencepiece"),
    "missing_config_file": (["pretrain", "--config", "{tmp}/nope.py", "--workdir", "{workdir}"],
                            r"config file '.*nope\.py' does not exist"),
    "missing_argument": (["pretrain", "--config", "{config}"],
                         r"the following arguments are required: --workdir"),
    "export_to_nonempty_dir": (["export", "--workdir", "{workdir}", "--out", "{nonempty}"],
                               r"--out .*out exists and is not empty; pass --overwrite"),
    "import_unsupported_architecture": (["import-hf", "--model", "{llama}", "--workdir",
                                         "{workdir}"],
                                        r"model_type='llama' \(architectures "
                                        r"\['LlamaForCausalLM'\]\) is not supported"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_line_and_changes_nothing(case, setup, existing, tmp_path, capsys):
  argv, message = CASES[case]
  lazy = {"config": lambda: setup.config, "workdir": lambda: existing,
          "tmp": lambda: tmp_path, "llama": lambda: _hf_llama(tmp_path),
          "nonempty": lambda: _nonempty(tmp_path), "a_file": lambda: _a_file(tmp_path),
          "garbage": lambda: _garbage(tmp_path),
          "other_tok": lambda: _other_tokenizer(setup, tmp_path),
          "corrupt_tokenizer": lambda: _corrupt_workdir_tokenizer(existing, tmp_path)}
  if isinstance(argv, str):  # a line added to the config file
    argv = ["pretrain", "--config", _config_file(setup, tmp_path, argv[len("file:"):]),
            "--workdir", "{workdir}"]
  (tmp_path / "empty.jsonl").write_text("")
  values = {}
  for arg in argv:
    for key, make in lazy.items():
      if "{" + key + "}" in arg and key not in values:
        values[key] = str(make())
  argv = [arg.format(**values) for arg in argv]
  watched = [p for p in (values.get("workdir"), values.get("nonempty"), values.get("a_file"),
                         values.get("corrupt_tokenizer"), tmp_path / "new") if p]
  before = snapshot(*watched)
  capsys.readouterr()

  rc = cli.main(argv)

  out, err = capsys.readouterr()
  assert rc == 2
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("plmjax: error: "), err
  assert re.search(message, lines[0]), lines[0]
  assert snapshot(*watched) == before


def test_cli_process_prints_one_line_and_debug_shows_the_traceback(setup, tmp_path):
  argv = [sys.executable, "-m", "plmjax.cli", "pretrain", "--config", setup.config,
          "--workdir", str(tmp_path / "w"), "--config.train.steps=0"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  quiet = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=240)
  assert quiet.returncode == 2
  assert quiet.stderr.splitlines() == [
      "plmjax: error: config.train.steps=0 must be a positive integer"]
  loud = subprocess.run(argv + ["--debug"], capture_output=True, text=True, env=env, timeout=240)
  assert loud.returncode == 1
  assert "Traceback" in loud.stderr and "ConfigError: config.train.steps=0" in loud.stderr
  assert not (tmp_path / "w").exists()


def test_export_of_an_unreadable_checkpoint_is_one_line(setup, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(setup.reference, workdir)
  truncate_largest(workdir / "checkpoints" / "6" / "params")
  done = subprocess.run([sys.executable, "-m", "plmjax.cli", "export", "--workdir", str(workdir),
                         "--out", str(tmp_path / "hf")], capture_output=True, text=True,
                        timeout=240)
  assert done.returncode == 2
  [line] = plmjax_lines(done.stderr)
  assert re.search(r"^plmjax: error: checkpoint step 6 \(.*/checkpoints/6\) is unreadable "
                   r"\(.+\); choose another with --step \(available: \[2, 4\]\)$", line), line
  assert not (tmp_path / "hf").exists()
