"""GPT prompt -> completion fine-tuning: loss mask, packing, parity with Hugging Face, CLI."""

import importlib.util
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from plmjax import cli
from plmjax.data.tokenizer import load_tokenizer
from plmjax.errors import ConfigError, DataError
from plmjax.export import export
from plmjax.finetune import completion, data, finetune, tasks
from plmjax.finetune.tasks import finetune_config
from plmjax.models import gpt
from plmjax.models.config import ModelConfig
from plmjax.train import checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("completion_vs_hf",
                                               ROOT / "bench" / "completion_vs_hf.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

WORDS = bench.task_words(12)
A, B = WORDS[:2]  # one token each
LENGTH = 3  # words per prompt; the completion reverses them
STEPS = 32  # exact match is rising here (about 0.27): a comparison that can fail


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory):
  return bench.make_init(tmp_path_factory.mktemp("gpt"), WORDS, max_len=2 * LENGTH + 8)


@pytest.fixture(scope="module")
def tok(init_dir):
  return load_tokenizer(init_dir + "/tokenizer")


@pytest.fixture(scope="module")
def hf_init(init_dir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("hf") / "init")
  export.export(init_dir, out)
  return out


def records(*pairs):
  return [data.Record(dict(prompt=p, completion=c), f"x.jsonl:{i + 1}")
          for i, (p, c) in enumerate(pairs)]


def task(**kw):
  return finetune_config(type="completion", **kw).task


def test_loss_mask_covers_the_completion_and_end_of_text(tok):
  eos = tok.eos_id
  feats = completion.featurize(task(), tok, records((f"{A} {B}", f"{B} {A}"), ("", A)), 8)
  p, c = tok.encode(f"{A} {B}"), tok.encode(f"{B} {A}")
  assert len(p) == len(c) == 2
  a = feats.arrays
  assert a["input_ids"][0].tolist() == p + c[:1] + c[1:] + [eos] * 4
  assert a["targets"][0].tolist() == p[1:] + c + [eos] * 5
  # The target of the last prompt token is the first completion token: weighted from there.
  assert a["loss_weights"][0].tolist() == [0, 1, 1, 1, 0, 0, 0, 0]
  # An empty prompt is <|endoftext|>, so the first completion token has a position too.
  k = tok.encode(A)
  assert a["input_ids"][1, :2].tolist() == [eos] + k
  assert a["targets"][1, :2].tolist() == k + [eos]
  assert a["loss_weights"][1].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
  assert feats.examples[0] == dict(prompt_ids=p, completion=f"{B} {A}")
  assert feats.truncated == 0 and a["weights"].tolist() == [1, 1]


def test_too_long_records_lose_the_prompt_start_then_the_completion_end(tok):
  five = " ".join(WORDS[2:7])
  feats = completion.featurize(task(), tok, records((five, f"{A} {B}"), (B, five)), 4)
  a, ids = feats.arrays, [tok.encode(w)[0] for w in WORDS[2:7]]
  kalo, mine = tok.encode(f"{A} {B}")
  # prompt + completion = 4 tokens: the prompt keeps its last 2 words.
  assert feats.examples[0]["prompt_ids"] == ids[3:]
  assert a["input_ids"][0].tolist() == ids[3:] + [kalo, mine]
  assert a["targets"][0].tolist() == ids[4:] + [kalo, mine, tok.eos_id]
  assert a["loss_weights"][0].tolist() == [0, 1, 1, 1]
  # A completion longer than the row: one prompt token stays, the end of text goes.
  assert a["input_ids"][1].tolist() == [mine] + ids[:3]
  assert a["targets"][1].tolist() == ids[:4]
  assert a["loss_weights"][1].tolist() == [1, 1, 1, 1]
  assert feats.truncated == 2


