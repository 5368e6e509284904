"""Multi-process start-up: where the numbers come from, validation, and real 2-process runs."""

import os
import socket
import stat
import subprocess
import sys
import textwrap
import time

import jax
import pytest

from plmjax.errors import UserError
from plmjax.train import distributed
from plmjax.train.distributed import resolve

PLMJAX_ENV = {"PLMJAX_COORDINATOR_ADDRESS": "10.0.0.2:8476", "PLMJAX_NUM_PROCESSES": "4",
              "PLMJAX_PROCESS_ID": "3"}
REAL_TPU_DETECTOR = distributed._on_cloud_tpu
SLURM_ENV = {"SLURM_JOB_ID": "1234", "SLURM_NTASKS": "4", "SLURM_PROCID": "2",
             "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "gpu[003-006]"}


@pytest.fixture(autouse=True)
def no_cluster(monkeypatch):
  """A clean environment: no cluster variables, not a TPU VM, no scontrol."""
  for var in list(os.environ):
    if var.startswith(("PLMJAX_", "SLURM_", "TPU_", "CLOUD_TPU")):
      monkeypatch.delenv(var)
  monkeypatch.setattr(distributed, "_on_cloud_tpu", lambda env: False)
  monkeypatch.setattr(distributed.shutil, "which", lambda name: None)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# ----- resolve: which numbers, from where -----

def test_nothing_set_is_a_single_process():
  assert resolve(environ={}) is None
  assert distributed.initialize_from_env() is False
  assert jax.process_index() == 0


def test_environment_gives_all_three():
  c = resolve(environ=PLMJAX_ENV)
  assert (c.coordinator_address, c.num_processes, c.process_id) == ("10.0.0.2:8476", 4, 3)
  assert c.origin("num") == "PLMJAX_NUM_PROCESSES" and not c.auto


def test_arguments_win_over_environment():
  c = resolve("127.0.0.1:9000", 2, 0, environ=PLMJAX_ENV)
  assert (c.coordinator_address, c.num_processes, c.process_id) == ("127.0.0.1:9000", 2, 0)
  assert c.origin("id") == "argument process_id"
  c = resolve(process_id=1, environ=PLMJAX_ENV)  # field by field
  assert (c.coordinator_address, c.num_processes, c.process_id) == ("10.0.0.2:8476", 4, 1)


def test_one_process_needs_no_coordinator():
  assert resolve(environ={"PLMJAX_NUM_PROCESSES": "1"}) is None
  assert resolve(num_processes=1, process_id=0, environ={}) is None


def test_missing_values_are_named():
  with pytest.raises(UserError, match="not PLMJAX_COORDINATOR_ADDRESS, PLMJAX_PROCESS_ID"):
    resolve(environ={"PLMJAX_NUM_PROCESSES": "2"})
  with pytest.raises(UserError, match="got PLMJAX_COORDINATOR_ADDRESS=h:1, PLMJAX_PROCESS_ID=1"):
    resolve(environ={"PLMJAX_COORDINATOR_ADDRESS": "h:1", "PLMJAX_PROCESS_ID": "1"})


@pytest.mark.parametrize("num, pid, match", [
    ("2", "2", r"PLMJAX_PROCESS_ID=2 is outside \[0, 2\) for PLMJAX_NUM_PROCESSES=2"),
    ("2", "-1", r"PLMJAX_PROCESS_ID=-1 is outside \[0, 2\)"),
    ("1", "1", r"PLMJAX_PROCESS_ID=1 is outside \[0, 1\)"),
    ("0", "0", "PLMJAX_NUM_PROCESSES=0: the process count must be at least 1"),
    ("two", "0", "PLMJAX_NUM_PROCESSES='two' is not an integer"),
    ("2", "first", "PLMJAX_PROCESS_ID='first' is not an integer"),
])
def test_bad_process_count_or_id(num, pid, match):
  env = dict(PLMJAX_ENV, PLMJAX_NUM_PROCESSES=num, PLMJAX_PROCESS_ID=pid)
  with pytest.raises(UserError, match=match):
    resolve(environ=env)


@pytest.mark.parametrize("address", ["node001", "node001:", ":8476", "node001:http",
                                     "node001:0", "node001:70000", "my host:8476"])
def test_malformed_coordinator_address(address):
  with pytest.raises(UserError, match=f"PLMJAX_COORDINATOR_ADDRESS='{address}' is not HOST:PORT"):
    resolve(environ=dict(PLMJAX_ENV, PLMJAX_COORDINATOR_ADDRESS=address))


@pytest.mark.parametrize("address, host, port", [
    ("10.0.0.2:8476", "10.0.0.2", 8476), ("node001:1", "node001", 1),
    ("[::1]:65535", "::1", 65535)])
def test_good_coordinator_address(address, host, port):
  assert distributed.split_address(address) == (host, port)


def test_slurm_fills_everything():
  c = resolve(environ=SLURM_ENV)
  assert (c.coordinator_address, c.num_processes, c.process_id) == ("gpu003:21234", 4, 2)
  assert c.origin("coordinator") == "SLURM_JOB_NODELIST"
  assert c.origin("num") == "SLURM_NTASKS"


def test_slurm_step_values_and_plmjax_overrides():
  env = dict(SLURM_ENV, SLURM_STEP_NUM_TASKS="8", SLURM_STEP_NODELIST="a7,b1",
             PLMJAX_COORDINATOR_PORT="5555", PLMJAX_PROCESS_ID="7")
  c = resolve(environ=env)
  assert (c.coordinator_address, c.num_processes, c.process_id) == ("a7:5555", 8, 7)
  assert c.origin("num") == "SLURM_STEP_NUM_TASKS" and c.origin("id") == "PLMJAX_PROCESS_ID"
  # An allocation of one task is a single process.
  assert resolve(environ=dict(SLURM_ENV, SLURM_NTASKS="1", SLURM_PROCID="0")) is None


@pytest.mark.parametrize("nodelist, first", [
    ("node001", "node001"), ("a1,b2", "a1"), ("gpu[003-007,010],cpu1", "gpu003"),
    ("rack1-n[7,9]", "rack1-n7"), ("x[01-02]-ib", "x01-ib"), ("x[01-02]-ib,y3", "x01-ib")])
def test_first_host_parser(nodelist, first):
  assert distributed.first_host(nodelist) == first


def test_first_host_asks_scontrol(tmp_path, monkeypatch):
  fake = tmp_path / "scontrol"
  fake.write_text("#!/bin/sh\nprintf 'n-from-scontrol\\nn2\\n'\n")
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
  monkeypatch.setattr(distributed.shutil, "which", lambda name: str(fake))
  assert distributed.first_host("weird[1-2]") == "n-from-scontrol"


def test_mode_switch_and_cloud_tpu(monkeypatch):
  assert resolve(environ=dict(PLMJAX_ENV, PLMJAX_DISTRIBUTED="off")) is None
  c = resolve(environ={"PLMJAX_DISTRIBUTED": "tpu"})
  assert c.auto and c.num_processes is None
  with pytest.raises(UserError, match="PLMJAX_DISTRIBUTED='yes' is not allowed"):
    resolve(environ={"PLMJAX_DISTRIBUTED": "yes"})
  # The real detector: env hints, then /dev/accel* or VFIO plus libtpu (absent here).
  monkeypatch.setattr(distributed, "_on_cloud_tpu", REAL_TPU_DETECTOR)
  assert resolve(environ={"TPU_WORKER_HOSTNAMES": "w0,w1", "TPU_WORKER_ID": "1"}).auto
  assert resolve(environ={"TPU_WORKER_HOSTNAMES": "w0"}) is None
  assert resolve(environ={}) is None


def test_timeout_from_environment(monkeypatch):
  monkeypatch.setenv("PLMJAX_INIT_TIMEOUT_S", "7")
  assert distributed._timeout_from_env(300) == 7
  monkeypatch.setenv("PLMJAX_INIT_TIMEOUT_S", "0")
  with pytest.raises(UserError, match="PLMJAX_INIT_TIMEOUT_S=0 must be a positive"):
    distributed._timeout_from_env(300)


# ----- failing fast, before jax would hang or abort -----

@pytest.fixture
def jax_untouched(monkeypatch):
  def fail(*args, **kwargs):
    raise AssertionError("jax.distributed.initialize must not be reached")
  monkeypatch.setattr(jax.distributed, "initialize", fail)


def test_unreachable_coordinator_is_a_clear_error(jax_untouched):
  address = f"127.0.0.1:{_free_port()}"  # nothing listens there
  start = time.monotonic()
  with pytest.raises(UserError) as e:
    distributed.initialize_from_env(address, 2, 1, timeout_s=2)
  assert time.monotonic() - start < 15
  message = str(e.value)
  assert f"process 1 of 2 could not reach the coordinator at {address}" in message
  assert "within 2s" in message and "check that process 0 is running on 127.0.0.1" in message


def test_process0_must_own_the_address(jax_untouched):
  # 192.0.2.0/24 is reserved for documentation: never an address of this machine.
  with pytest.raises(UserError, match="this is process 0, which runs the coordinator, but "
                                      "192.0.2.1:8476 .* is not an address of this machine"):
    distributed.initialize_from_env("192.0.2.1:8476", 2, 0)


def test_process0_port_taken(jax_untouched):
  with socket.socket() as busy:
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    with pytest.raises(UserError, match=f"the coordinator port {port} on .* is taken"):
      distributed.initialize_from_env(f"127.0.0.1:{port}", 2, 0)


# ----- real processes on CPU (gloo), 4 virtual devices each -----

WORKER = textwrap.dedent("""
    import sys
    import numpy as np
    import jax, jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from plmjax.errors import UserError
    from plmjax.train import distributed
    try:
      joined = distributed.initialize_from_env(timeout_s=int(sys.argv[1]))
    except UserError as e:
      print(f"plmjax: error: {e}", file=sys.stderr)
      sys.exit(2)
    if sys.argv[2] == "sum":
      mesh = Mesh(np.array(jax.devices()), ("data",))
      rows = np.full((jax.local_device_count(), 2), jax.process_index() + 1, np.float32)
      x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), rows)
      total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
      print("RESULT", joined, jax.process_index(), jax.process_count(), jax.device_count(),
            float(total), jax.process_index() == 0, flush=True)
""")


def _spawn(tmp_path, port, num, pid, timeout_s=30, job="sum"):
  script = tmp_path / "worker.py"
  script.write_text(WORKER)
  env = {k: v for k, v in os.environ.items() if not k.startswith(("PLMJAX_", "SLURM_"))}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
             PLMJAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", PLMJAX_NUM_PROCESSES=str(num),
             PLMJAX_PROCESS_ID=str(pid))
  return subprocess.Popen([sys.executable, str(script), str(timeout_s), job], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(procs, timeout=90):
  outs = []
  for p in procs:
    try:
      out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      p.kill()
      out, err = p.communicate()
    outs.append((p.returncode, out, err))
  return outs


def test_two_processes_sum_across_hosts(tmp_path):
  port = _free_port()
  results = _finish([_spawn(tmp_path, port, 2, i) for i in (1, 0)])
  lines = {}
  for rc, out, err in results:
    assert rc == 0, err[-3000:]
    fields = next(l for l in out.splitlines() if l.startswith("RESULT")).split()
    lines[int(fields[2])] = fields
  # 8 global devices, 2 rows each: process 0 contributes 4*2*1, process 1 4*2*2.
  assert lines[0][1:] == ["True", "0", "2", "8", "24.0", "True"]
  assert lines[1][1:] == ["True", "1", "2", "8", "24.0", "False"]


def test_missing_process_times_out_with_reason(tmp_path):
  start = time.monotonic()
  [(rc, _, err)] = _finish([_spawn(tmp_path, _free_port(), 2, 0, timeout_s=3, job="init")])
  assert rc == 2, err[-3000:]
  assert time.monotonic() - start < 60
  assert ("plmjax: error: process 0: not all 2 processes (PLMJAX_NUM_PROCESSES=2) joined the "
          "coordinator") in err
  assert "within 3s" in err


def test_process_count_mismatch(tmp_path):
  port = _free_port()
  procs = [_spawn(tmp_path, port, 2, 0, timeout_s=20, job="init"),
           _spawn(tmp_path, port, 3, 1, timeout_s=20, job="init")]
  (_, _, _), (rc1, _, err1) = _finish(procs)
  assert rc1 == 2, err1[-3000:]
  assert ("plmjax: error: 2 processes joined the run, but PLMJAX_NUM_PROCESSES=3; give every "
          "process the same process count") in err1
