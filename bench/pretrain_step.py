"""Throughput and MFU of the jitted pretraining step on one device.

  python bench/pretrain_step.py --config configs/bert_base.py [--batch 16] [--config.a.b=V ...]
  python bench/pretrain_step.py --arch bert --layers 4 --hidden 512 --heads 8 \
      --intermediate 2048 --vocab 30522 --seq-len 128 --batch 16 --dtype float32
  python bench/pretrain_step.py --config configs/t5_small.py --batch 8   # T5: inputs + targets

Times `Trainer.train_step` (the step `plmjax pretrain` runs: AdamW, clipping, dropout,
donated state) on a fixed synthetic batch already on the device, so the input pipeline
is not measured here (bench/data_pipeline.py measures it). Compilation and `--warmup`
steps are excluded; each of `--repeats` timings runs `--steps` steps and ends with
`block_until_ready`; the median is reported. The matmul peak is measured in the same
run (best of 3 2048x2048 matmuls of the compute dtype) before every repeat and after the
last: `mfu` is against the highest of those samples, `mfu_per_repeat` the median over
repeats of the step's FLOP/s against the peak sampled around that repeat (the figure to
trust on a machine whose speed drifts).

Prints one line per run:
  plmjax bert: tokens/s=N step_ms=... flops/token=... achieved_gflops=... peak_gflops=...
      mfu=... mfu_per_repeat=...
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FLOPS_FORMULA = ("flops/token = 6*N_layers*(4*D^2 + 2*D*I + 2*D*L) + BERT: 6*(P/L)*(D^2 + D*V) "
                 "+ 6*D^2/L | GPT: 6*D*V  (plmjax.train.flops.flops_per_token; P = masked "
                 "positions per row) | T5: t5.training_flops(S inputs, T targets) / (S + T), "
                 "a token being an input or a target token")

SIZE_FLAGS = (  # flag -> config key
    ("layers", "model.num_layers"), ("hidden", "model.hidden_size"),
    ("heads", "model.num_heads"), ("intermediate", "model.intermediate_size"),
    ("vocab", "model.vocab_size"), ("seq_len", "data.max_seq_len"),
    ("batch", "train.batch_size"), ("dtype", "model.dtype"),
)


def add_arguments(p: argparse.ArgumentParser):
  p.add_argument("--config", help="config file (configs/*.py); size flags override it")
  p.add_argument("--arch", choices=("bert", "gpt", "t5"), default="bert",
                 help="without --config: the architecture of base_config(arch)")
  for flag, key in SIZE_FLAGS:
    kind = str if flag == "dtype" else int
    p.add_argument("--" + flag.replace("_", "-"), type=kind, help=f"sets config.{key}")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
  p.add_argument("--repeats", type=int, default=5, help="timings; the median is reported")
  p.add_argument("--steps", type=int, default=3, help="steps per timing")
  p.epilog = ("Any other --config.KEY=VALUE is applied to the config, e.g. "
              "--config.model.remat=dots --config.model.attention_dropout_rate=0")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  add_arguments(p)
  args, overrides = p.parse_known_args(argv)
  bad = [o for o in overrides if not o.startswith("--config.")]
  if bad:
    p.error(f"unrecognized arguments: {' '.join(bad)}")
  return args, overrides


def build_config(args, overrides):
  """The run config: --config file or base_config(--arch), size flags, then overrides."""
  from plmjax import config as config_lib  # pylint: disable=g-import-not-at-top
  config = (config_lib.load_config_file(args.config) if args.config
            else config_lib.base_config(args.arch))
  for flag, key in SIZE_FLAGS:
    value = getattr(args, flag)
    if value is not None:
      config_lib.set_value(config, key, str(value))
  seq_len = config.data.max_seq_len
  if config.model.max_position_embeddings < seq_len:
    config.model.max_position_embeddings = seq_len
  config.data.max_predictions_per_seq = min(config.data.max_predictions_per_seq, seq_len - 1)
  config.train.grad_accum_steps = 1
  config.mesh.data = 1
  config_lib.apply_overrides(config, overrides)
  config_lib.validate(config)
  return config


def synthetic_batch(config, seed: int = 0) -> dict:
  """One global batch of random tokens in the layout the data pipeline produces."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  b, l, v = config.train.batch_size, config.data.max_seq_len, config.model.vocab_size
  ids = rng.integers(5, v, (b, l)).astype(np.int32)
  if config.model.arch == "gpt":
    return dict(input_ids=ids, targets=np.roll(ids, -1, axis=1),
                loss_weights=np.ones((b, l), np.float32))
  if config.model.arch == "t5":  # unpacked rows, full inputs and targets
    t = config.data.max_target_len
    targets = rng.integers(5, v, (b, t)).astype(np.int32)
    return dict(input_ids=ids, attention_mask=np.ones_like(ids), targets=targets,
                decoder_input_ids=np.concatenate([np.zeros((b, 1), np.int32), targets[:, :-1]],
                                                 axis=1),
                loss_weights=np.ones((b, t), np.float32))
  p = config.data.max_predictions_per_seq
  positions = np.sort(np.stack([rng.choice(np.arange(1, l), p, replace=False)
                                for _ in range(b)]), axis=1).astype(np.int32)
  labels = np.take_along_axis(ids, positions, axis=1)
  np.put_along_axis(ids, positions, 4, axis=1)
  token_types = np.zeros_like(ids)
  token_types[:, l // 2:] = 1
  return dict(input_ids=ids, token_type_ids=token_types, attention_mask=np.ones_like(ids),
              masked_positions=positions, masked_labels=labels,
              masked_weights=np.ones((b, p), np.float32),
              nsp_labels=rng.integers(0, 2, (b,)).astype(np.int32))


class PlmjaxStep:
  """One call = one training step of plmjax's Trainer on a fixed on-device batch."""

  def __init__(self, config, batch: dict):
    import jax  # pylint: disable=g-import-not-at-top
    from plmjax import config as config_lib  # pylint: disable=g-import-not-at-top
    from plmjax.models import build_model  # pylint: disable=g-import-not-at-top
    from plmjax.train import sharding  # pylint: disable=g-import-not-at-top
    from plmjax.train.flops import pretrain_flops  # pylint: disable=g-import-not-at-top
    from plmjax.train.objectives import PRETRAINING  # pylint: disable=g-import-not-at-top
    from plmjax.train.trainer import Trainer  # pylint: disable=g-import-not-at-top

    model_cfg = config_lib.validate(config)
    tokens, self.flops_per_token = pretrain_flops(config, model_cfg)
    self.tokens_per_step = config.train.batch_size * tokens
    workdir = tempfile.mkdtemp(prefix="plmjax_bench_")
    self.trainer = Trainer(config, workdir, build_model(model_cfg, config.task.head),
                           PRETRAINING[model_cfg.arch], batch,
                           flops_per_token=self.flops_per_token, tokens_per_example=tokens,
                           devices=jax.devices()[:1])
    self.batch = sharding.global_batch(batch, self.trainer.mesh)
    self.n_params = sum(x.size for x in jax.tree.leaves(self.trainer.state["params"]))
    t0 = time.perf_counter()
    self()  # compiles
    self.compile_s = time.perf_counter() - t0

  def __call__(self):
    t = self.trainer
    with t.context():
      t.state, metrics = t.train_step(t.state, self.batch)
    metrics["batch_loss"].block_until_ready()
    return metrics


class MatmulProbe:
  """The device's practical matmul peak, sampled between the timed steps.

  `measure()` records the best of 3 2048x2048 matmuls of `dtype` in FLOP/s. Timing
  loops call it before each repeat and once after the last, so every repeat has a
  peak measured just before and just after it: on a machine whose speed drifts
  (shared or throttled cores), MFU per repeat compares like with like.
  """

  def __init__(self, dtype: str, n: int = 2048):
    self.dtype, self.n, self.flops = dtype, n, 2 * n**3
    self.samples = []

  def measure(self, tries: int = 3) -> float:
    # The project's own peak measurement (plmjax.train.flops), uncached.
    from plmjax.train.flops import measured_matmul_peak  # pylint: disable=g-import-not-at-top
    self.samples.append(measured_matmul_peak.__wrapped__(self.dtype, self.n, tries))
    return self.samples[-1]

  def peak(self) -> float:
    return max(self.samples)

  def per_repeat(self) -> list:
    """The higher of the samples before and after each repeat."""
    return [max(a, b) for a, b in zip(self.samples, self.samples[1:])]


def interleaved_timings(runners: dict, warmup: int, repeats: int, steps: int,
                        probe: MatmulProbe | None = None) -> dict:
  """{name: [seconds per step, one per repeat]}, the runners taking turns each repeat
  so that load from other processes hits them alike; `probe` samples the matmul peak
  before each repeat and after the last."""
  for run in runners.values():
    for _ in range(warmup):
      run()
  out = {name: [] for name in runners}
  for _ in range(repeats):
    if probe:
      probe.measure()
    for name, run in runners.items():
      t0 = time.perf_counter()
      for _ in range(steps):
        run()
      out[name].append((time.perf_counter() - t0) / steps)
  if probe:
    probe.measure()
  return out


def result_line(name: str, step_times: list, tokens_per_step: int, flops_per_token: float,
                probe: MatmulProbe) -> str:
  """tokens/s from the median step; `mfu` against the highest matmul peak of the run
  (the conservative figure); `mfu_per_repeat` the median over repeats of achieved
  FLOP/s against the peak sampled around that repeat."""
  step_s = statistics.median(step_times)
  tok_s = tokens_per_step / step_s
  achieved = tok_s * flops_per_token
  peak = probe.peak()
  local = statistics.median(tokens_per_step * flops_per_token / t / p
                            for t, p in zip(step_times, probe.per_repeat()))
  spread = f"{min(step_times) * 1e3:.0f}-{max(step_times) * 1e3:.0f}"
  return (f"{name}: tokens/s={tok_s:.0f} step_ms={step_s * 1e3:.1f} (range {spread}) "
          f"flops/token={flops_per_token / 1e6:.2f}M achieved_gflops={achieved / 1e9:.1f} "
          f"peak_gflops={peak / 1e9:.1f} mfu={achieved / peak:.3f} "
          f"mfu_per_repeat={local:.3f}")


def describe(config) -> str:
  m = config.model
  return (f"{m.arch}: layers={m.num_layers} hidden={m.hidden_size} heads={m.num_heads} "
          f"intermediate={m.intermediate_size} vocab={m.vocab_size} "
          f"seq_len={config.data.max_seq_len} batch={config.train.batch_size} dtype={m.dtype} "
          f"remat={m.remat} dropout={m.dropout_rate}/{m.attention_dropout_rate}"
          + (f" masked_per_seq={config.data.max_predictions_per_seq}" if m.arch == "bert" else "")
          + (f" target_len={config.data.max_target_len}" if m.arch == "t5" else ""))


def device_line() -> str:
  import jax  # pylint: disable=g-import-not-at-top
  dev = jax.devices()[0]
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return (f"device: {dev.platform} {dev.device_kind} (1 of {jax.device_count()} devices), "
          f"{cores} host cores, jax {jax.__version__}, {time.strftime('%Y-%m-%d %H:%M %Z')}")


def main(argv=None):
  args, overrides = parse_args(argv)
  config = build_config(args, overrides)
  print(describe(config))
  print(device_line())
  probe = MatmulProbe(config.model.dtype)
  step = PlmjaxStep(config, synthetic_batch(config))
  print(f"plmjax: {step.n_params / 1e6:.2f}M parameters, compiled in {step.compile_s:.1f} s")
  times = interleaved_timings({"plmjax": step}, args.warmup, args.repeats, args.steps, probe)
  print(FLOPS_FORMULA)
  print(result_line(f"plmjax {config.model.arch}", times["plmjax"], step.tokens_per_step,
                    step.flops_per_token, probe))
  return 0


if __name__ == "__main__":
  sys.path.insert(0, ROOT)
  sys.exit(main())
