"""`plmjax generate`: text from a GPT workdir, decoding with a KV cache.

  plmjax generate --workdir runs/gpt2_small --prompt "The history of" \\
      [--max-new-tokens 50 --temperature 0.8 --top-k 40 --top-p 0.95 --seed 0]

The prompt fills the cache in one call; then one jitted step per token reads the cache
and samples the next token. --temperature 0 is greedy decoding (argmax), identical to
recomputing the full forward pass at every step. Generation stops at <|endoftext|>.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from plmjax import workdir as workdir_lib
from plmjax.data.tokenizer import load_tokenizer
from plmjax.errors import ConfigError, UserError
from plmjax.models import gpt
from plmjax.models.config import ModelConfig
from plmjax.train import checkpoint


def add_arguments(parser):
  parser.add_argument("--workdir", required=True, help="a GPT workdir (pretrain or import-hf)")
  parser.add_argument("--prompt", required=True)
  parser.add_argument("--max-new-tokens", type=int, default=50)
  parser.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
  parser.add_argument("--top-k", type=int, default=0, help="0: no top-k filter")
  parser.add_argument("--top-p", type=float, default=1.0, help="1: no nucleus filter")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")


def filter_logits(logits_V, top_k: int, top_p):
  """-inf outside the top-k tokens and outside the smallest set with probability >= top_p."""
  neg = jnp.finfo(logits_V.dtype).min
  if top_k > 0:
    kth = jax.lax.top_k(logits_V, top_k)[0][-1]
    logits_V = jnp.where(logits_V < kth, neg, logits_V)
  sorted_V = jnp.sort(logits_V)[::-1]
  probs_V = jax.nn.softmax(sorted_V)
  # A token stays while the probability of the tokens ranked above it is below top_p
  # (so the most likely token always stays).
  before_V = jnp.cumsum(probs_V) - probs_V
  cutoff = jnp.min(jnp.where(before_V < top_p, sorted_V, jnp.inf))
  return jnp.where(logits_V < cutoff, neg, logits_V)


def sample(logits_V, rng, greedy: bool, top_k: int, temperature, top_p):
  if greedy:
    return jnp.argmax(logits_V).astype(jnp.int32)
  logits_V = filter_logits(logits_V.astype(jnp.float32) / temperature, top_k, top_p)
  return jax.random.categorical(rng, logits_V).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 5, 6), donate_argnums=2)
def _decode(model, params, cache, ids_1xT, rng, greedy, top_k, temperature, top_p):
  """Feeds T tokens through the cache; returns (next token, cache). One compilation per
  (model, T, greedy, top_k): the prefill and then the 1-token step."""
  out, mutated = model.apply({"params": params, "cache": cache}, ids_1xT, decode=True,
                             mutable=["cache"])
  token = sample(out["logits"][0, -1], rng, greedy, top_k, temperature, top_p)
  return token, mutated["cache"]


def generate(model: gpt.GPT, params, prompt_ids, max_new_tokens: int, *,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             eos_id: int | None = None) -> list[int]:
  """New token ids after `prompt_ids` (without the prompt; stops before eos_id)."""
  prompt = np.asarray(prompt_ids, np.int32)[None, :]
  max_len = prompt.shape[1] + max_new_tokens
  limit = model.config.max_position_embeddings
  if prompt.shape[1] == 0:
    raise UserError("the prompt is empty after tokenization; give some text")
  if max_len > limit:
    raise ConfigError(f"prompt ({prompt.shape[1]} tokens) + --max-new-tokens {max_new_tokens} = "
                      f"{max_len} exceeds the model's {limit} positions; ask for fewer tokens")
  if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
    raise ConfigError("need --temperature >= 0, 0 < --top-p <= 1 and --top-k >= 0")

  cache = gpt.init_cache(model, 1, max_len)
  rng = jax.random.key(seed)
  knobs = (temperature == 0, top_k, jnp.float32(temperature or 1.0), jnp.float32(top_p))
  token, cache = _decode(model, params, cache, jnp.asarray(prompt), jax.random.fold_in(rng, 0),
                         *knobs)
  out = []
  for i in range(max_new_tokens):
    t = int(token)
    if eos_id is not None and t == eos_id:
      break
    out.append(t)
    if i + 1 < max_new_tokens:
      token, cache = _decode(model, params, cache, jnp.full((1, 1), t, jnp.int32),
                             jax.random.fold_in(rng, i + 1), *knobs)
  return out


def main(args, overrides):
  if overrides:
    raise ConfigError(f"generate takes no --config overrides (got {overrides[0]})")
  config = workdir_lib.read_config(args.workdir)
  model_cfg = ModelConfig.from_config(config.model)
  if model_cfg.arch != "gpt":
    raise ConfigError(f"{args.workdir} holds a {model_cfg.arch!r} model; generate needs GPT")
  tokenizer = load_tokenizer(workdir_lib.tokenizer_dir(args.workdir))
  params, _ = checkpoint.load_params(args.workdir, args.step)
  prompt = tokenizer.encode(args.prompt)
  ids = generate(gpt.GPT(model_cfg), jax.device_put(params), prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                 top_p=args.top_p, seed=args.seed, eos_id=tokenizer.eos_id)
  print(tokenizer.decode(list(prompt) + ids), flush=True)
  return 0
