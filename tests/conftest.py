"""Test setup: 8 virtual CPU devices (for sharding tests), set before jax is imported."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # also with libtpu installed (the tpu extra)
# Identical programs (the same tiny model built by several tests, subprocess runs)
# compile once per suite run: XLA executables are cached on disk by their HLO.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/plmjax-test-jax-cache")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pathlib  # noqa: E402

import pytest  # noqa: E402

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def wiki_sample():
  """Path to ../shared/data/wiki_sample.jsonl (95 Wikipedia articles)."""
  path = SHARED_DATA / "wiki_sample.jsonl"
  if not path.exists():
    pytest.fail(f"{path} is missing: the repository expects ../shared/ beside it")
  return path
