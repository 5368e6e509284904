"""Orbax checkpoints: save, restore the newest readable one, load parameters.

A checkpoint step holds the orbax items `params`, `opt_state` (absent in the params-only
checkpoints that import-hf writes) and `meta` (JSON: step, rng, data iterator position,
counters). Where they live is plmjax.workdir's business.
"""

import os
import shutil

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from plmjax import workdir as workdir_lib
from plmjax.errors import CheckpointError

ITEMS = ("params", "opt_state", "meta")


def manager(workdir: str, config: ml_collections.ConfigDict | None = None, *, keep: int = 3,
            async_save: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                         create=True)
  return ocp.CheckpointManager(workdir_lib.checkpoint_dir(workdir, config), options=options,
                               item_names=ITEMS)


def save(mngr: ocp.CheckpointManager, step: int, params, opt_state, meta: dict):
  """Starts an (async) save; `mngr.wait_until_finished()` blocks until it is on disk."""
  items = dict(params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta))
  if opt_state is not None:
    items["opt_state"] = ocp.args.StandardSave(opt_state)
  mngr.save(step, args=ocp.args.Composite(**items), force=True)


class Unreadable(Exception):
  """A checkpoint that orbax could not restore; the message is one line."""


def verify_readable(item_dir: str, window: int = 16):
  """Reads every stored entry of a local OCDBT checkpoint item (`.../STEP/params`), all
  reads awaited, and raises Unreadable naming the first damaged one.

  Orbax stops at the first failed read and closes its event loop while its other reads
  are in flight; those then print tracebacks over whatever the program writes next.
  Checking first keeps a damaged checkpoint to one line. Local files only: on them it
  costs a re-read from the page cache, while a cloud bucket would be read twice (and
  its objects are written whole).
  """
  if "://" in str(item_dir) or not os.path.exists(os.path.join(item_dir, "manifest.ocdbt")):
    return
  try:
    kv = ts.KvStore.open({"driver": "ocdbt",
                          "base": f"file://{os.path.abspath(item_dir)}/"}).result()
    keys = kv.list().result()
  except Exception as e:  # pylint: disable=broad-except
    raise Unreadable(describe_error(e)) from None
  failures = []
  for start in range(0, len(keys), window):
    reads = [(key, kv.read(key)) for key in keys[start:start + window]]
    for key, read in reads:  # every read is waited for, failed or not
      try:
        read.result()
      except Exception as e:  # pylint: disable=broad-except
        failures.append((key.decode(errors="replace"), e))
  if failures:
    key, e = failures[0]
    raise Unreadable(f"{describe_error(e)}, reading {key}"
                     + (f"; {len(failures)} of {len(keys)} entries" if len(failures) > 1 else ""))


def _restore(mngr, step: int, **args):
  for name, arg in args.items():
    if isinstance(arg, ocp.args.StandardRestore):
      verify_readable(os.path.join(str(mngr.directory), str(step), name))
  try:
    return mngr.restore(step, args=ocp.args.Composite(**args))
  except Exception as e:  # orbax/tensorstore raise many types for damaged files
    raise Unreadable(describe_error(e)) from None


def restore(mngr: ocp.CheckpointManager, step: int, abstract_params, abstract_opt_state):
  """The full train state of `step`, onto the shardings of the abstract trees."""
  restored = _restore(mngr, step, params=ocp.args.StandardRestore(abstract_params),
                      opt_state=ocp.args.StandardRestore(abstract_opt_state),
                      meta=ocp.args.JsonRestore())
  # Orbax hands namedtuples (optax states) back as plain tuples: re-impose the structure.
  opt_state = jax.tree.unflatten(jax.tree.structure(abstract_opt_state),
                                 jax.tree.leaves(restored["opt_state"]))
  return restored["params"], opt_state, restored["meta"]


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


def restore_latest_readable(mngr, abstract_params, abstract_opt_state, warn):
  """The newest checkpoint that restores, as (step, params, opt_state, meta), or None.

  Unreadable ones are skipped with `warn(message)`; those newer than the one restored
  are moved to DIR/unreadable_checkpoints/ (kept for inspection) so that training can
  write their steps again. CheckpointError when checkpoints exist but none can be read.
  """
  steps = sorted(mngr.all_steps(), reverse=True)
  failures = []
  for i, step in enumerate(steps):
    try:
      params, opt_state, meta = restore(mngr, step, abstract_params, abstract_opt_state)
    except Unreadable as e:
      failures.append(f"step {step} ({mngr.directory / str(step)}) is unreadable ({e})")
      older = steps[i + 1] if i + 1 < len(steps) else None
      warn(f"checkpoint {failures[-1]}; " + (
          f"falling back to the previous one, step {older} ({mngr.directory / str(older)})"
          if older is not None else "no older checkpoint"))
      continue
    if failures:
      _set_aside(mngr, steps[:i], warn)
    return step, params, opt_state, meta
  if failures:
    raise CheckpointError(
        f"no readable checkpoint in {mngr.directory}: " + " | ".join(failures)
        + f". Move {mngr.directory} away to start from scratch.")
  return None


def _set_aside(mngr, steps, warn):
  """Moves the checkpoints of `steps` beside the checkpoint directory (orbax would take
  any NAME_STEP directory inside it for a checkpoint)."""
  if jax.process_index() == 0:
    dest_root = mngr.directory.parent / "unreadable_checkpoints"
    dest_root.mkdir(parents=True, exist_ok=True)
    for step in steps:
      src, dest = mngr.directory / str(step), dest_root / str(step)
      if dest.exists():  # an earlier fallback kept one of the same step
        dest = dest_root / f"{step}-{len(list(dest_root.iterdir()))}"
      src.rename(dest)
      warn(f"moved the unreadable checkpoint {src} to {dest}")
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("plmjax_set_aside_checkpoints")
  mngr.reload()


def load_params(workdir: str, step: int | None = None):
  """Parameters (host numpy arrays) of the checkpoint at `step` (default: latest)."""
  steps = workdir_lib.checkpoint_steps(workdir)
  where = workdir_lib.checkpoint_dir(workdir)
  if not steps:
    raise CheckpointError(f"no checkpoint in {where}")
  if step is None:
    step = max(steps)
  elif step not in steps:
    raise CheckpointError(f"no checkpoint for step {step} in {where}; available steps: {steps}")
  path = os.path.join(where, str(step), "params") if "://" not in where else f"{where}/{step}/params"
  try:
    verify_readable(path)
    with ocp.StandardCheckpointer() as ckptr:
      params = ckptr.restore(path)
  except Exception as e:  # pylint: disable=broad-except
    detail = str(e) if isinstance(e, Unreadable) else describe_error(e)
    others = [s for s in steps if s != step]
    raise CheckpointError(
        f"checkpoint step {step} ({os.path.join(where, str(step))}) is unreadable "
        f"({detail})"
        + (f"; choose another with --step (available: {others})" if others else "")) from None
  return jax.tree.map(np.asarray, params), step


def write_params_workdir(workdir: str, config: ml_collections.ConfigDict, params, step: int = 0,
                         tokenizer_dir: str | None = None):
  """A workdir with config, tokenizer and a params-only checkpoint (import-hf)."""
  workdir_lib.write_config(workdir, config)
  if tokenizer_dir:
    dst = workdir_lib.tokenizer_dir(workdir)
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(tokenizer_dir, dst)
  mngr = manager(workdir, config, async_save=False)
  save(mngr, step, params, None, {"step": step})
  mngr.wait_until_finished()
  mngr.close()
