"""launch/ scripts: --dry-run output, and the commands they run against stand-in
gcloud/sbatch/srun/scontrol/plmjax programs that record their arguments.

The shell lines the TPU scripts send over ssh are also run here, in a sandbox HOME,
to check that they start, follow, refuse and stop a (stand-in) run as they claim.
"""

import json
import os
import pathlib
import shlex
import subprocess
import sys
import tarfile
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"

RECORDER = f"""#!{sys.executable}
import json, os, sys, time
env = {{k: v for k, v in os.environ.items()
        if k.startswith(("PLMJAX_", "CUDA_", "XLA_", "JAX_")) or k in ("GREETING",)}}
with open(os.environ["FAKE_LOG"], "a") as f:
  f.write(json.dumps({{"prog": os.path.basename(sys.argv[0]), "argv": sys.argv[1:],
                      "env": env, "cwd": os.getcwd()}}) + "\\n")
if os.environ.get("PLMJAX_PROCESS_ID", "-") == os.environ.get("FAKE_FAIL_ID"):
  sys.exit(3)
print(os.environ.get("FAKE_STDOUT", ""), end="")
time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
sys.exit(int(os.environ.get("FAKE_EXIT", "0")))
"""

# A python3 whose pip refuses user installs unless told --break-system-packages.
PEP668_PYTHON = f"""#!{sys.executable}
import sys
if sys.argv[1:3] == ["-m", "pip"] and "--break-system-packages" not in sys.argv:
  import json, os
  with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({{"prog": "python3", "argv": sys.argv[1:]}}) + "\\n")
  sys.exit(1)
"""

# Runs the command once per task, as srun would, with that task's SLURM_PROCID.
FAKE_SRUN = """#!/bin/bash
echo "$*" > "$FAKE_LOG.srun"
n=1
while [[ "$1" == -* ]]; do [[ "$1" == --ntasks=* ]] && n=${1#--ntasks=}; shift; done
for ((i = 0; i < n; i++)); do SLURM_PROCID=$i "$@" || exit $?; done
"""

# Worker-side stand-ins for setup --bucket and the workdir check. findmnt: `-T DIR -t
# fuse.gcsfuse` succeeds when FAKE_ON_GCSFUSE is set; `-n -o SOURCE -M DIR` prints
# FAKE_MOUNTED. sudo records (with what `tee` was given) and runs nothing, except that
# `apt-get install` puts a recording gcsfuse next to it.
FAKE_FINDMNT = """#!/bin/bash
echo "$*" >> "$FAKE_LOG.findmnt"
if [ "$1" = -T ]; then [ -n "$FAKE_ON_GCSFUSE" ]; exit; fi
[ -n "$FAKE_MOUNTED" ] && echo "$FAKE_MOUNTED"
"""

FAKE_SUDO = f"""#!{sys.executable}
import json, os, shutil, sys
stdin = sys.stdin.read() if sys.argv[1] == "tee" else None
with open(os.environ["FAKE_LOG"], "a") as f:
  f.write(json.dumps({{"prog": "sudo", "argv": sys.argv[1:], "stdin": stdin}}) + "\\n")
if sys.argv[1] == "apt-get" and "install" in sys.argv:
  bin_dir = os.path.dirname(sys.argv[0])
  shutil.copy(os.path.join(bin_dir, "curl"), os.path.join(bin_dir, "gcsfuse"))
"""

# `python -m plmjax.cli compile ...` finds this package first (PYTHONPATH): it records its
# arguments, prints FAKE_COMPILE_SAYS and exits with FAKE_COMPILE_EXIT.
FAKE_COMPILE = """import json, os, sys
with open(os.environ["FAKE_LOG"], "a") as f:
  f.write(json.dumps({"prog": "plmjax.cli", "argv": sys.argv[1:]}) + "\\n")
print("compiling the train step ...")
print(os.environ.get("FAKE_COMPILE_SAYS", "fits: 12.1 of 31.2 GiB of HBM per chip"))
sys.exit(int(os.environ.get("FAKE_COMPILE_EXIT", "0")))
"""

FAKE_SCONTROL = """#!/bin/bash
[[ "$1 $2" == "show hostnames" && "$3" == "gpu[003-004]" ]] || exit 1
printf 'gpu003\\ngpu004\\n'
"""


def _write_exe(path: pathlib.Path, text: str):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  path.chmod(0o755)


