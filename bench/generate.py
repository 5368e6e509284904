"""Generation throughput: plmjax's on-device decode loop against Hugging Face PyTorch
`generate`, on the same GPT-2 weights, in the same run.

  python bench/generate.py                       # 6 layers, 512 hidden, vocab 16384 (~30M)
  python bench/generate.py --layers 12 --hidden 768 --heads 12 --intermediate 3072 \\
      --vocab 50257                              # GPT-2 small (slow on a 2-core CPU)

For each batch size (--batches) and number of beams (--beams: 1 = greedy), both
frameworks continue the same random prompts of --prompt-len tokens by --new-tokens
tokens (no end-of-text, so every row runs to the end). tokens/s = batch x new tokens /
seconds per call (the median over --repeats; beams count the returned tokens, not
beams x tokens). The two take turns each repeat, so load from other processes hits
both alike; plmjax's first call, which compiles, is reported apart. `same` is the
fraction of prompts whose tokens agree (float32; random weights give close logits, so
an occasional near-tie may flip). On a CPU shared with other processes, PyTorch's
default threads can stall each other (OpenMP); --threads 1 gives both frameworks one.

Prints a header, then one line per (batch, beams):
  batch=B beams=K plmjax_tok/s=X hf_tok/s=Y ratio=X/Y same=F plmjax_compile_s=C
"""

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--layers", type=int, default=6)
  p.add_argument("--hidden", type=int, default=512)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--intermediate", type=int, default=2048)
  p.add_argument("--vocab", type=int, default=16384)
  p.add_argument("--prompt-len", type=int, default=32)
  p.add_argument("--new-tokens", type=int, default=32)
  p.add_argument("--batches", default="1,16", help="comma-separated batch sizes")
  p.add_argument("--beams", default="1,4", help="comma-separated; 1 = greedy")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--threads", type=int, default=0,
                 help="1: one compute thread for both (torch.set_num_threads(1), XLA without "
                      "its Eigen thread pool); 0: each framework's default")
  return p.parse_args(argv)


def build(args):
  """(plmjax model, params, Hugging Face GPT2LMHeadModel) with the same float32 weights."""
  import flax.linen as nn
  import jax
  import torch
  import transformers
  from plmjax.export import hf_config, hf_weights
  from plmjax.models import gpt
  from plmjax.models.config import ModelConfig

  cfg = ModelConfig(arch="gpt", vocab_size=args.vocab, hidden_size=args.hidden,
                    num_layers=args.layers, num_heads=args.heads,
                    intermediate_size=args.intermediate,
                    max_position_embeddings=args.prompt_len + args.new_tokens,
                    layer_norm_eps=1e-5, dropout_rate=0.0, attention_dropout_rate=0.0)
  model = gpt.GPT(cfg)
  init = jax.jit(lambda key: model.init(key, np.ones((1, 8), np.int32))["params"])
  params = jax.device_put(jax.device_get(nn.meta.unbox(init(jax.random.key(args.seed)))))
  hf = transformers.GPT2LMHeadModel(transformers.AutoConfig.for_model(
      **hf_config.to_hf_config(cfg, "lm"))).eval()
  state = hf_weights.to_hf_state_dict(jax.device_get(params), "gpt")
  hf.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
  return model, params, hf


def main(argv=None):
  args = parse_args(argv)
  if args.threads == 1:  # before jax starts its CPU client
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen="
                               "false intra_op_parallelism_threads=1").strip()
  elif args.threads > 1:
    raise SystemExit("--threads takes 0 (defaults) or 1")
  import jax
  import torch
  if args.threads == 1:
    torch.set_num_threads(1)
  from plmjax.generate import generate_ids

  model, params, hf = build(args)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  print(f"gpt2: layers={args.layers} hidden={args.hidden} heads={args.heads} "
        f"intermediate={args.intermediate} vocab={args.vocab} ({n_params / 1e6:.1f}M params) "
        f"prompt_len={args.prompt_len} new_tokens={args.new_tokens} float32")
  dev = jax.devices()[0]
  print(f"device: {dev.platform} {dev.device_kind}, {cores} host cores, torch threads "
        f"{torch.get_num_threads()}, jax {jax.__version__}, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}")
  rng = np.random.default_rng(args.seed)
  n = args.new_tokens
  for batch in (int(b) for b in args.batches.split(",")):
    prompts = rng.integers(0, args.vocab, (batch, args.prompt_len))
    for beams in (int(k) for k in args.beams.split(",")):
      def ours():
        return generate_ids(model, params, prompts.tolist(), max_new_tokens=n, eos_id=None,
                            batch_size=batch, num_beams=beams)

      def theirs():
        with torch.no_grad():
          out = hf.generate(torch.as_tensor(prompts), attention_mask=torch.ones_like(
              torch.as_tensor(prompts)), max_new_tokens=n, min_new_tokens=n, num_beams=beams,
              do_sample=False, eos_token_id=None, pad_token_id=0)
        return out[:, args.prompt_len:].tolist()

      t0 = time.perf_counter()
      got = ours()
      compile_s = time.perf_counter() - t0
      want = theirs()  # warm-up
      same = np.mean([a == b for a, b in zip(got, want)])
      times = {"plmjax": [], "hf": []}
      for _ in range(args.repeats):
        for name, run in (("plmjax", ours), ("hf", theirs)):
          t0 = time.perf_counter()
          run()
          times[name].append(time.perf_counter() - t0)
      tok_s = {k: batch * n / statistics.median(v) for k, v in times.items()}
      print(f"batch={batch} beams={beams} plmjax_tok/s={tok_s['plmjax']:.0f} "
            f"hf_tok/s={tok_s['hf']:.0f} ratio={tok_s['plmjax'] / tok_s['hf']:.2f} "
            f"same={same:.2f} plmjax_compile_s={compile_s:.1f}", flush=True)


if __name__ == "__main__":
  main()
