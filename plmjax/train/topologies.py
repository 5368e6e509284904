"""Compile targets for `plmjax compile`: TPU slices and NVIDIA GPUs that are not attached.

  parse("v5litepod-16") -> a Target: name, devices() (abstract), hosts, memory per device

TPU slices come from libtpu's compile-only topologies; GPUs from jax's CUDA plugin with a
GpuTargetConfig written here from the vendor's published figures; `cpu:N` are real
(virtual) CPU devices of this process.
"""

import dataclasses
import importlib.util
import os
import re

import jax

from plmjax.errors import ConfigError, UserError

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Generation:
  name: str  # jax topology prefix
  hbm_gib: float  # per chip
  cores_per_chip_in_name: int  # v4-8 counts TensorCores (2 per chip); v5e-8 counts chips
  megacore: bool  # one jax device per chip, over both TensorCores
  shapes: dict  # chips -> chip grid


_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
       128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16)}
_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16),
       256: (16, 16)}
TPUS = {
    "v4": Generation("v4", 32, 2, True, _3D),
    "v5p": Generation("v5p", 95, 2, True, _3D),
    "v5e": Generation("v5e", 16, 1, False, _2D),
    "v6e": Generation("v6e", 32, 1, False, _2D),
}
ALIASES = {"v5litepod": "v5e", "v6litepod": "v6e"}


@dataclasses.dataclass(frozen=True)
class Gpu:
  """An NVIDIA GPU as XLA's GpuTargetConfig describes it (public datasheet figures)."""
  description: str
  memory_bytes: int
  compute_capability: tuple[int, int]
  sms: int
  fp32_cores_per_sm: int
  shared_memory_per_sm: int
  shared_memory_per_block_optin: int
  l2_bytes: int
  bandwidth: float  # bytes/s
  clock_ghz: float

  def target_config(self) -> str:
    """GpuTargetConfigProto in text format."""
    major, minor = self.compute_capability
    info = dict(threads_per_block_limit=1024, threads_per_warp=32,
                shared_memory_per_block=48 * 1024, shared_memory_per_core=self.shared_memory_per_sm,
                threads_per_core_limit=2048, core_count=self.sms,
                fpus_per_core=self.fp32_cores_per_sm, block_dim_limit_x=2**31 - 1,
                block_dim_limit_y=65535, block_dim_limit_z=65535,
                memory_bandwidth=int(self.bandwidth), l2_cache_size=self.l2_bytes,
                clock_rate_ghz=self.clock_ghz, device_memory_size=self.memory_bytes,
                shared_memory_per_block_optin=self.shared_memory_per_block_optin,
                registers_per_core_limit=65536, registers_per_block_limit=65536)
    fields = "\n".join(f"  {k}: {v}" for k, v in info.items())
    return (f"gpu_device_info {{\n{fields}\n  cuda_compute_capability {{ major: {major} "
            f"minor: {minor} }}\n}}\nplatform_name: \"CUDA\"\n"
            "dnn_version_info { major: 9 minor: 8 }\nruntime_version { major: 12 minor: 9 }\n"
            f"device_description_str: \"{self.description}\"\n")


GPUS = {
    "h100": Gpu("NVIDIA H100 80GB HBM3", 80 * 10**9, (9, 0), 132, 128, 228 * 1024, 227 * 1024,
                50 * 2**20, 3.35e12, 1.98),
    "a100": Gpu("NVIDIA A100-SXM4-80GB", 80 * 10**9, (8, 0), 108, 64, 164 * 1024, 163 * 1024,
                40 * 2**20, 2.039e12, 1.41),
}
GPUS_PER_HOST = 8