@pytest.fixture
def fake(tmp_path):
  """A bin/ of stand-ins on PATH; `fake.records()` reads what they were called with."""
  bin_dir = tmp_path / "bin"
  for name in ("gcloud", "sbatch", "plmjax"):
    _write_exe(bin_dir / name, RECORDER)
  _write_exe(bin_dir / "srun", FAKE_SRUN)
  _write_exe(bin_dir / "scontrol", FAKE_SCONTROL)
  log = tmp_path / "calls.jsonl"

  class Fake:
    env = {**{k: v for k, v in os.environ.items()
              if not k.startswith(("PLMJAX_", "SLURM_", "JAX_", "XLA_", "CUDA_"))},
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_LOG": str(log)}
    dir = tmp_path

    @staticmethod
    def records():
      return [json.loads(l) for l in log.read_text().splitlines()] if log.exists() else []

  return Fake


def run_script(fake, script, *args, extra_env=None, timeout=60):
  cmd = [sys.executable, str(LAUNCH / script), *args]
  if script.endswith(".sbatch"):
    cmd = ["bash", str(LAUNCH / script), *args]
  return subprocess.run(cmd, env={**fake.env, **(extra_env or {})}, capture_output=True,
                        text=True, timeout=timeout, cwd=fake.dir)


def dry_lines(result):
  assert result.returncode == 0, result.stderr
  return [shlex.split(line) for line in result.stdout.splitlines()]


def gcloud_calls(fake):
  return [["gcloud"] + r["argv"] for r in fake.records() if r["prog"] == "gcloud"]


def command_of(argv):
  """The --command=... of a recorded `gcloud ... ssh`."""
  return next(a[len("--command="):] for a in argv if a.startswith("--command="))


TPU = ["--name", "tpu1", "--zone", "us-central2-b"]


# ----- Cloud TPU -----

def test_tpu_create_direct_and_queued(fake):
  args = ["create", *TPU, "--accelerator-type", "v4-32", "--spot", "--project", "proj"]
  expected = ["gcloud", "compute", "tpus", "tpu-vm", "create", "tpu1",
              "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", "--spot",
              "--zone=us-central2-b", "--project=proj"]
  assert dry_lines(run_script(fake, "tpu_vm.py", *args, "--dry-run")) == [expected]
  assert fake.records() == []  # dry run ran nothing
  assert run_script(fake, "tpu_vm.py", *args).returncode == 0
  assert gcloud_calls(fake) == [expected]

  queued = dry_lines(run_script(fake, "tpu_vm.py", "create", *TPU, "--queued",
                                "--accelerator-type", "v5litepod-16",
                                "--runtime-version", "v2-alpha-tpuv5-lite", "--dry-run"))
  assert queued == [["gcloud", "compute", "tpus", "queued-resources", "create", "tpu1",
                     "--node-id=tpu1", "--accelerator-type=v5litepod-16",
                     "--runtime-version=v2-alpha-tpuv5-lite", "--zone=us-central2-b"]]


def test_tpu_status_stop_delete(fake):
  for args, want in [
      (["status"], ["tpu-vm", "describe", "tpu1"]),
      (["status", "--queued"], ["queued-resources", "describe", "tpu1"]),
      (["delete"], ["tpu-vm", "delete", "tpu1"]),
      (["delete", "--yes"], ["tpu-vm", "delete", "tpu1", "--quiet"]),
      (["delete", "--queued"], ["queued-resources", "delete", "tpu1", "--force"])]:
    [line] = dry_lines(run_script(fake, "tpu_vm.py", *args, *TPU, "--dry-run"))
    assert line == ["gcloud", "compute", "tpus", *want, "--zone=us-central2-b"]
  [stop] = dry_lines(run_script(fake, "tpu_vm.py", "stop", *TPU, "--dry-run"))
  assert stop[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "tpu1", "--worker=all"]


def test_tpu_bad_input_is_one_line(fake):
  bad = run_script(fake, "tpu_vm.py", "create", *TPU, "--accelerator-type", "v4_32")
  assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
  assert "--accelerator-type 'v4_32' does not look like an accelerator type" in bad.stderr
  bad = run_script(fake, "tpu_vm.py", "run", *TPU, "--env", "NOEQUALS", "--dry-run")
  assert bad.returncode == 2 and "--env 'NOEQUALS' is not KEY=VALUE" in bad.stderr
  bad = run_script(fake, "tpu_vm.py", "stop", *TPU, "--config.train.steps=5")
  assert bad.returncode == 2 and "unrecognized arguments: --config.train.steps=5" in bad.stderr
  bad = run_script(fake, "tpu_vm.py", "setup", *TPU, "--local-code", str(fake.dir))
  assert bad.returncode == 2 and "has no pyproject.toml" in bad.stderr
  assert gcloud_calls(fake) == []


def _code_dir(tmp_path):
  code = tmp_path / "code"
  for rel in ("pyproject.toml", "plmjax/__init__.py", "configs/bert_tiny.py",
              ".git/HEAD", "runs/old/metrics.jsonl", "plmjax/__pycache__/x.pyc"):
    (code / rel).parent.mkdir(parents=True, exist_ok=True)
    (code / rel).write_text("x\n")
  return code


def test_tpu_setup_copies_code_and_installs(fake, tmp_path):
  name = f"t{os.getpid()}"
  args = ["setup", "--name", name, "--zone", "z1", "--local-code", str(_code_dir(tmp_path))]
  dry = dry_lines(run_script(fake, "tpu_vm.py", *args, "--dry-run"))
  result = run_script(fake, "tpu_vm.py", *args)
  assert result.returncode == 0, result.stderr
  calls = gcloud_calls(fake)
  assert calls == dry[1:]  # the dry run printed exactly what ran (after the local tar)
  tarball = pathlib.Path(dry[0][2])
  assert dry[0][:2] == ["tar", "-czf"] and tarball.is_file()
  assert calls[0] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", str(tarball),
                      f"{name}:plmjax-code.tar.gz", "--worker=all", "--zone=z1"]
  with tarfile.open(tarball) as tar:
    names = {pathlib.PurePosixPath(n).as_posix().lstrip("./") for n in tar.getnames()}
  assert {"pyproject.toml", "plmjax/__init__.py", "configs/bert_tiny.py"} <= names
  assert not any(n.startswith((".git", "runs")) or "__pycache__" in n for n in names)
  assert calls[1][5:7] == [name, "--worker=all"]

  # What every worker runs: unpack into ~/plmjax, then uv + jax[tpu] + this code.
  home = tmp_path / "home"
  home.mkdir()
  tarball.replace(home / "plmjax-code.tar.gz")
  _write_exe(tmp_path / "workerbin" / "python3", RECORDER)
  env = {**fake.env, "HOME": str(home),
         "PATH": f"{tmp_path / 'workerbin'}{os.pathsep}{fake.env['PATH']}"}
  done = subprocess.run(["bash", "-c", command_of(calls[1])], env=env, capture_output=True,
                        text=True, timeout=60)
  assert done.returncode == 0, done.stderr
  assert (home / "plmjax" / "configs" / "bert_tiny.py").is_file()
  get_uv = ["-m", "pip", "install", "--user", "--quiet", "--upgrade", "uv"]
  rest = [["-m", "uv", "venv", "--allow-existing", "--python", "3.11", f"{home}/plmjax-venv"],
          ["-m", "uv", "pip", "install", "--python", f"{home}/plmjax-venv/bin/python",
           "jax[tpu]", "-e", f"{home}/plmjax[gcs]"]]
  assert [r["argv"] for r in fake.records() if r["prog"] == "python3"] == [get_uv] + rest

  # An image whose system pip refuses --user installs (PEP 668) gets the second form.
  _write_exe(tmp_path / "workerbin" / "python3", PEP668_PYTHON + RECORDER.split("\n", 1)[1])
  (tmp_path / "calls.jsonl").unlink()
  done = subprocess.run(["bash", "-c", command_of(calls[1])], env=env, capture_output=True,
                        text=True, timeout=60)
  assert done.returncode == 0, done.stderr
  assert [r["argv"] for r in fake.records()] == [
      get_uv, get_uv + ["--break-system-packages"]] + rest


