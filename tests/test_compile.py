"""`plmjax compile`: the trainer's own step, compiled for TPU slices without a TPU.

TPU compiles need libtpu (the tpu extra, which CI installs); they are skipped, with the
reason, only where it is absent.
"""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from plmjax import cli
from plmjax.config import base_config, validate
from plmjax.data.pipeline import batch_spec
from plmjax.models import build_model
from plmjax.train import compile as compile_lib
from plmjax.train import sharding, topologies
from plmjax.train.objectives import PRETRAINING
from plmjax.train.trainer import Trainer

# The suite's on-disk compilation cache (conftest) cannot load compile-only executables.
pytestmark = pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache")
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed: pip install 'plmjax[tpu]'")


def tiny(arch: str, batch: int = 16, **mesh):
  c = base_config(arch)
  c.model.update(num_layers=2, hidden_size=64, num_heads=2, intermediate_size=128,
                 vocab_size=512, max_position_embeddings=128)
  c.data.update(max_seq_len=64, max_predictions_per_seq=10)
  c.train.batch_size = batch
  c.mesh.update(**mesh)
  return c


def test_cpu_1_compiles_the_trainers_own_step(tmp_path):
  config = tiny("bert", batch=4)
  rep = compile_lib.report(config, "cpu:1")
  model = build_model(validate(config), "pretraining")
  example = {k: np.zeros(shape, dtype) for k, (shape, dtype) in batch_spec(config, 4).items()}
  trainer = Trainer(config, str(tmp_path), model, PRETRAINING["bert"], example,
                    flops_per_token=1.0, tokens_per_example=64, devices=jax.devices()[:1])
  with trainer.context():
    compiled = trainer.train_step.lower(
        trainer.state, sharding.global_batch(example, trainer.mesh)).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  assert rep["xla_flops_per_device"] == cost["flops"] > 0
  params = sum(x.nbytes for x in jax.tree.leaves(trainer.state["params"]))
  assert rep["memory"]["params"] == params
  assert rep["memory"]["argument"] == compiled.memory_analysis().argument_size_in_bytes
  assert rep["num_devices"] == 1 and rep["fits"]


@needs_libtpu
@pytest.mark.parametrize("arch", ["bert", "gpt"])
@pytest.mark.parametrize("topology, chips", [("v4-8", 4), ("v5litepod-8", 8)])
def test_compiles_for_tpu_slices_and_data_parallelism_gathers_no_parameters(arch, topology,
                                                                            chips):
  rep = compile_lib.report(tiny(arch), topology)
  assert rep["num_devices"] == chips and rep["num_hosts"] == 1 and rep["fits"]
  assert rep["mesh"] == {"data": chips, "fsdp": 1, "tensor": 1}
  assert rep["device_kind"].startswith("TPU v")
  assert rep["collectives"]["all-gather"]["count"] == 0  # replicated parameters
  assert rep["collectives"]["all-reduce"]["count"] > 0  # the gradients
  assert rep["xla_flops_per_device"] > 0 and rep["model_flops_per_step"] > 0
  assert 0 < rep["memory"]["total"] < rep["memory"]["hbm"]


@needs_libtpu
def test_t5_compiles_for_a_tpu_slice_with_encoder_decoder_flops():
  from plmjax.models import t5  # pylint: disable=g-import-not-at-top
  c = base_config("t5")
  c.model.update(num_layers=2, num_decoder_layers=1, hidden_size=64, num_heads=2,
                 attention_head_dim=32, intermediate_size=128, vocab_size=512)
  c.data.update(max_seq_len=64, max_target_len=16)
  c.train.batch_size = 16
  rep = compile_lib.report(c, "v5litepod-8")
  assert rep["num_devices"] == 8 and rep["fits"] and rep["device_kind"].startswith("TPU v")
  assert rep["collectives"]["all-reduce"]["count"] > 0  # the gradients
  expected = 16 * t5.training_flops(validate(c), 64, 16)  # inputs and targets of 16 rows
  assert rep["model_flops_per_step"] == pytest.approx(expected, rel=1e-9)
  assert 0 < rep["memory"]["total"] < rep["memory"]["hbm"]


@needs_libtpu
def test_fsdp_shards_parameters_and_optimizer_state():
  full = compile_lib.report(tiny("bert"), "v4-8")
  fsdp = compile_lib.report(tiny("bert", fsdp=4, data=1), "v4-8")
  n = 4
  # Bound: every tensor with an `embed` axis (all matrices and embeddings here) is split
  # n ways; vectors (biases, LayerNorm) and scalars stay whole on every device.
  model = build_model(validate(tiny("bert")), "pretraining")
  spec = batch_spec(tiny("bert"), 16)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), np.zeros((1, 64), np.int32),
      **{k: np.zeros((1,) + s[1:], d) for k, (s, d) in spec.items()
         if k in ("token_type_ids", "attention_mask", "masked_positions")})["params"])
  leaves = jax.tree.leaves(jax.tree.map(lambda x: getattr(x, "value", x), shapes))
  vectors = sum(np.prod(x.shape) * 4 for x in leaves if len(x.shape) < 2)
  state = full["memory"]["params"] + full["memory"]["opt_state"]  # replicated: the whole
  assert fsdp["memory"]["params"] + fsdp["memory"]["opt_state"] <= state / n + 3 * vectors + 64
  assert fsdp["collectives"]["all-gather"]["count"] > 0  # parameters gathered for compute


