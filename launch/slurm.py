#!/usr/bin/env python3
"""Submit a plmjax command to SLURM on several GPU nodes (wraps launch/slurm.sbatch).

  python launch/slurm.py --nodes 4 --gpus-per-node 8 --partition gpu --time 48:00:00 \\
      -- pretrain --config configs/bert_base.py --workdir /shared/runs/bert_base
  python launch/slurm.py --nodes 2 --dry-run -- pretrain ...   # print the sbatch command

One task per node, each with all of that node's GPUs; the batch script sets the
coordinator (the first node) and each task's process id. The workdir must be on storage
that every node sees. This script's own flags come before the plmjax command.
"""

import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from runner import LaunchError, Runner, main_guard, split_plmjax_args  # noqa: E402

SBATCH_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "slurm.sbatch")


def known_commands():
  """plmjax's subcommands when plmjax is importable here (it need not be)."""
  try:
    from plmjax.cli import COMMANDS
  except ImportError:
    return None
  return set(COMMANDS)


def sbatch_command(ns, plmjax_args: list[str]) -> list[str]:
  if ns.nodes < 1:
    raise LaunchError(f"--nodes {ns.nodes} must be at least 1")
  if ns.gpus_per_node < 1:
    raise LaunchError(f"--gpus-per-node {ns.gpus_per_node} must be at least 1")
  if ns.time and not re.fullmatch(r"(\d+-)?\d+(:\d{1,2}){0,2}", ns.time):
    raise LaunchError(f"--time {ns.time!r} is not a SLURM time such as 48:00:00 or 2-00:00:00")
  known = known_commands()
  if known and plmjax_args[0] not in known:
    raise LaunchError(f"{plmjax_args[0]!r} is not a plmjax command; use one of "
                      f"{', '.join(sorted(known))}")
  # Flags on the sbatch command line override the script's #SBATCH lines.
  cmd = ["sbatch", f"--nodes={ns.nodes}", "--ntasks-per-node=1",
         f"--gpus-per-node={ns.gpus_per_node}"]
  for flag in ("partition", "account", "time", "job_name", "output"):
    value = getattr(ns, flag)
    if value:
      cmd.append(f"--{flag.replace('_', '-')}={value}")
  if ns.env:
    for item in ns.env:
      if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=[^,]*", item):
        raise LaunchError(f"--env {item!r} is not KEY=VALUE (without commas)")
    cmd.append("--export=ALL," + ",".join(ns.env))
  cmd += ns.sbatch_arg
  return cmd + [SBATCH_SCRIPT] + plmjax_args


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--nodes", type=int, default=2)
  parser.add_argument("--gpus-per-node", type=int, default=8)
  parser.add_argument("--partition", default="")
  parser.add_argument("--account", default="")
  parser.add_argument("--time", default="", help="time limit, e.g. 48:00:00")
  parser.add_argument("--job-name", default="")
  parser.add_argument("--output", default="", help="log file (default plmjax-JOBID.out)")
  parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                      help="extra environment variable for the job (repeatable)")
  parser.add_argument("--sbatch-arg", action="append", default=[], metavar="FLAG",
                      help="any other sbatch flag, e.g. --sbatch-arg=--exclusive (repeatable)")
  parser.add_argument("--dry-run", action="store_true", help="print the command, submit nothing")
  parser.add_argument("plmjax_args", nargs=argparse.REMAINDER,
                      help="the plmjax command, e.g. pretrain --config ... --workdir ...")
  ns = parser.parse_args(argv)
  plmjax_args = split_plmjax_args(ns.plmjax_args, "slurm.py")
  Runner(ns.dry_run).run(sbatch_command(ns, plmjax_args))


if __name__ == "__main__":
  sys.exit(main_guard(main))
