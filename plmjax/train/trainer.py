"""A model and an objective made trainable: sharded state, jitted steps, standard hooks.

  trainer = Trainer(config, workdir, model, objective, example_batch, ...)  # restores or inits
  result = trainer.fit(batches, evaluate=..., signals=..., hooks=[...])

Pretraining and fine-tuning both come through here; the loop is plmjax.train.loop.fit.
"""

import dataclasses
import sys
import time
from typing import Callable

import jax

from plmjax.models import attention
from plmjax.models.config import ModelConfig
from plmjax.train import hooks as hooks_lib
from plmjax.train import loop as loop_lib
from plmjax.train import sharding
from plmjax.train import state as state_lib
from plmjax.train.flops import peak_flops_per_device
from plmjax.train.objectives import Objective
from plmjax.train.optimizer import learning_rate_schedule
from plmjax.train.step import make_eval_step, make_train_step
from plmjax import workdir as workdir_lib

NonFiniteError = hooks_lib.NonFiniteError


@dataclasses.dataclass
class Result:
  step: int
  train_metrics: dict
  eval_metrics: dict
  stopped_by: str | None = None  # a signal's name or "train.stop_after_steps=N"
  stop_signal: int | None = None
  seconds: float = 0.0
  checkpoint_dir: str = ""


def jit_steps(lay: state_lib.Layout, model, objective: Objective, train_cfg):
  """The jitted train step (state donated) and eval step, with explicit shardings.
  `plmjax compile` lowers this very train step for devices that are not attached."""
  repl = sharding.replicated(lay.mesh)
  train_step = jax.jit(make_train_step(model, lay.tx, objective, train_cfg),
                       in_shardings=(lay.shardings, lay.batch_sharding),
                       out_shardings=(lay.shardings, repl), donate_argnums=0)
  eval_step = jax.jit(make_eval_step(model, objective),
                      in_shardings=(lay.shardings["params"], lay.batch_sharding),
                      out_shardings=repl)
  return train_step, eval_step


def warn(message: str):
  print(f"plmjax: warning: {message}", file=sys.stderr, flush=True)


