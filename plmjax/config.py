"""Run configuration: defaults, loading a config file, command-line overrides.

A config is a plain `ml_collections.ConfigDict` with five sections:
`model` (-> `ModelConfig`), `data`, `train`, `checkpoint`, `mesh` (+ `sharding`).
Config files in `configs/` define `get_config()` and start from `base_config()`.
ConfigDicts are type-safe: assigning a string to an int key, or a key that does
not exist, raises an error that names the key.
"""

import difflib
import importlib.util
import os
import traceback

import ml_collections

from plmjax.errors import ConfigError, UserError
from plmjax.models.config import ModelConfig

# Logical axis name -> mesh axes. Parameters and activations carry logical names
# (see plmjax/models); this table decides how they are laid out on the mesh.
# Data-parallel by default: batch over (data, fsdp); parameters sharded over
# `fsdp` (a no-op while mesh.fsdp == 1) and `tensor` (a no-op while tensor == 1).
DEFAULT_AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", None),
    ("vocab", None),  # GPT-2's 50257 rows do not split evenly
    ("embed_out", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("kv", None),
    ("qkv", None),  # GPT-2's fused c_attn: q, k and v of a head stay on one device
    ("position", None),
    ("type", None),
    ("classes", None),
    ("norm", None),
    ("layers", None),  # model.scan_layers' stacked layer axis: not split (its other axes are)
)


def base_config(arch: str = "bert") -> ml_collections.ConfigDict:
  """Every key a run understands, with defaults that work on a laptop CPU."""
  c = ml_collections.ConfigDict()
  c.model = ModelConfig(arch=arch).to_dict()
  c.model = ml_collections.ConfigDict(c.model)
  if arch == "gpt":
    c.model.layer_norm_eps = 1e-5
    c.model.vocab_size = 50257
    c.model.max_position_embeddings = 1024
  if arch == "t5":  # T5 1.1 base (configs/t5_base.py); no position table: 512 bounds max_seq_len
    c.model.update(vocab_size=32128, intermediate_size=2048, layer_norm_eps=1e-6,
                   initializer_range=1.0, feed_forward_proj="gated-gelu",
                   tie_word_embeddings=False)

  # Which head the model carries (plmjax.models.build_model): pretraining | mlm (BERT),
  # lm (GPT), seq2seq (T5), or a fine-tuning head set by configs/finetune/*.
  head = {"gpt": "lm", "t5": "seq2seq"}.get(arch, "pretraining")
  c.task = ml_collections.ConfigDict(dict(head=head))

  c.data = ml_collections.ConfigDict(dict(
      train="",  # glob of .txt/.jsonl files, tfds:NAME[/CONFIG]:SPLIT, or a `data prepare` dir
      eval="",  # same forms; empty: no evaluation
      tokenizer="",  # sentencepiece .model path; empty: train one into the workdir
      tokenizer_model_type="unigram",  # unigram | bpe (when training one)
      tfds_data_dir="",  # tfds data_dir (local or gs://); empty: tfds default
      max_seq_len=128,
      max_predictions_per_seq=20,  # BERT: masked positions per row
      mask_prob=0.15,
      short_seq_prob=0.1,  # BERT: chance of a shorter target length
      whole_word_masking=False,
      nsp=True,  # BERT: next-sentence pairs (False: MLM only, one segment)
      packing=False,  # pack several examples in one row with segment ids
      max_pairs_per_row=0,  # packed BERT: pairs per row (0: max_seq_len // 32)
      num_workers=0,  # grain worker processes (0: in-process)
      prefetch=2,  # batches prefetched to device
  ))
  if arch == "t5":  # span corruption (plmjax/data/span_corruption.py)
    c.data.max_target_len = 32  # targets (sentinels + dropped spans + </s>) per row
    c.data.noise_density = 0.15  # fraction of tokens dropped into the targets
    c.data.mean_noise_span_length = 3.0

  c.train = ml_collections.ConfigDict(dict(
      steps=1000,
      batch_size=32,  # global, across all processes and devices
      grad_accum_steps=1,  # micro-batches per optimiser step
      seed=0,
      learning_rate=1e-4,
      warmup_steps=100,
      decay="linear",  # linear | cosine | constant
      end_learning_rate_ratio=0.0,  # final lr as a fraction of the peak
      weight_decay=0.01,
      adam_b1=0.9,
      adam_b2=0.999,
      adam_eps=1e-6,
      grad_clip_norm=1.0,  # 0 disables clipping
      log_every_steps=10,
      eval_every_steps=0,  # 0: evaluate only at the end (when data.eval is set)
      eval_steps=10,  # batches per evaluation
      nonfinite="stop",  # stop | skip: what to do when loss or grads are not finite
      max_nonfinite_in_a_row=10,  # with nonfinite=skip
      stop_after_steps=0,  # >0: checkpoint and exit after this many steps of this invocation
      peak_flops_per_device=0.0,  # 0: look it up in the peak table (for MFU)
      # model.dtype=float16 only: dynamic loss scaling with torch.amp.GradScaler's rule. The
      # loss is multiplied by the scale; a step whose gradients overflow is skipped and halves
      # the scale (never below 1).
      loss_scale_init=65536.0,  # the first scale: 2**16, GradScaler's init_scale
      loss_scale_growth_interval=2000,  # overflow-free steps in a row that double the scale
  ))

  c.checkpoint = ml_collections.ConfigDict(dict(
      dir="",  # empty: WORKDIR/checkpoints; or e.g. gs://BUCKET/run/checkpoints
      every_steps=500,
      keep=3,
      async_save=True,
  ))

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.sharding = ml_collections.ConfigDict(dict(logical_axis_rules=DEFAULT_AXIS_RULES))
  return c


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """Runs `get_config()` from a Python config file."""
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path!r} does not exist; pass e.g. --config configs/bert_tiny.py")
  spec = importlib.util.spec_from_file_location("plmjax_user_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path!r} defines no get_config() function")
  return module.get_config()


