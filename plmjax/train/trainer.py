"""The training loop shared by pretraining and fine-tuning.

Everything stateful lives here (mesh, sharded state, checkpoints, data position,
logging, signals); the step itself is the pure function of plmjax.train.step.
"""

import dataclasses
import json
import logging
import os
import queue
import signal
import sys
import threading
import time
from typing import Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm import tqdm

from plmjax.errors import UserError
from plmjax.train import checkpoint, sharding
from plmjax.train.flops import peak_flops_per_device
from plmjax.train.metrics_writer import MetricsWriter
from plmjax.train.objectives import Objective
from plmjax.train.optimizer import learning_rate_schedule, make_optimizer
from plmjax.train.step import make_eval_step, make_train_step, model_inputs

log = logging.getLogger("plmjax")

# Test hook (tests/test_reliability.py): after this step the loop prints a line and waits
# (up to a minute) for a signal, so a test can preempt or kill a run at a chosen step.
PAUSE_ENV = "PLMJAX_TEST_PAUSE_AFTER_STEP"


class NonFiniteError(UserError):
  """Loss or gradients stopped being finite."""


@dataclasses.dataclass
class Result:
  step: int
  train_metrics: dict
  eval_metrics: dict
  stopped_by: str | None = None  # signal name when preempted


class _Prefetch:
  """Fetches (batch, iterator state after it) in a thread, `depth` batches ahead."""

  def __init__(self, it, depth: int):
    self._q = queue.Queue(maxsize=max(depth, 1))
    self._it = it
    self._stop = False
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()

  def _run(self):
    try:
      while not self._stop:
        batch = next(self._it)
        self._q.put((batch, self._it.get_state()))
    except BaseException as e:  # handed to the consumer
      self._q.put(e)

  def __next__(self):
    item = self._q.get()
    if isinstance(item, BaseException):
      raise item
    return item

  def close(self):
    self._stop = True
    try:
      while True:
        self._q.get_nowait()
    except queue.Empty:
      pass


class _Signals:
  """First SIGTERM/SIGINT: finish the step, checkpoint, exit. Second: exit at once."""

  def __init__(self):
    self.received = None
    self._old = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.received is not None:
      # Orbax commits a checkpoint by renaming its temporary directory, so the last
      # complete one stays intact whatever this cuts short (a save in flight is left
      # as a temporary directory that is never restored). os._exit, not SystemExit:
      # nothing may wait on the threads of a half-done save.
      print(f"\nplmjax: second {signal.Signals(signum).name}: exiting now; the last "
            "complete checkpoint is kept", file=sys.stderr, flush=True)
      sys.stdout.flush()
      os._exit(128 + signum)
    self.received = signum
    print(f"\nplmjax: {signal.Signals(signum).name} received: finishing the step, "
          "saving a checkpoint, then exiting (send again to exit at once)", file=sys.stderr,
          flush=True)

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


def _gather_from_processes(value) -> list:
  """Every process's JSON-able `value`, in process order (process 0 writes the JSON)."""
  if jax.process_count() == 1:
    return [value]
  from jax.experimental import multihost_utils
  raw = json.dumps(value).encode()
  sizes = multihost_utils.process_allgather(np.int32(len(raw)))
  padded = np.zeros(int(np.max(sizes)), np.uint8)
  padded[:len(raw)] = np.frombuffer(raw, np.uint8)
  rows = multihost_utils.process_allgather(padded)
  return [json.loads(bytes(row[:n]).decode()) for row, n in zip(rows, sizes)]


def _abstract(tree):
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _add(acc, new):
  return new if acc is None else jax.tree.map(jnp.add, acc, new)


def _count_nonfinite(c: dict, step, metrics: dict, limit: int, skip: bool):
  """One step of the non-finite counters (jitted: one dispatch per step, no host sync)."""
  metrics = dict(metrics)
  finite = metrics.pop("finite")
  new_bad = (c["first_bad"] < 0) & ~finite
  in_a_row = jnp.where(finite, 0, c["in_a_row"] + 1)
  c = dict(first_bad=jnp.where(new_bad, step, c["first_bad"]),
           loss_was_finite=jnp.where(new_bad, jnp.isfinite(metrics["loss"]),
                                     c["loss_was_finite"]),
           in_a_row=in_a_row, skipped=c["skipped"] + (~finite).astype(jnp.int32),
           limit_at=jnp.where((c["limit_at"] < 0) & (in_a_row >= limit), step, c["limit_at"]))
  if skip:  # the skipped update's loss sums would poison the logged averages
    metrics = jax.tree.map(lambda x: jnp.where(finite, x, jnp.zeros_like(x)), metrics)
  return c, metrics


_count_nonfinite = jax.jit(_count_nonfinite, static_argnums=(3, 4))


