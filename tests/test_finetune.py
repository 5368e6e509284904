"""End to end: each task type learns a synthetic task from a tiny 'pretrained' BERT."""

import collections
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from plmjax import cli
from plmjax import workdir as workdir_lib
from plmjax.data.tokenizer import load_tokenizer
from plmjax.errors import CheckpointError, DataError
from plmjax.finetune import finetune
from plmjax.finetune.tasks import finetune_config
from finetune_helpers import SEQ, make_init_workdir, words, write_jsonl

# Set by the `init_dir` fixture: words of the synthetic language whose first sub-token
# belongs to them alone (so the first sub-token identifies the word), and filler words.
W, FILLER = [], []
MARKERS = ANSWERS = ()
PER = LOC = QUESTION = ""  # tagging: PER may be followed by W[5] (I-PER)


def _choose_words(tokenizer):
  global MARKERS, PER, LOC, ANSWERS, QUESTION
  candidates = words(400)
  first = collections.Counter(tokenizer.encode(w)[0] for w in candidates)
  W[:] = [w for w in candidates if first[tokenizer.encode(w)[0]] == 1][:10]
  taken = {tokenizer.encode(w)[0] for w in W}
  FILLER[:] = [w for w in candidates if tokenizer.encode(w)[0] not in taken][:14]
  MARKERS, PER, LOC, ANSWERS, QUESTION = W[:3], W[3], W[4], W[6:9], W[9]


def sentence(rng, n):
  return [str(w) for w in rng.choice(FILLER, n)]


def insert(rng, ws, word):
  ws = list(ws)
  ws.insert(int(rng.integers(0, len(ws) + 1)), word)
  return ws


def classification_rows(n, seed):
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(n):
    label = int(rng.integers(0, 2))
    rows.append(dict(text=" ".join(insert(rng, sentence(rng, rng.integers(3, 8)), MARKERS[label])),
                     label=("neg", "pos")[label]))
  return rows


def regression_rows(n, seed):
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(n):
    k = int(rng.integers(0, 3))
    rows.append(dict(text=" ".join(insert(rng, sentence(rng, rng.integers(3, 8)), MARKERS[k])),
                     label=[-1.0, 0.0, 1.0][k]))
  return rows


def tagging_rows(n, seed):
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(n):
    tokens, tags = [], []
    for _ in range(rng.integers(4, 9)):
      r = rng.random()
      if r < 0.15:
        tokens += [PER, W[5]] if rng.random() < 0.5 else [PER]
        tags += ["B-PER", "I-PER"][:len(tokens) - len(tags)]
      elif r < 0.3:
        tokens.append(LOC)
        tags.append("B-LOC")
      else:
        tokens.append(str(rng.choice(FILLER)))
        tags.append("O")
    rows.append(dict(tokens=tokens, tags=tags))
  return rows


def qa_rows(n, seed):
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(n):
    answer = str(rng.choice(ANSWERS))
    context = " ".join(insert(rng, sentence(rng, rng.integers(6, 14)), answer))
    rows.append(dict(question=f"{QUESTION} {rng.choice(FILLER)}", context=context,
                     answers={"text": [answer], "answer_start": [context.index(answer)]}))
  return rows


TASKS = {
    "classification": (classification_rows, dict(labels=("neg", "pos")), "accuracy", 0.9),
    "regression": (regression_rows, dict(labels=()), "pearson", 0.8),
    "tagging": (tagging_rows, dict(labels=("O", "B-PER", "I-PER", "B-LOC"), text_field="tokens",
                                   label_field="tags"), "f1", 0.8),
    "qa": (qa_rows, dict(labels=(), text_field="question", text_b_field="context",
                         label_field="answers", doc_stride=6, max_query_len=8), "exact_match", 60),
}


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory):
  workdir = make_init_workdir(tmp_path_factory.mktemp("pretrained"))
  _choose_words(load_tokenizer(workdir + "/tokenizer"))
  assert len(W) == 10 and len(FILLER) == 14
  return workdir


def task_config(tmp_path, task_type, epochs=3):
  make_rows, task, _, _ = TASKS[task_type]
  c = finetune_config(type=task_type, **task)
  c.data.train = write_jsonl(tmp_path / "train.jsonl", make_rows(320, 0))
  c.data.eval = write_jsonl(tmp_path / "dev.jsonl", make_rows(64, 1))
  c.data.max_seq_len = SEQ
  c.model.update(dropout_rate=0.0, attention_dropout_rate=0.0)
  c.train.update(epochs=epochs, batch_size=16, learning_rate=5e-3, log_every_steps=10)
  c.checkpoint.update(async_save=False)
  return c


@pytest.mark.parametrize("task_type", list(TASKS))
def test_task_learns_synthetic_task(tmp_path, init_dir, task_type):
  _, _, metric, threshold = TASKS[task_type]
  workdir = tmp_path / "run"
  results = finetune.run(task_config(tmp_path, task_type), init_dir, str(workdir)).eval_metrics
  assert results[metric] > threshold, results
  saved = json.loads((workdir / "eval_results.json").read_text())
  assert saved[metric] == pytest.approx(results[metric]) and saved["step"] == 60
  evals = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [e["step"] for e in evals if e.get("split") == "eval"] == [20, 40, 60]
  assert (workdir / "tokenizer" / "tokenizer.model").is_file()
  assert json.loads((workdir / "config.json").read_text())["task"]["type"] == task_type
  if task_type in ("classification", "tagging"):
    check_predict(tmp_path, workdir, task_type)
  if task_type == "classification":  # the same command again: resumes at the end, re-evaluates
    again = finetune.run(task_config(tmp_path, task_type), init_dir, str(workdir))
    assert again.step == 60 and again.eval_metrics == pytest.approx(results)