def test_tpu_setup_from_git(fake):
  [line] = dry_lines(run_script(fake, "tpu_vm.py", "setup", *TPU, "--repo",
                                "https://example.com/me/plm jax.git", "--branch", "v1",
                                "--jax", "jax[tpu]==0.10.2", "--dry-run"))
  remote = command_of(line)
  assert ("git clone --depth 1 --branch v1 'https://example.com/me/plm jax.git' "
          "$HOME/plmjax") in remote
  assert "fetch --depth 1 origin v1" in remote and "'jax[tpu]==0.10.2'" in remote


def test_tpu_run_starts_on_all_workers_and_follows(fake):
  args = ["run", *TPU, "--config", "configs/bert_base.py", "--workdir", "/mnt/bkt/runs/b",
          "--config.train.steps=100", "--env", "GREETING=hi there", "--no-compile-check",
          "--", "--debug"]
  dry = dry_lines(run_script(fake, "tpu_vm.py", "run", "--dry-run", *args[1:]))
  assert fake.records() == []
  assert run_script(fake, "tpu_vm.py", *args).returncode == 0
  calls = gcloud_calls(fake)
  assert calls == dry and len(calls) == 2
  start, follow = calls
  assert start[4:7] == ["ssh", "tpu1", "--worker=all"]
  assert follow[4:7] == ["ssh", "tpu1", "--worker=0"] and "tail" in command_of(follow)
  assert "PLMJAX_DISTRIBUTED=tpu" in command_of(start)
  no_follow = dry_lines(run_script(fake, "tpu_vm.py", "run", "--no-follow", "--dry-run",
                                   *args[1:]))
  assert no_follow == [start]
  assert "warning" not in run_script(fake, "tpu_vm.py", "run", "--dry-run", *args[1:]).stderr
  bare = run_script(fake, "tpu_vm.py", "run", *TPU, "--workdir", "gs://bkt/x", "--dry-run")
  assert "mount the bucket with gcsfuse" in bare.stderr


