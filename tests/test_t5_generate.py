"""T5 generation (plmjax.seq2seq_decoding): the cached on-device loop against recomputing
the whole decoder, against Hugging Face's generate on the same weights, batching, and
sampling's determinism."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from plmjax import seq2seq_decoding
from plmjax.models import build_model
from test_t5 import hf_t5, params_from_hf, plmjax_config

PAD = 0
MAX_NEW = 12


@functools.cache
def built(ff: str, tied: bool):
  """(HF model, plmjax model, params, eos): a random HF T5 (weights x3: less repetitive
  output) and the same weights in plmjax. The end token is the one that, as eos, makes
  greedy rows stop at the most different steps (</s> for the untied variant)."""
  hf_model = hf_t5(ff, tied, seed=3, vocab_size=40)
  with torch.no_grad():
    for name, p in hf_model.named_parameters():
      if "layer_norm" not in name:
        p.mul_(3.0)
  model = build_model(plmjax_config(hf_model.config), "seq2seq")
  params = params_from_hf(hf_model, model, tied)
  free = seq2seq_decoding.generate_seq2seq_ids(model, params, sources(), max_new_tokens=MAX_NEW,
                                               eos_id=None, pad_id=PAD, batch_size=6)

  def stops(eos):
    return len({row.index(eos) if eos in row else MAX_NEW for row in free})
  return hf_model, model, params, max(range(1, 40), key=stops)


@pytest.fixture(scope="module", params=[("relu", True), ("gated-gelu", False)],
                ids=["relu-tied", "gated-gelu-untied"])
def variant(request):
  return built(*request.param)


def sources(n: int = 6, seed: int = 0) -> list[list[int]]:
  """Sources of different lengths, each ending with </s> (1, as the tokenizer gives them)."""
  rng = np.random.default_rng(seed)
  return [rng.integers(3, 40, int(rng.integers(3, 14))).tolist() + [1] for _ in range(n)]


def full_recompute_greedy(model, params, srcs, eos: int) -> list[list[int]]:
  """Greedy decoding without a cache: the whole decoder over every prefix."""
  ids_BxS, mask_BxS = seq2seq_decoding.right_pad(srcs, PAD)

  @jax.jit
  def next_logits(dec_BxN):
    enc = model.apply({"params": params}, ids_BxS, mask_BxS, method="encode")
    return model.apply({"params": params}, dec_BxN, enc, mask_BxS, method="decode")["logits"]

  dec = np.full((len(srcs), MAX_NEW), PAD, np.int32)  # causal: later pads change nothing
  for i in range(MAX_NEW - 1):
    dec[:, i + 1] = jnp.argmax(next_logits(dec)[:, i], axis=-1)
  last = np.asarray(jnp.argmax(next_logits(dec)[:, -1], axis=-1))
  out = []
  for row, final in zip(dec[:, 1:].tolist(), last.tolist()):
    row = row + [final]
    out.append(row[:row.index(eos)] if eos in row else row)
  return out


def hf_generate(hf_model, srcs, eos, **kw) -> list[list[int]]:
  out = []
  for s in srcs:  # one at a time: no padding on the Hugging Face side
    with torch.no_grad():
      ids = hf_model.generate(torch.tensor([s]), max_new_tokens=MAX_NEW, do_sample=False,
                              decoder_start_token_id=PAD, eos_token_id=eos,
                              pad_token_id=PAD, use_cache=False,  # (its cache breaks on 3+2 layers)
                              **kw)[0].tolist()
    assert ids[0] == PAD  # the decoder start
    ids = ids[1:]
    out.append(ids[:ids.index(eos)] if eos in ids else ids)
  return out


def generate(model, params, srcs, eos, **kw):
  return seq2seq_decoding.generate_seq2seq_ids(model, params, srcs, max_new_tokens=MAX_NEW,
                                               eos_id=eos, pad_id=PAD, **kw)


def test_greedy_equals_full_recompute_and_hugging_face(variant):
  hf_model, model, params, eos = variant
  srcs = sources()
  got = generate(model, params, srcs, eos, batch_size=6)
  assert got == full_recompute_greedy(model, params, srcs, eos)
  assert got == hf_generate(hf_model, srcs, eos)
  lengths = [len(g) for g in got]
  assert min(lengths) < MAX_NEW and max(lengths) == MAX_NEW, lengths  # rows end at eos or N


def test_batched_equals_one_at_a_time():
  _, model, params, eos = built("gated-gelu", False)
  srcs = sources(4, seed=1)
  batched = generate(model, params, srcs, eos, batch_size=3)  # 2 batches, the last filled up
  assert batched == [generate(model, params, [s], eos, batch_size=1)[0] for s in srcs]


def test_beam_search_equals_hugging_face():
  hf_model, model, params, eos = built("gated-gelu", False)
  srcs = sources(4, seed=2)
  for penalty in (1.0, 0.5):
    got = generate(model, params, srcs, eos, batch_size=4, num_beams=3, length_penalty=penalty)
    assert got == hf_generate(hf_model, srcs, eos, num_beams=3, length_penalty=penalty), penalty


def test_sampling_is_deterministic_in_the_seed():
  _, model, params, eos = built("relu", True)
  srcs = sources()

  def sample(seed, batch_size=6, **kw):
    return generate(model, params, srcs, eos, batch_size=batch_size, temperature=1.5, seed=seed,
                    **kw)

  first = sample(0)
  assert sample(0) == first
  assert sample(1) != first
  assert sample(0, batch_size=4) == first  # a source's sample does not depend on its batch
  greedy = generate(model, params, srcs, eos, batch_size=6)
  assert first != greedy
  assert sample(7, top_p=1e-6) == greedy  # a tiny nucleus keeps only the most likely token