def test_fields_come_from_the_task_keys(tok):
  recs = [data.Record(dict(q=A, a=B), "x:1")]
  with pytest.raises(DataError, match=r"x:1: no field 'prompt' .*set config.task.text_field"):
    completion.featurize(task(), tok, recs, 8)
  feats = completion.featurize(task(text_field="q", label_field="a"), tok, recs, 8)
  assert feats.examples[0]["completion"] == B
  tfds = [data.Record(dict(q=A, a=B), "tfds:x:train[0]")]
  feats = completion.featurize(task(tfds_fields=dict(text="q", label="a")), tok, tfds, 8)
  assert feats.examples[0]["prompt_ids"] == tok.encode(A)


def _model_and_params(init_dir):
  from plmjax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  cfg = ModelConfig.from_config(workdir_lib.read_config(init_dir).model)
  params, _ = checkpoint.load_params(init_dir)
  return gpt.GPT(cfg), params


def _batch(tok, n=6, seed=0, max_len=10):
  rows = bench.task_rows(WORDS, n, LENGTH, seed)
  rows[1]["prompt"] = A  # rows of different lengths
  rows[2]["completion"] = B
  return completion.featurize(task(), tok, [data.Record(r, f"x:{i}") for i, r in
                                            enumerate(rows)], max_len).arrays


def test_loss_and_gradient_equal_hugging_face(init_dir, hf_init, tok):
  model, params = _model_and_params(init_dir)
  batch = _batch(tok)
  batch["weights"][-1] = 0.0  # a padding row (as eval batches have) counts for nothing

  def loss_fn(p):
    out = model.apply({"params": p}, batch["input_ids"])
    o = completion.OBJECTIVE
    return o.loss(o.sums(out, batch), o.totals(batch))

  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
  hf = bench.hf_model(hf_init)
  hf_loss = bench.hf_batch_loss(hf, batch)
  hf_loss.backward()
  assert float(loss) == pytest.approx(hf_loss.item(), rel=1e-5)
  wte = hf.transformer.wte.weight.grad.numpy()  # tied: embedding and LM head gradients
  np.testing.assert_allclose(np.asarray(grads["transformer"]["wte"]["embedding"]), wte,
                             rtol=1e-4, atol=1e-6)
  c_fc = hf.transformer.h[0].mlp.c_fc.weight.grad.numpy()
  np.testing.assert_allclose(np.asarray(grads["transformer"]["h_0"]["mlp"]["c_fc"]["kernel"]),
                             c_fc, rtol=1e-4, atol=1e-6)
  # The same loss without the completion mask differs: the mask is what was compared.
  batch["loss_weights"] = np.ones_like(batch["loss_weights"])
  assert float(jax.jit(loss_fn)(params)) != pytest.approx(float(loss))


def test_packed_rows_give_the_same_sums(init_dir, tok):
  model, params = _model_and_params(init_dir)
  batch = _batch(tok, n=7, max_len=12)
  packed = completion.pack(batch)
  assert len(packed["input_ids"]) < 7
  assert packed["segment_ids"].max() >= 2
  # Each record's tokens, targets and weights, in order, in its segment.
  seg = packed["segment_ids"]
  flat = [(r, s) for r in range(len(seg)) for s in range(1, seg[r].max() + 1)]
  assert len(flat) == 7
  for i, (r, s) in enumerate(flat):
    at = seg[r] == s
    n = int(at.sum())
    assert packed["input_ids"][r][at].tolist() == batch["input_ids"][i, :n].tolist()
    assert packed["position_ids"][r][at].tolist() == list(range(n))
    assert packed["loss_weights"][r][at].sum() == batch["loss_weights"][i].sum()

  @jax.jit
  def sums(b):
    extra = {k: b[k] for k in ("segment_ids", "position_ids") if k in b}
    out = model.apply({"params": params}, b["input_ids"], **extra)
    return completion.OBJECTIVE.sums(out, b)

  got, want = jax.device_get((sums(packed), sums(batch)))
  assert float(got["count"]) == float(want["count"])
  assert float(got["loss_sum"]) == pytest.approx(float(want["loss_sum"]), rel=1e-5)


