#!/usr/bin/env python3
"""One machine, several GPUs: run a plmjax command on them.

  python launch/gpu_node.py pretrain --config configs/bert_base.py --workdir runs/bert_base
  python launch/gpu_node.py --gpus 0,1,2,3 pretrain --config configs/gpt2_small.py --workdir runs/g
  python launch/gpu_node.py --num-processes 2 --gpus 0,1,2,3 pretrain ...   # 2 processes x 2 GPUs

By default one process sees all the chosen GPUs: jax splits the batch over them, nothing
else is needed. --num-processes N starts N processes with the GPUs divided between them,
joined through PLMJAX_COORDINATOR_ADDRESS / PLMJAX_NUM_PROCESSES / PLMJAX_PROCESS_ID on
127.0.0.1 (what a multi-node run does, on one machine). --platform cpu rehearses that on a
CPU-only machine with --cpu-devices virtual devices per process.
--dry-run prints the exact commands (with their environment) and runs nothing.
This script's own flags come before the plmjax command.
"""

import argparse
import os
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from runner import LaunchError, main_guard, shell_line, split_plmjax_args  # noqa: E402


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_envs(ns) -> list[dict]:
  """The environment each process gets on top of the current one."""
  n = ns.num_processes
  if n < 1:
    raise LaunchError(f"--num-processes {n} must be at least 1")
  base = {}
  if ns.platform == "cpu":
    base.update(JAX_PLATFORMS="cpu",
                XLA_FLAGS=f"--xla_force_host_platform_device_count={ns.cpu_devices}")
  elif ns.mem_fraction:
    if not 0 < ns.mem_fraction <= 1:
      raise LaunchError(f"--mem-fraction {ns.mem_fraction} must be in (0, 1]")
    # jax grabs 75% of each GPU up front by default.
    base["XLA_PYTHON_CLIENT_MEM_FRACTION"] = str(ns.mem_fraction)
  gpus = [g.strip() for g in ns.gpus.split(",") if g.strip()] if ns.gpus else []
  if ns.platform == "gpu" and n > 1 and not gpus:
    raise LaunchError("with --num-processes > 1, say which GPUs to divide: --gpus 0,1,2,3")
  if gpus and len(gpus) % n:
    raise LaunchError(f"--gpus {ns.gpus} ({len(gpus)} GPUs) does not divide evenly over "
                      f"--num-processes {n}")
  if n == 1:
    return [dict(base, CUDA_VISIBLE_DEVICES=",".join(gpus)) if gpus else base]
  port = ns.port or int(os.environ.get("PLMJAX_COORDINATOR_PORT") or free_port())
  per = len(gpus) // n
  envs = []
  for i in range(n):
    env = dict(base, PLMJAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
               PLMJAX_NUM_PROCESSES=str(n), PLMJAX_PROCESS_ID=str(i))
    if gpus:
      env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[i * per:(i + 1) * per])
    envs.append(env)
  return envs


def launch(cmd: list[str], envs: list[dict]) -> int:
  """Starts one process per env; the first failure ends the others. Returns the exit status."""
  procs = []
  try:
    for env in envs:
      procs.append(subprocess.Popen(cmd, env={**os.environ, **env}))
  except FileNotFoundError:
    for p in procs:
      p.terminate()
    raise LaunchError(f"{cmd[0]!r} is not on PATH; install plmjax (pip install -e .) or pass "
                      "--plmjax /path/to/plmjax") from None
  try:
    while True:
      codes = [p.poll() for p in procs]
      failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
      if failed:
        i, code = failed[0]
        for p in procs:
          if p.poll() is None:
            p.terminate()
        for p in procs:
          p.wait()
        if len(procs) > 1:
          print(f"gpu_node.py: process {i} exited with status {code}; stopped the others",
                file=sys.stderr)
        return code
      if all(c == 0 for c in codes):
        return 0
      time.sleep(0.2)
  except KeyboardInterrupt:
    for p in procs:
      p.terminate()
    for p in procs:
      p.wait()
    raise


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--gpus", default="", help="GPU ids to use, e.g. 0,1,2,3 (default: all)")
  parser.add_argument("--num-processes", type=int, default=1,
                      help="processes to start (the GPUs are divided between them)")
  parser.add_argument("--port", type=int, default=0, help="coordinator port (default: a free one)")
  parser.add_argument("--mem-fraction", type=float, default=0.0,
                      help="XLA_PYTHON_CLIENT_MEM_FRACTION, share of each GPU jax may take")
  parser.add_argument("--platform", choices=("gpu", "cpu"), default="gpu")
  parser.add_argument("--cpu-devices", type=int, default=4,
                      help="with --platform cpu: virtual devices per process")
  parser.add_argument("--plmjax", default="plmjax", help="the plmjax executable")
  parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
  parser.add_argument("plmjax_args", nargs=argparse.REMAINDER,
                      help="the plmjax command, e.g. pretrain --config ... --workdir ...")
  ns = parser.parse_args(argv)
  cmd = [ns.plmjax] + split_plmjax_args(ns.plmjax_args, "gpu_node.py")
  envs = process_envs(ns)
  if ns.dry_run:
    # Several processes run side by side: print them as a script that does the same.
    tail = " &" if len(envs) > 1 else ""
    for env in envs:
      print(shell_line(cmd, env) + tail)
    if len(envs) > 1:
      print("wait")
    return 0
  return launch(cmd, envs)


if __name__ == "__main__":
  sys.exit(main_guard(main))