class Trainer:
  """Builds the sharded state for `model` (restored from the workdir's newest readable
  checkpoint, else `init_params(abstract params)`, else initialised) and the jitted steps.

  example_batch: one local batch (numpy), for shapes. devices: the mesh's (default: all).
  """

  def __init__(self, config, workdir: str, model, objective: Objective, example_batch: dict,
               *, flops_per_token: float, tokens_per_example: int,
               init_params: Callable | None = None, devices=None):
    self.config, self.workdir, self.model, self.objective = config, workdir, model, objective
    self.flops_per_token, self.tokens_per_example = flops_per_token, tokens_per_example
    self.is_main = jax.process_index() == 0
    self.layout = state_lib.layout(config, model, example_batch, devices)
    self.mesh = self.layout.mesh
    self.state, self.meta = state_lib.create(
        self.layout, model, example_batch, config.train.seed, workdir, config,
        init_params=init_params, warn=warn)
    self.start_step = int(self.meta["step"]) if self.meta else 0
    self.train_step, self.eval_step = jit_steps(self.layout, model, objective, config.train)
    if self.is_main:
      self._announce()

  def _announce(self):
    t = self.config.train
    if self.meta is not None:
      where = workdir_lib.checkpoint_dir(self.workdir, self.config)
      print(f"plmjax: resumed from step {self.start_step} of {where}", flush=True)
      old_steps = self.meta.get("train_steps", t.steps)
      if old_steps != t.steps:
        print(f"plmjax: train.steps is now {t.steps} (was {old_steps}): the learning-rate "
              f"schedule ({t.decay} decay after {t.warmup_steps} warmup steps) runs over "
              f"{t.steps} steps from here, so at step {self.start_step + 1} the rate is "
              f"{float(learning_rate_schedule(t)(self.start_step)):.3g}", flush=True)
    impl, why = attention.resolve_impl(ModelConfig.from_config(self.config.model),
                                       attention.device_platform(self.mesh),
                                       packed=self.config.data.get("packing", False))
    print(f"plmjax: attention {impl}: {why}", flush=True)
    n_params = sum(x.size for x in jax.tree.leaves(self.state["params"]))
    print(f"plmjax: {n_params / 1e6:.2f}M parameters, mesh {dict(self.mesh.shape)}, "
          f"{t.batch_size * self.tokens_per_example} tokens/step", flush=True)
    if "loss_scale" in self.state:
      scale = float(jax.device_get(self.state["loss_scale"]["scale"]))
      print(f"plmjax: float16 with dynamic loss scaling: scale {scale:g}, halved (and the "
            "update skipped) at a gradient overflow, doubled after "
            f"{t.loss_scale_growth_interval} overflow-free steps", flush=True)

  def context(self):
    return self.layout.context()

  def evaluate(self, params, batches, num_batches: int) -> dict:
    """The objective's metrics of `params` over `num_batches` local batches of `batches`."""
    acc = None
    with self.context():
      for _ in range(num_batches):
        sums = self.eval_step(params, sharding.global_batch(next(batches), self.mesh))
        acc = sums if acc is None else jax.tree.map(jax.numpy.add, acc, sums)
    return self.objective.finalize(jax.device_get(acc))

  def _rates(self):
    t = self.config.train
    schedule = learning_rate_schedule(t)
    tokens_per_step = t.batch_size * self.tokens_per_example
    peak, source = peak_flops_per_device(self.config.model.dtype, t.peak_flops_per_device)
    if self.is_main:
      print(f"plmjax: peak {peak / 1e12:.3g} TFLOP/s/device ({source}) for mfu", flush=True)
    total_peak = peak * jax.device_count()

    def rates(step: int, seconds: float, steps: int) -> dict:
      tok_s = tokens_per_step * steps / max(seconds, 1e-9)
      return dict(learning_rate=float(schedule(step - 1)), tokens_per_sec=tok_s,
                  steps_per_sec=steps / max(seconds, 1e-9),
                  mfu=tok_s * self.flops_per_token / total_peak)
    return rates

  def fit(self, batches, *, evaluate: Callable | None = None,
          eval_due: Callable | None = None, signals: hooks_lib.StopSignals | None = None,
          hooks=(), desc: str = "train") -> Result:
    """Trains from the current state to config.train.steps.

    batches: the train iterator (get_state/set_state), at its start; a resumed run
    moves it to the checkpoint's position. evaluate: params -> metrics, run when
    `eval_due(step)` and at the last step. signals: the command's StopSignals.
    hooks: more hooks, run before the standard ones at each step (they see the step's
    raw metrics and can change the state before it is checkpointed).
    """
    cfg, t = self.config, self.config.train
    if self.meta is not None:
      batches.set_state(self.meta["data"][jax.process_index()])
    meta = {k: self.meta[k] for k in ("nonfinite_skipped", "nonfinite_in_a_row")
            if self.meta and k in self.meta}
    meta["train_steps"] = t.steps
    loop = loop_lib.Loop(state=self.state, step=self.start_step, total_steps=t.steps, meta=meta)
    metrics = hooks_lib.Metrics(self.workdir, self.objective.finalize, self._rates(),
                                t.log_every_steps, desc=desc, enabled=self.is_main)
    ckpt = hooks_lib.Checkpoint(self.workdir, cfg)
    watch = hooks_lib.NonFiniteWatch(t, ckpt.newest_step)
    ckpt.guard = watch.check
    standard = [watch, metrics]
    evaluator = None
    if evaluate is not None:
      evaluator = hooks_lib.Evaluate(evaluate, eval_due or (lambda step: False), metrics.report)
      standard.append(evaluator)
    # After evaluation, so that a signal that arrives during it stops at this step.
    standard += [hooks_lib.Stop(signals, t.stop_after_steps, sync_every=t.log_every_steps), ckpt]
    t0 = time.perf_counter()
    with self.context():
      loop = loop_lib.fit(loop, batches, self.train_step, [*hooks, *standard], mesh=self.mesh,
                          prefetch=cfg.data.prefetch)
    self.state, self.start_step = loop.state, loop.step
    where = workdir_lib.checkpoint_dir(self.workdir, cfg)
    if loop.stop_reason and self.is_main:
      print(f"plmjax: stopped by {loop.stop_reason} after step {loop.step}; checkpoint saved "
            f"in {where}; run the same command to resume", flush=True)
    return Result(step=loop.step, train_metrics=metrics.last,
                  eval_metrics=evaluator.last if evaluator else {},
                  stopped_by=loop.stop_reason, stop_signal=loop.stop_signal,
                  seconds=time.perf_counter() - t0, checkpoint_dir=where)