def load_config(path: str, overrides, reference=None) -> ml_collections.ConfigDict:
  """The config file plus overrides; any error in the file becomes one ConfigError line.
  `reference(config)` gives the config holding every allowed key (default base_config)."""
  try:
    config = load_config_file(path)
  except UserError:
    raise
  except Exception as e:  # the user's Python: SyntaxError, ml_collections' TypeError, ...
    raise ConfigError(f"config file {path}{_line_in(path, e)}: {type(e).__name__}: "
                      f"{str(e).strip()}") from e
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"get_config() in {path} returned {type(config).__name__}, not an "
                      "ml_collections.ConfigDict; start from plmjax.config.base_config()")
  check_config_keys(config, reference(config) if reference else None)
  apply_overrides(config, overrides)
  return config


def _line_in(path: str, e: Exception) -> str:
  if isinstance(e, SyntaxError) and e.lineno:
    return f", line {e.lineno}"
  frames = [f for f in traceback.extract_tb(e.__traceback__)
            if os.path.abspath(f.filename) == os.path.abspath(path)]
  return f", line {frames[-1].lineno}" if frames else ""


def check_config_keys(config: ml_collections.ConfigDict, reference=None):
  """Every key must be one of `reference`'s (default: base_config()'s): a config file can
  add a misspelt key (c.train.stepz = 5) without ml_collections noticing."""
  arch = config.get("model", {}).get("arch", "bert")
  if reference is None:
    reference = base_config(arch)
  problems = []

  def walk(node, ref, prefix):
    for key in node.keys():
      if key not in ref:
        close = difflib.get_close_matches(key, list(ref.keys()), n=1)
        hint = f" (did you mean config.{prefix}{close[0]}?)" if close else ""
        problems.append(f"unknown config key config.{prefix}{key}{hint}")
      elif isinstance(ref[key], ml_collections.ConfigDict):
        if isinstance(node[key], ml_collections.ConfigDict):
          walk(node[key], ref[key], f"{prefix}{key}.")
        else:
          problems.append(f"config.{prefix}{key} must be a section, not {node[key]!r}")
    missing = [k for k in ref.keys() if k not in node]
    if missing:
      problems.append(f"config.{prefix.rstrip('.') or '(top)'} lacks "
                      f"{', '.join(prefix + k for k in missing)}")

  walk(config, reference, "")
  if problems:
    raise ConfigError("; ".join(problems) + "; plmjax/config.py base_config() lists every key "
                      "(config files start from it; fine-tuning adds plmjax/finetune/tasks.py "
                      "finetune_config()'s)")


def summary(config: ml_collections.ConfigDict) -> str:
  """The resolved config as one compact block: a line per section."""
  lines = ["plmjax: config (--print-config prints it as JSON):"]
  for section, values in config.items():
    if isinstance(values, ml_collections.ConfigDict):
      items = [f"{k}={v!r}" if isinstance(v, str) else
               f"{k}={v.to_dict()}" if isinstance(v, ml_collections.ConfigDict) else f"{k}={v}"
               for k, v in values.items() if k != "logical_axis_rules"]
      if "logical_axis_rules" in values:
        items.append(f"logical_axis_rules=({len(values.logical_axis_rules)} rules)")
      lines.append(f"  {section}: " + " ".join(items))
  return "\n".join(lines)


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]):
  """Applies `--config.a.b=VALUE` strings; unknown keys and bad types are errors."""
  for item in overrides:
    if not item.startswith("--config.") or "=" not in item:
      raise ConfigError(f"cannot parse {item!r}; overrides look like --config.train.steps=100")
    dotted, raw = item[len("--config."):].split("=", 1)
    set_value(config, dotted, raw)
  return config


