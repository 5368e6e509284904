"""Shared by the launch scripts: print or run commands, and fail with one clear line.

The scripts import nothing from plmjax or jax, so they run on a laptop that only has
`gcloud` or `sbatch` (and Python 3.10+).
"""

import os
import shlex
import subprocess
import sys


class LaunchError(Exception):
  """Bad input to a launch script, or a command that failed; printed as one line."""


def shell_line(cmd: list[str], env: dict | None = None) -> str:
  """The command as one shell line, `K=V ... cmd args` when it sets variables."""
  prefix = [f"{k}={shlex.quote(str(v))}" for k, v in (env or {}).items()]
  return " ".join(prefix + [shlex.quote(str(a)) for a in cmd])


class Runner:
  """Runs commands in order, or with dry_run prints exactly what it would run."""

  def __init__(self, dry_run: bool, out=None):
    self.dry_run = dry_run
    self.out = out or sys.stdout

  def run(self, cmd: list[str], env: dict | None = None, check: bool = True) -> int:
    """`env` adds to the current environment. Returns the exit status."""
    line = shell_line(cmd, env)
    if self.dry_run:
      print(line, file=self.out, flush=True)
      return 0
    print(f"+ {line}", file=sys.stderr, flush=True)
    full_env = {**os.environ, **{k: str(v) for k, v in env.items()}} if env else None
    try:
      rc = subprocess.run(cmd, env=full_env).returncode
    except FileNotFoundError:
      raise LaunchError(f"{cmd[0]!r} is not installed or not on PATH") from None
    if check and rc != 0:
      raise LaunchError(f"command failed with exit status {rc}: {line}")
    return rc


def split_plmjax_args(args: list[str], what: str) -> list[str]:
  """The plmjax command line given after the script's own flags (a leading `--` dropped)."""
  if args and args[0] == "--":
    args = args[1:]
  if not args:
    raise LaunchError(f"give the plmjax command to run after the {what} flags, e.g. "
                      "-- pretrain --config configs/bert_base.py --workdir DIR")
  if args[0].startswith("-"):
    raise LaunchError(f"the plmjax command must start with a subcommand (pretrain, finetune, "
                      f"export, ...), not {args[0]!r}")
  return args


def main_guard(main):
  """Calls `main()`; a LaunchError becomes one line on stderr and exit status 2."""
  try:
    return main() or 0
  except LaunchError as e:
    print(f"{sys.argv[0]}: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"{sys.argv[0]}: interrupted", file=sys.stderr)
    return 130
