"""T5 span-corruption pretraining: examples, loss against Hugging Face, CLI, resume, sharding.

One tiny T5 (1+1 layers, d_model 32) on a few Wikipedia articles; the CLI runs share
their compilations through conftest's JAX_COMPILATION_CACHE_DIR.
"""

import json
import types

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
import transformers

from plmjax import cli
from plmjax.config import load_config, validate
from plmjax.data import pipeline, span_corruption
from plmjax.data.corpus import TokenizedCorpus
from plmjax.data.t5_examples import T5Examples
from plmjax.data.tokenizer import load_tokenizer
from plmjax.export import hf_config, t5_weights
from plmjax.models import build_model
from plmjax.train import checkpoint
from plmjax.train.objectives import PRETRAINING
from plmjax.train.step import model_inputs
from plmjax.train.trainer import Trainer
from conftest import SHARED_DATA

STEPS = 6
CONFIG = """
from plmjax.config import base_config


def get_config():
  c = base_config("t5")
  c.model.update(num_layers=1, num_decoder_layers=1, hidden_size=32, num_heads=2,
                 intermediate_size=64, vocab_size=600, max_position_embeddings=48,
                 relative_attention_num_buckets=8, relative_attention_max_distance=16,
                 dropout_rate=0.0, attention_dropout_rate=0.0)
  c.data.update(train={train!r}, eval={train!r}, max_seq_len=48, max_target_len=12,
                packing=True, prefetch=1)
  c.train.update(steps={steps}, batch_size=16, learning_rate=1e-2, warmup_steps=2,
                 log_every_steps=1, eval_steps=1, peak_flops_per_device=1e12)
  c.checkpoint.update(every_steps=100, async_save=False)
  return c
"""


# ---------------------------------------------------------------- examples (numpy only)

def _fake_corpus(seed=0, docs=40):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, 150, docs)
  tokens = rng.integers(3, 400, lengths.sum()).astype(np.int32)
  offsets = np.concatenate([[0], np.cumsum(lengths)])
  return TokenizedCorpus(tokens, offsets, np.arange(docs + 1))


FAKE_TOKENIZER = types.SimpleNamespace(pad_id=0, eos_id=1, sentinel_id=499)


def _examples(packing, seed=3):
  return T5Examples(_fake_corpus(), FAKE_TOKENIZER, max_seq_len=64, max_target_len=16,
                    packing=packing, seed=seed)


