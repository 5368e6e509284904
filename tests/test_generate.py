"""Generation: the KV-cache decode equals recomputing the full forward pass; batched
(left-padded, on-device) decoding equals one prompt at a time; sampling filters; the command."""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from plmjax import cli, decoding, generate
from plmjax import workdir as workdir_lib
from plmjax.config import base_config
from plmjax.data.tokenizer import load_tokenizer
from plmjax.data.tokenizer_train import train_tokenizer
from plmjax.errors import ConfigError
from plmjax.models import gpt
from plmjax.models.config import ModelConfig
from plmjax.train import checkpoint

from synthetic import synthetic_texts

VOCAB = 97
NEW = 12
PROMPT_LENGTHS = (5, 1, 9, 3, 12, 7, 2)


@pytest.fixture(scope="module")
def tiny_gpt():
  cfg = ModelConfig(arch="gpt", vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=2,
                    intermediate_size=64, max_position_embeddings=32, layer_norm_eps=1e-5,
                    dropout_rate=0.0, attention_dropout_rate=0.0)
  model = gpt.GPT(cfg)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(1), jnp.ones((1, 8), jnp.int32))["params"])
  # Larger weights than the init: distinct logits, so argmax ties do not occur.
  params = jax.tree.map(lambda x: x * 4.0, params)
  return model, params


def test_greedy_with_cache_equals_full_forward(tiny_gpt):
  model, params = tiny_gpt
  prompt = [5, 17, 3, 60, 2]
  cached = generate.generate(model, params, prompt, 20, temperature=0)
  forward = jax.jit(lambda p, ids: model.apply({"params": p}, ids)["logits"])
  ids = list(prompt)
  for _ in range(20):  # full recomputation at every step (right padding: causal, unseen)
    padded = jnp.asarray([ids + [0] * (32 - len(ids))])
    ids.append(int(jnp.argmax(forward(params, padded)[0, len(ids) - 1])))
  assert cached == ids[len(prompt):]
  assert len(set(cached)) > 1  # a real sequence, not one repeated token


def test_sampling_is_seeded_and_top_k_1_is_greedy(tiny_gpt):
  model, params = tiny_gpt
  prompt = [5, 17, 3, 60, 2]
  greedy = generate.generate(model, params, prompt, NEW, temperature=0)
  assert generate.generate(model, params, prompt, NEW, temperature=1.0, top_k=1) == greedy
  a = generate.generate(model, params, prompt, NEW, temperature=1.5, seed=3)
  assert a == generate.generate(model, params, prompt, NEW, temperature=1.5, seed=3)
  assert a != generate.generate(model, params, prompt, NEW, temperature=1.5, seed=4)
  # Stops before the end-of-text token.
  i = next(i for i, t in enumerate(greedy) if t not in greedy[:i] and i > 0)
  stopped = generate.generate(model, params, prompt, NEW, temperature=0, eos_id=greedy[i])
  assert stopped == greedy[:i]
  with pytest.raises(ConfigError, match="exceeds the model's 32 positions"):
    generate.generate(model, params, prompt, 30)


def test_filter_logits_top_k_and_top_p():
  logits = jnp.log(jnp.array([0.1, 0.4, 0.3, 0.2]))
  kept = lambda x: np.asarray(x > -1e30)
  assert kept(generate.filter_logits(logits, 2, 1.0)).tolist() == [False, True, True, False]
  # top_p=0.6: 0.4 alone is below 0.6, 0.4+0.3 reaches it -> keep those two.
  assert kept(generate.filter_logits(logits, 0, 0.6)).tolist() == [False, True, True, False]
  assert kept(generate.filter_logits(logits, 0, 0.01)).tolist() == [False, True, False, False]
  assert kept(generate.filter_logits(logits, 0, 1.0)).all()


