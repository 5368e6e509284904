"""Will it fit? The README's table: `plmjax compile` for the shipped configs on TPU slices.

  JAX_PLATFORMS=cpu python bench/compile_table.py [--part memory|max-batch|all] [--out F.json]
  python bench/compile_table.py --table F.json [G.json ...]     # markdown from saved parts

Per config (bert_base, bert_large, gpt2_small, gpt2_medium) and slice (v4-8, v5e-8): the
per-chip memory with data parallelism (mesh.data=-1) and with FSDP (mesh.fsdp=-1); then,
for bert_large and gpt2_medium on v5e-8 with FSDP, the largest global batch that fits
with and without remat (`--find-max-batch`: at most --max-compiles more compiles each). Every compile is
its own `plmjax compile` process; the markdown table goes to stdout. Needs libtpu
(pip install 'plmjax[tpu]'); each BERT-large/GPT-2-medium compile takes minutes on 2 cores.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

from plmjax.train import compile as compile_lib

GIB = 1024**3
CONFIGS = ("bert_base", "bert_large", "gpt2_small", "gpt2_medium")
TOPOLOGIES = ("v4-8", "v5e-8")
MODES = {"dp": ("--config.mesh.data=-1", "--config.mesh.fsdp=1"),
         "fsdp": ("--config.mesh.data=1", "--config.mesh.fsdp=-1")}


def compile_report(config: str, topology: str, *extra: str) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "report.json")
    cmd = [sys.executable, "-m", "plmjax.cli", "compile", "--config", f"configs/{config}.py",
           "--topology", topology, "--out", out, *extra]
    done = subprocess.run(cmd, capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    if done.returncode not in (0, 3):
      raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    with open(out) as f:
      rep = json.load(f)
  rep["command"] = " ".join(["plmjax compile", "--config", f"configs/{config}.py",
                             "--topology", topology, *extra])
  print(f"  {rep['command']}: fits={rep['fits']} ({rep['compile_seconds']:.0f} s)",
        file=sys.stderr, flush=True)
  return rep


def gib(n) -> str:
  return "-" if n is None else f"{n / GIB:.1f}"


def print_tables(rows, best):
  if rows:
    print("| config | slice | mesh (data x fsdp) | global batch x seq | params | opt_state | "
          "temp | total | HBM | fits |")
    print("|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    m = r["memory"]
    if m.get("temp") is None and r.get("error"):  # XLA refused it: its own figure
      m["temp"] = compile_lib.xla_temp_bytes(r["error"])
      if m["temp"] is not None:
        m["total"] = m["params"] + m["opt_state"] + m["batch"] + m["temp"]
    print(f"| {r['name']} | {r['topology']} | {r['mode']} {r['mesh']['data']}x"
          f"{r['mesh']['fsdp']} | {r['global_batch']} x {r['seq_len']} | {gib(m['params'])} | "
          f"{gib(m['opt_state'])} | {gib(m.get('temp'))} | {gib(m.get('total'))} | "
          f"{gib(m['hbm'])} | {'yes' if r['fits'] else 'no'} |")
  if best:
    print("\n| config (v5e-8, FSDP 1x8) | remat | largest global batch that fits | batches tried |")
    print("|---|---|---|---|")
  for r in best:
    tried = ", ".join(f"{t['global_batch']}{'' if t['fits'] else ' (no)'}"
                      for t in r["max_global_batch_tried"])
    print(f"| {r['name']} | {r['remat']} | {r['max_global_batch']} | {tried} |")


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--part", default="all", choices=("memory", "max-batch", "all"))
  parser.add_argument("--configs", default=",".join(CONFIGS))
  parser.add_argument("--max-compiles", type=int, default=8)
  parser.add_argument("--out", default="bench/compile_table.json")
  parser.add_argument("--table", nargs="+", help="print the markdown of saved JSON parts")
  args = parser.parse_args()
  rows, best = [], []
  if args.table:
    for path in args.table:
      with open(path) as f:
        saved = json.load(f)
      rows += saved["memory"]
      best += saved["max_batch"]
    print_tables(rows, best)
    return
  configs = args.configs.split(",")
  if args.part in ("memory", "all"):
    for config in configs:
      for topology in TOPOLOGIES:
        for mode, extra in MODES.items():
          rows.append(compile_report(config, topology, *extra))
          rows[-1].update(name=config, mode=mode)
  if args.part in ("max-batch", "all"):
    for config in [c for c in configs if c in ("bert_large", "gpt2_medium")]:
      for remat in ("none", "full"):
        rep = compile_report(config, "v5e-8", *MODES["fsdp"], f"--config.model.remat={remat}",
                             "--find-max-batch", f"--max-compiles={args.max_compiles}")
        rep.update(name=config, remat=remat)
        best.append(rep)
  with open(args.out, "w") as f:
    json.dump(dict(memory=rows, max_batch=best), f, indent=2)
  print_tables(rows, best)


if __name__ == "__main__":
  main()
