#!/usr/bin/env python3
"""Cloud TPU VMs: create one, install plmjax on every worker, run, follow, stop, delete.

  python launch/tpu_vm.py create --name my-tpu --zone us-central2-b --accelerator-type v4-32
  python launch/tpu_vm.py setup  --name my-tpu --zone us-central2-b --bucket MY_BUCKET
  python launch/tpu_vm.py run    --name my-tpu --zone us-central2-b \\
      --config configs/bert_base.py --workdir /mnt/MY_BUCKET/runs/bert --config.train.steps=1000
  python launch/tpu_vm.py logs   --name my-tpu --zone us-central2-b
  python launch/tpu_vm.py stop   --name my-tpu --zone us-central2-b        # ends the run
  python launch/tpu_vm.py delete --name my-tpu --zone us-central2-b        # deletes the TPU

Every subcommand takes --dry-run (print the exact commands, run nothing) and --project.
`create --spot` asks for Spot capacity; `--queued` goes through a queued resource (then
pass --queued to `status` and `delete` too). `setup` copies this checkout (or clones
--repo) and installs it on every worker; with --bucket it also installs Cloud Storage
FUSE and mounts the bucket at the same path on every worker (/mnt/BUCKET, or --mount),
with --implicit-dirs; a bucket already mounted there is left alone.

`run` first compiles the pretraining step here for the TPU's accelerator type
(`plmjax compile`, needs `pip install -e '.[tpu]'` on this machine; the type comes from
--accelerator-type, else from `describe`) and refuses to start a step that does not fit
in HBM; --no-compile-check skips that. The run is started detached on every worker
(`--worker=all`), so closing the terminal does not stop it; its output goes to
~/plmjax-run.log on each worker and `logs` follows worker 0's. --workdir must be a path
every worker sees: a bucket mounted with Cloud Storage FUSE at the same place on each
worker (a bare gs:// workdir is not supported yet); tfds data may be on gs://. Before
starting, each worker checks with `findmnt -T WORKDIR -t fuse.gcsfuse` (on the nearest
existing parent if WORKDIR does not exist yet) and prints a `warning:` line when the
workdir is not on a gcsfuse mount there; the run starts anyway.
"""

import argparse
import os
import pathlib
import re
import shlex
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from runner import LaunchError, Runner, main_guard, shell_line  # noqa: E402

DEFAULT_RUNTIME = "tpu-ubuntu2204-base"
CODE_DIR = "$HOME/plmjax"  # on each worker
VENV = "$HOME/plmjax-venv"
LOG = "$HOME/plmjax-run.log"
PID = "$HOME/plmjax-run.pid"
EXIT = "$HOME/plmjax-run.exit"
TARBALL = "plmjax-code.tar.gz"  # in the worker's home
# Shell test: the recorded run is alive (a zombie not yet reaped counts as ended).
ALIVE = f'[ -s {PID} ] && ps -o stat= -p "$(cat {PID})" | grep -qv Z'
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
KEYRING = "/usr/share/keyrings/cloud.google.asc"  # Google's apt key, for gcsfuse
EXCLUDES = (".git", "*.egg-info", "__pycache__", ".pytest_cache", "venv", ".venv", "runs",
            "workdirs", "*.log")


def gcloud(ns, *args: str) -> list[str]:
  cmd = ["gcloud", "compute", "tpus", *args, f"--zone={ns.zone}"]
  return cmd + [f"--project={ns.project}"] if ns.project else cmd


def ssh(ns, command: str, worker: str = "all") -> list[str]:
  return gcloud(ns, "tpu-vm", "ssh", ns.name, f"--worker={worker}", f"--command={command}")


# ----- subcommands -----

def create(ns, runner: Runner):
  if not re.fullmatch(r"[a-z0-9]+-\d+", ns.accelerator_type):
    raise LaunchError(f"--accelerator-type {ns.accelerator_type!r} does not look like an "
                      "accelerator type such as v4-8, v4-32, v5litepod-16, v5p-8 or v6e-8")
  spot = ["--spot"] if ns.spot else []
  if ns.queued:
    runner.run(gcloud(ns, "queued-resources", "create", ns.name, f"--node-id={ns.name}",
                      f"--accelerator-type={ns.accelerator_type}",
                      f"--runtime-version={ns.runtime_version}", *spot))
  else:
    runner.run(gcloud(ns, "tpu-vm", "create", ns.name,
                      f"--accelerator-type={ns.accelerator_type}",
                      f"--version={ns.runtime_version}", *spot))


