"""Completion fine-tuning: plmjax against Hugging Face PyTorch on the same weights and data.

  python bench/completion_vs_hf.py [--steps 64 --eval-every 8 --batch 32 --lr 3e-3
                                    --words 12 --length 3 --layers 2 --hidden 64]

A synthetic prompt -> completion task: the prompt is `--length` words drawn from
`--words` one-token words, the completion the same words reversed. A tiny random GPT-2
(`plmjax export`ed to a GPT2LMHeadModel directory, so both start from the same weights)
is fine-tuned twice for `--steps` steps:

  plmjax  finetune.run with configs/finetune/completion.py (what `plmjax finetune` runs)
  HF      GPT2LMHeadModel in a PyTorch loop: the same batches in the same order (plmjax's
          BatchIterator over the same token ids), torch.optim.AdamW with the same betas,
          eps and weight decay on the same tensors (not biases, not LayerNorms), linear
          warmup + linear decay (transformers.get_linear_schedule_with_warmup), gradient
          clipping at 1.0, cross-entropy on the completion tokens + <|endoftext|> only,
          and greedy `generate` (do_sample=False, num_beams=1).

Dropout is 0 in both, so the two runs differ only by floating-point rounding. Prints, at
every evaluation, each side's eval loss, exact_match and rougeL, then

  train loss: max_abs_diff=D over N steps (step S)
  completion_vs_hf: steps=N plmjax_exact_match=A hf_exact_match=B abs_diff=C
      plmjax_rougeL=R hf_rougeL=Q plmjax_eval_loss=L hf_eval_loss=M seconds_plmjax=T seconds_hf=U
"""

import argparse
import json
import os
import pathlib
import tempfile
import time

import flax.linen as nn
import jax
import numpy as np
import torch
import transformers

from plmjax import config as config_lib
from plmjax.config import base_config
from plmjax.data.tokenizer import load_tokenizer
from plmjax.data.tokenizer_train import train_tokenizer
from plmjax.export import export
from plmjax.finetune import completion, data, finetune
from plmjax.models import build_model
from plmjax.models.config import ModelConfig
from plmjax.train import checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[1]


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=64)
  p.add_argument("--eval-every", type=int, default=8)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--lr", type=float, default=3e-3)
  p.add_argument("--words", type=int, default=12, help="distinct words")
  p.add_argument("--length", type=int, default=3, help="words per prompt")
  p.add_argument("--train", type=int, default=512, help="training records")
  p.add_argument("--eval", type=int, default=64, help="evaluation records")
  p.add_argument("--layers", type=int, default=2)
  p.add_argument("--hidden", type=int, default=64)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--workdir", default="", help="default: a temporary directory")
  return p.parse_args(argv)


# ---- the task and the init workdir ----------------------------------------------------------

SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "pe", "da", "gri", "sto")


def task_words(n: int) -> list[str]:
  return [a + b for a in SYLLABLES for b in SYLLABLES if a != b][:n]


def task_rows(words, n: int, length: int, seed: int) -> list[dict]:
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(n):
    ws = [str(w) for w in rng.choice(words, length)]
    rows.append(dict(prompt=" ".join(ws), completion=" ".join(ws[::-1])))
  return rows


def write_jsonl(path, rows) -> str:
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return str(path)


def make_init(root, words, *, layers=2, hidden=64, heads=4, max_len=32, seed=0) -> str:
  """A random GPT-2 workdir whose tokenizer (GPT kind) has every task word as one piece."""
  root = pathlib.Path(root)
  rng = np.random.default_rng(seed)
  texts = [" ".join(rng.choice(words, 12)) for _ in range(400)]
  tok_dir = root / "tok"
  train_tokenizer(texts, len(words) + 40, "bpe", str(tok_dir / "tokenizer"), kind="gpt")
  tok = load_tokenizer(str(tok_dir))
  long = [w for w in words if len(tok.encode(w)) != 1]
  assert not long, f"words of several pieces: {long}"
  config = base_config("gpt")
  config.model.update(num_layers=layers, hidden_size=hidden, num_heads=heads,
                      intermediate_size=2 * hidden, vocab_size=tok.vocab_size,
                      max_position_embeddings=max_len)
  model = build_model(ModelConfig.from_config(config.model), "lm")
  params = jax.jit(lambda: model.init(jax.random.PRNGKey(seed), np.ones((1, 8), np.int32)))()
  workdir = str(root / "init")
  checkpoint.write_params_workdir(workdir, config, jax.device_get(nn.meta.unbox(params["params"])),
                                  tokenizer_dir=str(tok_dir))
  return workdir


