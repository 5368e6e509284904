"""Everything periodic around the train step, as hooks of plmjax.train.loop.fit.

A hook has four methods, all optional (subclass `Hook`):
  start(loop)       before the first step of this invocation
  after_step(loop)  after every step, in list order; may read and change `loop`
  finish(loop)      after the last step (the end of training, or a requested stop)
  close()           always, last, also after an error: release files and threads

The hooks here: `Stop` (signals, train.stop_after_steps), `NonFiniteWatch`, `Metrics`
(metrics.jsonl, TensorBoard, progress bar), `Evaluate`, `Checkpoint`. A new concern (a
profiler, an experiment tracker) is a new hook passed to Trainer.fit, not a new branch.
"""

import json
import os
import signal
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from plmjax.errors import UserError
from plmjax.train import checkpoint
from plmjax.train.metrics_writer import MetricsWriter


class Hook:
  def start(self, loop):
    pass

  def after_step(self, loop):
    pass

  def finish(self, loop):
    pass

  def close(self):
    pass


def due(step: int, every: int) -> bool:
  return every > 0 and step % every == 0


def _gather(value) -> list:
  """Every process's JSON-able `value`, in process order."""
  if jax.process_count() == 1:
    return [value]
  from jax.experimental import multihost_utils
  raw = json.dumps(value).encode()
  sizes = multihost_utils.process_allgather(np.int32(len(raw)))
  padded = np.zeros(int(np.max(sizes)), np.uint8)
  padded[:len(raw)] = np.frombuffer(raw, np.uint8)
  rows = multihost_utils.process_allgather(padded)
  return [json.loads(bytes(row[:n]).decode()) for row, n in zip(rows, sizes)]


# ---- stopping --------------------------------------------------------------------------