def install_command(ns) -> str:
  """Python >= 3.11 in a venv (the TPU images ship 3.10), then jax[tpu] and this code."""
  # uv fetches the Python version asked for. Newer images (PEP 668) need the second form.
  get_uv = "python3 -m pip install --user --quiet --upgrade uv"
  return (f"({get_uv} || {get_uv} --break-system-packages) && "
          f"python3 -m uv venv --allow-existing --python {shlex.quote(ns.python)} {VENV} && "
          f"python3 -m uv pip install --python {VENV}/bin/python {shlex.quote(ns.jax)} "
          f'-e "{CODE_DIR}[gcs]"')


def setup(ns, runner: Runner):
  bucket, mount = bucket_and_mount(ns)  # checked before anything runs
  if ns.repo:
    ref = shlex.quote(ns.branch or "HEAD")
    branch = f"--branch {shlex.quote(ns.branch)} " if ns.branch else ""
    fetch = (f"if [ -d {CODE_DIR}/.git ]; then git -C {CODE_DIR} fetch --depth 1 origin {ref} "
             f"&& git -C {CODE_DIR} checkout --force FETCH_HEAD; else git clone --depth 1 "
             f"{branch}{shlex.quote(ns.repo)} {CODE_DIR}; fi")
    runner.run(ssh(ns, f"set -e; {fetch}; {install_command(ns)}"))
  else:
    code = pathlib.Path(ns.local_code or REPO_ROOT).resolve()
    if not (code / "pyproject.toml").is_file():
      raise LaunchError(f"--local-code {str(code)!r} has no pyproject.toml; point it at the "
                        "plmjax checkout to copy")
    tarball = pathlib.Path(tempfile.gettempdir()) / f"plmjax-code-{ns.name}.tar.gz"
    runner.run(["tar", "-czf", str(tarball), *(f"--exclude={e}" for e in EXCLUDES),
                "-C", str(code), "."])
    runner.run(gcloud(ns, "tpu-vm", "scp", str(tarball), f"{ns.name}:{TARBALL}",
                      "--worker=all"))
    unpack = f"mkdir -p {CODE_DIR} && tar -xzf $HOME/{TARBALL} -C {CODE_DIR}"
    runner.run(ssh(ns, f"set -e; {unpack}; {install_command(ns)}"))
  if bucket:
    runner.run(ssh(ns, mount_command(bucket, mount)))


def bucket_and_mount(ns) -> tuple[str, str]:
  """--bucket without gs://, and where it goes; ("", "") without --bucket."""
  if not ns.bucket:
    if ns.mount:
      raise LaunchError("--mount needs --bucket: say which bucket to mount there")
    return "", ""
  bucket = ns.bucket.removeprefix("gs://").rstrip("/")
  if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]", bucket):
    raise LaunchError(f"--bucket {ns.bucket!r} is not a bucket name such as my-bucket or "
                      "gs://my-bucket (a folder inside it is not supported)")
  mount = ns.mount or f"/mnt/{bucket}"
  if not re.fullmatch(r"/[A-Za-z0-9._/-]+", mount):
    raise LaunchError(f"--mount {ns.mount!r} is not an absolute path of letters, digits and "
                      f"._-/ such as /mnt/{bucket}")
  return bucket, mount


