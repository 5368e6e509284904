"""What checking a local checkpoint before restoring it costs (train/checkpoint.py).

`verify_readable` reads every stored entry of an orbax OCDBT item so that a damaged
checkpoint is reported in one line before orbax starts reading it. This saves a params
tree of --mib MiB (float32 arrays of 4M values, BERT-like) and times, each --repeats times,
the check and orbax's own restore of the same item, side by side:

  python bench/checkpoint_verify.py --mib 1024
"""

import argparse
import os
import shutil
import tempfile
import time

import numpy as np
import orbax.checkpoint as ocp

from plmjax.train import checkpoint


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--mib", type=int, default=1024)
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args()
  n = max(1, args.mib // 16)  # arrays of 16 MiB
  rng = np.random.default_rng(0)
  params = {f"layer_{i}": rng.standard_normal((1024, 4096), dtype=np.float32) for i in range(n)}
  root = tempfile.mkdtemp(prefix="plmjax_verify_")
  path = os.path.join(root, "params")
  try:
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(path, params)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    print(f"{n} arrays, {size / 2**20:.0f} MiB on disk, load average {os.getloadavg()[0]:.1f}")
    print("| repeat | verify_readable s | orbax restore s | ratio |\n|---|---|---|---|")
    for r in range(args.repeats):
      t = time.perf_counter()
      checkpoint.verify_readable(path)
      check = time.perf_counter() - t
      t = time.perf_counter()
      with ocp.StandardCheckpointer() as ckptr:
        ckptr.restore(path)
      restore = time.perf_counter() - t
      print(f"| {r + 1} | {check:.2f} | {restore:.2f} | {check / restore:.2f} |")
  finally:
    shutil.rmtree(root)


if __name__ == "__main__":
  main()
