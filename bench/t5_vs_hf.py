"""T5 span-corruption pretraining: plmjax against Hugging Face PyTorch, same init and batches.

  python bench/t5_vs_hf.py [--config configs/t5_tiny.py --steps 300 --batch 32 --lr 1e-3
                            --warmup 30 --articles 80 --out t5_vs_hf.json]

English Wikipedia text (../shared/data/wiki_sample.jsonl): the first `--articles` articles
train, the rest are held out for evaluation. A T5 tokenizer (`kind t5`, the config's
vocabulary size, or the largest the text allows) is trained on the training articles; the
span-corruption examples come from plmjax's pipeline (unpacked rows: Hugging Face has no
packed T5), in the order `plmjax pretrain` would draw them. Both models start from the same
weights (plmjax's initialisation, converted with plmjax.export.t5_weights) and see the same
batches:

  plmjax  the Trainer's jitted train step (what `plmjax pretrain` runs)
  HF      T5ForConditionalGeneration (eager attention) in a PyTorch loop: torch.optim.AdamW
          with the same betas, eps and weight decay on the same tensors (not layer norms),
          the same learning rate at every step (plmjax's linear warmup + linear decay),
          gradient clipping at 1.0, the mean cross-entropy over the batch's target tokens.

Dropout is 0 in both. Prints the training loss of both every 25 steps, then

  t5_vs_hf: steps=N last10_plmjax=A last10_hf=B rel_diff=C eval_plmjax=E eval_hf=F ...

(last10: mean training loss of the last 10 steps; eval: loss on `--eval-batches` batches of
the held-out articles after training).
"""

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

import jax
import numpy as np
import torch
import transformers

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from plmjax import config as config_lib  # noqa: E402
from plmjax.data import pipeline  # noqa: E402
from plmjax.data.tokenizer import load_tokenizer  # noqa: E402
from plmjax.data.tokenizer_train import train_tokenizer  # noqa: E402
from plmjax.errors import UserError  # noqa: E402
from plmjax.export import hf_config, t5_weights  # noqa: E402
from plmjax.models import build_model  # noqa: E402
from plmjax.train import sharding  # noqa: E402
from plmjax.train.flops import pretrain_flops  # noqa: E402
from plmjax.train.objectives import PRETRAINING  # noqa: E402
from plmjax.train.optimizer import learning_rate_schedule  # noqa: E402
from plmjax.train.trainer import Trainer  # noqa: E402

WIKI = ROOT.parent / "shared" / "data" / "wiki_sample.jsonl"


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default=str(ROOT / "configs" / "t5_tiny.py"))
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--warmup", type=int, default=30)
  p.add_argument("--articles", type=int, default=80, help="training articles; the rest eval")
  p.add_argument("--eval-batches", type=int, default=8)
  p.add_argument("--threads", type=int, default=2, help="torch threads")
  p.add_argument("--out", default="", help="write the curves as JSON here")
  return p.parse_args(argv)


def split_wiki(workdir: str, articles: int) -> tuple[str, str]:
  with open(WIKI) as f:
    lines = f.readlines()
  paths = []
  for name, part in (("train", lines[:articles]), ("eval", lines[articles:])):
    paths.append(os.path.join(workdir, f"{name}.jsonl"))
    with open(paths[-1], "w") as out:
      out.writelines(part)
  return tuple(paths)


def train_t5_tokenizer(train: str, vocab_size: int, workdir: str):
  """kind t5 at the config's size, or the largest the text allows (the error names it)."""
  prefix = os.path.join(workdir, "tokenizer")
  try:
    return load_tokenizer(train_tokenizer(train, vocab_size, "unigram", prefix, kind="t5"))
  except UserError as e:
    import re  # pylint: disable=g-import-not-at-top
    sizes = [int(s) for s in re.findall(r"\b(\d{3,6})\b", str(e)) if int(s) < vocab_size]
    if not sizes:
      raise
    print(f"tokenizer: {e}; using {max(sizes)}")
    return load_tokenizer(train_tokenizer(train, max(sizes), "unigram", prefix, kind="t5"))


def make_config(args, train: str, evaluation: str, tokenizer):
  config = config_lib.load_config_file(args.config)
  config.model.update(vocab_size=tokenizer.vocab_size, dropout_rate=0.0,
                      attention_dropout_rate=0.0, dtype="float32")
  config.data.update(train=train, eval=evaluation, tokenizer=tokenizer.path, packing=False)
  config.train.update(steps=args.steps, batch_size=args.batch, learning_rate=args.lr,
                      warmup_steps=args.warmup, decay="linear", grad_clip_norm=1.0)
  config.mesh.update(data=1, fsdp=1, tensor=1)
  config_lib.validate(config)
  return config


def hf_model(config, params):
  cfg = config_lib.validate(config)
  model = transformers.T5ForConditionalGeneration(
      transformers.T5Config(**hf_config.to_hf_config(cfg, "seq2seq")))
  model.config._attn_implementation = "eager"
  state = {k: torch.tensor(v) for k, v in t5_weights.to_hf_state_dict(params).items()}
  if not cfg.tie_word_embeddings:  # transformers 5 ties lm_head at construction: untie
    model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.shared.weight))
  missing, unexpected = model.load_state_dict(state, strict=False)
  assert not unexpected and all("embed_tokens" in k or k == "lm_head.weight" and
                                cfg.tie_word_embeddings for k in missing), (missing, unexpected)
  return model