def mount_command(bucket: str, mount: str) -> str:
  """Each worker: install gcsfuse from Google's apt repository (unless there), then mount
  the bucket as this user. gcsfuse runs as a daemon, so the mount outlives the ssh session
  (not a reboot: run setup again). A mount already there is left alone."""
  install = (f'echo "deb [signed-by={KEYRING}] https://packages.cloud.google.com/apt '
             f'gcsfuse-$(lsb_release -c -s) main" | sudo tee /etc/apt/sources.list.d/gcsfuse.list'
             f" > /dev/null && curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg"
             f" | sudo tee {KEYRING} > /dev/null && sudo apt-get update -qq && "
             f"sudo apt-get install -y -qq -o DPkg::Lock::Timeout=300 gcsfuse")
  return (f"set -eo pipefail; now=$(findmnt -n -o SOURCE -M {mount} || true); "
          f'if [ "$now" = {bucket} ]; then '
          f'echo "gs://{bucket} is already mounted at {mount} on $(hostname)"; exit 0; fi; '
          f'if [ -n "$now" ]; then echo "{mount} on $(hostname) already has $now mounted; '
          f'choose another --mount" >&2; exit 1; fi; '
          f"command -v gcsfuse > /dev/null || ({install}); "
          f"sudo mkdir -p {mount}; sudo chown $(id -u):$(id -g) {mount}; "
          f"gcsfuse --implicit-dirs {bucket} {mount}; "
          f'echo "mounted gs://{bucket} at {mount} on $(hostname)"')


def run_command(ns) -> str:
  """The shell line each worker runs: refuse if a run is going, else start one detached."""
  args = [ns.command]
  if ns.config:
    args += ["--config", ns.config]
  if ns.workdir:
    args += ["--workdir", ns.workdir]
  args += ns.overrides
  env = {"PLMJAX_DISTRIBUTED": "tpu"}  # join the other workers (plmjax.train.distributed)
  for item in ns.env:
    key, sep, value = item.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
      raise LaunchError(f"--env {item!r} is not KEY=VALUE")
    env[key] = value
  exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
  check = mount_check(ns.workdir) if ns.workdir and not ns.workdir.startswith("gs://") else ""
  plmjax = " ".join([f"{VENV}/bin/plmjax"] + [shlex.quote(a) for a in args])
  # The inner bash writes its own pid (setsid makes it a process-group leader, so `stop`
  # ends its children too) and the exit status for `logs`; nohup outlives the ssh session.
  job = shlex.quote(f'echo $$ > {PID}; "$0" "$@"; echo $? > {EXIT}')
  return (f"set -e; cd {CODE_DIR}; "
          f"if {ALIVE}; then "
          f"echo \"a plmjax run is still going on $(hostname) (pid $(cat {PID})); "
          f"end it with: tpu_vm.py stop\" >&2; exit 1; fi; {check}rm -f {PID} {EXIT}; "
          f"env {exports} setsid nohup bash -c {job} {plmjax} > {LOG} 2>&1 < /dev/null & "
          f"for i in $(seq 50); do [ -s {PID} ] && break; sleep 0.1; done; "
          f"echo \"started on $(hostname): pid $(cat {PID}), log {LOG}\"")


def mount_check(workdir: str) -> str:
  """Shell: a `warning:` line when the workdir (or, before it exists, its nearest existing
  parent) is not on a gcsfuse mount of this worker."""
  w = shlex.quote(workdir)
  return (f'd={w}; while [ ! -e "$d" ]; do d=$(dirname "$d"); done; '
          f'findmnt -T "$d" -t fuse.gcsfuse > /dev/null || echo "warning: --workdir "{w}" is '
          f"not on a Cloud Storage FUSE mount on $(hostname), so the workers do not share it "
          f'(tpu_vm.py setup --bucket BUCKET mounts one on every worker)" >&2; ')


def logs_command() -> str:
  return (f"if [ -f {PID} ]; then tail -n +1 -F --pid=$(cat {PID}) {LOG}; "
          f"else tail -n +1 {LOG}; fi; "
          f"if [ -f {EXIT} ]; then echo \"plmjax exited with status $(cat {EXIT})\"; fi")


def stop_command() -> str:
  """SIGTERM to the run's process group, then wait up to 10 s for it to go."""
  return (f"if {ALIVE}; then pid=$(cat {PID}); kill -TERM -- -$pid; "
          f"for i in $(seq 100); do {ALIVE} || break; sleep 0.1; done; "
          f"if {ALIVE}; then echo \"pid $pid on $(hostname) still runs 10 s after SIGTERM; "
          f"end it with kill -KILL -- -$pid\"; exit 1; fi; "
          f"echo \"stopped pid $pid on $(hostname)\"; "
          f"else echo \"no plmjax run on $(hostname)\"; fi")


