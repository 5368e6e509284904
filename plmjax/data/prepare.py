"""`plmjax data prepare`: tokenise a pretraining corpus once into ArrayRecord shards.

  plmjax data prepare --input 'wiki/*.jsonl' --tokenizer tok.model --out data/wiki \
      [--workers 8] [--shard-size 64MB]

Then pretrain on it: --config.data.train=data/wiki --config.data.tokenizer=data/wiki/tokenizer.
The layout is in prepared.py. Shard k holds the documents that follow shard k-1 until
their text reaches --shard-size, so the shards, and every byte written, are the same
for any --workers. A shard is written under a temporary name and renamed when complete,
the manifest last: running the same command again after an interruption keeps the
finished shards and redoes the rest. `plmjax pretrain` prepares a raw source the same
way into WORKDIR/data_cache/ on its first start (`prepare_cached`).
"""

import collections
import glob
import hashlib
import itertools
import json
import multiprocessing
import os
import re
import shutil
import time

import numpy as np
import tqdm
from array_record.python.array_record_module import ArrayRecordWriter

from plmjax.data import prepared, sources
from plmjax.data.tokenizer import load_tokenizer
from plmjax.errors import DataError, UserError

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMG]?)B?", re.IGNORECASE)


def add_arguments(parser):
  sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
  p = sub.add_parser("prepare", help="tokenize a corpus once into ArrayRecord shards")
  p.add_argument("--input", required=True,
                 help="glob of .txt/.jsonl(.gz) files, tfds:NAME[/CONFIG]:SPLIT or builtin:...")
  p.add_argument("--tokenizer", required=True,
                 help="sentencepiece .model, tokenizer.json, vocab.txt, or a directory of one")
  p.add_argument("--out", required=True, help="directory for the shards and manifest.json")
  p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                 help="tokenizer processes (default: one per CPU)")
  p.add_argument("--shard-size", default="64MB",
                 help="text per shard, e.g. 64MB (default), 500KB")
  p.add_argument("--tfds-data-dir", default="", help="tfds data_dir for a tfds: input")


def main(args, overrides):
  if overrides:
    raise UserError(f"`plmjax data prepare` takes no config overrides ({overrides[0]})")
  if args.workers < 1:
    raise UserError(f"--workers {args.workers} must be at least 1")
  t0 = time.perf_counter()
  done = prepared.is_prepared(args.out)
  manifest = prepare(args.input, args.tokenizer, args.out, workers=args.workers,
                     shard_bytes=parse_size(args.shard_size),
                     tfds_data_dir=args.tfds_data_dir or None, key="--input", progress=True)
  seconds = time.perf_counter() - t0
  print(f"plmjax: {'already ' if done else ''}prepared {args.out}: "
        f"{manifest['documents']} documents, "
        f"{manifest['segments']} segments, {manifest['tokens']} tokens in "
        f"{len(manifest['shards'])} shards ({seconds:.1f} s)\nnext: plmjax pretrain --config CFG "
        f"--workdir DIR --config.data.train={args.out} "
        f"--config.data.tokenizer={os.path.join(args.out, 'tokenizer')}", flush=True)
  return 0


def parse_size(text: str) -> int:
  """'64MB' -> 64 * 2**20 bytes; a plain number is bytes."""
  m = _SIZE.fullmatch(text.strip())
  if not m or float(m[1]) <= 0:
    raise UserError(f"--shard-size {text!r} is not a size; use e.g. 64MB, 500KB or 1GB")
  return max(1, int(float(m[1]) * 1024 ** " KMG".index(m[2].upper() or " ")))


def plan_of(spec: str, tokenizer, *, shard_bytes: int, tfds_data_dir: str | None = None,
            process_index: int = 0, process_count: int = 1, key: str = "--input",
            piece_tokens: int = prepared.PIECE_TOKENS) -> dict:
  """Everything the output depends on: same plan, same bytes."""
  return dict(source=sources.signature(spec, tfds_data_dir=tfds_data_dir, key=key),
              process=[process_index, process_count],
              tokenizer=dict(fingerprint=prepared.fingerprint(tokenizer),
                             vocab_size=tokenizer.vocab_size, path=os.path.abspath(tokenizer.path)),
              shard_bytes=shard_bytes, token_dtype=prepared.token_dtype(tokenizer.vocab_size),
              piece_tokens=piece_tokens)


def _same_plan(a: dict, b: dict) -> bool:
  strip = lambda p: dict(p, tokenizer={k: v for k, v in p["tokenizer"].items() if k != "path"})
  return strip(a) == strip(b)