def hf_optimizer(model, t):
  """AdamW on the tensors plmjax decays (kernels, embeddings) and the rest without decay."""
  decay, no_decay = [], []
  for name, p in model.named_parameters():
    (no_decay if "layer_norm" in name else decay).append(p)
  return torch.optim.AdamW([dict(params=decay, weight_decay=t.weight_decay),
                            dict(params=no_decay, weight_decay=0.0)],
                           lr=0.0, betas=(t.adam_b1, t.adam_b2), eps=t.adam_eps)


def hf_loss(model, batch):
  labels = np.where(batch["loss_weights"] > 0, batch["targets"], -100)
  out = model(input_ids=torch.tensor(batch["input_ids"], dtype=torch.long),
              attention_mask=torch.tensor(batch["attention_mask"], dtype=torch.long),
              decoder_input_ids=torch.tensor(batch["decoder_input_ids"], dtype=torch.long),
              labels=torch.tensor(labels, dtype=torch.long))
  return out.loss


def main(argv=None):
  args = parse_args(argv)
  torch.set_num_threads(args.threads)
  workdir = tempfile.mkdtemp(prefix="t5_vs_hf_")
  train, evaluation = split_wiki(workdir, args.articles)
  vocab = config_lib.load_config_file(args.config).model.vocab_size
  tokenizer = train_t5_tokenizer(train, vocab, workdir)
  config = make_config(args, train, evaluation, tokenizer)
  cfg = config_lib.validate(config)
  it = pipeline.make_pretrain_iterator(config, tokenizer, batch_size=args.batch)
  batches = [next(it) for _ in range(args.steps)]
  ev = pipeline.make_pretrain_iterator(config, tokenizer, split="eval", batch_size=args.batch)
  eval_batches = [next(ev) for _ in range(args.eval_batches)]
  print(f"model: {cfg.num_layers}+{cfg.num_decoder_layers or cfg.num_layers} layers, d_model "
        f"{cfg.hidden_size}, {cfg.num_heads} heads, d_ff {cfg.intermediate_size} "
        f"({cfg.feed_forward_proj}), vocab {cfg.vocab_size}; inputs {config.data.max_seq_len}, "
        f"targets {config.data.max_target_len}; {len(it.examples)} training examples "
        f"({it.num_tokens} tokens), batch {args.batch}, lr {args.lr}, warmup {args.warmup}, "
        f"{args.steps} steps", flush=True)

  tokens, flops = pretrain_flops(config, cfg)
  trainer = Trainer(config, os.path.join(workdir, "plmjax"), build_model(cfg, "seq2seq"),
                    PRETRAINING["t5"], batches[0], flops_per_token=flops,
                    tokens_per_example=tokens, devices=jax.devices()[:1])
  init_params = jax.device_get(trainer.state["params"])
  model = hf_model(config, init_params)

  t0 = time.perf_counter()
  ours = []
  with trainer.context():
    for batch in batches:
      trainer.state, metrics = trainer.train_step(
          trainer.state, sharding.global_batch(batch, trainer.mesh))
      ours.append(metrics["batch_loss"])
    ours = [float(x) for x in jax.device_get(ours)]
    ours_eval = trainer.evaluate(trainer.state["params"], iter(eval_batches), args.eval_batches)
  seconds_ours = time.perf_counter() - t0

  t0 = time.perf_counter()
  schedule = learning_rate_schedule(config.train)
  opt = hf_optimizer(model, config.train)
  theirs = []
  model.train()
  for step, batch in enumerate(batches):
    for group in opt.param_groups:
      group["lr"] = float(schedule(step))
    loss = hf_loss(model, batch)
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.grad_clip_norm)
    opt.step()
    theirs.append(loss.item())
    if (step + 1) % 25 == 0 or step == 0:
      print(f"step {step + 1}: plmjax {ours[step]:.4f} hf {theirs[step]:.4f}", flush=True)
  model.eval()
  with torch.no_grad():
    sums = [(float(hf_loss(model, b)) * float(b["loss_weights"].sum()),
             float(b["loss_weights"].sum())) for b in eval_batches]
  theirs_eval = sum(s for s, _ in sums) / sum(n for _, n in sums)
  seconds_hf = time.perf_counter() - t0

  last_ours, last_theirs = np.mean(ours[-10:]), np.mean(theirs[-10:])
  result = dict(steps=args.steps, batch=args.batch, lr=args.lr, warmup=args.warmup,
                vocab=cfg.vocab_size, last10_plmjax=float(last_ours),
                last10_hf=float(last_theirs),
                rel_diff=float(abs(last_ours - last_theirs) / last_theirs),
                eval_plmjax=ours_eval["loss"], eval_hf=theirs_eval,
                eval_accuracy_plmjax=ours_eval["accuracy"],
                max_abs_diff_first10=float(np.max(np.abs(np.subtract(ours[:10], theirs[:10])))),
                seconds_plmjax=seconds_ours, seconds_hf=seconds_hf,
                loss_plmjax=ours, loss_hf=theirs)
  print("t5_vs_hf: " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                for k, v in result.items() if not isinstance(v, list)))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
