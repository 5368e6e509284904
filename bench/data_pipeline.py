"""The pretraining input pipeline: example throughput, `data prepare` speed, start-up cost.

  python bench/data_pipeline.py [--data ../shared/data/wiki_sample.jsonl] [--batches 200]
  python bench/data_pipeline.py --prepare [--workers 1,2]
  python bench/data_pipeline.py --startup [--scales 1,10]

Default: for each example kind, the one-off setup (read + tokenise + chunk) and then
examples/s and tokens/s (real, non-padding tokens) of `next(iterator)` on one CPU core,
with grain reading in the calling thread (no prefetch thread, no workers).

--prepare: `plmjax data prepare` text MB/s on a corpus of --scale copies of --data (each
copy's text changed, see `scaled_corpus`), for each --workers count (worker start-up
included), against sentencepiece's own `encode` of the same segments (one thread) in one
process times the workers, and in N started processes at once (same load as prepare's);
medians of --repeats runs, sentencepiece and prepare alternating.

--startup: whole `plmjax pretrain` processes (configs/bert_tiny.py, one step, no eval) on
a prepared corpus of each --scales size: seconds from launch to the first logged step,
and the process's peak RSS (wait4's ru_maxrss), the median of --repeats processes run
interleaved across sizes; and, in this process, the data part alone (open the prepared
directory, first batch). Then the raw .jsonl of the largest scale: the first start
(tokenises into WORKDIR/data_cache) and a resume (one step more).

BPE tokenizers of --vocab-size pieces are trained on --data first.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
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
                 help="a .jsonl file (the default mode: anything config.data.train accepts)")
  p.add_argument("--cases", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES))
  p.add_argument("--vocab-size", type=int, default=8000)
  p.add_argument("--seq-len", type=int, default=128)
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--batches", type=int, default=200)
  p.add_argument("--all-cores", action="store_true", help="do not pin to one core")
  p.add_argument("--prepare", action="store_true", help="measure `data prepare` throughput")
  p.add_argument("--scale", type=int, default=10, help="--prepare: copies of --data")
  p.add_argument("--workers", default="1,2", help="--prepare: worker counts")
  p.add_argument("--startup", action="store_true", help="measure pretrain start-up and RSS")
  p.add_argument("--scales", default="1,10", help="--startup: corpus sizes in copies of --data")
  p.add_argument("--repeats", type=int, default=3, help="--prepare/--startup: runs (median)")
  p.add_argument("--tmp", default="", help="work directory (default: a new temporary one)")
  return p.parse_args()


def train_tokenizer(args, tmp: str, kind: str):
  from plmjax.data import tokenizer as tk  # pylint: disable=g-import-not-at-top
  from plmjax.data import tokenizer_train  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  path = tokenizer_train.train_tokenizer(args.data, args.vocab_size, "bpe",
                                         os.path.join(tmp, kind), kind=kind, num_threads=1)
  print(f"tokenizer {kind}: trained in {time.perf_counter() - t0:.1f} s", flush=True)
  return tk.load_tokenizer(path)


def scaled_corpus(src: str, copies: int, out: str) -> str:
  """`copies` copies of a .jsonl corpus; copy r rotates the words of every line by r, so
  no two copies have the same text (or the same tokens) but all have its statistics."""
  with open(src, encoding="utf-8") as f:
    records = [json.loads(line) for line in f if line.strip()]
  with open(out, "w", encoding="utf-8") as f:
    for r in range(copies):
      for rec in records:
        lines = []
        for line in rec["text"].split("\n"):
          words = line.split(" ")
          k = r % len(words) if words else 0
          lines.append(" ".join(words[k:] + words[:k]))
        f.write(json.dumps(dict(rec, text="\n".join(lines))) + "\n")
  return out


def throughput(args, tmp: str):
  if not args.all_cores and hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # before any thread pool starts
  from plmjax.config import base_config  # pylint: disable=g-import-not-at-top
  from plmjax.data import pipeline  # pylint: disable=g-import-not-at-top

  toks = {kind: train_tokenizer(args, tmp, kind) for kind in ("bert", "gpt")}
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


def _sp_encode(job):
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  model, segments = job
  return sum(map(len, spm.SentencePieceProcessor(model_file=model).encode(segments,
                                                                          num_threads=1)))


def prepare_speed(args, tmp: str):
  import multiprocessing  # pylint: disable=g-import-not-at-top
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  from plmjax.data import prepare, sources  # pylint: disable=g-import-not-at-top

  tok = train_tokenizer(args, tmp, "bert")
  corpus = scaled_corpus(args.data, args.scale, os.path.join(tmp, f"x{args.scale}.jsonl"))
  segments = [s for doc in sources.read_documents(corpus) for s in doc]
  mb = sum(len(s.encode("utf-8")) for s in segments) / 2**20
  sp = spm.SentencePieceProcessor(model_file=tok.path)
  sp.encode(segments[:2000], num_threads=1)  # warm-up
  sp_rates, n_tokens = [], 0
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    n_tokens = sum(map(len, sp.encode(segments, num_threads=1)))
    sp_rates.append(mb / (time.perf_counter() - t0))
  sp_rate = sorted(sp_rates)[len(sp_rates) // 2]
  print(f"corpus {args.scale}x {args.data}: {mb:.1f} MB of text, {n_tokens} tokens; "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; medians of "
        f"{args.repeats} runs, sentencepiece and prepare alternating")
  print(f"sentencepiece encode, 1 process, 1 thread: {sp_rate:.2f} MB/s "
        f"({', '.join(f'{r:.2f}' for r in sp_rates)})")
  print(f"{'workers':>7} {'prepare s':>9} {'MB/s':>6} {'tokens/s':>9} {'sp x workers':>12} "
        f"{'ratio':>6} {'sp in N procs':>13} {'ratio':>6}")
  for workers in map(int, args.workers.split(",")):
    times, sp_parallel = [], []
    for r in range(args.repeats):
      with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pool.map(abs, range(workers))  # started
        parts = [(tok.path, segments[i::workers]) for i in range(workers)]
        t0 = time.perf_counter()
        assert sum(pool.map(_sp_encode, parts)) == n_tokens
        sp_parallel.append(mb / (time.perf_counter() - t0))
      out = os.path.join(tmp, f"prepared_w{workers}_{r}")
      t0 = time.perf_counter()
      manifest = prepare.prepare(corpus, tok, out, workers=workers, shard_bytes=1 << 20)
      times.append(time.perf_counter() - t0)
      assert manifest["tokens"] == n_tokens
    dt = sorted(times)[len(times) // 2]
    par = sorted(sp_parallel)[len(sp_parallel) // 2]
    print(f"{workers:7d} {dt:9.2f} {mb / dt:6.2f} {n_tokens / dt:9.0f} {sp_rate * workers:12.2f} "
          f"{mb / dt / (sp_rate * workers):6.2f} {par:13.2f} {mb / dt / par:6.2f}  (prepare s: "
          f"{', '.join(f'{t:.2f}' for t in times)})", flush=True)


def _pretrain(workdir: str, train: str, tokenizer: str,
              steps: int = 1) -> tuple[float, float, float]:
  """(seconds to the first logged step, seconds in all, peak RSS MiB) of one process."""
  argv = [sys.executable, "-m", "plmjax.cli", "pretrain", "--config",
          str(ROOT / "configs" / "bert_tiny.py"), "--workdir", workdir,
          f"--config.data.train={train}", "--config.data.eval=",
          f"--config.data.tokenizer={tokenizer}", f"--config.train.steps={steps}",
          "--config.train.log_every_steps=1"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  metrics = os.path.join(workdir, "metrics.jsonl")
  t0 = time.perf_counter()
  proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  first = None
  while True:
    pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
    if first is None and os.path.isfile(metrics) and os.path.getsize(metrics):
      first = time.perf_counter() - t0
    if pid:
      break
    time.sleep(0.02)
  total = time.perf_counter() - t0
  if status:
    raise RuntimeError(f"pretrain failed: {proc.stderr.read().decode()[-2000:]}")
  return first or total, total, usage.ru_maxrss / 1024


def _data_setup(out: str, tokenizer) -> float:
  """Seconds this process takes to open a prepared corpus and make the first batch."""
  from plmjax import config as config_lib  # pylint: disable=g-import-not-at-top
  from plmjax.data import pipeline  # pylint: disable=g-import-not-at-top

  config = config_lib.load_config(str(ROOT / "configs" / "bert_tiny.py"),
                                  [f"--config.data.train={out}"])
  t0 = time.perf_counter()
  next(pipeline.make_pretrain_iterator(config, tokenizer, batch_size=32, num_threads=0))
  return time.perf_counter() - t0


def _median(runs):
  return [sorted(x)[len(x) // 2] for x in zip(*runs)]


def startup(args, tmp: str):
  from plmjax.data import prepare  # pylint: disable=g-import-not-at-top

  tok = train_tokenizer(args, tmp, "bert")
  scales = [int(s) for s in args.scales.split(",")]
  print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; configs/bert_tiny.py, "
        f"1 step, no eval; median of {args.repeats} processes per row, rows interleaved")
  prepared_dirs, tokens, setup, runs = {}, {}, {}, {s: [] for s in scales}
  for scale in scales:
    corpus = scaled_corpus(args.data, scale, os.path.join(tmp, f"x{scale}.jsonl"))
    prepared_dirs[scale] = os.path.join(tmp, f"prepared_x{scale}")
    tokens[scale] = prepare.prepare(corpus, tok, prepared_dirs[scale], workers=1,
                                    shard_bytes=1 << 20)["tokens"]
    setup[scale] = _data_setup(prepared_dirs[scale], tok)
  for r in range(args.repeats):  # interleaved, so that changing load hits every row alike
    for scale in scales:
      runs[scale].append(_pretrain(os.path.join(tmp, f"run_x{scale}_{r}"), prepared_dirs[scale],
                                   tok.path))
  print(f"{'corpus':<26} {'tokens':>9} {'data setup s':>12} {'first step s':>12} "
        f"{'process s':>9} {'peak RSS MiB':>12}  (each run: first step s / RSS MiB)")
  for scale in scales:
    first, total, rss = _median(runs[scale])
    each = ", ".join(f"{f:.1f}/{m:.0f}" for f, _, m in runs[scale])
    print(f"{f'prepared {scale}x':<26} {tokens[scale]:9d} {setup[scale]:12.2f} {first:12.1f} "
          f"{total:9.1f} {rss:12.0f}  ({each})", flush=True)
  scale = max(scales)
  corpus = os.path.join(tmp, f"x{scale}.jsonl")
  workdir = os.path.join(tmp, f"run_raw_x{scale}")
  first, total, rss = _pretrain(workdir, corpus, tok.path, 1)
  print(f"{f'raw, first start {scale}x':<26} {'':9} {'':12} {first:12.1f} {total:9.1f} "
        f"{rss:12.0f}", flush=True)
  os.remove(os.path.join(workdir, "metrics.jsonl"))  # the resume's first record: step 2
  first, total, rss = _pretrain(workdir, corpus, tok.path, 2)
  print(f"{f'raw, resume (cached) {scale}x':<26} {'':9} {'':12} {first:12.1f} {total:9.1f} "
        f"{rss:12.0f}", flush=True)


def main():
  args = parse_args()
  tmp = args.tmp or tempfile.mkdtemp(prefix="plmjax_bench_")
  os.makedirs(tmp, exist_ok=True)
  if args.prepare:
    prepare_speed(args, tmp)
  elif args.startup:
    startup(args, tmp)
  else:
    throughput(args, tmp)


if __name__ == "__main__":
  main()
