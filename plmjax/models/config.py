"""The typed model configuration every model module takes.

Built from `config.model` (a plain ConfigDict) by `ModelConfig.from_config`, which
validates every value and names the key and the allowed values on error.
"""

import dataclasses
from typing import Any

import jax.numpy as jnp

from plmjax.errors import ConfigError

ARCHITECTURES = ("bert", "gpt", "t5")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
ATTENTION_IMPLS = ("auto", "splash", "xla", "cudnn")
FUSED_ATTENTION = ("splash", "cudnn")  # kernels without attention dropout
REMAT_POLICIES = ("none", "full", "dots")
FEED_FORWARD_PROJ = ("relu", "gated-gelu")  # T5 1.0, T5 1.1


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  arch: str = "bert"  # "bert" (post-LN encoder), "gpt" (pre-LN decoder) or "t5" (encoder-decoder)
  vocab_size: int = 30522
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  max_position_embeddings: int = 512
  type_vocab_size: int = 2  # BERT only
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  layer_norm_eps: float = 1e-12
  initializer_range: float = 0.02
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"  # master weights
  # auto: splash (TPU), cudnn (GPU) or xla, by the devices the model runs on
  # (plmjax.models.attention.resolve_impl); or one of them by name.
  attention_impl: str = "auto"
  remat: str = "none"  # per-layer rematerialisation policy
  # The layer stack as one layer under nn.scan: parameters stacked on a leading "layers"
  # axis (layer / h instead of layer_0.. / h_0..); compile time no longer grows with depth.
  scan_layers: bool = False
  num_labels: int = 2  # fine-tuning heads (classification, tagging)
  # T5 only (plmjax/models/t5.py). num_layers is the encoder's depth; initializer_range is
  # T5's initializer_factor (1.0: Hugging Face's T5 init); layer_norm_eps its RMS norm's eps.
  num_decoder_layers: int = 0  # 0: as num_layers
  attention_head_dim: int = 0  # T5's d_kv; 0: hidden_size // num_heads
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  feed_forward_proj: str = "relu"  # relu (T5 1.0) | gated-gelu (T5 1.1)
  tie_word_embeddings: bool = True  # tied output embedding, scaled by hidden_size ** -0.5

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def compute_dtype(self) -> Any:
    return DTYPES[self.dtype]

  @property
  def weights_dtype(self) -> Any:
    return DTYPES[self.param_dtype]

  def __post_init__(self):
    def bad(key, value, allowed):
      raise ConfigError(f"config.model.{key}={value!r} is not allowed; use {allowed}.")

    if self.arch not in ARCHITECTURES:
      bad("arch", self.arch, " or ".join(ARCHITECTURES))
    for key in ("dtype", "param_dtype"):
      if getattr(self, key) not in DTYPES:
        bad(key, getattr(self, key), " or ".join(DTYPES))
    if self.attention_impl not in ATTENTION_IMPLS:
      bad("attention_impl", self.attention_impl, "auto, splash, xla or cudnn")
    if self.remat not in REMAT_POLICIES:
      bad("remat", self.remat, " or ".join(REMAT_POLICIES))
    if not isinstance(self.scan_layers, bool):
      bad("scan_layers", self.scan_layers, "true or false")
    if self.scan_layers and self.arch not in ("bert", "gpt"):
      raise ConfigError(f"config.model.scan_layers=true is for arch bert and gpt, not "
                        f"{self.arch!r}; remove it")
    for key in ("vocab_size", "hidden_size", "num_layers", "num_heads",
                "intermediate_size", "max_position_embeddings", "type_vocab_size",
                "num_labels"):
      value = getattr(self, key)
      if not isinstance(value, int) or value <= 0:
        bad(key, value, "a positive integer")
    if self.hidden_size % self.num_heads and not self.attention_head_dim:
      raise ConfigError(
          f"config.model.hidden_size={self.hidden_size} is not divisible by "
          f"config.model.num_heads={self.num_heads}; choose num_heads that divides it "
          f"(e.g. {', '.join(str(h) for h in _divisors(self.hidden_size))}).")
    for key in ("dropout_rate", "attention_dropout_rate"):
      if not 0.0 <= getattr(self, key) < 1.0:
        bad(key, getattr(self, key), "a number in [0, 1)")
    if self.attention_impl in FUSED_ATTENTION and self.attention_dropout_rate > 0:
      raise ConfigError(
          f"config.model.attention_impl={self.attention_impl!r} has no attention dropout but "
          f"config.model.attention_dropout_rate={self.attention_dropout_rate}; set "
          "--config.model.attention_dropout_rate=0, or attention_impl=auto (which then "
          "picks xla)")

    if self.arch == "t5" or any(getattr(self, k) != v for k, v in _T5_DEFAULTS.items()):
      self._check_t5(bad)

  def _check_t5(self, bad):
    if self.arch != "t5":
      changed = sorted(k for k, v in _T5_DEFAULTS.items() if getattr(self, k) != v)
      raise ConfigError(f"config.model.{changed[0]} applies to arch t5 only; remove it or set "
                        "config.model.arch=t5")
    if self.feed_forward_proj not in FEED_FORWARD_PROJ:
      bad("feed_forward_proj", self.feed_forward_proj, " or ".join(FEED_FORWARD_PROJ))
    for key in ("num_decoder_layers", "attention_head_dim"):
      value = getattr(self, key)
      if not isinstance(value, int) or value < 0:
        bad(key, value, "a positive integer, or 0 for the default")
    for key in ("relative_attention_num_buckets", "relative_attention_max_distance"):
      value = getattr(self, key)
      if not isinstance(value, int) or value < 2:
        bad(key, value, "an integer of at least 2")
    if self.scan_layers:
      raise ConfigError("config.model.scan_layers=true is not supported for arch t5 (its first "
                        "block differs: it owns the position bias); set scan_layers=false")
    if self.attention_impl in FUSED_ATTENTION:
      raise ConfigError(
          f"config.model.attention_impl={self.attention_impl!r} cannot add T5's relative "
          "position bias; use attention_impl=xla or auto (which picks xla for T5)")

  @classmethod
  def from_config(cls, model_cfg) -> "ModelConfig":
    """From a mapping (ConfigDict or dict); unknown keys are an error."""
    values = dict(model_cfg.items()) if hasattr(model_cfg, "items") else dict(model_cfg)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
      raise ConfigError(
          f"unknown key(s) config.model.{', config.model.'.join(unknown)}; "
          f"known keys: {', '.join(sorted(names))}.")
    return cls(**values)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, min(n, 64) + 1) if n % d == 0][-6:]


# The T5-only fields at their defaults (a BERT or GPT config must leave them there).
_T5_DEFAULTS = dict(num_decoder_layers=0, attention_head_dim=0, relative_attention_num_buckets=32,
                    relative_attention_max_distance=128, feed_forward_proj="relu",
                    tie_word_embeddings=True)