def run(ns, runner: Runner):
  if ns.workdir.startswith("gs://"):
    print(f"warning: --workdir {ns.workdir}: plmjax writes config.json, metrics.jsonl and the "
          "tokenizer with plain file I/O; mount the bucket with gcsfuse on every worker and "
          "pass the mounted path (checkpoints alone may go to gs:// with "
          "--config.checkpoint.dir)", file=sys.stderr)
  command = run_command(ns)
  if ns.compile_check and ns.command == "pretrain":
    compile_check(ns, runner)
  runner.run(ssh(ns, command))
  if ns.follow:
    logs(ns, runner)


def accelerator_type(ns, runner: Runner) -> str:
  """--accelerator-type, else what `describe` says (a placeholder in a dry run)."""
  if ns.accelerator_type:
    return ns.accelerator_type
  cmd = gcloud(ns, "tpu-vm", "describe", ns.name, "--format=value(acceleratorType)")
  if runner.dry_run:
    runner.run(cmd)
    return "ACCELERATOR_TYPE"
  print(f"+ {shell_line(cmd)}", file=sys.stderr, flush=True)
  try:
    done = subprocess.run(cmd, capture_output=True, text=True)
  except FileNotFoundError:
    raise LaunchError("'gcloud' is not installed or not on PATH") from None
  if done.returncode != 0 or not done.stdout.strip():
    said = (done.stderr.strip().splitlines() or ["it printed nothing"])[-1]
    raise LaunchError(f"could not read the accelerator type of {ns.name} ({said}); pass "
                      "--accelerator-type, or --no-compile-check")
  return done.stdout.strip()


def compile_check(ns, runner: Runner):
  """`plmjax compile` on this machine, for the TPU's accelerator type: exit status 0 fits,
  3 does not fit in HBM (its last line says by how much), 2 bad input or no libtpu."""
  if not ns.config:
    raise LaunchError("pass --config: pretrain needs one (or --no-compile-check to skip the "
                      "compile check)")
  cmd = [sys.executable, "-m", "plmjax.cli", "compile", "--config",
         str(REPO_ROOT / ns.config), "--topology", accelerator_type(ns, runner),
         *(a for a in ns.overrides if a.startswith("--config."))]
  if runner.dry_run:
    runner.run(cmd)
    return
  print(f"+ {shell_line(cmd)}", file=sys.stderr, flush=True)
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  lines = []
  for line in proc.stdout:  # shown as it comes: compiling takes a while
    print(line, end="", file=sys.stderr, flush=True)
    if line.strip():
      lines.append(line.strip())
  rc = proc.wait()
  if rc == 0:
    return
  if rc == 3:
    raise LaunchError("not starting: the train step does not fit in the TPU's memory (see the "
                      "line above); change the config, or pass --no-compile-check to start "
                      "anyway")
  said = "\n".join(lines)
  if "pip install 'plmjax[tpu]'" in said or "No module named 'plmjax" in said:
    raise LaunchError(f"not starting: the compile check needs plmjax and libtpu in this "
                      f"Python: {shlex.quote(sys.executable)} -m pip install -e '.[tpu]' in "
                      f"{REPO_ROOT}, or pass --no-compile-check")
  raise LaunchError(f"not starting: the compile check failed with exit status {rc}: "
                    f"{lines[-1] if lines else 'no output'} (or pass --no-compile-check)")


def logs(ns, runner: Runner):
  try:
    runner.run(ssh(ns, logs_command(), worker=getattr(ns, "worker", "0")), check=False)
  except KeyboardInterrupt:
    print("stopped following; the run goes on (tpu_vm.py logs to follow again, "
          "tpu_vm.py stop to end it)", file=sys.stderr)


def stop(ns, runner: Runner):
  runner.run(ssh(ns, stop_command()))


def status(ns, runner: Runner):
  kind = "queued-resources" if ns.queued else "tpu-vm"
  runner.run(gcloud(ns, kind, "describe", ns.name))


def delete(ns, runner: Runner):
  quiet = ["--quiet"] if ns.yes else []
  if ns.queued:
    runner.run(gcloud(ns, "queued-resources", "delete", ns.name, "--force", *quiet))
  else:
    runner.run(gcloud(ns, "tpu-vm", "delete", ns.name, *quiet))


