"""`plmjax generate`: text from a GPT or T5 workdir, the whole decode loop on device.

  plmjax generate --workdir runs/gpt2_small --prompt "The history of" \\
      [--max-new-tokens 50 --temperature 0.8 --top-k 40 --top-p 0.95 --seed 0]
  plmjax generate --workdir runs/gpt2_small --input prompts.jsonl --output out.jsonl \\
      [--batch-size 16] [--num-beams 4 --length-penalty 1.0]

--input takes a .jsonl file of {"prompt": ...} lines or a text file with one prompt per
line; --output gets {"prompt": ..., "completion": ...} lines in input order. Prompts are
left-padded into batches and each batch is one on-device call (plmjax/decoding.py):
prefill, then a while_loop over the KV cache until every row reaches end-of-text or
--max-new-tokens. --temperature 0 is greedy decoding; --num-beams K > 1 is beam search
as Hugging Face's generate(num_beams=K, do_sample=False), which ignores --temperature,
--top-k and --top-p.

A T5 workdir (model.arch=t5) takes the same flags: each prompt is the encoder's source
(its tokens and </s>), and the output is the decoder's text, printed for --prompt and
written as {"prompt": ..., "target": ...} lines for --input (plmjax/seq2seq_decoding.py:
the encoder once, then the cached decoder in a while_loop; --max-new-tokens has no
position-table bound).
"""

import json
import os

import jax
import numpy as np

from plmjax import decoding, seq2seq_decoding
from plmjax import workdir as workdir_lib
from plmjax.data.tokenizer import load_tokenizer
from plmjax.decoding import filter_logits  # noqa: F401  (public: tests, callers)
from plmjax.errors import ConfigError, DataError, UserError
from plmjax.models import build_model, gpt
from plmjax.models.config import ModelConfig
from plmjax.train import checkpoint

PROMPT_BUCKET = 8  # prompt lengths round up to a multiple: fewer compilations


def add_arguments(parser):
  parser.add_argument("--workdir", required=True,
                      help="a GPT or T5 workdir (pretrain, import-hf or finetune)")
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--prompt", help="one prompt; prints prompt + completion (T5: the target)")
  source.add_argument("--input", help="prompts: .jsonl ({\"prompt\": ...} lines) or text lines")
  parser.add_argument("--output", help="with --input: .jsonl of {\"prompt\", \"completion\"} "
                      "(T5: {\"prompt\", \"target\"})")
  parser.add_argument("--batch-size", type=int, default=16, help="prompts per device call")
  parser.add_argument("--max-new-tokens", type=int, default=50)
  parser.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
  parser.add_argument("--top-k", type=int, default=0, help="0: no top-k filter")
  parser.add_argument("--top-p", type=float, default=1.0, help="1: no nucleus filter")
  parser.add_argument("--num-beams", type=int, default=1, help=">1: beam search (deterministic)")
  parser.add_argument("--length-penalty", type=float, default=1.0,
                      help="beam search: scores are sum(log p) / length ** this")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")