def completion_config(train: str, eval_: str, *, steps: int, eval_every: int, batch: int,
                      lr: float, max_seq_len: int, max_new_tokens: int):
  """configs/finetune/completion.py, sized for the task; dropout off."""
  c = config_lib.load_config_file(str(ROOT / "configs" / "finetune" / "completion.py"))
  c.data.update(train=train, eval=eval_, max_seq_len=max_seq_len)
  c.task.max_new_tokens = max_new_tokens
  c.model.update(dropout_rate=0.0, attention_dropout_rate=0.0)
  c.train.update(epochs=0, steps=steps, eval_every_steps=eval_every, batch_size=batch,
                 learning_rate=lr, log_every_steps=1)
  c.checkpoint.update(async_save=False, every_steps=steps)
  return c


# ---- the Hugging Face side ------------------------------------------------------------------

def hf_model(hf_dir: str):
  return transformers.GPT2LMHeadModel.from_pretrained(hf_dir, resid_pdrop=0.0, embd_pdrop=0.0,
                                                      attn_pdrop=0.0)


def hf_batch_loss(model, batch: dict):
  """Hugging Face's own loss: labels -100 outside the completion (+ <|endoftext|>).

  GPT2LMHeadModel predicts labels[:, j + 1] at position j; a row's targets are its
  input_ids shifted by one, so labels = [-100, targets masked...]. Rows must end before
  the last position (its target has no label slot).
  """
  w = batch["loss_weights"] * batch["weights"][:, None]
  assert not w[:, -1].any(), "a row fills the whole length"
  labels = np.where(w > 0, batch["targets"], -100)[:, :-1]
  labels = np.concatenate([np.full((len(labels), 1), -100), labels], axis=1)
  ids = torch.as_tensor(batch["input_ids"], dtype=torch.long)
  return model(input_ids=ids, labels=torch.as_tensor(labels, dtype=torch.long)).loss


def hf_optimizer(model, train_cfg):
  decay, no_decay = [], []
  for name, p in model.named_parameters():
    (no_decay if name.endswith("bias") or ".ln_" in name or name.startswith("transformer.ln_f")
     else decay).append(p)
  opt = torch.optim.AdamW([dict(params=decay, weight_decay=train_cfg.weight_decay),
                           dict(params=no_decay, weight_decay=0.0)],
                          lr=train_cfg.learning_rate, betas=(train_cfg.adam_b1, train_cfg.adam_b2),
                          eps=train_cfg.adam_eps)
  sched = transformers.get_linear_schedule_with_warmup(opt, train_cfg.warmup_steps,
                                                       train_cfg.steps)
  return opt, sched


def hf_generate(model, prompts: list[list[int]], max_new_tokens: int, eos: int) -> list[list[int]]:
  """Greedy ids after each prompt, cut before <|endoftext|> (prompts grouped by length)."""
  out = [None] * len(prompts)
  by_len = {}
  for i, p in enumerate(prompts):
    by_len.setdefault(len(p), []).append(i)
  with torch.no_grad():
    for length, idx in by_len.items():
      ids = torch.tensor([prompts[i] for i in idx], dtype=torch.long)
      gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                           num_beams=1, max_new_tokens=max_new_tokens, eos_token_id=eos,
                           pad_token_id=eos)
      for i, row in zip(idx, gen[:, length:].tolist()):
        out[i] = row[:row.index(eos)] if eos in row else row
  return out


def hf_evaluate(model, feats, tokenizer, max_new_tokens: int) -> dict:
  model.eval()
  a = feats.arrays
  with torch.no_grad():
    logits = model(input_ids=torch.as_tensor(a["input_ids"], dtype=torch.long)).logits
    nll = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), torch.as_tensor(a["targets"], dtype=torch.long).flatten(),
        reduction="none").numpy()
  w = a["loss_weights"].reshape(-1)
  eos = tokenizer.eos_id
  ids = hf_generate(model, [ex["prompt_ids"] for ex in feats.examples], max_new_tokens, eos)
  texts = [tokenizer.decode(x) for x in ids]
  model.train()
  return dict(loss=float((nll * w).sum() / w.sum()),
              **completion.scores(texts, [ex["completion"] for ex in feats.examples]))


