"""Multi-process start-up: `jax.distributed` from arguments, environment, SLURM or Cloud TPU.

Where the three numbers (coordinator address, process count, process id) come from,
field by field, first hit wins:
  1. arguments of `initialize_from_env`;
  2. PLMJAX_COORDINATOR_ADDRESS, PLMJAX_NUM_PROCESSES, PLMJAX_PROCESS_ID;
  3. SLURM (inside `srun`): SLURM_STEP_NUM_TASKS or SLURM_NTASKS, SLURM_PROCID, and the
     first host of the node list with port PLMJAX_COORDINATOR_PORT (default: from the job id).
If none of the three is known, a Cloud TPU VM (or PLMJAX_DISTRIBUTED=tpu) lets jax find its
workers by itself. PLMJAX_DISTRIBUTED=off turns all of this off; PLMJAX_INIT_TIMEOUT_S sets
how long to wait for the other processes.

jax aborts the whole process (no Python exception) when the coordinator cannot be
reached or processes are missing, so those failures are caught before and around it:
a TCP probe of the coordinator, and a watchdog that prints one clear line and exits 2
(the CLI's exit status for bad input) shortly before jax's own deadline.
"""

import dataclasses
import glob
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import jax

from plmjax.errors import UserError

ENV_COORDINATOR = "PLMJAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "PLMJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "PLMJAX_PROCESS_ID"
ENV_COORDINATOR_PORT = "PLMJAX_COORDINATOR_PORT"
ENV_MODE = "PLMJAX_DISTRIBUTED"  # auto (default) | off | tpu
ENV_TIMEOUT = "PLMJAX_INIT_TIMEOUT_S"

# jax's own deadline is this much later than ours, so our message comes first.
_JAX_GRACE_S = 15


@dataclasses.dataclass(frozen=True)
class Cluster:
  """How this process joins the run. `None` fields are left for jax to detect (Cloud TPU)."""
  coordinator_address: str | None
  num_processes: int | None
  process_id: int | None
  origins: dict = dataclasses.field(default_factory=dict)  # field -> where it came from

  def origin(self, field: str) -> str:
    """'coordinator', 'num' or 'id' -> e.g. 'PLMJAX_NUM_PROCESSES', for messages."""
    return self.origins.get(field, "Cloud TPU")

  @property
  def auto(self) -> bool:
    return self.coordinator_address is None


def initialize_from_env(coordinator_address: str | None = None,
                        num_processes: int | None = None,
                        process_id: int | None = None,
                        *, timeout_s: int = 300) -> bool:
  """Joins a multi-process run if one is configured; returns whether it did.

  Call once at start-up, before anything touches a jax device. A single process
  (nothing set) is left alone and gets False.
  """
  if jax.distributed.is_initialized():
    return True  # e.g. a second command in the same Python process
  timeout_s = _timeout_from_env(timeout_s)
  cluster = resolve(coordinator_address, num_processes, process_id)
  if cluster is None:
    return False
  if cluster.auto:
    with _Watchdog(timeout_s, _tpu_hint(timeout_s)):
      jax.distributed.initialize(initialization_timeout=timeout_s + _JAX_GRACE_S)
    return True
  _probe_coordinator(cluster, timeout_s)
  # CPU processes talk through gloo; GPU/TPU backends ignore this setting.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  with _Watchdog(timeout_s, _join_hint(cluster, timeout_s)):
    # `deactivate`: use exactly these numbers, and keep every local device visible
    # (jax's SLURM detection would otherwise give each process one GPU).
    jax.distributed.initialize(
        coordinator_address=cluster.coordinator_address,
        num_processes=cluster.num_processes,
        process_id=cluster.process_id,
        cluster_detection_method="deactivate",
        initialization_timeout=timeout_s + _JAX_GRACE_S)
    joined = jax.process_count()
  if joined != cluster.num_processes:
    raise UserError(f"{joined} processes joined the run, but {cluster.origin('num')}="
                    f"{cluster.num_processes}; give every process the same process count")
  return True


