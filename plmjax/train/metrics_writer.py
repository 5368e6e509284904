"""Metric sinks: DIR/metrics.jsonl (one JSON object per logged step) and TensorBoard."""

import json
import math
import os


def _clean(value):
  if isinstance(value, float) and not math.isfinite(value):
    return None  # JSON has no NaN/inf
  return value


class MetricsWriter:
  """Writes from the main process only; other processes get a no-op writer."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if enabled:
      # Imported here: tensorboardX imports torch when it is installed (seconds).
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tb"))

  def truncate_after(self, step: int):
    """Drops lines logged after `step` (a resumed run logs those steps again)."""
    if not self.enabled or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      lines = [line for line in f if line.strip()]
    keep = [line for line in lines if json.loads(line).get("step", 0) <= step]
    with open(self.path + ".tmp", "w") as f:
      f.writelines(keep)
    os.replace(self.path + ".tmp", self.path)

  def write(self, step: int, metrics: dict, split: str = "train"):
    if not self.enabled:
      return
    record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
    if split != "train":
      record["split"] = split
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for key, value in metrics.items():
      if isinstance(value, (int, float)) and value is not None and math.isfinite(value):
        self._tb.add_scalar(f"{split}/{key}", value, step)

  def close(self):
    if self._tb is not None:
      self._tb.flush()
      self._tb.close()
