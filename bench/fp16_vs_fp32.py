"""float16 with dynamic loss scaling against float32: `plmjax pretrain`, step by step.

  python bench/fp16_vs_fp32.py [--config configs/bert_tiny.py] [--dtypes float32,float16,bfloat16]
      [--config.train.steps=300 ...]
  python bench/fp16_vs_fp32.py --scaler-cost [--config ...] [--repeats 5 --steps 5]

Runs `plmjax pretrain` (the command users run: real text, tokenizer, data pipeline,
Trainer) once per dtype with the same config, seed and tokenizer (the first run trains
it, the others reuse it), logging every step, and compares each step's loss in
metrics.jsonl with the first dtype's. Evaluation is off: on CPU, float16 evaluation
would take jax.nn.dot_product_attention's F16_F16_F32 dot, which XLA:CPU refuses
(training uses the attention-dropout einsum path). Step times include the hooks, and on
CPU XLA upcasts float16 matmuls: they say nothing about a GPU's float16 speed.

Prints one line per dtype:
  float16: steps=N max_abs_loss_diff=D (step S) mean_abs_loss_diff=M final_loss=L
      overflow_steps=K loss_scale_range=A-B final_loss_scale=X median_step_ms=T
then every dtype's loss at a few steps.

--scaler-cost times what the scaler adds: the float16 train step of `Trainer` against
the same step built from a state without a loss scale (bench/pretrain_step.py's fixed
batch and interleaved repeats), and prints
  scaler cost: with=Tms without=Tms (+P%)
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default=os.path.join(ROOT, "configs", "bert_tiny.py"))
  p.add_argument("--dtypes", default="float32,float16,bfloat16",
                 help="model.dtype of each run; the first is the reference")
  p.add_argument("--scaler-cost", action="store_true",
                 help="time the float16 step with and without the loss scaler instead")
  p.add_argument("--repeats", type=int, default=5, help="--scaler-cost: timings (median)")
  p.add_argument("--steps", type=int, default=5, help="--scaler-cost: steps per timing")
  p.epilog = "Any other --config.KEY=VALUE is passed to every run."
  args, overrides = p.parse_known_args(argv)
  bad = [o for o in overrides if not o.startswith("--config.")]
  if bad:
    p.error(f"unrecognized arguments: {' '.join(bad)}")
  return args, overrides


def pretrain(args, overrides, dtype: str, workdir: str, tokenizer: str | None) -> list:
  """metrics.jsonl rows of one `plmjax pretrain` run."""
  cmd = [sys.executable, "-m", "plmjax.cli", "pretrain", "--config", args.config,
         "--workdir", workdir, f"--config.model.dtype={dtype}", "--config.data.eval=",
         "--config.train.log_every_steps=1", *overrides]
  if tokenizer:
    cmd.append(f"--config.data.tokenizer={tokenizer}")
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  if out.returncode != 0:
    sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if '"split"' not in line]


def summary(dtype: str, got: list, ref: list) -> str:
  diffs = [abs(a["loss"] - b["loss"]) for a, b in zip(got, ref)]
  worst = max(range(len(diffs)), key=diffs.__getitem__)
  step_ms = statistics.median(1e3 / r["steps_per_sec"] for r in got[1:])
  line = (f"{dtype}: steps={len(got)} max_abs_loss_diff={diffs[worst]:.3g} (step "
          f"{got[worst]['step']}) mean_abs_loss_diff={statistics.mean(diffs):.3g} "
          f"final_loss={got[-1]['loss']:.4f}")
  if "loss_scale" in got[-1]:
    scales = [r["loss_scale"] for r in got]
    line += (f" overflow_steps={sum(r['overflow_steps'] for r in got)} "
             f"loss_scale_range={min(scales):g}-{max(scales):g} final_loss_scale={scales[-1]:g}")
  return line + f" median_step_ms={step_ms:.1f}"


def scaler_cost(args, overrides) -> str:
  """Median step time of the float16 step with its loss scaler and without one."""
  sys.path.insert(0, os.path.join(ROOT, "bench"))
  import jax  # pylint: disable=g-import-not-at-top
  import pretrain_step as ps  # pylint: disable=g-import-not-at-top
  from plmjax import config as config_lib  # pylint: disable=g-import-not-at-top
  from plmjax.train import sharding  # pylint: disable=g-import-not-at-top
  from plmjax.train.step import make_train_step  # pylint: disable=g-import-not-at-top

  config = config_lib.load_config(args.config, ["--config.model.dtype=float16",
                                                "--config.mesh.data=1", *overrides])
  scaled = ps.PlmjaxStep(config, ps.synthetic_batch(config))
  t, lay = scaled.trainer, scaled.trainer.layout
  shardings = {k: v for k, v in lay.shardings.items() if k != "loss_scale"}
  step = jax.jit(make_train_step(t.model, lay.tx, t.objective, config.train),
                 in_shardings=(shardings, lay.batch_sharding),
                 out_shardings=(shardings, sharding.replicated(lay.mesh)), donate_argnums=0)
  state = [jax.tree.map(jax.numpy.copy, {k: t.state[k] for k in shardings})]

  def unscaled():
    with t.context():
      state[0], metrics = step(state[0], scaled.batch)
    metrics["batch_loss"].block_until_ready()

  times = ps.interleaved_timings({"with": scaled, "without": unscaled}, 2, args.repeats,
                                 args.steps)
  with_ms, without_ms = (1e3 * statistics.median(times[k]) for k in ("with", "without"))
  return (f"scaler cost: with={with_ms:.1f}ms without={without_ms:.1f}ms "
          f"({100 * (with_ms / without_ms - 1):+.1f}%)")


def main(argv=None):
  args, overrides = parse_args(argv)
  if args.scaler_cost:
    print(f"{os.path.relpath(args.config, ROOT)} {' '.join(overrides)}; "
          f"{time.strftime('%Y-%m-%d %H:%M %Z')}")
    print(scaler_cost(args, overrides))
    return 0
  print(f"{os.path.relpath(args.config, ROOT)} {' '.join(overrides)}; "
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}", flush=True)
  dtypes = args.dtypes.split(",")
  runs, tokenizer = {}, None
  with tempfile.TemporaryDirectory(prefix="plmjax_fp16_") as tmp:
    for dtype in dtypes:
      t0 = time.perf_counter()
      workdir = os.path.join(tmp, dtype)
      runs[dtype] = pretrain(args, overrides, dtype, workdir, tokenizer)
      tokenizer = tokenizer or os.path.join(workdir, "tokenizer", "tokenizer.model")
      print(f"{dtype}: {time.perf_counter() - t0:.0f} s", flush=True)
  ref = runs[dtypes[0]]
  for dtype in dtypes:
    print(summary(dtype, runs[dtype], ref))
  n = len(ref)
  marks = sorted({m for m in (1, 10, n // 4, n // 2, 3 * n // 4, n) if 1 <= m <= n})
  print("loss at step " + " ".join(f"{m:>8}" for m in marks))
  for dtype in dtypes:
    print(f"{dtype:>12} " + " ".join(f"{runs[dtype][m - 1]['loss']:8.4f}" for m in marks))
  return 0


if __name__ == "__main__":
  sys.exit(main())
