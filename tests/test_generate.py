"""Generation: the KV-cache decode equals recomputing the full forward pass; sampling filters."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from plmjax import cli, generate
from plmjax.config import base_config
from plmjax.data.tokenizer import train_tokenizer
from plmjax.errors import ConfigError
from plmjax.models import gpt
from plmjax.models.config import ModelConfig
from plmjax.train import checkpoint

from synthetic import synthetic_texts

VOCAB = 97


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
  greedy = generate.generate(model, params, prompt, 8, temperature=0)
  assert generate.generate(model, params, prompt, 8, temperature=1.0, top_k=1) == greedy
  a = generate.generate(model, params, prompt, 8, temperature=1.5, seed=3)
  assert a == generate.generate(model, params, prompt, 8, temperature=1.5, seed=3)
  assert a != generate.generate(model, params, prompt, 8, temperature=1.5, seed=4)
  # Stops before the end-of-text token.
  i = next(i for i, t in enumerate(greedy) if t not in greedy[:i] and i > 0)
  assert generate.generate(model, params, prompt, 8, temperature=0, eos_id=greedy[i]) == greedy[:i]
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


def test_generate_command(tmp_path, capsys):
  tok = train_tokenizer(synthetic_texts(30, seed=2), 120, "unigram", str(tmp_path / "tok" / "t"),
                        kind="gpt")
  config = base_config("gpt")
  config.model.update(vocab_size=120, hidden_size=32, num_layers=1, num_heads=2,
                      intermediate_size=64, max_position_embeddings=32)
  model = gpt.GPT(ModelConfig.from_config(config.model))
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32))["params"])
  workdir = tmp_path / "gpt"
  checkpoint.write_params_workdir(str(workdir), config, jax.device_get(params),
                                  tokenizer_dir=str(tmp_path / "tok"))
  assert tok.endswith(".model")
  rc = cli.main(["generate", "--workdir", str(workdir), "--prompt", "Kalo mine", "--max-new-tokens",
                 "5", "--temperature", "0.7", "--top-p", "0.9", "--seed", "1"])
  assert rc == 0
  text = capsys.readouterr().out.strip()
  assert text.lower().startswith("kalo mine") and len(text) > len("kalo mine")
