"""The training loop, the only one: batches -> train step -> hooks.

  loop = Loop(state, step, total_steps, meta)
  fit(loop, batches, train_step, hooks, mesh=mesh)

Everything periodic (logging, evaluation, checkpoints, stopping) is a hook
(plmjax.train.hooks); the step is the pure function of plmjax.train.step.
"""

import dataclasses
import queue
import threading
from typing import Any

from plmjax.train import sharding


@dataclasses.dataclass
class Loop:
  """What hooks see after each step, and may change."""
  state: dict  # the train state (device arrays)
  step: int  # steps done so far
  total_steps: int
  meta: dict  # host values saved with each checkpoint and restored with it
  metrics: dict | None = None  # the last step's metrics (device arrays)
  data_state: Any = None  # the batch iterator's position after the last batch
  stop_reason: str | None = None  # set by request_stop: the loop ends after this step
  stop_signal: int | None = None
  excluded_seconds: float = 0.0  # time hooks spent on other work (evaluation): not in tokens/s

  def request_stop(self, reason: str, signum: int | None = None):
    if self.stop_reason is None:
      self.stop_reason, self.stop_signal = reason, signum


def fit(loop: Loop, batches, train_step, hooks, *, mesh, prefetch: int = 2) -> Loop:
  """Runs `train_step` until loop.total_steps or a requested stop.

  batches: an iterator of local (per-process) numpy batches with get_state/set_state,
  already at loop.step's position; each step's batch comes with the position after it.
  """
  try:
    for hook in hooks:
      hook.start(loop)
    if loop.step < loop.total_steps:
      loop.data_state = batches.get_state()  # before the prefetch thread moves it
      fetch = _Prefetch(batches, prefetch)
      try:
        while loop.step < loop.total_steps and loop.stop_reason is None:
          local, loop.data_state = next(fetch)
          loop.state, loop.metrics = train_step(loop.state, sharding.global_batch(local, mesh))
          loop.step += 1
          for hook in hooks:
            hook.after_step(loop)
      finally:
        fetch.close()
    for hook in hooks:
      hook.finish(loop)
  finally:
    for hook in reversed(hooks):
      hook.close()
  return loop


class _Prefetch:
  """Fetches (batch, iterator position after it) in a thread, `depth` batches ahead."""

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