def prepare(spec: str, tokenizer, out: str, *, workers: int = 1, shard_bytes: int = 64 << 20,
            tfds_data_dir: str | None = None, process_index: int = 0, process_count: int = 1,
            key: str = "--input", progress: bool = False,
            piece_tokens: int = prepared.PIECE_TOKENS) -> dict:
  """Writes (or finishes) the prepared corpus of `spec` in `out`; returns its manifest.

  `tokenizer` is a path or a loaded Tokenizer. An `out` already prepared with the same
  plan is left as it is. Bad input raises before `out` is created; a failure later
  removes what this call created, an interruption keeps the finished shards.
  """
  if isinstance(tokenizer, (str, os.PathLike)):
    tokenizer = load_tokenizer(os.fspath(tokenizer))
  plan = plan_of(spec, tokenizer, shard_bytes=shard_bytes, tfds_data_dir=tfds_data_dir,
                 process_index=process_index, process_count=process_count, key=key,
                 piece_tokens=piece_tokens)
  if _resume_state(out, plan) == "done":
    return prepared.read_manifest(out)
  docs = iter(sources.iter_documents(spec, process_index=process_index,
                                     process_count=process_count, tfds_data_dir=tfds_data_dir,
                                     key=key))
  first = next(docs, None)  # a bad first file fails here, before anything is written
  if first is None:
    raise DataError(f"{key}={spec!r} holds no documents")
  created = not os.path.exists(out)
  fresh = created or not os.listdir(out)  # nothing of an earlier run to keep
  os.makedirs(out, exist_ok=True)
  if not os.path.isfile(os.path.join(out, prepared.PLAN)):
    _write_json(os.path.join(out, prepared.PLAN), dict(format=prepared.FORMAT,
                                                       version=prepared.VERSION, plan=plan))
  for tmp in glob.glob(os.path.join(glob.escape(out), "*.tmp")):
    if os.path.isfile(tmp):
      os.remove(tmp)  # half-written by an interrupted run
  try:
    shards = _write_shards(_group(_chain(first, docs), shard_bytes), tokenizer, out, plan,
                           workers, f"preparing {spec}", progress)
    if not any(s["tokens"] for s in shards):
      raise DataError(f"{key}={spec!r} has no tokens after tokenisation")
    # Written in place, not renamed (gcsfuse mounts cannot rename directories); the
    # manifest, written after it, is what marks the directory complete.
    tok_dir = os.path.join(out, "tokenizer")
    shutil.rmtree(tok_dir, ignore_errors=True)
    tokenizer.save(tok_dir)
    manifest = dict(format=prepared.FORMAT, version=prepared.VERSION, plan=plan,
                    token_dtype=plan["token_dtype"], piece_tokens=piece_tokens,
                    shards=shards,
                    **{k: sum(s[k] for s in shards) for k in ("documents", "segments", "tokens")})
    _write_json(os.path.join(out, prepared.MANIFEST), manifest)
    os.remove(os.path.join(out, prepared.PLAN))
    return manifest
  except (KeyboardInterrupt, SystemExit):
    raise  # finished shards stay: the same command continues
  except BaseException:
    if created:
      shutil.rmtree(out, ignore_errors=True)
    elif fresh:
      for name in os.listdir(out):
        path = os.path.join(out, name)
        if os.path.isdir(path):
          shutil.rmtree(path)
        else:
          os.remove(path)
    raise


def _resume_state(out: str, plan: dict) -> str:
  """'done' (prepared with this plan), 'continue' or 'new'; an error for anything else."""
  if not os.path.exists(out):
    return "new"
  if not os.path.isdir(out):
    raise DataError(f"--out {out} is a file; give a directory for the prepared corpus")
  for name, state in ((prepared.MANIFEST, "done"), (prepared.PLAN, "continue")):
    path = os.path.join(out, name)
    if os.path.isfile(path):
      with open(path, encoding="utf-8") as f:
        saved = json.load(f).get("plan")
      if saved is None or not _same_plan(saved, plan):
        what = "a corpus prepared" if state == "done" else "an unfinished prepare"
        raise DataError(f"--out {out} holds {what} from another source, tokenizer or "
                        "--shard-size (or the input files changed); give a new --out or "
                        "delete it")
      return state
  if os.listdir(out):
    raise DataError(f"--out {out} is not empty and holds no plmjax prepared corpus; give a "
                    "new or empty directory")
  return "new"


def _chain(first, rest):
  yield first
  yield from rest


def _group(docs, shard_bytes: int):
  """(k, documents, text bytes) per shard: documents until their text reaches shard_bytes."""
  k, batch, size = 0, [], 0
  for doc in docs:
    batch.append(doc)
    size += sum(len(s.encode("utf-8")) for s in doc)
    if size >= shard_bytes:
      yield k, batch, size
      k, batch, size = k + 1, [], 0
  if batch:
    yield k, batch, size