def generate_ids(model: gpt.GPT, params, prompts: list[list[int]], *, max_new_tokens: int,
                 eos_id: int, pad_id: int = 0, batch_size: int = 16, num_beams: int = 1,
                 length_penalty: float = 1.0, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0) -> list[list[int]]:
  """Per prompt, the generated ids after it, cut before the first eos_id.

  temperature 0: greedy; num_beams > 1: beam search (temperature, top_k, top_p unused).
  Prompts are sorted by length into left-padded batches of `batch_size`; each batch is
  one call of a jitted on-device loop. A prompt's sample depends on (seed, its index),
  not on the batch it lands in.
  """
  _check(model, prompts, max_new_tokens, batch_size, num_beams, temperature, top_k, top_p)
  eos = -1 if eos_id is None else int(eos_id)
  # Every input goes to the device explicitly: the loop itself transfers nothing.
  params = jax.device_put(params)
  scalars = jax.device_put((np.int32(seed), np.int32(eos), np.int32(pad_id),
                            np.float32(temperature or 1.0), np.float32(top_p),
                            decoding.length_penalties(max_new_tokens, length_penalty)))
  seed_, eos_, pad_, temperature_, top_p_, penalties_N1 = scalars
  order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
  batch = min(batch_size, len(prompts))
  pending = []  # batches dispatched back to back; results read once all are queued
  for start in range(0, len(order), batch):
    chosen = order[start:start + batch]
    rows = chosen + [chosen[-1]] * (batch - len(chosen))  # a full batch: one compilation
    ids_BxT, mask_BxT = jax.device_put(left_pad([prompts[i] for i in rows], pad_id))
    if num_beams > 1:
      out_BxN = decoding.beam_loop(model, params, ids_BxT, mask_BxT, eos_, pad_, penalties_N1,
                                   max_new_tokens=max_new_tokens, num_beams=num_beams)
    else:
      out_BxN = decoding.sample_loop(
          model, params, ids_BxT, mask_BxT, jax.device_put(np.asarray(rows, np.int32)), seed_,
          eos_, pad_, temperature_, top_p_, max_new_tokens=max_new_tokens,
          greedy=temperature == 0, top_k=top_k)
    pending.append((chosen, out_BxN))
  results: list[list[int]] = [[] for _ in prompts]
  for chosen, out_BxN in jax.device_get(pending):
    for i, row in zip(chosen, out_BxN):
      results[i] = cut_at_eos(row.tolist(), eos)
  return results


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """BxT ids and 1/0 mask, real tokens last; T rounded up to a multiple of PROMPT_BUCKET."""
  longest = max(len(p) for p in prompts)
  length = -(-longest // PROMPT_BUCKET) * PROMPT_BUCKET
  ids = np.full((len(prompts), length), pad_id, np.int32)
  mask = np.zeros((len(prompts), length), np.int32)
  for row, p in enumerate(prompts):
    ids[row, length - len(p):] = p
    mask[row, length - len(p):] = 1
  return ids, mask


def cut_at_eos(ids: list[int], eos_id: int) -> list[int]:
  return ids[:ids.index(eos_id)] if eos_id in ids else ids


def _check(model, prompts, max_new_tokens, batch_size, num_beams, temperature, top_k, top_p):
  limit = model.config.max_position_embeddings
  if not prompts:
    raise UserError("no prompts to generate from")
  if max_new_tokens < 1 or batch_size < 1 or num_beams < 1:
    raise ConfigError("need --max-new-tokens, --batch-size and --num-beams >= 1")
  if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
    raise ConfigError("need --temperature >= 0, 0 < --top-p <= 1 and --top-k >= 0")
  for i, p in enumerate(prompts):
    if not p:
      raise UserError(f"prompt {i + 1} is empty after tokenization; give some text")
    if len(p) + max_new_tokens > limit:
      raise ConfigError(f"prompt {i + 1} ({len(p)} tokens) + --max-new-tokens {max_new_tokens} = "
                        f"{len(p) + max_new_tokens} exceeds the model's {limit} positions; "
                        "ask for fewer tokens")


def generate(model: gpt.GPT, params, prompt_ids, max_new_tokens: int, *,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             eos_id: int | None = None, num_beams: int = 1,
             length_penalty: float = 1.0) -> list[int]:
  """New token ids after one prompt (without the prompt; stops before eos_id)."""
  return generate_ids(model, params, [list(prompt_ids)], max_new_tokens=max_new_tokens,
                      eos_id=eos_id, batch_size=1, num_beams=num_beams,
                      length_penalty=length_penalty, temperature=temperature, top_k=top_k,
                      top_p=top_p, seed=seed)[0]


def read_prompts(path: str) -> list[str]:
  """Prompts from a .jsonl file ({"prompt": ...} per line) or a text file (one per line)."""
  if not os.path.exists(path):
    raise DataError(f"--input {path} does not exist")
  with open(path, encoding="utf-8") as f:
    lines = [line.rstrip("\n") for line in f]
  if not path.endswith((".jsonl", ".json")):
    return lines
  prompts = []
  for n, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{path} line {n} is not JSON ({e.msg}); write one "
                      "{\"prompt\": ...} object per line") from None
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
      raise DataError(f"{path} line {n} has no \"prompt\" string; write one "
                      "{\"prompt\": ...} object per line")
    prompts.append(record["prompt"])
  return prompts


