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
          "--config.train.steps=100", "--env", "GREETING=hi there", "--", "--debug"]
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
          "--config.train.steps=100", "--env", "GREETING=hi there", "--no-follow", "--dry-run"]
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