def check_predict(tmp_path, workdir, task_type):
  make_rows = TASKS[task_type][0]
  rows = make_rows(20, 2)
  for r in rows:  # labels are not needed to predict
    r.pop("label", None)
  inp = write_jsonl(tmp_path / "in.jsonl", rows)
  out = tmp_path / "out.jsonl"
  assert cli.main(["predict", "--workdir", str(workdir), "--input", inp,
                   "--output", str(out)]) == 0
  preds = [json.loads(line) for line in out.read_text().splitlines()]
  assert len(preds) == 20
  if task_type == "classification":
    want = ["pos" if MARKERS[1] in r["text"].split() else "neg" for r in rows]
    assert sum(p["label"] == w for p, w in zip(preds, want)) >= 16
    assert all(abs(sum(p["scores"].values()) - 1) < 1e-5 for p in preds)
  else:
    gold = [t for r in make_rows(20, 2) for t in r["tags"]]
    got = [t for p in preds for t in p["tags"]]
    assert len(got) == len(gold) and np.mean(np.array(got) == np.array(gold)) > 0.9


def test_bad_input_is_a_clear_error(tmp_path, init_dir):
  config = task_config(tmp_path, "classification", epochs=1)
  rows = classification_rows(8, 5)
  rows[3]["label"] = "maybe"
  config.data.train = write_jsonl(tmp_path / "bad.jsonl", rows)
  with pytest.raises(DataError, match=r"bad\.jsonl:4: label 'maybe' is not one of"):
    finetune.run(config, init_dir, str(tmp_path / "bad"))
  config = task_config(tmp_path, "classification", epochs=1)
  config.data.eval = write_jsonl(tmp_path / "nofield.jsonl", [{"sentence": "x", "label": "pos"}])
  with pytest.raises(DataError, match=r"nofield\.jsonl:1: no field 'text'"):
    finetune.run(config, init_dir, str(tmp_path / "bad"))
  with pytest.raises(CheckpointError, match="not a plmjax workdir"):
    finetune.run(task_config(tmp_path, "classification"), str(tmp_path), str(tmp_path / "x"))


def _records(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_one_pass_logs_the_mean_train_loss_under_the_eval_names(tmp_path, init_dir, capsys):
  config = task_config(tmp_path, "classification", epochs=2)
  config.train.update(log_every_steps=1, learning_rate=1e-5)
  finetune.run(config, init_dir, str(tmp_path / "run"))
  out = capsys.readouterr().out
  # One fit: the start-up lines once, not once per epoch.
  assert out.count("M parameters") == 1 and out.count("tensors from") == 1
  train = [r for r in _records(tmp_path / "run") if "split" not in r]
  evals = [r for r in _records(tmp_path / "run") if r.get("split") == "eval"]
  assert [r["step"] for r in train] == list(range(1, 41)) and [r["step"] for r in evals] == [20, 40]
  # A fresh 2-class head on balanced labels: the mean loss is about ln 2, as in eval rows.
  assert train[0]["loss"] == pytest.approx(np.log(2), abs=0.03)
  assert evals[0]["loss"] == pytest.approx(np.log(2), abs=0.03)
  assert {"loss", "accuracy"} <= set(train[0]) and "correct" not in train[0]


def test_unknown_key_in_a_finetune_config_file_is_refused(tmp_path, init_dir, capsys):
  path = tmp_path / "bad.py"
  path.write_text("from plmjax.finetune.tasks import finetune_config\n"
                  "def get_config():\n"
                  "  c = finetune_config(type='classification')\n"
                  "  c.train.stepz = 5\n"
                  "  return c\n")
  rc = cli.main(["finetune", "--config", str(path), "--init", init_dir,
                 "--workdir", str(tmp_path / "w")])
  assert rc == 2
  err = capsys.readouterr().err
  assert "unknown config key config.train.stepz (did you mean config.train.steps?)" in err
  assert not (tmp_path / "w").exists()


CLI_CONFIG = """
from plmjax.finetune.tasks import finetune_config

def get_config():
  c = finetune_config(type="classification", labels=("neg", "pos"))
  c.data.update(train={train!r}, eval={eval!r}, max_seq_len={seq})
  c.model.update(dropout_rate=0.0, attention_dropout_rate=0.0)
  c.train.update(epochs=50, batch_size=16, learning_rate=5e-3, log_every_steps=10)
  c.checkpoint.update(every_steps=1000)
  return c
"""


def test_sigint_during_evaluation_stops_with_a_checkpoint_in_a_background_start(
    tmp_path, init_dir):
  config = task_config(tmp_path, "classification")
  path = tmp_path / "ft.py"
  path.write_text(CLI_CONFIG.format(train=config.data.train, eval=config.data.eval, seq=SEQ))
  workdir = tmp_path / "run"
  hooked = os.path.join(os.path.dirname(__file__), "hooked_cli.py")
  argv = [sys.executable, hooked, "--pause-in-eval", "--", "finetune", "--config", str(path),
          "--init", init_dir, "--workdir", str(workdir)]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  # `trap "" INT`: SIGINT ignored, as a shell starts `plmjax finetune ... &` in a script.
  proc = subprocess.Popen(["sh", "-c", 'trap "" INT; exec "$@"', "sh", *argv], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  line = ""
  while "paused in evaluation" not in line:
    line = proc.stdout.readline()
    assert line or proc.poll() is None, proc.stderr.read()
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=240)
  assert proc.returncode == 130, err
  assert "stopped by SIGINT after step 20" in out
  assert workdir_lib.checkpoint_steps(str(workdir)) == [20]
  assert [r["step"] for r in _records(workdir) if r.get("split") == "eval"] == [20]
