"""Start-up tables (BERT chunks, packed rows) kept on disk, so that a resume loads them.

Such a table is a few numpy arrays made from the corpus's segment and document offsets
and the data settings, in a Python pass over every segment: seconds per million
segments, minutes at Wikipedia scale, at every start. `cached(cache_dir, key, build)`
keeps them in CACHE_DIR/index-HASH/ (HASH of the key, which names the offsets by their
digest) as .npy files, written to a temporary directory that is renamed when complete,
and maps them read-only on later starts. No cache_dir (or a bucket path): just build.
"""

import hashlib
import json
import os
import shutil
from collections.abc import Callable

import numpy as np

VERSION = 1


def offsets_digest(corpus) -> str:
  """What a chunk table depends on: the corpus's segment and document offsets."""
  h = hashlib.blake2b(digest_size=16)
  for offsets in (corpus.segment_offsets, corpus.document_offsets):
    h.update(np.ascontiguousarray(offsets, dtype=np.int64).data)
    h.update(b"|")
  return h.hexdigest()


def key_digest(key: dict) -> str:
  return hashlib.sha256(json.dumps(dict(key, version=VERSION), sort_keys=True).encode()
                        ).hexdigest()[:16]


def _load(path: str) -> dict[str, np.ndarray] | None:
  try:
    with open(os.path.join(path, "key.json"), encoding="utf-8") as f:
      names = json.load(f)["arrays"]
    return {name: np.load(os.path.join(path, f"{name}.npy"), mmap_mode="r") for name in names}
  except (OSError, ValueError, KeyError):
    return None  # damaged or foreign: built again


def cached(cache_dir: str | None, key: dict,
           build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """build()'s arrays, from CACHE_DIR/index-HASH when an earlier start stored them."""
  if not cache_dir or "://" in cache_dir:
    return build()
  path = os.path.join(cache_dir, f"index-{key_digest(key)}")
  if os.path.isdir(path) and (arrays := _load(path)) is not None:
    return arrays
  arrays = build()
  tmp = f"{path}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    for name, array in arrays.items():
      np.save(os.path.join(tmp, f"{name}.npy"), np.asarray(array))
    with open(os.path.join(tmp, "key.json"), "w", encoding="utf-8") as f:
      json.dump(dict(key, version=VERSION, arrays=list(arrays)), f, indent=1)
    shutil.rmtree(path, ignore_errors=True)  # a damaged one
    try:
      os.replace(tmp, path)
    except OSError:
      if _load(path) is None:  # not another process's finished copy of the same table
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return arrays