def _sandbox_worker(tmp_path):
  home = tmp_path / "worker-home"
  (home / "plmjax").mkdir(parents=True)
  _write_exe(home / "plmjax-venv" / "bin" / "plmjax", RECORDER)
  return home


def _wait_gone(pid_file: pathlib.Path, seconds=20):
  pid = int(pid_file.read_text())
  deadline = time.monotonic() + seconds
  while time.monotonic() < deadline:
    try:
      state = pathlib.Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0]
    except (FileNotFoundError, IndexError):
      return
    if state == "Z":
      return
    time.sleep(0.05)
  raise AssertionError(f"pid {pid} still running")


def test_tpu_worker_side_run_logs_stop(fake, tmp_path):
  """The ssh command lines, run in a sandbox HOME with a stand-in plmjax."""
  args = ["--config", "configs/bert_base.py", "--workdir", "gs://bkt/r",
          "--config.train.steps=100", "--env", "GREETING=hi there", "--no-follow",
          "--no-compile-check", "--dry-run"]
  [start] = dry_lines(run_script(fake, "tpu_vm.py", "run", *TPU, *args))
  [logs] = dry_lines(run_script(fake, "tpu_vm.py", "logs", *TPU, "--dry-run"))
  [stop] = dry_lines(run_script(fake, "tpu_vm.py", "stop", *TPU, "--dry-run"))
  home = _sandbox_worker(tmp_path)

  def on_worker(line, **env):
    return subprocess.run(["bash", "-c", command_of(line)], capture_output=True, text=True,
                          env={**fake.env, "HOME": str(home), **env}, timeout=60)

  # A run that finishes: started detached, then `logs` prints its output and exit status.
  started = on_worker(start, FAKE_EXIT="0")
  assert started.returncode == 0, started.stderr
  assert "started on" in started.stdout
  _wait_gone(home / "plmjax-run.pid")
  [rec] = [r for r in fake.records() if r["prog"] == "plmjax"]
  assert rec["argv"] == ["pretrain", "--config", "configs/bert_base.py", "--workdir",
                         "gs://bkt/r", "--config.train.steps=100"]
  assert rec["env"]["PLMJAX_DISTRIBUTED"] == "tpu" and rec["env"]["GREETING"] == "hi there"
  assert rec["cwd"] == str(home / "plmjax")
  shown = on_worker(logs)
  assert shown.returncode == 0 and "plmjax exited with status 0" in shown.stdout

  # A long run: a second start is refused, `stop` ends it, a second `stop` finds nothing.
  assert on_worker(start, FAKE_SLEEP="60").returncode == 0
  again = on_worker(start)
  assert again.returncode == 1 and "a plmjax run is still going" in again.stderr
  stopped = on_worker(stop)
  assert stopped.returncode == 0 and "stopped pid" in stopped.stdout, stopped.stderr
  _wait_gone(home / "plmjax-run.pid", seconds=5)
  assert "no plmjax run" in on_worker(stop).stdout


