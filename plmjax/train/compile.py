"""`plmjax compile`: will the train step fit? Compiled for a TPU slice that is not attached.

  plmjax compile --config configs/bert_large.py --topology v5e-8 [--config.K=V ...] [--out R.json]
  plmjax compile --config configs/gpt2_small.py --topology h100-8    # needs plmjax[gpu-compile]
  plmjax compile --config configs/bert_base.py --topology cpu:8      # 8 virtual CPU devices
  plmjax compile --topology list                                     # the known slices

The step is the trainer's own (plmjax.train.state.layout + trainer.jit_steps), lowered with
abstract inputs (no data, no tokenizer, nothing written but --out) on the abstract devices
of plmjax.train.topologies, then compiled by XLA for that TPU or GPU. The report: per-chip
memory (params, opt_state, batch, temp, total against the chip's HBM), model FLOPs per step
(the MFU formula of plmjax.train.flops), XLA's FLOPs per device, and the collectives in
the optimised HLO. Exit 0: it fits; 3: it does not (with what to change); 2: bad input.
"""

import json
import math
import re
import sys
import time

import jax
import numpy as np

from plmjax import config as config_lib
from plmjax.data.pipeline import batch_spec
from plmjax.errors import UserError
from plmjax.models import build_model
from plmjax.train import sharding
from plmjax.train import state as state_lib
from plmjax.train import topologies
from plmjax.train.flops import pretrain_flops
from plmjax.train.objectives import PRETRAINING
from plmjax.train.trainer import jit_steps

GIB = topologies.GIB
DOESNT_FIT = 3
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def _bytes_per_device(tree) -> int:
  total = 0
  for leaf in jax.tree.leaves(tree):
    shard = leaf.sharding.shard_shape(leaf.shape)
    total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
  return total


_SHAPE = re.compile(r"\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|f16|bf16|f32|f64)\[([0-9,]*)\]")
_ITEMSIZE = dict(pred=1, s8=1, u8=1, s16=2, u16=2, bf16=2, f16=2, s32=4, u32=4, f32=4,
                 s64=8, u64=8, f64=8)


def collectives(hlo: str) -> dict:
  """{kind: {"count", "bytes"}} of the collectives in optimised HLO text; an async pair
  (-start/-done) counts once, with the bytes of its result."""
  out = {k: {"count": 0, "bytes": 0} for k in COLLECTIVES}
  for line in hlo.splitlines():
    m = re.search(r"=\s*(.*?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(", line)
    if not m:
      continue
    shapes = _SHAPE.findall(m.group(1))
    if m.group(3) and len(shapes) > 1:  # (operand, result[, ...]) of an async start
      shapes = shapes[len(shapes) // 2:]
    out[m.group(2)]["count"] += 1
    out[m.group(2)]["bytes"] += sum(
        math.prod(int(d) for d in dims.split(",") if d) * _ITEMSIZE[t] for t, dims in shapes)
  return out


def custom_calls(hlo: str) -> list[str]:
  """The distinct custom-call targets in optimised HLO text (tpu_custom_call: a Pallas
  kernel such as splash attention; cuDNN's fused attention on GPU)."""
  return sorted(set(re.findall(r'custom_call_target="([^"]+)"', hlo)))


def xla_temp_bytes(message: str) -> int | None:
  """The temporaries XLA needed, from its RESOURCE_EXHAUSTED line ("... required for HLO
  temporaries (41.32G) exceeds available HBM (15.75G)"); None if it does not say."""
  m = re.search(r"temporaries \(([0-9.]+)([KMGT])\)", message)
  return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2))) if m else None


def report(config, topology: str) -> dict:
  """Compiles the train step of `config` for `topology`; the report as a dict."""
  config_lib.check_config_keys(config)
  model_cfg = config_lib.validate(config)
  target = topologies.parse(topology)
  devices, hbm = target.devices(), target.memory
  model = build_model(model_cfg, config.task.head)
  t, seq_len = config.train, config.data.max_seq_len
  spec = batch_spec(config, t.batch_size)
  lay = state_lib.layout(config, model, {k: jax.ShapeDtypeStruct(*v) for k, v in spec.items()},
                         devices)
  batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=lay.batch_sharding)
           for k, (shape, dtype) in spec.items()}
  train_step, _ = jit_steps(lay, model, PRETRAINING[model_cfg.arch], t)
  tokens, fpt = pretrain_flops(config, model_cfg)  # T5: inputs + targets
  out = dict(topology=topology, device_kind=devices[0].device_kind, num_devices=len(devices),
             num_hosts=sharding.num_processes(lay.mesh), mesh=dict(lay.mesh.shape),
             global_batch=t.batch_size, seq_len=seq_len,
             model_flops_per_step=fpt * t.batch_size * tokens)
  memory = dict(params=_bytes_per_device(lay.abstract["params"]),
                opt_state=_bytes_per_device(lay.abstract["opt_state"]),
                batch=_bytes_per_device(batch), hbm=hbm)
  t0 = time.perf_counter()
  try:
    with lay.context():
      compiled = train_step.lower(lay.abstract, batch).compile()
  except Exception as e:  # XLA refuses a step that cannot fit in HBM
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    first = str(e).strip().splitlines()[0]
    temp = xla_temp_bytes(first)
    total = None if temp is None else memory["params"] + memory["opt_state"] + memory["batch"] + temp
    return dict(out, memory=dict(memory, temp=temp, total=total), fits=False,
                error=first[:500], compile_seconds=time.perf_counter() - t0)
  out["compile_seconds"] = time.perf_counter() - t0
  m = compiled.memory_analysis()
  memory.update(temp=int(m.temp_size_in_bytes), argument=int(m.argument_size_in_bytes),
                output=int(m.output_size_in_bytes), alias=int(m.alias_size_in_bytes))
  memory["total"] = (memory["argument"] + memory["output"] - memory["alias"] + memory["temp"])
  cost = compiled.cost_analysis()  # None for a GPU compiled without one
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  hlo = compiled.as_text()
  out.update(memory=memory, fits=hbm is None or memory["total"] <= hbm,
             xla_flops_per_device=float(cost["flops"]) if cost else None,
             collectives=collectives(hlo), custom_calls=custom_calls(hlo))
  return out