@pytest.fixture(scope="module")
def prompts():
  rng = np.random.default_rng(1)
  return [rng.integers(1, VOCAB, n).tolist() for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def singles(tiny_gpt, prompts):
  """Greedy, one prompt at a time, no end-of-text."""
  model, params = tiny_gpt
  return [generate.generate(model, params, p, NEW, temperature=0) for p in prompts]


def test_batched_greedy_equals_one_at_a_time(tiny_gpt, prompts, singles):
  model, params = tiny_gpt
  # An end-of-text token that the greedy rows reach at different steps (or never).
  eos = singles[0][1]
  one_by_one = [generate.generate(model, params, p, NEW, temperature=0, eos_id=eos)
                for p in prompts]
  assert one_by_one == [generate.cut_at_eos(s, eos) for s in singles]
  lengths = {len(s) for s in one_by_one}
  assert NEW in lengths and len(lengths) >= 3, lengths  # rows stop at their own end-of-text
  for batch_size in (4, len(prompts)):  # 2 batches (the last filled up), and 1
    batched = generate.generate_ids(model, params, prompts, max_new_tokens=NEW, eos_id=eos,
                                    batch_size=batch_size)
    assert batched == one_by_one, batch_size


def test_decode_loop_stays_on_device(tiny_gpt, prompts, singles):
  model, params = tiny_gpt
  n = len(prompts)
  params, (ids_BxT, mask_BxT), rows_B, (seed, eos, pad, temperature, top_p, penalties_N1) = (
      jax.device_put((params, generate.left_pad(prompts, 0), np.arange(n, dtype=np.int32),
                      (np.int32(0), np.int32(-1), np.int32(0), np.float32(1), np.float32(1),
                       decoding.length_penalties(NEW, 1.0)))))
  # Device-to-host is what the loop must avoid on an accelerator; on CPU jax does not guard
  # it (zero-copy, jax#16602), but a host-driven loop would also send each token back to
  # the device: host-to-device is guarded too.
  with jax.transfer_guard_device_to_host("disallow"), jax.transfer_guard_host_to_device("disallow"):
    out_BxN = decoding.sample_loop(model, params, ids_BxT, mask_BxT, rows_B, seed, eos, pad,
                                   temperature, top_p, max_new_tokens=NEW, greedy=True, top_k=0)
    beams_BxN = decoding.beam_loop(model, params, ids_BxT, mask_BxT, eos, pad, penalties_N1,
                                   max_new_tokens=NEW, num_beams=2)
    jax.block_until_ready((out_BxN, beams_BxN))
    # The whole API too: only explicit device_put / device_get around each batch's call.
    sampled = generate.generate_ids(model, params, prompts, max_new_tokens=NEW, eos_id=-1,
                                    batch_size=n, temperature=1.0, seed=3)
  assert jax.device_get(out_BxN).tolist() == singles
  assert jax.device_get(beams_BxN).shape == (n, NEW)
  assert [len(s) for s in sampled] == [NEW] * n and sampled != singles
  with pytest.raises(Exception, match="Disallowed host-to-device"):  # the guard works: eos=-1
    with jax.transfer_guard_host_to_device("disallow"):
      decoding.sample_loop(model, params, ids_BxT, mask_BxT, rows_B, seed, -1, pad, temperature,
                           top_p, max_new_tokens=NEW, greedy=True, top_k=0)


def test_scanned_layers_decode_alike(tiny_gpt, prompts, singles):
  """config.model.scan_layers stacks the KV cache on a leading layer axis: the beams'
  cache reordering finds each leaf's batch axis either way."""
  model, params = tiny_gpt
  scanned = gpt.GPT(dataclasses.replace(model.config, scan_layers=True))
  blocks = [params["transformer"][f"h_{i}"] for i in range(model.config.num_layers)]
  stacked = {k: v for k, v in params["transformer"].items() if not k.startswith("h_")}
  stacked["h"] = jax.tree.map(lambda *x: jnp.stack(x), *blocks)
  stacked = {**params, "transformer": stacked}
  kw = dict(max_new_tokens=NEW, eos_id=-1, batch_size=len(prompts))
  assert generate.generate_ids(scanned, stacked, prompts, **kw) == singles
  assert (generate.generate_ids(scanned, stacked, prompts, num_beams=2, **kw) ==
          generate.generate_ids(model, params, prompts, num_beams=2, **kw))


@pytest.fixture(scope="module")
def gpt_workdir(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("gen")
  tok = train_tokenizer(synthetic_texts(30, seed=2), 120, "unigram", str(tmp / "tok" / "t"),
                        kind="gpt")
  assert tok.endswith(".model")
  config = base_config("gpt")
  config.model.update(vocab_size=120, hidden_size=32, num_layers=1, num_heads=2,
                      intermediate_size=64, max_position_embeddings=32)
  model = gpt.GPT(ModelConfig.from_config(config.model))
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32))["params"])
  workdir = tmp / "gpt"
  checkpoint.write_params_workdir(str(workdir), config, jax.device_get(params),
                                  tokenizer_dir=str(tmp / "tok"))
  return workdir