def test_tpu_setup_bucket_dry_run_and_bad_input(fake):
  repo = ["--repo", "https://example.com/plmjax.git"]
  install, mount = dry_lines(run_script(fake, "tpu_vm.py", "setup", *TPU, *repo, "--bucket",
                                        "gs://my-bkt/", "--dry-run"))
  assert mount[4:7] == ["ssh", "tpu1", "--worker=all"] and install[4:7] == mount[4:7]
  assert "gcsfuse --implicit-dirs my-bkt /mnt/my-bkt;" in command_of(mount)
  [_, there] = dry_lines(run_script(fake, "tpu_vm.py", "setup", *TPU, *repo, "--bucket",
                                    "my-bkt", "--mount", "/data/bkt", "--dry-run"))
  assert "gcsfuse --implicit-dirs my-bkt /data/bkt;" in command_of(there)
  for args, message in [
      (["--bucket", "My_Bucket"], "--bucket 'My_Bucket' is not a bucket name"),
      (["--bucket", "gs://bkt/runs"], "a folder inside it is not supported"),
      (["--bucket", "bkt", "--mount", "data/bkt"], "--mount 'data/bkt' is not an absolute path"),
      (["--mount", "/data/bkt"], "--mount needs --bucket")]:
    bad = run_script(fake, "tpu_vm.py", "setup", *TPU, *repo, *args, "--dry-run")
    assert bad.returncode == 2 and bad.stdout == "", args
    assert len(bad.stderr.splitlines()) == 1 and message in bad.stderr, (args, bad.stderr)


def test_tpu_setup_bucket_on_worker(fake, tmp_path):
  """The mount command in a sandbox: installs gcsfuse once, mounts, then leaves it alone."""
  mount = tmp_path / "mnt" / "my-bkt"
  [_, line] = dry_lines(run_script(fake, "tpu_vm.py", "setup", *TPU, "--repo", "r",
                                   "--bucket", "my-bkt", "--mount", str(mount), "--dry-run"))
  bin_dir = tmp_path / "workerbin"
  _write_exe(bin_dir / "findmnt", FAKE_FINDMNT)
  _write_exe(bin_dir / "sudo", FAKE_SUDO)
  _write_exe(bin_dir / "curl", RECORDER)
  _write_exe(bin_dir / "lsb_release", "#!/bin/bash\n[ \"$*\" = \"-c -s\" ] && echo jammy\n")
  env = {**fake.env, "PATH": f"{bin_dir}{os.pathsep}{fake.env['PATH']}"}

  def on_worker(**extra):
    (tmp_path / "calls.jsonl").unlink(missing_ok=True)
    done = subprocess.run(["bash", "-c", command_of(line)], capture_output=True, text=True,
                          env={**env, **extra}, timeout=60)
    return done, [[r["prog"], *r["argv"]] for r in fake.records()]

  keyring = "/usr/share/keyrings/cloud.google.asc"
  owner = f"{os.getuid()}:{os.getgid()}"
  mounting = [["sudo", "mkdir", "-p", str(mount)], ["sudo", "chown", owner, str(mount)],
              ["gcsfuse", "--implicit-dirs", "my-bkt", str(mount)]]
  done, calls = on_worker()
  assert done.returncode == 0, done.stderr
  assert calls == [
      ["sudo", "tee", "/etc/apt/sources.list.d/gcsfuse.list"],
      ["curl", "-fsSL", "https://packages.cloud.google.com/apt/doc/apt-key.gpg"],
      ["sudo", "tee", keyring], ["sudo", "apt-get", "update", "-qq"],
      ["sudo", "apt-get", "install", "-y", "-qq", "-o", "DPkg::Lock::Timeout=300", "gcsfuse"],
      *mounting]
  repo = "https://packages.cloud.google.com/apt gcsfuse-jammy main"
  assert fake.records()[0]["stdin"] == f"deb [signed-by={keyring}] {repo}\n"
  assert f"mounted gs://my-bkt at {mount}" in done.stdout

  done, calls = on_worker()  # gcsfuse is there now: not installed again
  assert done.returncode == 0 and calls == mounting, done.stderr
  done, calls = on_worker(FAKE_MOUNTED="my-bkt")  # already mounted: nothing to do
  assert done.returncode == 0 and calls == [], done.stderr
  assert f"gs://my-bkt is already mounted at {mount}" in done.stdout
  done, calls = on_worker(FAKE_MOUNTED="other-bkt")
  assert done.returncode == 1 and calls == []
  assert "already has other-bkt mounted; choose another --mount" in done.stderr