class _NonFiniteWatch:
  """Counts non-finite updates; `check` (at log and checkpoint steps, the host syncs)
  raises NonFiniteError when training must stop, before anything is saved.

  nonfinite=stop: stop at the first non-finite loss or gradient norm.
  nonfinite=skip: the step already kept the old state; stop after
  max_nonfinite_in_a_row such updates in a row. Counts survive a resume (meta).
  """

  def __init__(self, tcfg, meta: dict | None):
    meta = meta or {}
    self.mode, self.limit = tcfg.nonfinite, tcfg.max_nonfinite_in_a_row
    self._c = dict(first_bad=np.int32(-1), loss_was_finite=np.bool_(False),
                   in_a_row=np.int32(meta.get("nonfinite_in_a_row", 0)), skipped=np.int32(0),
                   limit_at=np.int32(-1))
    self._skipped_before = int(meta.get("nonfinite_skipped", 0))
    self._skipped_at_log = 0

  def update(self, step: int, metrics: dict) -> dict:
    self._c, metrics = _count_nonfinite(self._c, np.int32(step), metrics, self.limit,
                                        self.mode == "skip")
    return metrics

  def skipped_since_log(self) -> int:
    now = int(self._c["skipped"])
    since, self._skipped_at_log = now - self._skipped_at_log, now
    return since

  def skipped_total(self) -> int:
    return self._skipped_before + int(self._c["skipped"])

  def counters(self) -> dict:
    return dict(nonfinite_skipped=self.skipped_total(),
                nonfinite_in_a_row=int(self._c["in_a_row"]))

  def check(self, step: int, mngr):
    c = jax.device_get(self._c)
    bad, limit_at = int(c["first_bad"]), int(c["limit_at"])
    if bad < 0 or (self.mode == "skip" and limit_at < 0):
      return
    metric = "gradient norm (grad_norm)" if c["loss_was_finite"] else "loss"
    mngr.wait_until_finished()
    newest = mngr.latest_step()
    kept = (f"the newest checkpoint is step {newest}" if newest is not None
            else "there is no checkpoint")
    if self.mode == "stop":
      raise NonFiniteError(
          f"non-finite {metric} at step {bad}; stopped at step {step} without writing a new "
          f"checkpoint ({kept}). Lower the learning rate, or set config.train.nonfinite=skip "
          "to skip such updates")
    raise NonFiniteError(
        f"{self.limit} non-finite update(s) in a row up to step {limit_at} (limit "
        f"config.train.max_nonfinite_in_a_row={self.limit}; the first non-finite {metric} "
        f"was at step {bad}); stopped at step {step} without writing a new checkpoint ({kept})")


def _pause_for_test(step: int, mngr, signals: "_Signals"):
  """The PAUSE_ENV test hook: the checkpoints so far are complete while it waits."""
  mngr.wait_until_finished()
  print(f"plmjax: test hook {PAUSE_ENV}: paused after step {step}", flush=True)
  deadline = time.monotonic() + 60
  while signals.received is None and time.monotonic() < deadline:
    time.sleep(0.01)