def run_hf(hf_dir: str, config, tokenizer) -> tuple[list[float], dict]:
  """(train loss per step, {eval step: metrics}) of the PyTorch run.

  One torch thread: these models are tiny, and on a busy CPU more threads only spin.
  """
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  try:
    torch.manual_seed(0)
    model = hf_model(hf_dir)
    model.train()
    train = finetune.load_split(config, tokenizer, "train")
    evaluation = finetune.load_split(config, tokenizer, "eval")
    t = config.train
    opt, sched = hf_optimizer(model, t)
    batches = data.BatchIterator(train.arrays, t.batch_size, seed=t.seed)
    losses, evals = [], {}
    for step in range(1, t.steps + 1):
      loss = hf_batch_loss(model, next(batches))
      opt.zero_grad()
      loss.backward()
      torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip_norm)
      opt.step()
      sched.step()
      losses.append(loss.item())
      if step % t.eval_every_steps == 0 or step == t.steps:
        evals[step] = hf_evaluate(model, evaluation, tokenizer, config.task.max_new_tokens)
    return losses, evals
  finally:
    torch.set_num_threads(threads)


# ---- both -----------------------------------------------------------------------------------

def run_plmjax(config, init: str, workdir: str) -> tuple[list[float], dict]:
  finetune.run(config, init, workdir)
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  losses = [r["loss"] for r in rows if "split" not in r]
  evals = {r["step"]: r for r in rows if r.get("split") == "eval"}
  return losses, evals


def compare(args, root: str) -> dict:
  words = task_words(args.words)
  init = make_init(root, words, layers=args.layers, hidden=args.hidden, heads=args.heads,
                   max_len=2 * args.length + 8, seed=args.seed)
  hf_dir = os.path.join(root, "init_hf")
  export.export(init, hf_dir)
  train = write_jsonl(os.path.join(root, "train.jsonl"),
                      task_rows(words, args.train, args.length, args.seed))
  dev = write_jsonl(os.path.join(root, "dev.jsonl"),
                    task_rows(words, args.eval, args.length, args.seed + 1))

  def config():
    c = completion_config(train, dev, steps=args.steps, eval_every=args.eval_every,
                          batch=args.batch, lr=args.lr, max_seq_len=2 * args.length + 2,
                          max_new_tokens=args.length + 2)
    c.train.seed = args.seed
    return c

  t0 = time.perf_counter()
  jax_losses, jax_evals = run_plmjax(config(), init, os.path.join(root, "run"))
  t1 = time.perf_counter()
  c = config()
  finetune.prepare_config(c, init)
  finetune.schedule(c, args.train)
  hf_losses, hf_evals = run_hf(hf_dir, c, load_tokenizer(os.path.join(init, "tokenizer")))
  t2 = time.perf_counter()
  return dict(jax_losses=jax_losses, hf_losses=hf_losses, jax_evals=jax_evals,
              hf_evals=hf_evals, seconds_plmjax=t1 - t0, seconds_hf=t2 - t1)


def main(argv=None):
  args = parse_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    root = args.workdir or tmp
    os.makedirs(root, exist_ok=True)
    r = compare(args, root)
  diffs = [abs(a - b) for a, b in zip(r["jax_losses"], r["hf_losses"])]
  worst = max(range(len(diffs)), key=diffs.__getitem__)
  for step in sorted(r["hf_evals"]):
    j, h = r["jax_evals"][step], r["hf_evals"][step]
    print(f"step {step}: plmjax loss={j['loss']:.4f} exact_match={j['exact_match']:.3f} "
          f"rougeL={j['rougeL']:.3f} | hf loss={h['loss']:.4f} "
          f"exact_match={h['exact_match']:.3f} rougeL={h['rougeL']:.3f}")
  print(f"train loss: max_abs_diff={diffs[worst]:.2e} over {len(diffs)} steps (step {worst + 1})")
  last = max(r["hf_evals"])
  j, h = r["jax_evals"][last], r["hf_evals"][last]
  print(f"completion_vs_hf: steps={last} plmjax_exact_match={j['exact_match']:.4f} "
        f"hf_exact_match={h['exact_match']:.4f} "
        f"abs_diff={abs(j['exact_match'] - h['exact_match']):.4f} "
        f"plmjax_rougeL={j['rougeL']:.4f} hf_rougeL={h['rougeL']:.4f} "
        f"plmjax_eval_loss={j['loss']:.4f} hf_eval_loss={h['loss']:.4f} "
        f"seconds_plmjax={r['seconds_plmjax']:.1f} seconds_hf={r['seconds_hf']:.1f}")
  return r


if __name__ == "__main__":
  main()