@pytest.mark.parametrize("packing", [False, True])
def test_examples_are_deterministic_and_reconstruct_the_runs(packing):
  ex, again = _examples(packing), _examples(packing)
  n = span_corruption.lengths(64, 16).tokens
  seen = []
  changed = 0
  for i in range(len(ex)):
    row = ex.example(i, epoch=2)
    for key, value in again.example(i, epoch=2).items():  # a fresh source: the same row
      np.testing.assert_array_equal(value, row[key])
    changed += any(not np.array_equal(v, ex.example(i, epoch=3)[k]) for k, v in row.items())
    if packing:
      enc_seg, dec_seg = row["encoder_segment_ids"], row["decoder_segment_ids"]
      assert "attention_mask" not in row
    else:
      enc_seg, dec_seg = row["attention_mask"], (row["loss_weights"] > 0).astype(np.int32)
    np.testing.assert_array_equal(row["loss_weights"], (dec_seg > 0).astype(np.float32))
    assert enc_seg.max() == dec_seg.max() == len(ex.runs_of(i))
    for k, r in enumerate(ex.runs_of(i), start=1):
      inputs, targets = row["input_ids"][enc_seg == k], row["targets"][dec_seg == k]
      assert inputs[-1] == targets[-1] == 1 and targets[0] == 499  # </s>; <extra_id_0>
      original = ex.corpus.tokens[ex.run_start[r]:ex.run_end[r]]
      assert 2 <= len(original) <= n
      np.testing.assert_array_equal(span_corruption.uncorrupt(inputs, targets, 499, 1),
                                    original)
      # The decoder input restarts with <pad> and is the targets shifted right.
      np.testing.assert_array_equal(row["decoder_input_ids"][dec_seg == k],
                                    np.concatenate([[0], targets[:-1]]))
      if packing:
        np.testing.assert_array_equal(row["encoder_positions"][enc_seg == k],
                                      np.arange(len(inputs)))
        np.testing.assert_array_equal(row["decoder_positions"][dec_seg == k],
                                      np.arange(len(targets)))
      seen.append(r)
    assert np.all(row["input_ids"][enc_seg == 0] == 0) and np.all(row["targets"][dec_seg == 0] == 0)
  assert changed > len(ex) // 2  # a new noise mask every epoch
  # Every run of every document, exactly once (runs of one token dropped).
  assert sorted(seen) == list(range(len(ex.run_start)))
  doc_lengths = np.diff(ex.corpus.document_starts())
  assert len(ex.run_start) == sum(-(-d // n) - (d % n == 1) for d in doc_lengths)
  if packing:
    assert len(ex) < 0.8 * len(ex.run_start)  # the document tails share rows


# ---------------------------------------------------------------- the model's loss vs HF

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("t5p")
  train = root / "wiki.jsonl"
  with open(SHARED_DATA / "wiki_sample.jsonl") as f, open(train, "w") as out:
    out.writelines(line for _, line in zip(range(12), f))
  config_file = root / "t5.py"
  config_file.write_text(CONFIG.format(train=str(train), steps=STEPS))
  # The reference run: trains its own T5 tokenizer (data.tokenizer empty), offline.
  assert cli.main(["pretrain", "--config", str(config_file), "--workdir",
                   str(root / "straight")]) == 0
  return types.SimpleNamespace(root=root, config_file=str(config_file),
                               tokenizer=str(root / "straight" / "tokenizer"))


def _config(setup, *overrides):
  return load_config(setup.config_file, [f"--config.data.tokenizer={setup.tokenizer}",
                                         *overrides])


def _batch(config, tokenizer, batch_size=8):
  return next(pipeline.make_pretrain_iterator(config, tokenizer, batch_size=batch_size))


def _hf_model(cfg, params):
  hf = transformers.T5ForConditionalGeneration(
      transformers.T5Config(**hf_config.to_hf_config(cfg, "seq2seq")))
  hf.config._attn_implementation = "eager"
  state = {k: torch.tensor(v) for k, v in t5_weights.to_hf_state_dict(params).items()}
  hf.lm_head.weight = torch.nn.Parameter(torch.empty_like(hf.shared.weight))  # untie
  hf.load_state_dict(state, strict=False)
  loaded = hf.state_dict()
  for k, v in state.items():
    np.testing.assert_array_equal(loaded[k].numpy(), v.numpy())
  return hf.eval()


def _hf_summed_loss(hf, pairs):
  """Summed target-token NLL and count of (inputs, targets) pairs, one HF row each."""
  s, t = max(len(p[0]) for p in pairs), max(len(p[1]) for p in pairs)
  ids, mask, labels = np.zeros((len(pairs), s), np.int64), np.zeros((len(pairs), s)), \
      np.full((len(pairs), t), -100, np.int64)
  for i, (x, y) in enumerate(pairs):
    ids[i, :len(x)], mask[i, :len(x)], labels[i, :len(y)] = x, 1, y
  with torch.no_grad():
    out = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
             labels=torch.tensor(labels))
  count = (labels != -100).sum()
  return float(out.loss) * count, count


@pytest.mark.parametrize("packing", [False, True])
def test_loss_equals_hugging_face_on_the_same_batch(setup, packing):
  config = _config(setup, f"--config.data.packing={packing}")
  cfg = validate(config)
  tokenizer = load_tokenizer(setup.tokenizer)
  examples = pipeline.make_pretrain_iterator(config, tokenizer, batch_size=8).examples
  shared = [i for i in range(len(examples)) if len(examples.runs_of(i)) > 1][:4]
  rows = shared + list(range(8 - len(shared)))  # packed: rows of several runs, and full ones
  batch = {k: np.stack([examples.example(i, 1)[k] for i in rows])
           for k in examples.example(0)}
  model = build_model(cfg, "seq2seq")
  params = nn.meta.unbox(model.init(jax.random.key(1), batch["input_ids"][:1])["params"])
  out = jax.jit(lambda p, b: model.apply({"params": p}, b["input_ids"], **model_inputs(b)))(
      params, batch)
  sums = PRETRAINING["t5"].sums(out, batch)
  enc_seg = batch["encoder_segment_ids"] if packing else batch["attention_mask"]
  dec_seg = batch["decoder_segment_ids"] if packing else batch["loss_weights"].astype(int)
  pairs = [(batch["input_ids"][i][enc_seg[i] == k], batch["targets"][i][dec_seg[i] == k])
           for i in range(len(enc_seg)) for k in range(1, enc_seg[i].max() + 1)]
  assert len(pairs) >= len(enc_seg) + 4 if packing else len(pairs) == len(enc_seg)
  hf_sum, hf_count = _hf_summed_loss(_hf_model(cfg, params), pairs)
  assert float(sums["lm_count"]) == hf_count
  np.testing.assert_allclose(float(sums["lm_loss"]), hf_sum, rtol=2e-6)
  metrics = PRETRAINING["t5"].finalize(jax.device_get(sums))
  np.testing.assert_allclose(metrics["loss"], hf_sum / hf_count, rtol=2e-6)
  assert set(metrics) == {"loss", "accuracy", "perplexity"}


# ---------------------------------------------------------------- CLI, resume, sharding

def _records(workdir):
  with open(workdir / "metrics.jsonl") as f:
    return [json.loads(line) for line in f]


def test_pretrain_cli_trains_logs_and_evaluates(setup):
  straight = setup.root / "straight"
  records = _records(straight)
  train = [r for r in records if "split" not in r]
  evals = [r for r in records if r.get("split") == "eval"]
  assert [r["step"] for r in train] == list(range(1, STEPS + 1))
  for key in ("loss", "accuracy", "perplexity", "tokens_per_sec", "mfu", "learning_rate"):
    assert key in train[-1]
  assert train[-1]["loss"] < train[0]["loss"] - 1.0
  assert len(evals) == 1 and evals[0]["step"] == STEPS and "accuracy" in evals[0]
  tokenizer = load_tokenizer(setup.tokenizer)
  assert tokenizer.kind == "t5" and tokenizer.vocab_size == 600
  # The batches the pipeline gives are what batch_spec (plmjax compile) says.
  config = _config(setup)
  batch = _batch(config, tokenizer, 4)
  spec = pipeline.batch_spec(config, 4)
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
      k: (shape, np.dtype(dtype)) for k, (shape, dtype) in spec.items()}


