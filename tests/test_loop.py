"""The loop and its hooks: iterator state before prefetching, user hooks, schedule notice."""

import json
import time

import pytest

from plmjax.train import hooks as hooks_lib
from plmjax.train import optimizer
from plmjax import workdir as workdir_lib
from synthetic import SyntheticBert
from test_trainer import BATCH, make_trainer, tiny_config


class SpyBatches:
  """SyntheticBert that records calls; get_state is slow, as a real iterator's can be."""

  def __init__(self):
    self.inner, self.calls = SyntheticBert(BATCH), []

  def __next__(self):
    self.calls.append("next")
    return next(self.inner)

  def get_state(self):
    time.sleep(0.05)
    self.calls.append("get_state")
    return self.inner.get_state()

  def set_state(self, state):
    self.inner.set_state(state)


def test_the_position_is_read_before_the_prefetch_thread_starts(tmp_path):
  batches = SpyBatches()
  make_trainer(tiny_config(steps=2), tmp_path / "run").fit(batches)
  assert batches.calls[0] == "get_state", batches.calls


class StopAtThree(hooks_lib.Hook):
  """A user's hook: sees every step once, in order, and stops the loop at step 3."""

  def __init__(self):
    self.seen, self.events = [], []

  def start(self, loop):
    self.events.append("start")

  def after_step(self, loop):
    self.seen.append(loop.step)
    assert float(loop.metrics["batch_loss"]) > 0
    if loop.step == 3:
      loop.request_stop("my hook")

  def finish(self, loop):
    self.events.append("finish")

  def close(self):
    self.events.append("close")


def test_a_hook_can_stop_the_loop_and_the_stop_is_checkpointed(tmp_path):
  hook = StopAtThree()
  result = make_trainer(tiny_config(steps=6), tmp_path / "run").fit(SyntheticBert(BATCH),
                                                                    hooks=[hook])
  assert hook.seen == [1, 2, 3] and hook.events == ["start", "finish", "close"]
  assert result.step == 3 and result.stopped_by == "my hook"
  assert workdir_lib.checkpoint_steps(str(tmp_path / "run")) == [3]
  # The next run resumes from the stop and finishes.
  assert make_trainer(tiny_config(steps=6), tmp_path / "run").fit(SyntheticBert(BATCH)).step == 6


def test_more_steps_on_resume_restart_the_schedule_and_say_so(tmp_path, capsys):
  make_trainer(tiny_config(steps=4), tmp_path / "run").fit(SyntheticBert(BATCH))
  longer = tiny_config(steps=8)
  trainer = make_trainer(longer, tmp_path / "run")
  out = capsys.readouterr().out
  want = float(optimizer.learning_rate_schedule(longer.train)(4))
  assert f"train.steps is now 8 (was 4)" in out and f"the rate is {want:.3g}" in out
  trainer.fit(SyntheticBert(BATCH))
  rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == list(range(1, 9))
  assert rows[4]["learning_rate"] == pytest.approx(want)  # step 5: the new schedule at 4
  assert rows[3]["learning_rate"] == pytest.approx(
      float(optimizer.learning_rate_schedule(tiny_config(steps=4).train)(3)))
