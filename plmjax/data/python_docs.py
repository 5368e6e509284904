"""`builtin:python-docs`: English text that ships with every Python, for offline demos.

Documents: each topic of `pydoc_data.topics.topics` (~465k characters), then one
document per standard-library module holding its module, class and function
docstrings, parsed with `ast` (never imported). test/, idlelib/ and site-packages
are skipped; files are read in sorted order until MAX_CHARS, so the corpus is the
same on every run of the same Python. Segments are paragraphs (blank-line
separated, whitespace collapsed), long ones split at sentence ends.

`builtin:python-docs:eval` is a held-out 1/EVAL_EVERY of the documents, chosen by
a hash of the document name; `builtin:python-docs` (or `:train`) is the rest.
"""

import ast
import functools
import os
import re
import sysconfig
import warnings
import zlib

from plmjax.data.segments import split_sentences
from plmjax.errors import DataError

MAX_CHARS = 4_000_000
EVAL_EVERY = 20  # ~5% of the documents are held out for evaluation
_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__"}
_PARAGRAPH = re.compile(r"\n\s*\n")


def read(spec: str, key: str = "data spec") -> list[list[str]]:
  name, _, split = spec[len("builtin:"):].partition(":")
  if name != "python-docs" or split not in ("", "train", "eval"):
    raise DataError(f"{key}={spec!r} is not a built-in corpus; use builtin:python-docs "
                    "or builtin:python-docs:eval")
  want_eval = split == "eval"
  return [doc for name, doc in _all_documents() if _is_eval(name) == want_eval]


def _is_eval(name: str) -> bool:
  return zlib.crc32(name.encode("utf-8")) % EVAL_EVERY == 0


def _segments(text: str) -> list[str]:
  out = []
  for paragraph in _PARAGRAPH.split(text):
    out.extend(split_sentences(" ".join(paragraph.split())))
  return out


@functools.cache
def _all_documents() -> tuple[tuple[str, list[str]], ...]:
  from pydoc_data.topics import topics  # pylint: disable=g-import-not-at-top

  docs, total = [], 0
  for name in sorted(topics):
    docs.append((f"topic:{name}", _segments(topics[name])))
    total += len(topics[name])
  for path, rel in _stdlib_files():
    if total >= MAX_CHARS:
      break
    texts = _docstrings(path)
    if texts:
      docs.append((f"module:{rel}", [s for t in texts for s in _segments(t)]))
      total += sum(len(t) for t in texts)
  return tuple((name, segs) for name, segs in docs if segs)


def _stdlib_files():
  root = sysconfig.get_paths()["stdlib"]
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
    for f in filenames:
      if f.endswith(".py"):
        path = os.path.join(dirpath, f)
        found.append((path, os.path.relpath(path, root).replace(os.sep, "/")))
  return sorted(found, key=lambda item: item[1])


def _docstrings(path: str) -> list[str]:
  """Module, class and function docstrings of one file, in source order."""
  try:
    with open(path, "rb") as f:
      source = f.read()
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # invalid escape sequences in old modules
      tree = ast.parse(source)
  except (OSError, SyntaxError, ValueError):
    return []
  out = []

  def visit(node):
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
      doc = ast.get_docstring(node)
      if doc:
        out.append(doc)
    for child in ast.iter_child_nodes(node):
      if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        visit(child)

  visit(tree)
  return out