def advice(rep: dict) -> str:
  mem = rep["memory"]
  if mem.get("total"):
    need = (f"needs {mem['total'] / GIB:.1f} GiB per device, "
            f"{(mem['total'] - mem['hbm']) / GIB:.1f} GiB more than the {mem['hbm'] / GIB:.3g} GiB")
  else:
    need = f"does not fit in the {mem['hbm'] / GIB:.3g} GiB ({rep['error']})"
  return (f"the train step {need} of memory of a {rep['topology']} device; shard parameters and "
          "optimiser state with --config.mesh.fsdp=N, recompute activations with "
          "--config.model.remat=full, or lower --config.train.batch_size (or raise "
          "--config.train.grad_accum_steps)")


def _gib(n) -> str:
  if n is None:
    return "?"
  return f"{n / GIB:.2f} GiB" if n >= GIB / 4 else f"{n / 2**20:.1f} MiB"


def table(rep: dict) -> str:
  mem = rep["memory"]
  xla = rep.get("xla_flops_per_device")
  lines = [f"plmjax compile: {rep['topology']} ({rep['device_kind']}): {rep['num_devices']} "
           f"devices on {rep['num_hosts']} host(s), mesh {rep['mesh']}, global batch "
           f"{rep['global_batch']} x seq {rep['seq_len']}",
           "  per device: " + "  ".join(f"{k} {_gib(mem.get(k))}" for k in
                                        ("params", "opt_state", "batch", "temp", "total"))
           + (f"  of {_gib(mem['hbm'])}" if mem["hbm"] else "")
           + f"  -> {'fits' if rep['fits'] else 'DOES NOT FIT'}",
           f"  FLOPs per step: model {rep['model_flops_per_step']:.3g}"
           + (f", XLA per device {xla:.3g}" if xla else "")]
  if "collectives" in rep:
    lines.append("  collectives: " + ", ".join(
        f"{k} {v['count']} ({v['bytes'] / 2**20:.1f} MiB)" for k, v in rep["collectives"].items()))
  lines.append(f"  compiled in {rep['compile_seconds']:.1f} s")
  return "\n".join(lines)


def find_max_batch(config, topology: str, first: dict, max_compiles: int = 8):
  """The largest global batch that fits, by doubling (or halving) from the config's and
  then bisecting, in steps of the smallest batch the mesh and hosts accept; `first` is
  the config's own report. At most `max_compiles` more compiles. (batch or None, tried)."""
  ways = first["mesh"]["data"] * first["mesh"]["fsdp"] * config.train.grad_accum_steps
  unit = math.lcm(ways, first["num_hosts"])
  tried = [(config.train.batch_size, first["fits"])]

  def fits(k: int) -> bool:
    c = config.copy_and_resolve_references()
    c.train.batch_size = k * unit
    tried.append((k * unit, report(c, topology)["fits"]))
    return tried[-1][1]

  k = config.train.batch_size // unit
  low, high = (k, None) if first["fits"] else (None, k)
  while len(tried) <= max_compiles and (low is None or high is None):
    if low is None:  # halve until it fits
      if high == 1:
        break
      low, high = (high // 2, high) if fits(high // 2) else (None, high // 2)
    else:  # double until it does not
      low, high = (2 * low, None) if fits(2 * low) else (low, 2 * low)
  while low is not None and high is not None and high - low > 1 and len(tried) <= max_compiles:
    mid = (low + high) // 2
    low, high = (mid, high) if fits(mid) else (low, mid)
  return (low * unit if low else None), tried


def add_arguments(parser):
  parser.add_argument("--config", help="config file, e.g. configs/bert_large.py")
  parser.add_argument("--topology", required=True,
                      help="Cloud TPU accelerator type (v4-8, v5litepod-16, v6e-8, ...), "
                      "a GPU count (h100-8, a100-16), cpu:N, or `list`")
  parser.add_argument("--out", help="write the report as JSON to this file")
  parser.add_argument("--find-max-batch", action="store_true",
                      help="also find the largest global batch that fits")
  parser.add_argument("--max-compiles", type=int, default=8,
                      help="compiles --find-max-batch may add (default 8)")
  parser.epilog = "Override any config key with --config.KEY=VALUE, e.g. --config.mesh.fsdp=8"


def main(args, overrides):
  if args.topology == "list":
    print(topologies.table())
    return 0
  if not args.config:
    raise UserError("--config is required (e.g. --config configs/bert_large.py)")
  config = config_lib.load_config(args.config, overrides)
  rep = report(config, args.topology)
  rep["config"] = args.config
  if args.find_max_batch:
    best, tried = find_max_batch(config, args.topology, rep, args.max_compiles)
    rep["max_global_batch"] = best
    rep["max_global_batch_tried"] = [dict(global_batch=b, fits=f) for b, f in tried]
  print(table(rep), flush=True)
  if args.find_max_batch:
    print(f"  largest global batch that fits: {rep['max_global_batch']} (tried "
          + ", ".join(f"{b} {'fits' if f else 'no'}" for b, f in tried) + ")", flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(rep, f, indent=2)
  if not rep["fits"]:
    print(f"plmjax: {advice(rep)}", file=sys.stderr, flush=True)
    return DOESNT_FIT
  return 0
