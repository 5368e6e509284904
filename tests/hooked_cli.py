"""The plmjax command with test hooks in its training loop: faults come from outside.

  python tests/hooked_cli.py [--pause-after N] [--nan-at-step K] -- pretrain --config ...

--pause-after N: after step N (once the checkpoints due by then are on disk) print
  "paused after step N" and wait, up to a minute, for SIGTERM/SIGINT, so a test can
  preempt or kill a run at a chosen step.
--nan-at-step K: step K computes on NaN parameters (its loss and gradients are NaN);
  the real parameters are put back after it, as if only that batch had been bad.
--pause-in-eval: fine-tuning's first evaluation prints "paused in evaluation" and waits,
  up to a minute, for SIGTERM/SIGINT before it evaluates.
"""

import argparse
import signal
import sys
import time

import jax
import jax.numpy as jnp

from plmjax import cli
from plmjax import workdir as workdir_lib
from plmjax.train.hooks import Hook


class PauseAfter(Hook):

  def __init__(self, step: int, workdir: str, checkpoint_every: int):
    self.step, self.workdir, self.every = step, workdir, checkpoint_every

  def after_step(self, loop):
    if loop.step != self.step:
      return
    due = loop.step // self.every * self.every
    deadline = time.monotonic() + 60
    while due and due not in workdir_lib.checkpoint_steps(self.workdir):
      if time.monotonic() > deadline:
        break
      time.sleep(0.01)
    wait_for_signal(f"paused after step {loop.step}")


def wait_for_signal(announce: str):
  """Prints `announce`, waits up to a minute for SIGTERM/SIGINT, passes it on to plmjax."""
  got = []
  old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

  def handler(signum, frame):
    got.append(signum)
    old[signum](signum, frame)

  for s in old:
    signal.signal(s, handler)
  print(announce, flush=True)
  deadline = time.monotonic() + 60
  while not got and time.monotonic() < deadline:
    time.sleep(0.01)
  for s, h in old.items():
    signal.signal(s, h)


def pause_in_first_evaluation():
  from plmjax.finetune import finetune  # pylint: disable=g-import-not-at-top
  make_evaluate = finetune.make_evaluate

  def patched(*args, **kwargs):
    evaluate, calls = make_evaluate(*args, **kwargs), []

    def slow(params):
      if not calls:
        calls.append(1)
        wait_for_signal("paused in evaluation")
      return evaluate(params)
    return slow
  finetune.make_evaluate = patched


class NanAt(Hook):

  def __init__(self, step: int):
    self.step = step

  def after_step(self, loop):
    if loop.step == self.step - 1:
      self.saved = loop.state["params"]
      poisoned = jax.tree.map(lambda p: p * jnp.nan, self.saved)
      loop.state = dict(loop.state, params=poisoned)
    elif loop.step == self.step:
      loop.state = dict(loop.state, params=self.saved)


def main(argv):
  parser = argparse.ArgumentParser()
  parser.add_argument("--pause-after", type=int)
  parser.add_argument("--nan-at-step", type=int)
  parser.add_argument("--checkpoint-every", type=int, default=2)
  parser.add_argument("--pause-in-eval", action="store_true")
  ours, rest = argv[:argv.index("--")], argv[argv.index("--") + 1:]
  args = parser.parse_args(ours)
  hooks = []
  if args.pause_after is not None:
    workdir = rest[rest.index("--workdir") + 1]
    hooks.append(PauseAfter(args.pause_after, workdir, args.checkpoint_every))
  if args.nan_at_step is not None:
    hooks.append(NanAt(args.nan_at_step))
  if args.pause_in_eval:
    pause_in_first_evaluation()
  return cli.main(rest, hooks=hooks)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