def test_generate_command(gpt_workdir, capsys):
  rc = cli.main(["generate", "--workdir", str(gpt_workdir), "--prompt", "Kalo mine",
                 "--max-new-tokens", "5", "--temperature", "0.7", "--top-p", "0.9", "--seed", "1"])
  assert rc == 0
  text = capsys.readouterr().out.strip()
  assert text.lower().startswith("kalo mine") and len(text) > len("kalo mine")


def test_generate_command_from_files(gpt_workdir, tmp_path, capsys):
  texts = ["Kalo mine", "Sa", "Ruti vo pe da lan mer qui", "Ho ju bel"]
  (tmp_path / "in.jsonl").write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
  (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
  common = ["generate", "--workdir", str(gpt_workdir), "--max-new-tokens", "6",
            "--temperature", "0", "--batch-size", "3"]
  assert cli.main(common + ["--input", str(tmp_path / "in.jsonl"),
                            "--output", str(tmp_path / "greedy.jsonl")]) == 0
  assert cli.main(common + ["--input", str(tmp_path / "in.txt"), "--num-beams", "2",
                            "--output", str(tmp_path / "beams.jsonl")]) == 0
  read = lambda name: [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]
  greedy, beams = read("greedy.jsonl"), read("beams.jsonl")
  assert [r["prompt"] for r in greedy] == texts == [r["prompt"] for r in beams]
  # The completions are the API's, in input order.
  tokenizer = load_tokenizer(workdir_lib.tokenizer_dir(str(gpt_workdir)))
  config = workdir_lib.read_config(str(gpt_workdir))
  model = gpt.GPT(ModelConfig.from_config(config.model))
  params, _ = checkpoint.load_params(str(gpt_workdir))
  ids = [tokenizer.encode(t) for t in texts]
  for out, num_beams in ((greedy, 1), (beams, 2)):
    new = generate.generate_ids(model, params, ids, max_new_tokens=6, eos_id=tokenizer.eos_id,
                                batch_size=3, num_beams=num_beams)
    assert [r["completion"] for r in out] == [generate.completion_text(tokenizer, p, n)
                                              for p, n in zip(ids, new)]
    assert any(r["completion"] for r in out)
  capsys.readouterr()
  assert cli.main(common + ["--input", str(tmp_path / "in.txt")]) == 2
  assert "--input needs --output" in capsys.readouterr().err
  (tmp_path / "bad.jsonl").write_text('{"prompt": "Sa"}\n{"text": "Sa"}\n')
  assert cli.main(common + ["--input", str(tmp_path / "bad.jsonl"), "--output",
                            str(tmp_path / "x.jsonl")]) == 2
  assert "bad.jsonl line 2 has no \"prompt\"" in capsys.readouterr().err
