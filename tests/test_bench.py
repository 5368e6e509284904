"""The benchmark scripts run on a tiny size and print their documented result lines."""

import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--layers", "1", "--hidden", "32", "--heads", "2", "--intermediate", "64",
        "--vocab", "300", "--seq-len", "16", "--batch", "2", "--warmup", "1", "--repeats", "2",
        "--steps", "1"]
RESULT = re.compile(r"^(?P<name>[\w\- ]+): tokens/s=(?P<tok>\d+) step_ms=(?P<ms>[\d.]+) "
                    r"\(range \d+-\d+\) flops/token=(?P<flops>[\d.]+)M achieved_gflops=[\d.]+ "
                    r"peak_gflops=(?P<peak>[\d.]+) mfu=(?P<mfu>[\d.]+) "
                    r"mfu_per_repeat=(?P<mfu_local>[\d.]+)$", re.M)


def run(script, *args):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # the scripts time one device, as a user runs them
  out = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], env=env,
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


def results(stdout):
  return {m["name"]: m for m in RESULT.finditer(stdout)}


def test_peers_prints_both_frameworks_and_their_ratio():
  stdout = run("peers.py", *TINY, "--arch", "bert")
  lines = results(stdout)
  assert set(lines) == {"plmjax bert", "hf-pytorch BertForPreTraining"}, stdout
  ours, hf = lines["plmjax bert"], lines["hf-pytorch BertForPreTraining"]
  # Same useful FLOPs and the same peak for both; tokens/s = batch*seq / step time.
  assert ours["flops"] == hf["flops"] and ours["peak"] == hf["peak"]
  for m in (ours, hf):
    assert int(m["tok"]) > 0 and float(m["peak"]) > 0
    assert abs(int(m["tok"]) - 2 * 16 / (float(m["ms"]) / 1e3)) <= 0.02 * int(m["tok"]) + 1
  ratio = float(re.search(r"^ratio plmjax/hf tokens/s=([\d.]+)", stdout, re.M).group(1))
  assert abs(ratio - int(ours["tok"]) / int(hf["tok"])) <= 0.05 * ratio + 0.01
  assert "device: cpu" in stdout and "flops/token = 6*N_layers" in stdout
  assert "1 of 1 devices" in stdout  # no virtual devices leak into the timing


def test_pretrain_step_gpt_from_config_file_with_override():
  stdout = run("pretrain_step.py", "--config", "configs/gpt2_tiny.py", *TINY,
               "--config.model.remat=dots")
  lines = results(stdout)
  assert list(lines) == ["plmjax gpt"], stdout
  assert "remat=dots" in stdout
  # GPT flops/token, from plmjax.train.flops: 6*(4*D^2 + 2*D*I + 2*D*L) + 6*D*V.
  d, i, l, v = 32, 64, 16, 300
  expected = 6 * (4 * d * d + 2 * d * i + 2 * d * l) + 6 * d * v
  assert float(lines["plmjax gpt"]["flops"]) == round(expected / 1e6, 2)


def test_pretrain_step_t5_config_counts_input_and_target_tokens():
  stdout = run("pretrain_step.py", "--config", "configs/t5_tiny.py", *TINY)
  lines = results(stdout)
  assert list(lines) == ["plmjax t5"], stdout
  from plmjax.config import load_config, validate  # pylint: disable=g-import-not-at-top
  from plmjax.models import t5  # pylint: disable=g-import-not-at-top
  config = load_config("configs/t5_tiny.py", [
      "--config.model.num_layers=1", "--config.model.hidden_size=32", "--config.model.num_heads=2",
      "--config.model.intermediate_size=64", "--config.model.vocab_size=300"])
  cfg = validate(config)
  s, t = 16, config.data.max_target_len
  assert f"{2 * (s + t)} tokens/step" in stdout and f"target_len={t}" in stdout
  per_token = t5.training_flops(cfg, s, t) / (s + t)
  assert float(lines["plmjax t5"]["flops"]) == round(per_token / 1e6, 2)


def test_unknown_argument_is_an_error():
  env = dict(os.environ)
  out = subprocess.run([sys.executable, str(ROOT / "bench" / "pretrain_step.py"), "--bogus"],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert out.returncode == 2 and "--bogus" in out.stderr


def test_matmul_shapes_prints_every_product_of_every_weight():
  stdout = run("matmul_shapes.py", "--hidden", "32", "--intermediate", "64", "--vocab", "300",
               "--tokens", "64", "--masked", "8", "--repeats", "1")
  lines = re.findall(r"^([\w-]+) (forward|input-grad|weight-grad) \((\d+)x(\d+)x(\d+)\): "
                     r"xla=(\d+) torch=(\d+) GFLOP/s$", stdout, re.M)
  assert len(lines) == 12, stdout
  assert {l[0] for l in lines} == {"projection", "mlp-up", "mlp-down", "mlm-decoder"}
  assert ("mlm-decoder", "weight-grad", "8", "32", "300") in [l[:5] for l in lines]