def test_tpu_run_warns_when_workdir_is_not_on_gcsfuse(fake, tmp_path):
  """Each worker checks the workdir (its nearest existing parent) with findmnt first."""
  (tmp_path / "bkt").mkdir()
  workdir = tmp_path / "bkt" / "runs" / "r1"
  home = _sandbox_worker(tmp_path)
  _write_exe(tmp_path / "workerbin" / "findmnt", FAKE_FINDMNT)
  env = {**fake.env, "HOME": str(home),
         "PATH": f"{tmp_path / 'workerbin'}{os.pathsep}{fake.env['PATH']}"}

  def start(workdir, **extra):
    [line] = dry_lines(run_script(fake, "tpu_vm.py", "run", *TPU, "--workdir", workdir,
                                  "--no-follow", "--no-compile-check", "--dry-run"))
    done = subprocess.run(["bash", "-c", command_of(line)], capture_output=True, text=True,
                          env={**env, **extra}, timeout=60)
    assert done.returncode == 0 and "started on" in done.stdout, done.stderr
    _wait_gone(home / "plmjax-run.pid")
    return [l for l in done.stderr.splitlines() if l.startswith("warning:")]

  findmnt_log = pathlib.Path(fake.env["FAKE_LOG"] + ".findmnt")
  [warning] = start(str(workdir))
  assert warning.startswith(f"warning: --workdir {workdir} is not on a Cloud Storage FUSE "
                            "mount on ")
  assert "tpu_vm.py setup --bucket BUCKET" in warning
  assert findmnt_log.read_text() == f"-T {tmp_path / 'bkt'} -t fuse.gcsfuse\n"
  assert start(str(workdir), FAKE_ON_GCSFUSE="1") == []
  findmnt_log.unlink()
  assert start("gs://bkt/r") == [] and not findmnt_log.exists()  # warned about locally


def _fake_compile(fake):
  """`python -m plmjax.cli` runs FAKE_COMPILE (the launcher's cwd has no plmjax/)."""
  pkg = fake.dir / "fakepy" / "plmjax"
  pkg.mkdir(parents=True)
  (pkg / "__init__.py").write_text("")
  (pkg / "cli.py").write_text(FAKE_COMPILE)
  return {"PYTHONPATH": str(fake.dir / "fakepy")}


RUN = ["run", *TPU, "--config", "configs/bert_base.py", "--workdir", "/mnt/bkt/r",
       "--config.train.steps=100", "--no-follow"]
PASSED_ON = ["--", "--config.model.dropout=0", "--debug"]  # after the launcher's own flags
COMPILE = [sys.executable, "-m", "plmjax.cli", "compile", "--config",
           str(ROOT / "configs" / "bert_base.py"), "--topology"]
OVERRIDES = ["--config.train.steps=100", "--config.model.dropout=0"]


def test_tpu_run_compile_check_dry_run(fake):
  describe = ["gcloud", "compute", "tpus", "tpu-vm", "describe", "tpu1",
              "--format=value(acceleratorType)", "--zone=us-central2-b"]
  [*check, start] = dry_lines(run_script(fake, "tpu_vm.py", *RUN, "--dry-run", *PASSED_ON))
  assert check == [describe, COMPILE + ["ACCELERATOR_TYPE"] + OVERRIDES]
  assert start[4:7] == ["ssh", "tpu1", "--worker=all"]
  given = dry_lines(run_script(fake, "tpu_vm.py", *RUN, "--accelerator-type", "v5p-64",
                               "--dry-run", *PASSED_ON))
  assert given == [COMPILE + ["v5p-64"] + OVERRIDES, start]
  for skip in (["--no-compile-check"], ["--command", "finetune"]):
    [line] = dry_lines(run_script(fake, "tpu_vm.py", *RUN, *skip, "--dry-run", *PASSED_ON))
    assert line[4:7] == ["ssh", "tpu1", "--worker=all"]
  assert fake.records() == []


def test_tpu_run_compile_check_fits_then_starts(fake):
  env = _fake_compile(fake)
  done = run_script(fake, "tpu_vm.py", *RUN, "--accelerator-type", "v4-32", *PASSED_ON,
                    extra_env=env)
  assert done.returncode == 0, done.stderr
  assert "fits: 12.1 of 31.2 GiB of HBM per chip" in done.stderr
  compiled, started = fake.records()
  assert compiled["argv"] == COMPILE[3:] + ["v4-32"] + OVERRIDES
  assert started["prog"] == "gcloud" and started["argv"][3:5] == ["ssh", "tpu1"]

  (fake.dir / "calls.jsonl").unlink()  # the type from `describe`
  done = run_script(fake, "tpu_vm.py", *RUN, *PASSED_ON,
                    extra_env={**env, "FAKE_STDOUT": "v5litepod-16\n"})
  assert done.returncode == 0, done.stderr
  described, compiled, started = fake.records()
  assert described["argv"][3:5] == ["describe", "tpu1"]
  assert compiled["argv"] == COMPILE[3:] + ["v5litepod-16"] + OVERRIDES
  assert started["argv"][3:5] == ["ssh", "tpu1"]


