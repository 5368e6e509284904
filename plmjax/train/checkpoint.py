"""Workdir layout and orbax checkpoints.

  DIR/config.json        the run config (ConfigDict JSON); `read_config` loads it.
  DIR/tokenizer/         tokenizer file(s): tokenizer.model, or tokenizer.json / vocab.txt.
  DIR/checkpoints/STEP/  (or config.checkpoint.dir/STEP/, e.g. on gs://) orbax items: `params`, `opt_state` (absent in params-only
                         checkpoints written by import-hf), `meta` (JSON: step, rng,
                         data iterator position, nonfinite counters).

Orbax writes each step into a temporary directory and renames it when complete, so a
crash mid-save never leaves a checkpoint that `latest_step` would pick.
"""

import gc
import json
import logging
import os
import shutil
import sys
import time

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from plmjax.errors import CheckpointError

ITEMS = ("params", "opt_state", "meta")
# Keys of config.model that change parameter shapes: a workdir trained with other
# values cannot be resumed.
SHAPE_KEYS = ("arch", "vocab_size", "hidden_size", "num_layers", "num_heads",
              "intermediate_size", "max_position_embeddings", "type_vocab_size")


def checkpoint_dir(workdir: str, config: ml_collections.ConfigDict | None = None) -> str:
  """DIR/checkpoints, or `config.checkpoint.dir` when set (a local path or a URL such as
  gs://BUCKET/run/checkpoints, which orbax writes natively). Without `config`, the
  workdir's config.json decides."""
  if config is None:
    path = os.path.join(workdir, "config.json")
    config = read_config(workdir) if os.path.isfile(path) else None
  custom = config.checkpoint.get("dir", "") if config is not None else ""
  if custom:
    return custom if "://" in custom else os.path.abspath(custom)
  return os.path.join(os.path.abspath(workdir) if "://" not in workdir else workdir,
                      "checkpoints")


def tokenizer_subdir(workdir: str) -> str:
  return os.path.join(workdir, "tokenizer")


def manager(workdir: str, *, keep: int = 3, async_save: bool = True,
            read_only: bool = False,
            config: ml_collections.ConfigDict | None = None) -> ocp.CheckpointManager:
  # Read-only managers get the option values orbax would force, so it has nothing to
  # warn about on stderr (the CLI's errors are meant to be the only line there).
  options = ocp.CheckpointManagerOptions(
      max_to_keep=None if read_only else keep, save_interval_steps=0 if read_only else 1,
      enable_async_checkpointing=async_save, read_only=read_only, create=not read_only)
  absl_log = logging.getLogger("absl")
  absl_log.addFilter(_drop_read_only_notice)
  try:
    return ocp.CheckpointManager(checkpoint_dir(workdir, config), options=options,
                                 item_names=ITEMS)
  finally:
    absl_log.removeFilter(_drop_read_only_notice)


def _drop_read_only_notice(record: logging.LogRecord) -> bool:
  return not record.getMessage().startswith("Given directory is read only")


def checkpoint_steps(workdir: str, config: ml_collections.ConfigDict | None = None) -> list[int]:
  """Steps of the complete checkpoints (no manager needed); none if the directory is absent."""
  path = checkpoint_dir(workdir, config)
  if "://" not in path and not os.path.isdir(path):
    return []
  return sorted(ocp.utils.checkpoint_steps(path))


def write_config(workdir: str, config: ml_collections.ConfigDict):
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  text = config.to_json(indent=2)
  if os.path.isfile(path):
    with open(path) as f:
      if f.read() == text:
        return  # a resumed run leaves its workdir as it found it
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def read_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise CheckpointError(f"{path} does not exist: {workdir!r} is not a plmjax workdir "
                          "(pretrain, finetune or import-hf create one)")
  with open(path) as f:
    try:
      values = json.load(f)
    except json.JSONDecodeError as e:
      raise CheckpointError(f"{path} is not valid JSON ({e})") from e
  return ml_collections.ConfigDict(_lists_to_tuples(values))


def _lists_to_tuples(value):
  if isinstance(value, dict):
    return {k: _lists_to_tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_lists_to_tuples(v) for v in value)
  return value