@needs_libtpu
def test_a_batch_too_large_for_hbm_exits_3_with_what_to_change(tmp_path, capsys):
  config = tmp_path / "big.py"
  config.write_text("from plmjax.config import base_config\n"
                    "def get_config():\n"
                    "  c = base_config('bert')\n"
                    "  c.model.update(num_layers=1, hidden_size=64, num_heads=4,\n"
                    "                 intermediate_size=128, vocab_size=512)\n"
                    "  c.data.max_seq_len = 512\n"
                    "  c.train.batch_size = 65536\n"
                    "  return c\n")
  out = tmp_path / "r.json"
  rc = cli.main(["compile", "--config", str(config), "--topology", "v5e-4", "--out", str(out)])
  err = capsys.readouterr().err
  assert rc == 3
  assert "of memory of a v5e-4 device" in err and "--config.mesh.fsdp=N" in err
  assert "--config.model.remat=full" in err and "--config.train.batch_size" in err
  rep = json.loads(out.read_text())
  assert rep["fits"] is False and rep["memory"]["hbm"] == 16 * 2**30
  assert rep["memory"]["params"] > 0


@needs_libtpu
@pytest.mark.parametrize("argv, message", [
    (["--topology", "v9-8"], "is not a known Cloud TPU accelerator type or GPU"),
    (["--topology", "h100-12"], "give 1-8 GPUs, or a multiple of 8"),
    (["--topology", "v4-6"], "no v4 slice of that size is known"),
    (["--topology", "v4-32", "--config.train.batch_size=20"], "not divisible by the 16"),
    (["--topology", "v5e-16", "--config.train.batch_size=6", "--config.mesh.data=2",
      "--config.mesh.tensor=8", "--config.model.num_heads=16"], "not divisible by the 4 processes"),
    (["--topology", "v4-8", "--config.mesh.data=1", "--config.mesh.tensor=4"],
     "config.model.num_heads=2 is not divisible by config.mesh.tensor=4"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
  rc = cli.main(["compile", "--config", "configs/bert_tiny.py", *argv])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2 and len(err) == 1 and message in err[0], err


def test_topology_list_and_parsing(capsys):
  assert cli.main(["compile", "--topology", "list"]) == 0
  out = capsys.readouterr().out
  assert "v4-32" in out and "v5e-16" in out and "v6e-8" in out and "cpu:N" in out
  t = topologies.parse("v4-32")
  assert (t.count, t.hosts, t.memory) == (16, 4, 32 * 2**30)
  t = topologies.parse("v5litepod-16")
  assert (t.count, t.hosts, t.spec.shapes[t.count]) == (16, 4, (4, 4))
  assert topologies.parse("v5p-8").count == 4 and topologies.parse("v6e-8").hosts == 1
  t = topologies.parse("h100-16")
  assert (t.kind, t.count, t.hosts) == ("gpu", 16, 2)
  assert t.memory == int(80e9 * float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", 0.75)))


def test_collectives_are_counted_with_their_bytes():
  hlo = """
  %all-reduce.1 = f32[1024,64]{1,0} all-reduce(f32[1024,64]{1,0} %p), replica_groups={}
  %ag = (bf16[8,128]{1,0}, bf16[64,128]{1,0}) all-gather-start(bf16[8,128]{1,0} %x)
  %agd = bf16[64,128]{1,0} all-gather-done((bf16[8,128]{1,0}, bf16[64,128]{1,0}) %ag)
  %rs = (f32[16]{0}, f32[4]{0}) reduce-scatter(f32[16]{0} %a, f32[4]{0} %b)
  %cp = s32[2]{0} collective-permute(s32[2]{0} %c)
  %add = f32[4]{0} add(f32[4]{0} %d, f32[4]{0} %e)
  """
  got = compile_lib.collectives(hlo)
  assert got["all-reduce"] == {"count": 1, "bytes": 1024 * 64 * 4}
  assert got["all-gather"] == {"count": 1, "bytes": 64 * 128 * 2}
  assert got["reduce-scatter"] == {"count": 1, "bytes": (16 + 4) * 4}
  assert got["collective-permute"] == {"count": 1, "bytes": 8}
  assert got["all-to-all"] == {"count": 0, "bytes": 0}


@needs_libtpu
def test_stderr_stays_clean_for_cpu_users_with_libtpu_installed(tmp_path):
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
  done = subprocess.run([sys.executable, "-m", "plmjax.cli", "compile", "--config",
                         "configs/bert_tiny.py", "--topology", "cpu:2"],
                        capture_output=True, text=True, env=env, timeout=300)
  assert done.returncode == 0, done.stderr
  assert "2 devices" in done.stdout
  if importlib.util.find_spec("jax_cuda12_plugin") is None:
    assert done.stderr == ""
  else:  # jax's CUDA plugin prints its own lines when jax is imported: libtpu's must not
    assert "TPU" not in done.stderr, done.stderr


@pytest.mark.skipif(importlib.util.find_spec("jax_cuda12_plugin") is None,
                    reason="jax's CUDA plugin is not installed: pip install 'plmjax[gpu-compile]'")
def test_compiles_for_gpus_that_are_not_attached():
  rep = compile_lib.report(tiny("gpt"), "h100-8")
  assert rep["device_kind"] == "NVIDIA H100 80GB HBM3" and rep["num_devices"] == 8
  assert rep["fits"] and 0 < rep["memory"]["total"] < rep["memory"]["hbm"]
  assert rep["collectives"]["all-reduce"]["count"] > 0
