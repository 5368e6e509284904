"""Beam search and greedy decoding equal Hugging Face's GPT2LMHeadModel.generate on the same
weights; bench/generate.py runs."""

import importlib.util
import pathlib
import re

import numpy as np
import pytest
import torch

from hf_helpers import hf_config_for, hf_model_from_config, random_params, tiny_config
from plmjax import generate
from plmjax.export import hf_weights
from plmjax.models import gpt

NEW = 12
# Prompts of several lengths, left-padded into one batch (by both frameworks).
PROMPT_LENGTHS = (3, 7, 5, 11, 2, 9)
NO_EOS = -1
# (eos_id, length_penalty). With these weights token 81 ends beams after 1-10 tokens,
# depending on the prompt, the number of beams and the length penalty; 73 ends some at once.
CASES = ((NO_EOS, 1.0), (81, 1.0), (81, -0.5), (73, 2.0))


@pytest.fixture(scope="module")
def models():
  cfg = tiny_config("gpt", vocab_size=97, max_position_embeddings=48)
  params = random_params(cfg, "lm", seed=4)
  # Strong position embeddings: outputs vary along the sequence instead of repeating one
  # token (random tiny GPTs do that), so beams diverge and end at different lengths.
  params["transformer"]["wpe"]["embedding"] = params["transformer"]["wpe"]["embedding"] * 10
  hf = hf_model_from_config(hf_config_for(cfg, "lm"))
  state = hf_weights.to_hf_state_dict(params, "gpt")
  hf.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(1, 97, n).tolist() for n in PROMPT_LENGTHS]
  # Tiny matrices: PyTorch's threads only wait on each other (badly, on a busy CPU).
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield gpt.GPT(cfg), params, hf, prompts
  torch.set_num_threads(threads)


def hf_generate(hf, prompts, num_beams, length_penalty, eos_id):
  """Hugging Face on the prompts, left-padded into one batch (which gives the same tokens
  as one prompt at a time)."""
  ids, mask = generate.left_pad(prompts, 0)
  eos = None if eos_id == NO_EOS else eos_id
  with torch.no_grad():
    out = hf.generate(torch.tensor(ids, dtype=torch.long),
                      attention_mask=torch.tensor(mask, dtype=torch.long), max_new_tokens=NEW,
                      num_beams=num_beams, do_sample=False, length_penalty=length_penalty,
                      eos_token_id=eos, pad_token_id=0 if eos is None else eos)
  return [generate.cut_at_eos(row, eos_id) for row in out[:, ids.shape[1]:].tolist()]


@pytest.mark.parametrize("num_beams", [1, 2, 3, 4])
def test_beam_search_equals_hugging_face(models, num_beams):
  model, params, hf, prompts = models
  lengths = set()
  for eos_id, length_penalty in CASES:
    want = hf_generate(hf, prompts, num_beams, length_penalty, eos_id)
    got = generate.generate_ids(model, params, prompts, max_new_tokens=NEW, eos_id=eos_id,
                                num_beams=num_beams, length_penalty=length_penalty,
                                batch_size=len(prompts))
    assert got == want, (eos_id, length_penalty)
    lengths |= {len(w) for w in want}
  # The cases include hypotheses ended by end-of-text at several lengths, and none.
  assert NEW in lengths and len(lengths - {NEW}) >= 4, lengths


def test_beams_differ_from_greedy_and_ignore_temperature(models):
  model, params, hf, prompts = models
  kw = dict(max_new_tokens=NEW, eos_id=NO_EOS, batch_size=len(prompts))
  greedy = generate.generate_ids(model, params, prompts, **kw)
  beams = generate.generate_ids(model, params, prompts, num_beams=3, **kw)
  assert beams != greedy
  assert generate.generate_ids(model, params, prompts, num_beams=3, temperature=1.5, top_k=5,
                               top_p=0.5, seed=7, **kw) == beams
  # Hugging Face on one unpadded prompt gives the row our padded batch gives it.
  for i in (4, 3):  # the shortest and the longest prompt
    assert hf_generate(hf, [prompts[i]], 3, 1.0, NO_EOS) == [beams[i]]


def test_bench_generate_prints_both_frameworks(capsys):
  """bench/generate.py at a tiny size: one line per (batch, beams), the same tokens."""
  path = pathlib.Path(__file__).resolve().parents[1] / "bench" / "generate.py"
  spec = importlib.util.spec_from_file_location("bench_generate", path)
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  bench.main(["--layers", "1", "--hidden", "32", "--heads", "2", "--intermediate", "64",
              "--vocab", "300", "--prompt-len", "5", "--new-tokens", "4", "--batches", "1,3",
              "--beams", "1,2", "--repeats", "1"])
  out = capsys.readouterr().out
  lines = re.findall(r"^batch=(\d+) beams=(\d+) plmjax_tok/s=(\d+) hf_tok/s=(\d+) "
                     r"ratio=[\d.]+ same=([\d.]+) plmjax_compile_s=[\d.]+$", out, re.M)
  assert [(b, k) for b, k, *_ in lines] == [("1", "1"), ("1", "2"), ("3", "1"), ("3", "2")], out
  assert all(int(ours) > 0 and int(hf) > 0 and same == "1.00" for *_, ours, hf, same in lines)