def check_same_model(workdir: str, config: ml_collections.ConfigDict):
  """Refuses to resume a workdir whose checkpoints hold another model shape."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    return
  old_config = read_config(workdir)
  old = old_config.model
  diffs = [f"model.{k}: workdir has {old.get(k)!r}, this run has {config.model.get(k)!r}"
           for k in SHAPE_KEYS if old.get(k) != config.model.get(k)]
  old_head, head = _head(old_config), _head(config)
  if old_head != head:  # another head is another parameter tree
    diffs.append(f"task.head: workdir has {old_head!r}, this run has {head!r}")
  if diffs and checkpoint_steps(workdir):
    raise CheckpointError(
        f"workdir {workdir!r} holds checkpoints of another model ({'; '.join(diffs)}); "
        "use a new --workdir, or the same model settings to resume")


def _head(config) -> str | None:
  task = config.get("task")
  return task.get("head") if task is not None else None


def save(mngr: ocp.CheckpointManager, step: int, params, opt_state, meta: dict):
  """Starts an (async) save; `mngr.wait_until_finished()` blocks until it is on disk."""
  items = dict(params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta))
  if opt_state is not None:
    items["opt_state"] = ocp.args.StandardSave(opt_state)
  mngr.save(step, args=ocp.args.Composite(**items), force=True)


def restore(mngr: ocp.CheckpointManager, step: int, abstract_params, abstract_opt_state):
  """Restores the full train state onto the shardings of the abstract trees."""
  restored = _restore_quietly(mngr, step, ocp.args.Composite(
      params=ocp.args.StandardRestore(abstract_params),
      opt_state=ocp.args.StandardRestore(abstract_opt_state),
      meta=ocp.args.JsonRestore()))
  # Orbax hands namedtuples (optax states) back as plain tuples: re-impose the structure.
  opt_state = jax.tree.unflatten(jax.tree.structure(abstract_opt_state),
                                 jax.tree.leaves(restored["opt_state"]))
  return restored["params"], opt_state, restored["meta"]


class _AbandonedReads:
  """Keeps a failed restore's aftermath off stderr.

  When one array of a restore cannot be read, orbax abandons the others; as they finish,
  their coroutines and callbacks report errors of their own (event loop closed, exception
  never retrieved) through sys.unraisablehook, sys.excepthook and the asyncio logger:
  hundreds of lines that add nothing to the first error. They are dropped while a
  restore runs and, after a failure, until they stop coming.
  """

  def __enter__(self):
    self.dropped = 0
    self._old = (sys.unraisablehook, sys.excepthook)
    sys.unraisablehook = self._drop
    sys.excepthook = self._drop
    self._asyncio_log = logging.getLogger("asyncio")
    self._asyncio_was_disabled = self._asyncio_log.disabled
    self._asyncio_log.disabled = True
    return self

  def _drop(self, *unused):
    self.dropped += 1

  def settle(self, quiet_s: float = 0.3, limit_s: float = 5.0):
    """Waits until no report came for `quiet_s` (at most `limit_s`)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
      before = self.dropped
      gc.collect()  # abandoned coroutines report when they are finalised
      time.sleep(quiet_s)
      if self.dropped == before:
        return

  def __exit__(self, *exc):
    sys.unraisablehook, sys.excepthook = self._old
    self._asyncio_log.disabled = self._asyncio_was_disabled


class _Unreadable(Exception):
  """A restore failed; the message is `describe_error` of what orbax raised."""


def _restore_quietly(mngr, step, args):
  """mngr.restore, raising _Unreadable (without orbax's traceback) when it fails."""
  with _AbandonedReads() as aftermath:
    try:
      return mngr.restore(step, args=args)
    except Exception as e:  # orbax/tensorstore raise many types for damaged files
      reason = describe_error(e)
    # Out of the except block the traceback, and the abandoned reads it holds, can be
    # collected: settle() finalises them while their reports are still dropped.
    aftermath.settle()
  _filter_late_read_reports()
  raise _Unreadable(reason)


def _is_abandoned_read(report) -> bool:
  """A report from one of orbax's array reads abandoned by a failed restore."""
  text = f"{report.object!r} {report.exc_value!r}"
  return ("_read_array_index_and_device_put" in text
          or "Encountered error while reading array index" in text)


def _filter_late_read_reports():
  """From the first failed restore on, drops the abandoned reads' reports that arrive
  after settle() gave up waiting (their coroutines can be finalised much later);
  every other unraisable report still reaches the previous hook."""
  previous = sys.unraisablehook
  if getattr(previous, "plmjax_filter", False):
    return

  def hook(report):
    if not _is_abandoned_read(report):
      previous(report)
  hook.plmjax_filter = True
  sys.unraisablehook = hook