def test_resume_is_exact(setup):
  resumed = setup.root / "resumed"
  args = ["pretrain", "--config", setup.config_file, "--workdir", str(resumed)]
  assert cli.main(args + ["--config.train.stop_after_steps=2"]) == 0
  assert [r["step"] for r in _records(resumed) if "split" not in r] == [1, 2]
  assert cli.main(args) == 0
  straight = setup.root / "straight"
  assert _records(resumed) == _records(straight) or _same_but_timing(resumed, straight)
  _assert_same_params(resumed, straight, atol=0)


TIMING = ("tokens_per_sec", "steps_per_sec", "mfu", "seconds", "time")


def _same_but_timing(a, b):
  strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMING} for r in rs]
  assert strip(_records(a)) == strip(_records(b))
  return True


def _assert_same_params(a, b, atol):
  pa, pb = _load(a), _load(b)
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


def _load(workdir):
  return checkpoint.load_params(str(workdir), STEPS)[0]


def test_sharded_training_equals_one_device(setup):
  straight = setup.root / "straight"  # data parallel over the 8 virtual devices
  fsdp = setup.root / "fsdp"
  assert cli.main(["pretrain", "--config", setup.config_file, "--workdir", str(fsdp),
                   f"--config.data.tokenizer={setup.tokenizer}", "--config.mesh.data=2",
                   "--config.mesh.fsdp=4"]) == 0
  config = _config(setup, "--config.mesh.data=1")
  tokenizer = load_tokenizer(setup.tokenizer)
  batches = pipeline.make_pretrain_iterator(config, tokenizer, batch_size=16)
  start = batches.get_state()
  example = next(batches)
  batches.set_state(start)
  one = setup.root / "one"
  trainer = Trainer(config, str(one), build_model(validate(config), "seq2seq"),
                    PRETRAINING["t5"], example, flops_per_token=1.0, tokens_per_example=60,
                    devices=jax.devices()[:1])
  trainer.fit(batches)
  losses = {name: [r["loss"] for r in _records(setup.root / name) if "split" not in r]
            for name in ("straight", "fsdp", "one")}
  np.testing.assert_allclose(losses["straight"], losses["one"], rtol=1e-5)
  np.testing.assert_allclose(losses["fsdp"], losses["one"], rtol=1e-5)
  for x, y in zip(jax.tree.leaves(trainer.state["params"]), jax.tree.leaves(_load(straight))):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=2e-5, rtol=0)