def test_packing_is_off_by_default_and_packs_only_the_training_split(init_dir, tok, tmp_path):
  rows = bench.task_rows(WORDS, 10, LENGTH, 3)
  path = bench.write_jsonl(tmp_path / "t.jsonl", rows)
  c = finetune_config(type="completion")
  assert not c.data.packing
  finetune.prepare_config(c, init_dir, [f"--config.data.train={path}", f"--config.data.eval={path}",
                                        "--config.data.max_seq_len=14"])
  assert len(finetune.load_split(c, tok, "train").arrays["input_ids"]) == 10  # one per row
  c.data.packing = True
  packed = finetune.load_split(c, tok, "train").arrays
  assert len(packed["input_ids"]) == 5 and packed["segment_ids"].max() == 2  # 6 + 6 <= 14
  assert "segment_ids" not in finetune.load_split(c, tok, "eval").arrays


def test_scores_exact_match_strips_and_rouge_l_is_the_lcs_f_measure():
  got = completion.scores([" a b c ", "a c", "x"], ["a b c", "a b c", "y"])
  assert got["exact_match"] == pytest.approx(1 / 3)
  # "a c" vs "a b c": LCS 2, precision 1, recall 2/3, F = 0.8.
  assert got["rougeL"] == pytest.approx((1 + 0.8 + 0) / 3)


def test_objective_names_and_perplexity():
  batch = dict(targets=jnp.array([[1, 2, 0]]), loss_weights=jnp.array([[0.0, 1, 1]]),
               weights=jnp.array([1.0]))
  out = dict(logits=jnp.zeros((1, 3, 4)))
  o = tasks.OBJECTIVES["completion"]
  got = o.finalize(jax.device_get(o.sums(out, batch)))
  assert set(got) == {"loss", "accuracy", "perplexity"}
  assert got["loss"] == pytest.approx(np.log(4)) and got["perplexity"] == pytest.approx(4.0)


def test_config_checks(init_dir, tmp_path):
  bert_init = tmp_path / "bert"
  from finetune_helpers import make_init_workdir  # pylint: disable=g-import-not-at-top
  bert_dir = make_init_workdir(bert_init)
  c = finetune_config(type="completion")
  with pytest.raises(ConfigError, match="a completion task fine-tunes a 'gpt' model"):
    finetune.prepare_config(c, bert_dir)
  with pytest.raises(ConfigError, match="a classification task fine-tunes a 'bert' model"):
    finetune.prepare_config(finetune_config(type="classification"), init_dir)
  with pytest.raises(ConfigError, match="max_new_tokens=0 must be at least 1"):
    finetune.prepare_config(finetune_config(type="completion"), init_dir,
                            ["--config.task.max_new_tokens=0"])


# ---- end to end: the CLI, then Hugging Face on the same weights, data and steps -----------

@pytest.fixture(scope="module")
def tuned(init_dir, tmp_path_factory):
  root = tmp_path_factory.mktemp("tuned")
  train = bench.write_jsonl(root / "train.jsonl", bench.task_rows(WORDS, 256, LENGTH, 0))
  dev = bench.write_jsonl(root / "dev.jsonl", bench.task_rows(WORDS, 48, LENGTH, 1))
  workdir = root / "run"
  overrides = [f"--config.data.train={train}", f"--config.data.eval={dev}",
               f"--config.data.max_seq_len={2 * LENGTH + 2}",
               f"--config.task.max_new_tokens={LENGTH + 2}",
               "--config.model.dropout_rate=0", "--config.model.attention_dropout_rate=0",
               "--config.train.epochs=0", f"--config.train.steps={STEPS}",
               "--config.train.batch_size=32", "--config.train.learning_rate=3e-3",
               "--config.train.log_every_steps=4", "--config.checkpoint.async_save=false"]
  argv = ["finetune", "--config", str(ROOT / "configs" / "finetune" / "completion.py"),
          "--init", init_dir, "--workdir", str(workdir), *overrides]
  assert cli.main(argv) == 0
  return workdir, train, dev, overrides