def test_tpu_run_compile_check_refuses(fake):
  env = _fake_compile(fake)
  for exit_status, says, message in [
      ("3", "does not fit: 41.0 GiB of 31.2 GiB of HBM per chip; halve train.batch_size",
       "not starting: the train step does not fit in the TPU's memory (see the line above); "
       "change the config, or pass --no-compile-check to start anyway"),
      ("2", "plmjax: error: libtpu is not installed: pip install 'plmjax[tpu]'",
       f"{sys.executable} -m pip install -e '.[tpu]' in {ROOT}, or pass --no-compile-check"),
      ("1", "/usr/bin/python3: No module named 'plmjax'", "-m pip install -e '.[tpu]'"),
      ("2", "plmjax: error: unknown topology 'v9-8' (known: v4-8, v4-16, ...)",
       "the compile check failed with exit status 2: plmjax: error: unknown topology 'v9-8' "
       "(known: v4-8, v4-16, ...) (or pass --no-compile-check)")]:
    done = run_script(fake, "tpu_vm.py", *RUN, "--accelerator-type", "v9-8", *PASSED_ON,
                      extra_env={**env, "FAKE_COMPILE_EXIT": exit_status,
                                 "FAKE_COMPILE_SAYS": says})
    *shown, error = done.stderr.splitlines()
    assert done.returncode == 2 and says in shown, done.stderr
    assert "error: not starting:" in error and message in error, error
    assert [r["prog"] for r in fake.records()] == ["plmjax.cli"]  # no ssh: nothing started
    (fake.dir / "calls.jsonl").unlink()

  done = run_script(fake, "tpu_vm.py", *RUN, *PASSED_ON, extra_env={**env, "FAKE_EXIT": "1"})
  assert done.returncode == 2 and "could not read the accelerator type of tpu1" in done.stderr
  assert [r["prog"] for r in fake.records()] == ["gcloud"]


# ----- one GPU node -----

