"""Throughput of the pretraining input pipeline alone, on one CPU core.

  python bench/data_pipeline.py [--data ../shared/data/wiki_sample.jsonl] [--batches 200]

For each example kind it reports the one-off setup (read + tokenise + chunk) and
then examples/s and tokens/s (real, non-padding tokens) of `next(iterator)`,
with grain reading in the calling thread (no prefetch thread, no workers).
Tokenizers (BPE, 8000 pieces) are trained first, also timed.
"""

import argparse
import os
import pathlib
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
CASES = {
    "bert": dict(arch="bert"),
    "bert-wwm": dict(arch="bert", whole_word_masking=True),
    "bert-packed": dict(arch="bert", packing=True),
    "bert-no-nsp": dict(arch="bert", nsp=False),
    "gpt": dict(arch="gpt"),
    "gpt-packed": dict(arch="gpt", packing=True),
}


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "wiki_sample.jsonl"),
                 help="anything config.data.train accepts")
  p.add_argument("--cases", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES))
  p.add_argument("--vocab-size", type=int, default=8000)
  p.add_argument("--seq-len", type=int, default=128)
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--batches", type=int, default=200)
  p.add_argument("--all-cores", action="store_true", help="do not pin to one core")
  return p.parse_args()


def main():
  args = parse_args()
  if not args.all_cores and hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # before any thread pool starts

  from plmjax.config import base_config  # pylint: disable=g-import-not-at-top
  from plmjax.data import pipeline  # pylint: disable=g-import-not-at-top
  from plmjax.data import tokenizer as tk  # pylint: disable=g-import-not-at-top

  tmp = tempfile.mkdtemp(prefix="plmjax_bench_")
  toks = {}
  for kind in ("bert", "gpt"):
    t0 = time.perf_counter()
    path = tk.train_tokenizer(args.data, args.vocab_size, "bpe", os.path.join(tmp, kind),
                              kind=kind, num_threads=1)
    toks[kind] = tk.load_tokenizer(path)
    print(f"tokenizer {kind}: trained in {time.perf_counter() - t0:.1f} s")

  print(f"data {args.data}; seq {args.seq_len}, batch {args.batch_size}, {args.batches} batches, "
        f"{'all cores' if args.all_cores else 'one core'}")
  print(f"{'case':<12} {'setup s':>8} {'examples/s':>11} {'tokens/s':>11} {'fill':>6}")
  for name in args.cases.split(","):
    case = dict(CASES[name])
    arch = case.pop("arch")
    c = base_config(arch)
    c.model.vocab_size = toks[arch].vocab_size
    c.data.update(dict(train=args.data, max_seq_len=args.seq_len, **case))
    t0 = time.perf_counter()
    it = pipeline.make_pretrain_iterator(c, toks[arch], batch_size=args.batch_size,
                                         num_threads=0)
    next(it)
    setup = time.perf_counter() - t0
    real = 0
    t0 = time.perf_counter()
    for _ in range(args.batches):
      batch = next(it)
      real += int(batch["attention_mask" if arch == "bert" else "loss_weights"].sum())
    dt = time.perf_counter() - t0
    examples = args.batches * args.batch_size
    print(f"{name:<12} {setup:8.2f} {examples / dt:11.0f} {real / dt:11.0f} "
          f"{real / (examples * args.seq_len):6.1%}")


if __name__ == "__main__":
  main()
