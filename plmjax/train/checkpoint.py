"""Workdir layout and orbax checkpoints.

  DIR/config.json        the run config (ConfigDict JSON); `read_config` loads it.
  DIR/tokenizer/         tokenizer file(s): tokenizer.model, or tokenizer.json / vocab.txt.
  DIR/checkpoints/STEP/  orbax items: `params`, `opt_state` (absent in params-only
                         checkpoints written by import-hf), `meta` (JSON: step, rng,
                         data iterator position, nonfinite counters).

Orbax writes each step into a temporary directory and renames it when complete, so a
crash mid-save never leaves a checkpoint that `latest_step` would pick.
"""

import json
import logging
import os
import shutil

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


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir) if "://" not in workdir else workdir,
                      "checkpoints")


def tokenizer_subdir(workdir: str) -> str:
  return os.path.join(workdir, "tokenizer")


def manager(workdir: str, *, keep: int = 3, async_save: bool = True,
            read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, enable_async_checkpointing=async_save, read_only=read_only,
      create=not read_only)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=ITEMS)


def write_config(workdir: str, config: ml_collections.ConfigDict):
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(config.to_json(indent=2))
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
  old = read_config(workdir).model
  diffs = [f"model.{k}: workdir has {old.get(k)!r}, this run has {config.model.get(k)!r}"
           for k in SHAPE_KEYS if old.get(k) != config.model.get(k)]
  if diffs and manager(workdir, read_only=True).latest_step() is not None:
    raise CheckpointError(
        f"workdir {workdir!r} holds checkpoints of another model ({'; '.join(diffs)}); "
        "use a new --workdir, or the same model settings to resume")


def save(mngr: ocp.CheckpointManager, step: int, params, opt_state, meta: dict):
  """Starts an (async) save; `mngr.wait_until_finished()` blocks until it is on disk."""
  items = dict(params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta))
  if opt_state is not None:
    items["opt_state"] = ocp.args.StandardSave(opt_state)
  mngr.save(step, args=ocp.args.Composite(**items), force=True)


def restore(mngr: ocp.CheckpointManager, step: int, abstract_params, abstract_opt_state):
  """Restores the full train state onto the shardings of the abstract trees."""
  restored = mngr.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(abstract_params),
      opt_state=ocp.args.StandardRestore(abstract_opt_state),
      meta=ocp.args.JsonRestore()))
  # Orbax hands namedtuples (optax states) back as plain tuples: re-impose the structure.
  opt_state = jax.tree.unflatten(jax.tree.structure(abstract_opt_state),
                                 jax.tree.leaves(restored["opt_state"]))
  return restored["params"], opt_state, restored["meta"]


def restore_latest_readable(mngr, abstract_params, abstract_opt_state, log=logging.warning):
  """Newest checkpoint that restores; unreadable ones are skipped with a warning.

  Returns (step, params, opt_state, meta) or None when there is no checkpoint.
  Raises CheckpointError when checkpoints exist but none can be read.
  """
  steps = sorted(mngr.all_steps(), reverse=True)
  failures = []
  for i, step in enumerate(steps):
    try:
      params, opt_state, meta = restore(mngr, step, abstract_params, abstract_opt_state)
    except Exception as e:  # orbax/tensorstore raise many types for damaged files
      failures.append(f"step {step}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
      older = steps[i + 1] if i + 1 < len(steps) else None
      log(f"checkpoint at step {step} in {mngr.directory} is unreadable "
          f"({failures[-1]}); " + (f"falling back to step {older}" if older is not None
                                   else "no older checkpoint"))
      continue
    return step, params, opt_state, meta
  if failures:
    raise CheckpointError(f"no readable checkpoint in {mngr.directory}: " + " | ".join(failures)
                          + ". Move the directory away to start from scratch.")
  return None


def load_params(workdir: str, step: int | None = None):
  """Parameters (host numpy arrays) of the checkpoint at `step` (default: latest)."""
  mngr = manager(workdir, read_only=True)
  steps = mngr.all_steps()
  if not steps:
    raise CheckpointError(f"no checkpoint in {checkpoint_dir(workdir)}")
  if step is None:
    step = max(steps)
  elif step not in steps:
    raise CheckpointError(f"no checkpoint for step {step} in {checkpoint_dir(workdir)}; "
                          f"available steps: {sorted(steps)}")
  restored = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore()))
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