def completion_text(tokenizer, prompt_ids: list[int], new_ids: list[int]) -> str:
  """The text the new ids add after the prompt (keeps a leading space a piece carries)."""
  prompt, full = tokenizer.decode(prompt_ids), tokenizer.decode(list(prompt_ids) + new_ids)
  return full[len(prompt):] if full.startswith(prompt) else tokenizer.decode(new_ids)


def _main_t5(args, model_cfg):
  """T5: each prompt is the encoder's source (its tokens and </s>); the output is the
  decoder's text (plmjax.seq2seq_decoding: encoder once, cached decoder on device)."""
  tokenizer = load_tokenizer(workdir_lib.tokenizer_dir(args.workdir))
  texts = [args.prompt] if args.prompt is not None else read_prompts(args.input)
  sources = [list(tokenizer.encode(t)) + [tokenizer.eos_id] for t in texts]
  params, _ = checkpoint.load_params(args.workdir, args.step)
  new = seq2seq_decoding.generate_seq2seq_ids(
      build_model(model_cfg, "seq2seq"), params, sources, max_new_tokens=args.max_new_tokens,
      eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, batch_size=args.batch_size,
      num_beams=args.num_beams, length_penalty=args.length_penalty,
      temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
  targets = [tokenizer.decode(ids) for ids in new]
  if args.prompt is not None:
    print(targets[0], flush=True)
    return 0
  with open(args.output, "w", encoding="utf-8") as f:
    for text, target in zip(texts, targets):
      f.write(json.dumps({"prompt": text, "target": target}, ensure_ascii=False) + "\n")
  print(f"wrote {len(texts)} targets to {args.output}", flush=True)
  return 0


def main(args, overrides):
  if overrides:
    raise ConfigError(f"generate takes no --config overrides (got {overrides[0]})")
  if args.input and not args.output:
    raise UserError("--input needs --output FILE.jsonl for the completions")
  config = workdir_lib.read_config(args.workdir)
  model_cfg = ModelConfig.from_config(config.model)
  if model_cfg.arch == "t5":
    return _main_t5(args, model_cfg)
  if model_cfg.arch != "gpt":
    raise ConfigError(f"{args.workdir} holds a {model_cfg.arch!r} model; generate needs GPT "
                      "or T5")
  tokenizer = load_tokenizer(workdir_lib.tokenizer_dir(args.workdir))
  texts = [args.prompt] if args.prompt is not None else read_prompts(args.input)
  prompts = [tokenizer.encode(t) for t in texts]
  params, _ = checkpoint.load_params(args.workdir, args.step)
  pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
  new = generate_ids(gpt.GPT(model_cfg), params, prompts, max_new_tokens=args.max_new_tokens,
                     eos_id=tokenizer.eos_id, pad_id=pad_id, batch_size=args.batch_size,
                     num_beams=args.num_beams, length_penalty=args.length_penalty,
                     temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                     seed=args.seed)
  if args.prompt is not None:
    print(tokenizer.decode(prompts[0] + new[0]), flush=True)
    return 0
  with open(args.output, "w", encoding="utf-8") as f:
    for text, p, ids in zip(texts, prompts, new):
      f.write(json.dumps({"prompt": text, "completion": completion_text(tokenizer, p, ids)},
                         ensure_ascii=False) + "\n")
  print(f"wrote {len(texts)} completions to {args.output}", flush=True)
  return 0