def test_finetune_writes_the_completion_metrics(tuned):
  workdir = tuned[0]
  results = json.loads((workdir / "eval_results.json").read_text())
  assert set(results) == {"loss", "accuracy", "perplexity", "exact_match", "rougeL", "step"}
  assert results["step"] == STEPS
  assert results["perplexity"] == pytest.approx(np.exp(results["loss"]), rel=1e-6)
  assert 0 < results["exact_match"] < 1  # still learning: a meaningful comparison below
  config = json.loads((workdir / "config.json").read_text())
  assert config["task"]["head"] == "lm" and config["model"]["arch"] == "gpt"


def test_exact_match_equals_hugging_face_with_the_same_budget(tuned, init_dir, hf_init, tok):
  workdir, train, dev, overrides = tuned
  from plmjax import config as config_lib  # pylint: disable=g-import-not-at-top
  c = config_lib.load_config_file(str(ROOT / "configs" / "finetune" / "completion.py"))
  finetune.prepare_config(c, init_dir, overrides)
  finetune.schedule(c, 256)
  c.train.eval_every_steps = STEPS
  hf_losses, hf_evals = bench.run_hf(hf_init, c, tok)
  ours = json.loads((workdir / "eval_results.json").read_text())
  theirs = hf_evals[STEPS]
  assert abs(ours["exact_match"] - theirs["exact_match"]) <= 0.1, (ours, theirs)
  assert ours["loss"] == pytest.approx(theirs["loss"], abs=2e-3)
  logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  train_rows = [r for r in logged if "split" not in r]
  # Logged losses are means over log_every_steps=4 steps.
  for r in train_rows:
    want = np.mean(hf_losses[r["step"] - 4:r["step"]])
    assert r["loss"] == pytest.approx(want, abs=2e-3), r["step"]


def test_predict_generate_and_export_on_the_tuned_workdir(tuned, tok, tmp_path, capsys):
  workdir = tuned[0]
  rows = bench.task_rows(WORDS, 6, LENGTH, 7)
  inp = bench.write_jsonl(tmp_path / "in.jsonl", [dict(prompt=r["prompt"]) for r in rows])
  out = tmp_path / "out.jsonl"
  assert cli.main(["predict", "--workdir", str(workdir), "--input", inp,
                   "--output", str(out)]) == 0
  preds = [json.loads(line) for line in out.read_text().splitlines()]
  assert len(preds) == 6 and all(set(p) == {"completion"} for p in preds)
  # predict's completion is the greedy generation of the exported model.
  hf_dir = tmp_path / "hf"
  assert cli.main(["export", "--workdir", str(workdir), "--out", str(hf_dir)]) == 0
  assert "GPT2LMHeadModel" in capsys.readouterr().out
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir))
  assert type(hf).__name__ == "GPT2LMHeadModel"
  prompts = [tok.encode(r["prompt"]) for r in rows]
  want = [tok.decode(x) for x in bench.hf_generate(hf, prompts, LENGTH + 2, tok.eos_id)]
  assert [p["completion"] for p in preds] == want
  model, params = _model_and_params(str(workdir))
  ids = np.array(prompts)
  with torch.no_grad():
    hf_logits = hf(torch.as_tensor(ids)).logits.numpy()
  np.testing.assert_allclose(np.asarray(model.apply({"params": params}, ids)["logits"]),
                             hf_logits, atol=1e-4)
  assert cli.main(["generate", "--workdir", str(workdir), "--prompt", rows[0]["prompt"],
                   "--max-new-tokens", "4", "--temperature", "0"]) == 0
  assert rows[0]["prompt"] in capsys.readouterr().out