def resolve(coordinator_address: str | None = None,
            num_processes: int | None = None,
            process_id: int | None = None,
            environ=None) -> Cluster | None:
  """Works out the cluster without touching jax; None means a single process."""
  env = os.environ if environ is None else environ
  mode = env.get(ENV_MODE, "auto").strip().lower() or "auto"
  if mode not in ("auto", "off", "tpu"):
    raise UserError(f"{ENV_MODE}={env[ENV_MODE]!r} is not allowed; use auto, off or tpu")
  if mode == "off":
    return None

  slurm = _from_slurm(env)
  fields = {}  # name -> (raw value, where it came from)
  for name, arg, var in (("coordinator", coordinator_address, ENV_COORDINATOR),
                         ("num", num_processes, ENV_NUM_PROCESSES),
                         ("id", process_id, ENV_PROCESS_ID)):
    if arg is not None:
      fields[name] = (arg, f"argument {_ARG_NAMES[name]}")
    elif env.get(var, "").strip():
      fields[name] = (env[var].strip(), var)
    elif slurm.get(name) is not None:
      fields[name] = slurm[name]

  if not fields:
    return Cluster(None, None, None) if mode == "tpu" or _on_cloud_tpu(env) else None
  num = _parse_int(*fields["num"]) if "num" in fields else None
  if num is not None and num < 1:
    raise UserError(f"{fields['num'][1]}={num}: the process count must be at least 1")
  pid = _parse_int(*fields["id"]) if "id" in fields else None
  if num is not None and pid is not None and not 0 <= pid < num:
    raise UserError(f"{fields['id'][1]}={pid} is outside [0, {num}) for {fields['num'][1]}={num}; "
                    f"give each process a distinct id from 0 to {num - 1}")
  if num == 1:
    return None  # one process: nothing to coordinate
  missing = [_ENV_NAMES[n] for n in ("coordinator", "num", "id") if n not in fields]
  if missing:
    given = ", ".join(f"{where}={value}" for value, where in fields.values())
    raise UserError(f"a multi-process run needs all three of {ENV_COORDINATOR}, "
                    f"{ENV_NUM_PROCESSES} and {ENV_PROCESS_ID}; got {given} but not "
                    f"{', '.join(missing)}")
  address = str(fields["coordinator"][0])
  split_address(address, fields["coordinator"][1])
  return Cluster(address, num, pid, {k: where for k, (_, where) in fields.items()})


def split_address(address: str, where: str = ENV_COORDINATOR) -> tuple[str, int]:
  """'host:port' or '[v6]:port' -> (host, port); UserError if malformed."""
  host, sep, port = address.rpartition(":")
  if host.startswith("[") and host.endswith("]"):
    host = host[1:-1]
  ok = sep and host and port.isdigit() and 0 < int(port) < 65536 and " " not in host
  if not ok:
    raise UserError(f"{where}={address!r} is not HOST:PORT (for example 10.0.0.2:8476 or "
                    "node001:8476); the port must be a number from 1 to 65535")
  return host, int(port)


# ----- where the numbers come from -----

_ARG_NAMES = {"coordinator": "coordinator_address", "num": "num_processes", "id": "process_id"}
_ENV_NAMES = {"coordinator": ENV_COORDINATOR, "num": ENV_NUM_PROCESSES, "id": ENV_PROCESS_ID}


def _parse_int(value, where: str) -> int:
  try:
    return int(value)
  except (TypeError, ValueError):
    raise UserError(f"{where}={value!r} is not an integer") from None


def _timeout_from_env(default: int) -> int:
  raw = os.environ.get(ENV_TIMEOUT, "").strip()
  if not raw:
    return default
  value = _parse_int(raw, ENV_TIMEOUT)
  if value < 1:
    raise UserError(f"{ENV_TIMEOUT}={value} must be a positive number of seconds")
  return value