class Trainer:
  """Builds the sharded state for `model` and runs the loop.

  example_batch: one local batch (numpy), used for shapes at init.
  init_params: optional callable(abstract params) -> params (fine-tuning from a checkpoint).
  devices: the devices of the mesh (default: all).
  """

  def __init__(self, config, workdir: str, model, objective: Objective, example_batch: dict,
               *, flops_per_token: float, tokens_per_example: int,
               init_params: Callable | None = None, devices=None):
    self.config, self.workdir, self.model, self.objective = config, workdir, model, objective
    self.flops_per_token = flops_per_token
    self.tokens_per_example = tokens_per_example
    self.mesh = sharding.make_mesh(config.mesh, devices)
    sharding.check_batch(config.train.batch_size, config.train.grad_accum_steps, self.mesh)
    self.rules = tuple(tuple(r) for r in config.sharding.logical_axis_rules)
    self.tx = make_optimizer(config.train)
    self.schedule = learning_rate_schedule(config.train)
    self.is_main = jax.process_index() == 0
    self._init_state(example_batch, init_params)

  def context(self):
    """The mesh and logical-axis rules: enter it to trace or run this model by hand."""
    return _MeshRules(self.mesh, self.rules)

  def _init_state(self, example_batch, init_params):
    row = {k: np.asarray(v)[:1] for k, v in example_batch.items()}

    def init_boxed(rng):
      return self.model.init({"params": rng, "dropout": rng}, row["input_ids"],
                             **model_inputs(row), deterministic=True)["params"]

    rng = jax.random.PRNGKey(self.config.train.seed)
    init_rng, dropout_rng = jax.random.split(rng)
    with self.context():
      boxed = jax.eval_shape(init_boxed, init_rng)
      self.param_sharding = sharding.logical_shardings(boxed, self.mesh, self.rules)
      params = jax.jit(lambda r: nn.meta.unbox(init_boxed(r)),
                       out_shardings=self.param_sharding)(init_rng)
    # A workdir with checkpoints resumes from them in fit(): loading the initial
    # parameters (a pretrained checkpoint, for fine-tuning) would be wasted work.
    resuming = bool(checkpoint.checkpoint_steps(self.workdir, self.config))
    if init_params is not None and not resuming:
      params = jax.device_put(init_params(_abstract(params)), self.param_sharding)
    abstract_opt = jax.eval_shape(self.tx.init, params)
    repl = sharding.replicated(self.mesh)
    self.opt_sharding = optax.tree_map_params(
        self.tx, lambda _, s: s, abstract_opt, self.param_sharding,
        transform_non_params=lambda _: repl)
    opt_state = jax.jit(self.tx.init, out_shardings=self.opt_sharding)(params)
    self.state_sharding = dict(step=repl, params=self.param_sharding,
                               opt_state=self.opt_sharding, rng=repl)
    self.state = dict(step=jax.device_put(jnp.int32(0), repl), params=params,
                      opt_state=opt_state,
                      rng=jax.device_put(jax.random.key_data(dropout_rng), repl))
    self.batch_sharding = sharding.batch_sharding(self.mesh)
    step_fn = make_train_step(self.model, self.tx, self.objective, self.config.train)
    self.train_step = jax.jit(step_fn, in_shardings=(self.state_sharding, self.batch_sharding),
                              out_shardings=(self.state_sharding, repl), donate_argnums=0)
    self.eval_step = jax.jit(make_eval_step(self.model, self.objective),
                             in_shardings=(self.param_sharding, self.batch_sharding),
                             out_shardings=repl)

  # ---- checkpoints -------------------------------------------------------------------

  def restore(self, mngr) -> dict | None:
    """Restores the newest readable checkpoint into self.state; returns its meta."""
    found = checkpoint.restore_latest_readable(
        mngr, _abstract(self.state["params"]), _abstract(self.state["opt_state"]),
        log=lambda msg: print(f"plmjax: warning: {msg}", file=sys.stderr, flush=True))
    if found is None:
      return None
    step, params, opt_state, meta = found
    repl = sharding.replicated(self.mesh)
    self.state = dict(step=jax.device_put(jnp.int32(step), repl), params=params,
                      opt_state=opt_state,
                      rng=jax.device_put(np.asarray(meta["rng"], np.uint32), repl))
    return meta

  def _save(self, mngr, step: int, data_state, extra: dict):
    meta = dict(step=step, rng=np.asarray(jax.device_get(self.state["rng"])).tolist(),
                data=_gather_from_processes(data_state), **extra)
    checkpoint.save(mngr, step, self.state["params"], self.state["opt_state"], meta)

  # ---- evaluation ----------------------------------------------------------------------

  def evaluate(self, eval_iter: Iterator, num_batches: int) -> dict:
    acc = None
    with self.context():
      for _ in range(num_batches):
        batch = sharding.global_batch(next(eval_iter), self.mesh)
        acc = _add(acc, self.eval_step(self.state["params"], batch))
    return self.objective.finalize(jax.device_get(acc))

  # ---- the loop ------------------------------------------------------------------------

  def fit(self, train_iter, make_eval_iter: Callable | None = None,
          stop_at: int | None = None, desc: str = "train") -> Result:
    """Trains to config.train.steps; `stop_at` stops (with a checkpoint) at that step as
    a preemption would, leaving the schedule untouched (fine-tuning evaluates at epoch
    ends this way). `desc` labels the progress bar."""
    announce_stop = stop_at is None  # a caller's own stop_at is not news to the user
    cfg, tcfg = self.config, self.config.train
    mngr = checkpoint.manager(self.workdir, keep=cfg.checkpoint.keep,
                              async_save=cfg.checkpoint.async_save, config=cfg)
    meta = self.restore(mngr)
    start = 0
    if meta is not None:
      start = int(meta["step"])
      train_iter.set_state(meta["data"][jax.process_index()])
      print(f"plmjax: resumed from step {start} of {mngr.directory}", flush=True)
    if stop_at is None and tcfg.stop_after_steps > 0:
      stop_at = start + tcfg.stop_after_steps
    writer = MetricsWriter(self.workdir, enabled=self.is_main)
    writer.truncate_after(start)
    tokens_per_step = tcfg.batch_size * self.tokens_per_example
    peak, peak_source = peak_flops_per_device(cfg.model.dtype, tcfg.peak_flops_per_device)
    total_peak = peak * jax.device_count()
    if self.is_main:
      n_params = sum(x.size for x in jax.tree.leaves(self.state["params"]))
      print(f"plmjax: {n_params / 1e6:.2f}M parameters, mesh {dict(self.mesh.shape)}, "
            f"{tokens_per_step} tokens/step, peak {peak / 1e12:.3g} TFLOP/s/device "
            f"({peak_source})", flush=True)

    prefetch = _Prefetch(train_iter, cfg.data.prefetch)
    data_state = train_iter.get_state()
    step, acc, train_metrics, eval_metrics = start, None, {}, {}
    watch = _NonFiniteWatch(tcfg, meta)
    t_log, steps_since_log = time.perf_counter(), 0
    bar = tqdm(total=tcfg.steps, initial=start, disable=not self.is_main, desc=desc,
               unit="step", dynamic_ncols=True, mininterval=1.0)
    stopped_by = None
    pause_after = int(os.environ.get(PAUSE_ENV, "-1"))

    # The handlers stay in place through the final save: a second signal cuts it short.
    with _Signals() as signals:
      try:
        with self.context():
          while step < tcfg.steps:
            local, data_state = next(prefetch)
            batch = sharding.global_batch(local, self.mesh)
            self.state, m = self.train_step(self.state, batch)
            step += 1
            steps_since_log += 1
            acc = _add(acc, watch.update(step, m))
            bar.update(1)

            if step % tcfg.log_every_steps == 0 or step == tcfg.steps:
              host = jax.device_get(acc)
              good_steps = steps_since_log - watch.skipped_since_log()
              elapsed = time.perf_counter() - t_log
              train_metrics = self.objective.finalize(host)
              tok_s = tokens_per_step * steps_since_log / elapsed
              train_metrics.update(
                  grad_norm=float(host["grad_norm"]) / max(good_steps, 1),
                  learning_rate=float(self.schedule(step - 1)),
                  tokens_per_sec=tok_s, steps_per_sec=steps_since_log / elapsed,
                  mfu=tok_s * self.flops_per_token / total_peak,
                  nonfinite_skipped=watch.skipped_total())
              if good_steps == 0:  # every update since the last log was skipped: no averages
                for key in [*self.objective.finalize(host), "grad_norm"]:
                  train_metrics[key] = float("nan")
              writer.write(step, train_metrics)
              watch.check(step, mngr)  # after logging: metrics.jsonl shows the bad values
              bar.set_postfix(loss=f"{train_metrics['loss']:.3f}", tok_s=f"{tok_s:.0f}",
                              refresh=False)
              acc, steps_since_log, t_log = None, 0, time.perf_counter()

            eval_due = ((tcfg.eval_every_steps and step % tcfg.eval_every_steps == 0)
                        or step == tcfg.steps)
            if make_eval_iter is not None and cfg.data.eval and eval_due:
              t_eval = time.perf_counter()
              eval_metrics = self.evaluate(make_eval_iter(), tcfg.eval_steps)
              writer.write(step, eval_metrics, split="eval")
              bar.write(f"eval @ step {step}: " + ", ".join(
                  f"{k}={v:.4g}" for k, v in eval_metrics.items()))
              t_log += time.perf_counter() - t_eval  # eval time does not count in tokens/s

            if step == pause_after:
              _pause_for_test(step, mngr, signals)

            stop_now = signals.received is not None or step == stop_at
            if jax.process_count() > 1:  # every process must stop at the same step
              from jax.experimental import multihost_utils
              stop_now = bool(np.any(multihost_utils.process_allgather(np.int32(stop_now))))
            if step % cfg.checkpoint.every_steps == 0 or step == tcfg.steps or stop_now:
              watch.check(step, mngr)
              self._save(mngr, step, data_state, watch.counters())
            if stop_now:
              stopped_by = (signal.Signals(signals.received).name if signals.received
                            else f"stop_at={stop_at}")
              break
      finally:
        prefetch.close()
        bar.close()
        mngr.wait_until_finished()
        mngr.close()
        writer.close()
    if stopped_by and (announce_stop or signals.received):
      where = checkpoint.checkpoint_dir(self.workdir, self.config)
      print(f"plmjax: stopped by {stopped_by} after step {step}; checkpoint saved in {where}; "
            "run the same command to resume", flush=True)
    return Result(step=step, train_metrics=train_metrics, eval_metrics=eval_metrics,
                  stopped_by=stopped_by)


class _MeshRules:
  """Enters the mesh and the logical-axis rules (needed while tracing the model)."""

  def __init__(self, mesh, rules):
    self.mesh, self.rules = mesh, rules

  def __enter__(self):
    self._rules = nn.logical_axis_rules(self.rules)
    self._rules.__enter__()
    self._mesh = jax.set_mesh(self.mesh) if hasattr(jax, "set_mesh") else self.mesh
    self._mesh.__enter__()
    return self

  def __exit__(self, *exc):
    self._mesh.__exit__(*exc)
    self._rules.__exit__(*exc)