class StopSignals:
  """SIGTERM/SIGINT handlers for a whole command, start to final save, whatever the
  disposition it inherited (a background start ignores SIGINT).

  The first signal is recorded: the loop finishes its step, saves a checkpoint and
  stops. A second one exits at once: orbax commits a checkpoint by renaming its
  temporary directory, so the last complete one is never damaged; os._exit because
  nothing may wait on the threads of a half-done save.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received = None
    self._old = {}

  def __enter__(self):
    for sig in self.SIGNALS:
      self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    name = signal.Signals(signum).name
    if self.received is not None:
      print(f"\nplmjax: second {name}: exiting now; the last complete checkpoint is kept",
            file=sys.stderr, flush=True)
      sys.stdout.flush()
      os._exit(128 + signum)
    self.received = signum
    print(f"\nplmjax: {name} received: finishing the step, saving a checkpoint, then exiting "
          "(send again to exit at once)", file=sys.stderr, flush=True)

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


class Stop(Hook):
  """Stops the loop on a signal (from `signals`) or after `stop_after` steps of this
  invocation. Processes agree on a signal at sync steps only (multiples of `sync_every`,
  the last step): one small allgather there instead of a host sync every step."""

  def __init__(self, signals: StopSignals | None, stop_after: int = 0, sync_every: int = 1):
    self.signals, self.stop_after, self.sync_every = signals, stop_after, sync_every

  def start(self, loop):
    self.stop_at = loop.step + self.stop_after if self.stop_after > 0 else None

  def after_step(self, loop):
    signum = self.signals.received if self.signals is not None else None
    if jax.process_count() > 1:
      if not (due(loop.step, self.sync_every) or loop.step == loop.total_steps):
        signum = None
      else:
        from jax.experimental import multihost_utils
        signum = int(np.max(multihost_utils.process_allgather(np.int32(signum or 0)))) or None
    if signum:
      loop.request_stop(signal.Signals(signum).name, signum)
    elif loop.step == self.stop_at and loop.step < loop.total_steps:
      loop.request_stop(f"train.stop_after_steps={self.stop_after}")


# ---- non-finite losses -------------------------------------------------------------------


class NonFiniteError(UserError):
  """Loss or gradients stopped being finite."""


@jax.jit
def _count(c: dict, step, finite, overflow, loss_finite, limit):
  """One step of the non-finite counters (one dispatch per step, no host sync).
  overflow (float16 runs, else None): the loss scaler skipped the step; not a failure."""
  if overflow is not None:
    finite = finite | overflow
  new_bad = (c["first_bad"] < 0) & ~finite
  in_a_row = jnp.where(finite, 0, c["in_a_row"] + 1)
  return dict(first_bad=jnp.where(new_bad, step, c["first_bad"]),
              loss_was_finite=jnp.where(new_bad, loss_finite, c["loss_was_finite"]),
              in_a_row=in_a_row, skipped=c["skipped"] + (~finite).astype(jnp.int32),
              limit_at=jnp.where((c["limit_at"] < 0) & (in_a_row >= limit), step, c["limit_at"]))


class NonFiniteWatch(Hook):
  """Counts non-finite updates; `check` (at log steps, the last step, and by Checkpoint
  before every save) raises NonFiniteError when training must stop.

  nonfinite=stop: stop at the first non-finite loss or gradient norm.
  nonfinite=skip: the step kept the old state; stop after max_nonfinite_in_a_row such
  updates in a row. The counts go into loop.meta, so they survive a resume.
  Under float16 a gradient overflow that the loss scaler skips (finite loss, scale above
  its minimum of 1) is no failure; a non-finite loss, or gradients that overflow at scale 1,
  are.
  """

  def __init__(self, train_cfg, newest_checkpoint: Callable):
    self.mode, self.limit = train_cfg.nonfinite, train_cfg.max_nonfinite_in_a_row
    self.log_every, self.newest_checkpoint = train_cfg.log_every_steps, newest_checkpoint

  def start(self, loop):
    self._c = dict(first_bad=np.int32(-1), loss_was_finite=np.bool_(False),
                   in_a_row=np.int32(loop.meta.get("nonfinite_in_a_row", 0)),
                   skipped=np.int32(0), limit_at=np.int32(-1))
    self._skipped_before = int(loop.meta.get("nonfinite_skipped", 0))
    self._scaled = False

  def after_step(self, loop):
    m = loop.metrics
    self._scaled = "overflow" in m
    self._c = _count(self._c, np.int32(loop.step), m["finite"], m.get("overflow"),
                     jnp.isfinite(m["batch_loss"]), np.int32(self.limit))
    if due(loop.step, self.log_every) or loop.step == loop.total_steps:
      self.check(loop)

  def check(self, loop):
    c = jax.device_get(self._c)
    loop.meta.update(nonfinite_skipped=self._skipped_before + int(c["skipped"]),
                     nonfinite_in_a_row=int(c["in_a_row"]))
    bad, limit_at = int(c["first_bad"]), int(c["limit_at"])
    if bad < 0 or (self.mode == "skip" and limit_at < 0):
      return
    metric = "gradient norm (grad_norm)" if c["loss_was_finite"] else "loss"
    if c["loss_was_finite"] and self._scaled:
      metric += " with the float16 loss scale at its minimum of 1"
    newest = self.newest_checkpoint()
    kept = (f"the newest checkpoint is step {newest}" if newest is not None
            else "there is no checkpoint")
    if self.mode == "stop":
      raise NonFiniteError(
          f"non-finite {metric} at step {bad}; stopped at step {loop.step} without writing a "
          f"new checkpoint ({kept}). Lower the learning rate, or set "
          "config.train.nonfinite=skip to skip such updates")
    raise NonFiniteError(
        f"{self.limit} non-finite update(s) in a row up to step {limit_at} (limit "
        f"config.train.max_nonfinite_in_a_row={self.limit}; the first non-finite {metric} "
        f"was at step {bad}); stopped at step {loop.step} without writing a new checkpoint "
        f"({kept})")


# ---- metrics -----------------------------------------------------------------------------


@jax.jit
def _accumulate(acc: dict, metrics: dict) -> dict:
  new = {k: v for k, v in metrics.items() if k not in ("finite", "overflow")}
  new["good_steps"] = metrics["finite"].astype(jnp.float32)
  if "overflow" in metrics:  # float16: updates the loss scaler skipped (their loss counts)
    new["overflow_steps"] = metrics["overflow"].astype(jnp.float32)
  return new if acc is None else jax.tree.map(jnp.add, acc, new)


class Metrics(Hook):
  """Train metrics every `log_every` steps (and at the last step or a stop) to
  metrics.jsonl, TensorBoard and the progress bar; `report` writes other rows (eval).

  finalize: the objective's accumulated sums -> metrics. `rates(step, seconds, steps)`
  adds learning_rate, tokens_per_sec, mfu, ... Process 0 writes; the others only count.
  float16 runs also log `loss_scale` (after the step) and `overflow_steps` (updates the
  loss scaler skipped since the previous row).
  """

  def __init__(self, workdir: str, finalize: Callable, rates: Callable, log_every: int, *,
               desc: str, enabled: bool):
    self.finalize, self.rates, self.log_every = finalize, rates, log_every
    self.workdir, self.desc, self.enabled = workdir, desc, enabled
    self.last: dict = {}

  def start(self, loop):
    self.writer = MetricsWriter(self.workdir, enabled=self.enabled)
    self.writer.truncate_after(loop.step)
    self.bar = tqdm(total=loop.total_steps, initial=loop.step, disable=not self.enabled,
                    desc=self.desc, unit="step", dynamic_ncols=True, mininterval=1.0)
    self._acc, self._steps = None, 0
    self._t, self._excluded = time.perf_counter(), loop.excluded_seconds

  def after_step(self, loop):
    self._acc = _accumulate(self._acc, loop.metrics)
    self._steps += 1
    self.bar.update(1)
    if due(loop.step, self.log_every) or loop.step == loop.total_steps:
      self._log(loop)

  def finish(self, loop):
    if self._steps:  # a stop between log steps: log what was trained since the last
      self._log(loop)

  def _log(self, loop):
    host, loss_scale = jax.device_get((self._acc, loop.state.get("loss_scale")))
    seconds = (time.perf_counter() - self._t) - (loop.excluded_seconds - self._excluded)
    good, overflows = int(host.pop("good_steps")), int(host.pop("overflow_steps", 0))
    out = self.finalize(host)
    if good + overflows == 0:  # every step since the last log was skipped: nothing to average
      out = {k: float("nan") for k in out}
    out["grad_norm"] = float(host["grad_norm"]) / good if good else float("nan")
    out.update(self.rates(loop.step, seconds, self._steps))
    out["nonfinite_skipped"] = loop.meta.get("nonfinite_skipped", 0)
    if loss_scale is not None:
      out.update(loss_scale=float(loss_scale["scale"]), overflow_steps=overflows)
    self.writer.write(loop.step, out)
    self.last = out
    postfix = dict(loss=f"{out['loss']:.3f}")
    if "tokens_per_sec" in out:
      postfix["tok_s"] = f"{out['tokens_per_sec']:.0f}"
    self.bar.set_postfix(postfix, refresh=False)
    self._acc, self._steps = None, 0
    self._t, self._excluded = time.perf_counter(), loop.excluded_seconds

  def report(self, step: int, metrics: dict, split: str):
    self.writer.write(step, metrics, split=split)
    if self.enabled:
      self.bar.write(f"{split} @ step {step}: " + ", ".join(
          f"{k}={v:.4g}" for k, v in metrics.items()))

  def close(self):
    if hasattr(self, "bar"):
      self.bar.close()
      self.writer.close()


class Evaluate(Hook):
  """Runs `evaluate(params)` -> metrics at the steps `is_due(step)` says, and at the end if the
  last step was not evaluated in this invocation; `report(step, metrics, split)` writes
  them. Evaluation time is left out of tokens/s (loop.excluded_seconds)."""

  def __init__(self, evaluate: Callable, is_due: Callable, report: Callable):
    self.evaluate, self.is_due, self.report = evaluate, is_due, report
    self.last: dict = {}
    self.last_step = None

  def after_step(self, loop):
    if self.is_due(loop.step) or loop.step == loop.total_steps:
      self._run(loop)

  def finish(self, loop):
    if loop.step == loop.total_steps and self.last_step != loop.step:
      self._run(loop)

  def _run(self, loop):
    t = time.perf_counter()
    self.last, self.last_step = self.evaluate(loop.state["params"]), loop.step
    self.report(loop.step, self.last, "eval")
    loop.excluded_seconds += time.perf_counter() - t


# ---- checkpoints -------------------------------------------------------------------------


class Checkpoint(Hook):
  """Saves params, optimiser state and meta (step, RNG, float16's loss scale, every
  process's data position, loop.meta) every `every` steps, at the last step and when the
  loop stops; calls `guard(loop)` first (NonFiniteWatch.check: nothing non-finite is ever
  saved)."""

  def __init__(self, workdir: str, config, guard: Callable = lambda loop: None):
    self.workdir, self.config, self.guard = workdir, config, guard
    self.every = config.checkpoint.every_steps
    self.mngr = None

  def start(self, loop):
    c = self.config.checkpoint
    self.mngr = checkpoint.manager(self.workdir, self.config, keep=c.keep,
                                   async_save=c.async_save)

  def after_step(self, loop):
    if due(loop.step, self.every) or loop.step == loop.total_steps or loop.stop_reason:
      self.guard(loop)
      rng, loss_scale = jax.device_get((loop.state["rng"], loop.state.get("loss_scale")))
      meta = dict(loop.meta, step=loop.step, rng=np.asarray(rng).tolist(),
                  data=_gather(loop.data_state))
      if loss_scale is not None:  # exact in JSON: a float32 is a double
        meta["loss_scale"] = {k: v.item() for k, v in loss_scale.items()}
      checkpoint.save(self.mngr, loop.step, loop.state["params"], loop.state["opt_state"], meta)

  def newest_step(self):
    if self.mngr is None:
      return None
    self.mngr.wait_until_finished()
    return self.mngr.latest_step()

  def close(self):
    if self.mngr is not None:
      self.mngr.wait_until_finished()
      self.mngr.close()