def set_value(config: ml_collections.ConfigDict, dotted: str, raw: str):
  *parents, leaf = dotted.split(".")
  node = config
  for i, part in enumerate(parents):
    if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
      raise ConfigError(f"unknown config key config.{'.'.join(parents[:i + 1])}; "
                        f"known: {', '.join(sorted(node.keys()))}")
    node = node[part]
  if leaf not in node:
    where = "config." + ".".join(parents) if parents else "config"
    raise ConfigError(f"unknown config key config.{dotted}; known keys of {where}: "
                      f"{', '.join(sorted(node.keys()))}")
  old = node[leaf]
  node[leaf] = _parse(raw, old, dotted)


def _parse(raw: str, old, dotted: str):
  want = type(old)
  try:
    if isinstance(old, bool):
      if raw.lower() in ("true", "1", "yes"):
        return True
      if raw.lower() in ("false", "0", "no"):
        return False
      raise ValueError
    if isinstance(old, int):
      return int(raw)
    if isinstance(old, float):
      return float(raw)
    if isinstance(old, str) or old is None:
      return raw
    if isinstance(old, (tuple, list)):
      import ast
      value = ast.literal_eval(raw)
      return want(value)
  except (ValueError, SyntaxError):
    pass
  raise ConfigError(f"config.{dotted}={raw!r} is not a valid {want.__name__} "
                    f"(current value {old!r})")


def validate(config: ml_collections.ConfigDict) -> ModelConfig:
  """Checks cross-key constraints; returns the typed model config."""
  model_cfg = ModelConfig.from_config(config.model)
  d, t = config.data, config.train
  positive = [("train.steps", t.steps), ("train.batch_size", t.batch_size),
              ("train.grad_accum_steps", t.grad_accum_steps),
              ("data.max_seq_len", d.max_seq_len), ("checkpoint.every_steps",
                                                    config.checkpoint.every_steps),
              ("checkpoint.keep", config.checkpoint.keep),
              ("train.log_every_steps", t.log_every_steps),
              ("train.loss_scale_growth_interval", t.loss_scale_growth_interval)]
  for key, value in positive:
    if value <= 0:
      raise ConfigError(f"config.{key}={value} must be a positive integer")
  if t.learning_rate <= 0:
    raise ConfigError(f"config.train.learning_rate={t.learning_rate} must be positive")
  if t.decay not in ("linear", "cosine", "constant"):
    raise ConfigError(f"config.train.decay={t.decay!r} is not allowed; use linear, cosine or constant")
  if t.loss_scale_init < 1:
    raise ConfigError(f"config.train.loss_scale_init={t.loss_scale_init} must be at least 1 "
                      "(the loss scale never goes below 1)")
  if model_cfg.dtype == "float16" and model_cfg.param_dtype != "float32":
    raise ConfigError(
        f"config.model.param_dtype={model_cfg.param_dtype!r} with model.dtype='float16': "
        "loss-scaled float16 training needs float32 master weights (the unscaled gradients "
        "and small updates underflow in 16 bits); set config.model.param_dtype=float32")
  if t.nonfinite not in ("stop", "skip"):
    raise ConfigError(f"config.train.nonfinite={t.nonfinite!r} is not allowed; use stop or skip")
  if d.max_seq_len > model_cfg.max_position_embeddings:
    raise ConfigError(
        f"config.data.max_seq_len={d.max_seq_len} is above the model's position table "
        f"(config.model.max_position_embeddings={model_cfg.max_position_embeddings}); "
        "lower max_seq_len or raise max_position_embeddings")
  tensor = config.mesh.tensor
  if tensor > 1 and model_cfg.num_heads % tensor:
    raise ConfigError(f"config.model.num_heads={model_cfg.num_heads} is not divisible by "
                      f"config.mesh.tensor={tensor}: tensor parallelism splits whole heads; "
                      "use a tensor size that divides the heads")
  if t.batch_size % t.grad_accum_steps:
    raise ConfigError(f"config.train.batch_size={t.batch_size} is not divisible by "
                      f"config.train.grad_accum_steps={t.grad_accum_steps}")
  if model_cfg.arch == "bert":
    if not 0 < d.mask_prob < 1:
      raise ConfigError(f"config.data.mask_prob={d.mask_prob} must be in (0, 1)")
    if d.max_predictions_per_seq < 1:
      raise ConfigError(f"config.data.max_predictions_per_seq={d.max_predictions_per_seq} "
                        "must be at least 1")
    if d.max_seq_len < 8:
      raise ConfigError(f"config.data.max_seq_len={d.max_seq_len} is too short for BERT pairs "
                        "(at least 8)")
  if model_cfg.arch == "t5":
    if d.max_target_len < 4:
      raise ConfigError(f"config.data.max_target_len={d.max_target_len} is too short for "
                        "span-corruption targets (at least 4)")
    if not 0 < d.noise_density < 1:
      raise ConfigError(f"config.data.noise_density={d.noise_density} must be in (0, 1)")
    if d.mean_noise_span_length < 1:
      raise ConfigError(f"config.data.mean_noise_span_length={d.mean_noise_span_length} must "
                        "be at least 1")
  return model_cfg