def describe_error(e: BaseException, limit: int = 300) -> str:
  """One line for a (chained) orbax/tensorstore error: the root cause says what broke."""
  root = e
  while root.__cause__ is not None or (root.__context__ is not None
                                       and not root.__suppress_context__):
    root = root.__cause__ or root.__context__
  text = (str(root).strip().splitlines() or [""])[0]
  text = text.split(" See full TensorStore details")[0]
  if len(text) > limit:
    text = text[:limit] + "..."
  return f"{type(root).__name__}: {text}" if text else type(root).__name__


def unreadable_dir(mngr: ocp.CheckpointManager):
  """Where unreadable checkpoints are moved: beside checkpoints/, not inside it (orbax
  would take any NAME_STEP directory there for a checkpoint)."""
  return mngr.directory.parent / "unreadable_checkpoints"


def restore_latest_readable(mngr, abstract_params, abstract_opt_state, log=logging.warning):
  """Newest checkpoint that restores; unreadable ones are skipped with a warning.

  Unreadable checkpoints newer than the one restored are moved to
  DIR/unreadable_checkpoints/ (kept for inspection) so that training can write
  those steps again. Returns (step, params, opt_state, meta) or None when there is
  no checkpoint. Raises CheckpointError when checkpoints exist but none can be read.
  """
  steps = sorted(mngr.all_steps(), reverse=True)
  failures = []
  for i, step in enumerate(steps):
    try:
      params, opt_state, meta = restore(mngr, step, abstract_params, abstract_opt_state)
    except _Unreadable as e:
      failures.append(f"step {step} ({mngr.directory / str(step)}) is unreadable ({e})")
      older = steps[i + 1] if i + 1 < len(steps) else None
      log(f"checkpoint {failures[-1]}; " + (
          f"falling back to the previous one, step {older} ({mngr.directory / str(older)})"
          if older is not None else "no older checkpoint"))
      continue
    if failures:
      _set_aside(mngr, steps[:i], log)
    return step, params, opt_state, meta
  if failures:
    raise CheckpointError(
        f"no readable checkpoint in {mngr.directory}: " + " | ".join(failures)
        + f". Move {mngr.directory} away to start from scratch.")
  return None


def _set_aside(mngr, steps, log):
  """Moves the checkpoints of `steps` out of the manager's directory."""
  if jax.process_index() == 0:
    dest_root = unreadable_dir(mngr)
    dest_root.mkdir(parents=True, exist_ok=True)
    for step in steps:
      src, dest = mngr.directory / str(step), dest_root / str(step)
      if dest.exists():  # an earlier fallback kept one of the same step
        dest = dest_root / f"{step}-{len(list(dest_root.iterdir()))}"
      src.rename(dest)
      log(f"moved the unreadable checkpoint {src} to {dest}")
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("plmjax_set_aside_checkpoints")
  mngr.reload()


def load_params(workdir: str, step: int | None = None):
  """Parameters (host numpy arrays) of the checkpoint at `step` (default: latest)."""
  steps = checkpoint_steps(workdir)
  if not steps:
    raise CheckpointError(f"no checkpoint in {checkpoint_dir(workdir)}")
  if step is None:
    step = max(steps)
  elif step not in steps:
    raise CheckpointError(f"no checkpoint for step {step} in {checkpoint_dir(workdir)}; "
                          f"available steps: {steps}")
  mngr = manager(workdir, read_only=True)
  try:
    restored = _restore_quietly(mngr, step,
                                ocp.args.Composite(params=ocp.args.StandardRestore()))
  except _Unreadable as e:
    others = [s for s in steps if s != step]
    raise CheckpointError(
        f"checkpoint step {step} ({mngr.directory / str(step)}) is unreadable ({e})"
        + (f"; choose another with --step (available: {others})" if others else "")) from None
  finally:
    mngr.close()
  params = jax.tree.map(np.asarray, restored["params"])
  return params, step


def write_params_workdir(workdir: str, config: ml_collections.ConfigDict, params, step: int = 0,
                         tokenizer_dir: str | None = None):
  """A workdir with config, tokenizer and a params-only checkpoint (import-hf)."""
  os.makedirs(workdir, exist_ok=True)
  write_config(workdir, config)
  if tokenizer_dir:
    dst = tokenizer_subdir(workdir)
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(tokenizer_dir, dst)
  mngr = manager(workdir, async_save=False)
  save(mngr, step, params, None, {"step": step})
  mngr.wait_until_finished()
  mngr.close()