def _write_shards(groups, tokenizer, out: str, plan: dict, workers: int, desc: str,
                  progress: bool):
  """Tokenises and writes every shard not already finished; returns their stats in order."""
  stats = {}
  bar = tqdm.tqdm(desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                  delay=0 if progress else 3, leave=False, dynamic_ncols=True)
  tokens, t0 = 0, time.perf_counter()

  def finish(result):
    nonlocal tokens
    stats[result["shard"]] = result
    tokens += result["tokens"]
    bar.update(result["text_bytes"])
    bar.set_postfix_str(f"{tokens / max(time.perf_counter() - t0, 1e-9) / 1e3:.0f}k tokens/s",
                        refresh=False)

  pool = None
  if workers > 1:
    pool = multiprocessing.get_context("spawn").Pool(
        workers, initializer=_init_worker, initargs=(tokenizer.path, out, plan))
  else:
    _init_worker(tokenizer, out, plan)
  try:
    pending = collections.deque()
    for k, docs, size in groups:
      done = _finished_shard(out, k)
      if done is not None:
        stats[k] = done
        continue
      if pool is None:
        finish(_write_shard(k, docs, size))
        continue
      pending.append(pool.apply_async(_write_shard, (k, docs, size)))
      while len(pending) > workers:  # a few shards of text in flight, not the corpus
        finish(pending.popleft().get())
    while pending:
      finish(pending.popleft().get())
    if pool is not None:
      pool.close()
      pool.join()
  finally:
    if pool is not None:
      pool.terminate()
    bar.close()
  return [stats[k] for k in range(len(stats))]


def _finished_shard(out: str, k: int) -> dict | None:
  """A shard's stats if it was completely written (its record file is renamed last)."""
  if not os.path.isfile(os.path.join(out, prepared.shard_name(k))):
    return None
  with np.load(os.path.join(out, prepared.index_name(k))) as index:
    return json.loads(str(index["stats"]))


_WORKER = {}


def _init_worker(tokenizer, out: str, plan: dict):
  if isinstance(tokenizer, str):
    tokenizer = load_tokenizer(tokenizer)
  _WORKER.update(tokenizer=tokenizer, out=out, dtype=plan["token_dtype"],
                 piece_tokens=plan["piece_tokens"])


def _write_shard(k: int, docs: list[list[str]], text_bytes: int) -> dict:
  """Tokenises one shard's documents (empty segments and documents dropped, as
  corpus.tokenize_documents does) and writes its records and index."""
  tokenizer, out, dtype = _WORKER["tokenizer"], _WORKER["out"], _WORKER["dtype"]
  piece_tokens = _WORKER["piece_tokens"]
  ids = tokenizer.encode_batch([s for doc in docs for s in doc])
  records, doc_segments, seg_lengths, i = [], [], [], 0
  for doc in docs:
    segments = [seg for seg in ids[i:i + len(doc)] if seg]
    i += len(doc)
    if segments:
      flat = np.fromiter(itertools.chain.from_iterable(segments), np.int64,
                         count=sum(map(len, segments)))
      records.extend(prepared.pieces(flat, dtype, piece_tokens))
      doc_segments.append(len(segments))
      seg_lengths.extend(len(s) for s in segments)
  stats = dict(shard=k, file=prepared.shard_name(k), source_documents=len(docs),
               documents=len(doc_segments), records=len(records), segments=len(seg_lengths),
               tokens=int(sum(seg_lengths)), text_bytes=text_bytes)
  index_path = os.path.join(out, prepared.index_name(k))
  with open(index_path + ".tmp", "wb") as f:
    np.savez(f, doc_segments=np.asarray(doc_segments, np.int32),
             segment_lengths=np.asarray(seg_lengths, np.int32), stats=json.dumps(stats))
  shard_path = os.path.join(out, prepared.shard_name(k))
  writer = ArrayRecordWriter(shard_path + ".tmp", "group_size:1")
  for record in records:
    writer.write(record)
  writer.close()
  os.replace(index_path + ".tmp", index_path)
  os.replace(shard_path + ".tmp", shard_path)  # last: the shard counts as finished
  return stats


def _write_json(path: str, value: dict):
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(value, f, indent=1)
    f.write("\n")
  os.replace(path + ".tmp", path)


def cache_dir_for(spec: str, tokenizer, cache_root: str, *, split: str, process_index: int,
                  process_count: int, tfds_data_dir: str | None = None,
                  key: str = "data spec") -> str:
  """WORKDIR/data_cache/SPLIT-HASH[-pPofN]: one prepared directory per source, tokenizer
  and process share (so each process prepares only the documents it reads)."""
  plan = plan_of(spec, tokenizer, shard_bytes=0, tfds_data_dir=tfds_data_dir,
                 process_index=process_index, process_count=process_count, key=key)
  plan["tokenizer"].pop("path")
  digest = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:12]
  share = f"-p{process_index}of{process_count}" if process_count > 1 else ""
  return os.path.join(cache_root, f"{split}-{digest}{share}")


def prepare_cached(spec: str, tokenizer, cache_root: str, *, split: str, process_index: int = 0,
                   process_count: int = 1, tfds_data_dir: str | None = None,
                   key: str = "data spec") -> str:
  """Prepares this process's share of a raw source under cache_root once; returns the
  directory. Later starts (resumes) find it done and skip tokenisation."""
  out = cache_dir_for(spec, tokenizer, cache_root, split=split, process_index=process_index,
                      process_count=process_count, tfds_data_dir=tfds_data_dir, key=key)
  prepare(spec, tokenizer, out, workers=1, shard_bytes=64 << 20, tfds_data_dir=tfds_data_dir,
          process_index=process_index, process_count=process_count, key=key)
  return out
