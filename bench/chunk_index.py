"""BERT start-up tables at scale: cutting chunks (and packing rows) vs loading them.

Every BERT start cuts the corpus into chunks (bert_examples.make_chunks, a Python pass
over every segment); with data.packing it also assigns chunks to rows. The workdir's
data_cache keeps both (index_cache.py), so a resume maps them instead. This times, each
in a fresh process on a synthetic corpus (segments of 5-59 tokens, 40 per document,
seq 128, NSP on), the three cases a run meets, with the process's peak RSS:

  python bench/chunk_index.py --segments 20000000 [--packing] [--old OLD_bert_examples.py]

  build   BertExamples without a cache (what every start did before)
  first   with cache_dir, empty: build and store (a first start)
  resume  with cache_dir, filled: load (every later start)

--old times another make_chunks (e.g. `git show 2f683cb:plmjax/data/bert_examples.py`)
in place of the build row, for before/after figures.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time


def child(args):
  import numpy as np
  from plmjax.data.corpus import TokenizedCorpus
  rng = np.random.default_rng(0)
  seg_len = rng.integers(5, 60, size=args.segments)
  offsets = np.concatenate([[0], np.cumsum(seg_len)])
  corpus = TokenizedCorpus(np.zeros(1, np.int32), offsets,
                           np.arange(0, args.segments + 1, 40, dtype=np.int64))
  tok = type("Tok", (), dict(pad_id=0, cls_id=1, sep_id=2, mask_id=3, vocab_size=1000,
                             special_ids=(0, 1, 2, 3)))()  # all the tables need
  base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  t = time.perf_counter()
  if args.mode == "old":
    import importlib.util
    spec = importlib.util.spec_from_file_location("old_bert_examples", args.old)
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    chunks = old.make_chunks(corpus, 125, 0.1, np.random.default_rng([0, 0x43484e4b]),
                             np.random.default_rng([0, 0x4e5350]))
    n = len(chunks)
  else:
    from plmjax.data import bert_examples, bert_packing
    cls = bert_packing.PackedBertExamples if args.packing else bert_examples.BertExamples
    extra = dict(max_pairs_per_row=4) if args.packing else {}
    ex = cls(corpus, tok, max_seq_len=128, max_predictions_per_seq=20, seed=0,
             cache_dir=args.cache_dir or None, **extra)
    n = len(ex.chunks)
  seconds = time.perf_counter() - t
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  print(json.dumps(dict(seconds=seconds, chunks=n, base_mib=base / 1024,
                        peak_mib=peak / 1024)))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--segments", type=int, default=2_000_000)
  p.add_argument("--packing", action="store_true")
  p.add_argument("--old", default="")
  p.add_argument("--mode", default="")
  p.add_argument("--cache-dir", default="")
  args = p.parse_args()
  if args.mode:
    return child(args)
  cache = tempfile.mkdtemp(prefix="plmjax_chunk_index_")
  rows = [("old", "") if args.old else ("build", ""), ("first", cache), ("resume", cache)]
  print(f"{args.segments:,} segments, packing={args.packing}, load average "
        f"{os.getloadavg()[0]:.1f}")
  print("| case | chunks | seconds | RSS before MiB | peak RSS MiB |\n|---|---|---|---|---|")
  for mode, cache_dir in rows:
    out = subprocess.run([sys.executable, __file__, "--mode", mode, "--segments",
                          str(args.segments), "--cache-dir", cache_dir, "--old", args.old]
                         + (["--packing"] if args.packing else []),
                         capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"| {mode} | {r['chunks']:,} | {r['seconds']:.2f} | {r['base_mib']:.0f} | "
          f"{r['peak_mib']:.0f} |")
  size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(cache) for f in fs)
  print(f"cache on disk: {size / 2**20:.0f} MiB in {cache}")


if __name__ == "__main__":
  main()