def _from_slurm(env) -> dict:
  """SLURM's view inside an srun step: {'num'|'id'|'coordinator': (value, origin)}."""
  if "SLURM_PROCID" not in env or "SLURM_JOB_ID" not in env:
    return {}
  # Inside srun the step's task count is the right one; the batch script itself
  # (no srun) sees only SLURM_NTASKS of the allocation.
  count_var = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
  if count_var not in env:
    return {}
  out = {"num": (env[count_var], count_var), "id": (env["SLURM_PROCID"], "SLURM_PROCID")}
  nodes_var = next((v for v in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST") if env.get(v)), None)
  if nodes_var:
    port = env.get(ENV_COORDINATOR_PORT, "").strip()
    if not port:
      # Same on every node without talking: derived from the job id, in a high range.
      port = str(20000 + _parse_int(env["SLURM_JOB_ID"], "SLURM_JOB_ID") % 20000)
    out["coordinator"] = (f"{first_host(env[nodes_var])}:{port}", nodes_var)
  return out


def first_host(nodelist: str) -> str:
  """First host of a SLURM node list ('gpu[003-007,010],cpu1' -> 'gpu003')."""
  if shutil.which("scontrol"):
    try:
      out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                           text=True, timeout=30, check=True).stdout.split()
      if out:
        return out[0]
    except (subprocess.SubprocessError, OSError):
      pass  # fall back to parsing it ourselves
  return _first_host_parsed(nodelist)


def _first_host_parsed(nodelist: str) -> str:
  nodelist = nodelist.strip()
  if "[" not in nodelist.split(",")[0]:
    return nodelist.split(",")[0]
  prefix, rest = nodelist.split("[", 1)
  ranges, _, suffix = rest.partition("]")
  first = ranges.split(",")[0].split("-")[0]  # keeps zero padding: '003'
  suffix = suffix.split(",")[0] if not suffix.startswith(",") else ""
  return f"{prefix}{first}{suffix}"


def _on_cloud_tpu(env) -> bool:
  """A Cloud TPU VM or a GKE TPU pod: jax can find the other workers itself."""
  if "," in env.get("TPU_WORKER_HOSTNAMES", "") or env.get("CLOUD_TPU_TASK_ID"):
    return True
  # TPU chips show up as /dev/accel* (v2-v4) or VFIO groups (v5e and later), with libtpu
  # installed; GPU machines and laptops have neither together.
  chips = glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*")
  return bool(chips) and importlib.util.find_spec("libtpu") is not None


# ----- failing clearly instead of hanging or aborting -----

def _probe_coordinator(cluster: Cluster, timeout_s: int):
  host, port = split_address(cluster.coordinator_address, cluster.origin("coordinator"))
  if cluster.process_id == 0:
    _check_can_serve(host, port, cluster)
    return
  deadline = time.monotonic() + timeout_s
  delay = 0.1
  while True:
    try:
      with socket.create_connection((host, port), timeout=min(5.0, timeout_s)):
        return
    except OSError as e:
      last = e
    if time.monotonic() + delay > deadline:
      break
    time.sleep(delay)
    delay = min(delay * 2, 5.0)
  where = cluster.origin("coordinator")
  raise UserError(
      f"process {cluster.process_id} of {cluster.num_processes} could not reach the coordinator "
      f"at {cluster.coordinator_address} (from {where}) within {timeout_s}s "
      f"({type(last).__name__}: {last}); check that process 0 is running on {host}, that port "
      f"{port} is open between the hosts, and that every process got the same address "
      f"(wait longer with {ENV_TIMEOUT})")


def _check_can_serve(host: str, port: int, cluster: Cluster):
  """Process 0 runs the coordinator: the address must be this machine and the port free."""
  where = cluster.origin("coordinator")
  try:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
  except socket.gaierror as e:
    raise UserError(f"the coordinator host {host!r} (from {where}) does not resolve: {e}; "
                    "use a host name or IP address that every process can reach") from None
  family, _, _, _, sockaddr = infos[0]
  with socket.socket(family, socket.SOCK_STREAM) as s:
    try:
      s.bind((sockaddr[0], 0))
    except OSError:
      raise UserError(
          f"this is process 0, which runs the coordinator, but {cluster.coordinator_address} "
          f"(from {where}) is not an address of this machine ({socket.gethostname()}); "
          "start process 0 on that host or point the address at this one") from None
  with socket.socket(socket.AF_INET6 if ":" in sockaddr[0] else socket.AF_INET) as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      s.bind(("", port))
    except OSError as e:
      raise UserError(f"the coordinator port {port} on {socket.gethostname()} is taken ({e}); "
                      "another run may be using it: stop it or choose another port in "
                      f"{where}") from None


def _join_hint(cluster: Cluster, timeout_s: int) -> str:
  n = cluster.num_processes
  return (f"process {cluster.process_id}: not all {n} processes ({cluster.origin('num')}={n}) "
          f"joined the coordinator at {cluster.coordinator_address} within {timeout_s}s; start "
          f"exactly {n} processes, each with a different process id ({cluster.origin('id')}) "
          f"from 0 to {n - 1} and the same count and address (wait longer with {ENV_TIMEOUT})"
          + ("; under SLURM start plmjax with srun (one task per process), or set "
             f"{ENV_MODE}=off to run one process" if cluster.origin("num").startswith("SLURM")
             else ""))


def _tpu_hint(timeout_s: int) -> str:
  return (f"the Cloud TPU workers did not all join within {timeout_s}s; run the same command "
          "on every worker at once (gcloud compute tpus tpu-vm ssh ... --worker=all), or set "
          f"{ENV_MODE}=off for a single-host run")


class _Watchdog:
  """Prints `message` and exits 2 if the `with` body is still running after `timeout_s`.

  jax's coordination client blocks in C++ (releasing the GIL) and, on its own deadline,
  aborts the process with a long stack trace; this fires first with the reason.
  """

  def __init__(self, timeout_s: float, message: str):
    self._timer = threading.Timer(timeout_s, self._fire, args=(message,))
    self._timer.daemon = True

  @staticmethod
  def _fire(message: str):
    print(f"plmjax: error: {message}", file=sys.stderr, flush=True)
    os._exit(2)

  def __enter__(self):
    self._timer.start()
    return self

  def __exit__(self, *exc):
    self._timer.cancel()
    return False