def test_gpu_node_single_process(fake):
  args = ["--gpus", "0,1", "--mem-fraction", "0.9", "pretrain", "--config", "configs/x.py",
          "--workdir", "runs/x", "--config.train.steps=5"]
  [line] = dry_lines(run_script(fake, "gpu_node.py", "--dry-run", *args))
  assert line == ["XLA_PYTHON_CLIENT_MEM_FRACTION=0.9", "CUDA_VISIBLE_DEVICES=0,1", "plmjax",
                  *args[4:]]
  assert run_script(fake, "gpu_node.py", *args).returncode == 0
  [rec] = fake.records()
  assert rec["argv"] == args[4:]
  assert rec["env"] == {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.9", "CUDA_VISIBLE_DEVICES": "0,1"}


def test_gpu_node_several_processes(fake):
  args = ["--gpus", "0,1,2,3", "--num-processes", "2", "--port", "23456", "--",
          "pretrain", "--workdir", "runs/x"]
  lines = run_script(fake, "gpu_node.py", "--dry-run", *args).stdout.splitlines()
  assert lines[-1] == "wait" and all(l.endswith(" &") for l in lines[:2])
  assert run_script(fake, "gpu_node.py", *args).returncode == 0
  recs = sorted(fake.records(), key=lambda r: r["env"]["PLMJAX_PROCESS_ID"])
  assert [r["env"] for r in recs] == [
      {"PLMJAX_COORDINATOR_ADDRESS": "127.0.0.1:23456", "PLMJAX_NUM_PROCESSES": "2",
       "PLMJAX_PROCESS_ID": str(i), "CUDA_VISIBLE_DEVICES": gpus}
      for i, gpus in enumerate(["0,1", "2,3"])]
  assert all(r["argv"] == ["pretrain", "--workdir", "runs/x"] for r in recs)


def test_gpu_node_cpu_rehearsal_and_failure(fake):
  # Process 1 fails at once; the launcher must end process 0 (which would sleep 60 s).
  start = time.monotonic()
  result = run_script(fake, "gpu_node.py", "--platform", "cpu", "--num-processes", "2",
                      "--cpu-devices", "2", "pretrain", "--workdir", "w",
                      extra_env={"FAKE_FAIL_ID": "1", "FAKE_SLEEP": "60"})
  assert time.monotonic() - start < 30
  assert result.returncode == 3
  assert "process 1 exited with status 3; stopped the others" in result.stderr
  envs = [r["env"] for r in fake.records()]
  assert len(envs) == 2 and all(e["JAX_PLATFORMS"] == "cpu" for e in envs)
  assert all(e["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2" for e in envs)


def test_gpu_node_bad_input(fake):
  for args, message in [
      (["--num-processes", "2", "pretrain"], "say which GPUs to divide: --gpus 0,1,2,3"),
      (["--gpus", "0,1,2", "--num-processes", "2", "pretrain"], "does not divide evenly"),
      (["--mem-fraction", "1.5", "pretrain"], "--mem-fraction 1.5 must be in (0, 1]"),
      ([], "give the plmjax command to run"),
      (["--", "--config", "x"], "must start with a subcommand")]:
    result = run_script(fake, "gpu_node.py", "--dry-run", *args)
    assert result.returncode == 2 and message in result.stderr, (args, result.stderr)


# ----- SLURM -----

def test_slurm_submit(fake):
  args = ["--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu", "--time", "48:00:00",
          "--env", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9", "--sbatch-arg=--exclusive", "--",
          "pretrain", "--config", "configs/bert_base.py", "--workdir", "/shared/r"]
  expected = ["sbatch", "--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8",
              "--partition=gpu", "--time=48:00:00",
              "--export=ALL,XLA_PYTHON_CLIENT_MEM_FRACTION=0.9", "--exclusive",
              str(LAUNCH / "slurm.sbatch"), "pretrain", "--config", "configs/bert_base.py",
              "--workdir", "/shared/r"]
  assert dry_lines(run_script(fake, "slurm.py", "--dry-run", *args)) == [expected]
  assert fake.records() == []
  assert run_script(fake, "slurm.py", *args).returncode == 0
  assert [["sbatch"] + r["argv"] for r in fake.records()] == [expected]


def test_slurm_submit_bad_input(fake):
  for args, message in [
      (["--nodes", "0", "pretrain"], "--nodes 0 must be at least 1"),
      (["--time", "two days", "pretrain"], "is not a SLURM time"),
      (["pretrian", "--workdir", "w"], "'pretrian' is not a plmjax command"),
      (["--env", "A=1,B=2", "pretrain"], "is not KEY=VALUE")]:
    result = run_script(fake, "slurm.py", "--dry-run", *args)
    assert result.returncode == 2 and message in result.stderr, (args, result.stderr)


SLURM_JOB = {"SLURM_JOB_ID": "777", "SLURM_JOB_NODELIST": "gpu[003-004]", "SLURM_NTASKS": "2"}


def test_slurm_batch_script_sets_coordinator_and_ids(fake):
  plmjax_args = ["pretrain", "--config", "configs/my config.py", "--workdir", "/shared/r"]
  result = run_script(fake, "slurm.sbatch", *plmjax_args, extra_env=SLURM_JOB)
  assert result.returncode == 0, result.stderr
  recs = fake.records()
  assert [r["argv"] for r in recs] == [plmjax_args] * 2
  # The port is 20000 + job id % 20000, as plmjax.train.distributed derives it under SLURM.
  assert [r["env"] for r in recs] == [
      {"PLMJAX_COORDINATOR_ADDRESS": "gpu003:20777", "PLMJAX_NUM_PROCESSES": "2",
       "PLMJAX_PROCESS_ID": str(i)} for i in (0, 1)]
  srun_args = pathlib.Path(fake.env["FAKE_LOG"] + ".srun").read_text()
  assert srun_args.startswith("--kill-on-bad-exit=1 --ntasks=2 bash -c")


def test_slurm_batch_script_dry_run_and_errors(fake):
  dry = run_script(fake, "slurm.sbatch", "--dry-run", "pretrain", "--workdir", "/s/r",
                   extra_env=dict(SLURM_JOB, PLMJAX_COORDINATOR_PORT="4000"))
  [line] = dry_lines(dry)
  assert line[:2] == ["PLMJAX_COORDINATOR_ADDRESS=gpu003:4000", "PLMJAX_NUM_PROCESSES=2"]
  assert line[2:7] == ["srun", "--kill-on-bad-exit=1", "--ntasks=2", "bash", "-c"]
  assert line[-4:] == ["plmjax", "pretrain", "--workdir", "/s/r"]
  assert fake.records() == []
  outside = run_script(fake, "slurm.sbatch", "pretrain")
  assert outside.returncode == 2 and "not inside a SLURM job" in outside.stderr
  empty = run_script(fake, "slurm.sbatch", extra_env=SLURM_JOB)
  assert empty.returncode == 2 and "give the plmjax command" in empty.stderr


def test_every_script_offers_dry_run(fake):
  for script in ("tpu_vm.py", "gpu_node.py", "slurm.py"):
    assert "--dry-run" in run_script(fake, script, "--help").stdout
  for sub in ("create", "setup", "run", "logs", "stop", "status", "delete"):
    assert "--dry-run" in run_script(fake, "tpu_vm.py", sub, "--help").stdout
  assert "--dry-run" in (LAUNCH / "slurm.sbatch").read_text()