# ----- command line -----

def build_parser() -> argparse.ArgumentParser:
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--name", required=True, help="TPU VM (node) name")
  common.add_argument("--zone", required=True, help="e.g. us-central2-b")
  common.add_argument("--project", default="", help="default: gcloud's configured project")
  common.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
  queued = argparse.ArgumentParser(add_help=False)
  queued.add_argument("--queued", action="store_true",
                      help="the TPU is (to be) a queued resource of the same name")

  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)

  p = sub.add_parser("create", parents=[common, queued], help="create the TPU VM")
  p.add_argument("--accelerator-type", default="v4-8", help="v4-8, v4-32, v5litepod-16, ...")
  p.add_argument("--runtime-version", default=DEFAULT_RUNTIME,
                 help=f"TPU VM image (default {DEFAULT_RUNTIME}; v6e: v2-alpha-tpuv6e)")
  p.add_argument("--spot", action="store_true", help="Spot capacity (cheaper, preemptible)")
  p.set_defaults(func=create)

  p = sub.add_parser("setup", parents=[common], help="copy or clone the code, install it")
  src = p.add_mutually_exclusive_group()
  src.add_argument("--local-code", default="", help="checkout to copy (default: this one)")
  src.add_argument("--repo", default="", help="git URL to clone on every worker instead")
  p.add_argument("--branch", default="", help="with --repo: branch or tag")
  p.add_argument("--python", default="3.11", help="Python version for the venv")
  p.add_argument("--jax", default="jax[tpu]", help="jax requirement, e.g. 'jax[tpu]==0.10.2'")
  p.add_argument("--bucket", default="",
                 help="also mount this Cloud Storage bucket on every worker with gcsfuse")
  p.add_argument("--mount", default="", help="with --bucket: where (default /mnt/BUCKET)")
  p.set_defaults(func=setup)

  p = sub.add_parser("run", parents=[common], help="start plmjax on every worker")
  p.add_argument("--command", default="pretrain", help="plmjax subcommand (default pretrain)")
  p.add_argument("--config", default="", help="config file, relative to the code directory")
  p.add_argument("--workdir", default="",
                 help="a path every worker sees, e.g. a gcsfuse mount /mnt/BUCKET/run")
  p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                 help="environment variable for the run (repeatable)")
  p.add_argument("--no-follow", dest="follow", action="store_false",
                 help="return after starting instead of following worker 0's log")
  p.add_argument("--accelerator-type", default="",
                 help="for the compile check (default: what `describe` says), e.g. v4-32")
  p.add_argument("--no-compile-check", dest="compile_check", action="store_false",
                 help="start without first compiling the step here (plmjax compile)")
  p.set_defaults(func=run)

  p = sub.add_parser("logs", parents=[common], help="follow a worker's log until the run ends")
  p.add_argument("--worker", default="0", help="worker index, or all")
  p.set_defaults(func=logs)

  p = sub.add_parser("stop", parents=[common], help="end the run on every worker")
  p.set_defaults(func=stop)
  p = sub.add_parser("status", parents=[common, queued], help="describe the TPU")
  p.set_defaults(func=status)
  p = sub.add_parser("delete", parents=[common, queued], help="delete the TPU")
  p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
  p.set_defaults(func=delete)
  return parser


def main(argv=None):
  parser = build_parser()
  ns, extra = parser.parse_known_args(argv)
  passthrough = extra[extra.index("--") + 1:] if "--" in extra else []
  extra = extra[:extra.index("--")] if "--" in extra else extra
  unknown = [a for a in extra if not (ns.subcommand == "run" and a.startswith("--config."))]
  if unknown:
    parser.error(f"unrecognized arguments: {' '.join(unknown)}")
  ns.overrides = [a for a in extra if a.startswith("--config.")] + passthrough
  if passthrough and ns.subcommand != "run":
    parser.error(f"arguments after -- are only for run: {' '.join(passthrough)}")
  ns.func(ns, Runner(ns.dry_run))


if __name__ == "__main__":
  sys.exit(main_guard(main))