@dataclasses.dataclass(frozen=True)
class Target:
  name: str
  kind: str  # tpu | gpu | cpu
  count: int  # devices
  hosts: int
  memory: int | None  # bytes a step may use per device (None: not checked, CPU)
  spec: object = None  # Generation, Gpu or None

  def devices(self):
    if self.kind == "cpu":
      return _cpu_devices(self.count)
    from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
    if self.kind == "gpu":
      try:
        topo = topologies.get_topology_desc(
            platform="cuda", topology=f"1x{self.hosts}x{self.count // self.hosts}",
            target_config=self.spec.target_config())
      except (NotImplementedError, RuntimeError) as e:
        raise UserError(f"compiling for {self.name} needs jax's CUDA plugin, loaded on the CPU: "
                        "pip install 'plmjax[gpu-compile]' and run with JAX_PLATFORMS=cpu "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
      return topo.devices
    if importlib.util.find_spec("libtpu") is None:
      raise UserError("compiling for a TPU needs libtpu; install it with "
                      "pip install 'plmjax[tpu]'")
    # Compile-only: no TPU is held, so several compiles may load libtpu at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    grid = self.spec.shapes[self.count]
    per_host = grid + (1,) * (3 - len(grid)) if self.hosts == 1 else (2, 2, 1)
    topo = topologies.get_topology_desc(
        topology_name=f"{self.spec.name}:" + "x".join(map(str, grid)), platform="tpu",
        chip_config_name="megacore" if self.spec.megacore else "default",
        chips_per_host_bounds=per_host, num_slices=1, wrap=(False, False, False))
    return topo.devices


def _tpu(name: str, gen: Generation, chips: int) -> Target:
  # 4 chips per host, except single-host v5e/v6e slices of up to 8 chips.
  single = chips <= (8 if len(gen.shapes[chips]) == 2 else 4)
  return Target(name, "tpu", chips, 1 if single else chips // 4, int(gen.hbm_gib * GIB), gen)


def _gpu(name: str, gpu: Gpu, count: int) -> Target:
  # jax takes XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.75) of each GPU's memory.
  fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75"))
  return Target(name, "gpu", count, max(1, count // GPUS_PER_HOST),
                int(gpu.memory_bytes * fraction), gpu)


def parse(text: str) -> Target:
  text = text.strip().lower()
  if text.startswith("cpu:"):
    n = int(text[4:]) if text[4:].isdigit() else 0
    if n < 1:
      raise ConfigError(f"--topology {text}: give a number of devices, e.g. cpu:8")
    return Target(text, "cpu", n, 1, None)
  m = re.fullmatch(r"([a-z0-9]+)-(\d+)", text)
  family = ALIASES.get(m.group(1), m.group(1)) if m else ""
  if family in GPUS:
    count = int(m.group(2))
    if count < 1 or (count > GPUS_PER_HOST and count % GPUS_PER_HOST):
      raise ConfigError(f"--topology {text}: give 1-8 GPUs, or a multiple of 8 (8 per host)")
    return _gpu(text, GPUS[family], count)
  if family not in TPUS:
    raise ConfigError(f"--topology {text!r} is not a known Cloud TPU accelerator type or GPU; "
                      "use one of `plmjax compile --topology list` (e.g. v4-8, v5litepod-16, "
                      "v6e-8, h100-8) or cpu:N")
  gen = TPUS[family]
  chips = int(m.group(2)) // gen.cores_per_chip_in_name
  if chips not in gen.shapes:
    known = ", ".join(f"{m.group(1)}-{c * gen.cores_per_chip_in_name}" for c in gen.shapes)
    raise ConfigError(f"--topology {text!r}: no {m.group(1)} slice of that size is known; "
                      f"use one of {known}")
  return _tpu(text, gen, chips)


def table() -> str:
  lines = ["topology            devices  hosts  memory per device"]
  for family, gen in TPUS.items():
    for chips in gen.shapes:
      t = _tpu(f"{family}-{chips * gen.cores_per_chip_in_name}", gen, chips)
      lines.append(f"{t.name:<18}  {t.count:>7}  {t.hosts:>5}  {gen.hbm_gib:g} GiB HBM")
  for family, gpu in GPUS.items():
    t = _gpu(f"{family}-8", gpu, 8)
    lines.append(f"{family}-N (N <= 8, or 8 per host)  {gpu.description}: "
                 f"{t.memory / GIB:.1f} GiB for jax (XLA_PYTHON_CLIENT_MEM_FRACTION)")
  lines.append("v5litepod-N = v5e-N, v6litepod-N = v6e-N; cpu:N = N virtual CPU devices")
  return "\n".join(lines)


def _cpu_devices(n: int):
  try:  # only possible before jax has started its CPU backend
    jax.config.update("jax_num_cpu_devices", max(n, jax.config.jax_num_cpu_devices))
  except RuntimeError:
    pass
  cpus = jax.devices("cpu")
  if len(cpus) < n:
    raise ConfigError(f"--topology cpu:{n}: this process has {len(cpus)} CPU devices (jax "
                      "started before the command could ask for more); run plmjax compile in a "
                      "new process")
  return cpus[:n]
