"""`plmjax embed`: sentence embeddings from any BERT workdir (pretrained, imported, fine-tuned).

  plmjax embed --workdir runs/minilm --input texts.txt --output emb.npy \\
      [--pooling mean|cls] [--normalize] [--batch-size 64] [--max-seq-len N]

--input is a .txt file (one text per line) or a .jsonl file (a JSON string, or an
object whose --field, default "text", holds the text). Each text becomes one row
[CLS] text [SEP], cut to --max-seq-len tokens (default: the workdir's data.max_seq_len).
`mean` averages the encoder's last hidden states over the row's tokens, padding left
out ([CLS] and [SEP] included, as sentence-transformers does); `cls` takes the [CLS]
hidden state. --normalize scales each vector to unit length. Rows are sorted by length and
padded to a few bucket lengths, so a file compiles a handful of programs. The output .npy
holds N x hidden_size float32 vectors in input order.

Sharding: the local devices form a mesh as in training, by default all of them over `data`
(weights replicated, rows split). `--config.mesh.fsdp=N` / `--config.mesh.tensor=N` split
the weights as training does (config.sharding.logical_axis_rules) for a model too large for
one device; rows are split over data x fsdp. The training run's own mesh is not reused (it
may span other hosts).

A workdir that `plmjax import-hf` made from a sentence-transformers directory
(modules.json: Transformer, Pooling, Normalize) keeps that model's pooling, normalisation
and max_seq_length in DIR/sentence_transformers.json; they are this command's defaults,
so its vectors are `SentenceTransformer(dir).encode(texts)`'s.
"""

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from plmjax import config as config_lib
from plmjax import workdir as workdir_lib
from plmjax.data.tokenizer import load_tokenizer
from plmjax.errors import ConfigError, DataError, UserError
from plmjax.models import bert
from plmjax.models.config import ModelConfig
from plmjax.train import checkpoint, sharding
from plmjax.train.state import MeshRules

POOLINGS = ("mean", "cls")
SETTINGS_FILE = "sentence_transformers.json"


def add_arguments(parser):
  parser.add_argument("--workdir", required=True, help="a BERT workdir")
  parser.add_argument("--input", required=True, help=".txt (a text per line) or .jsonl file")
  parser.add_argument("--output", required=True, help="output .npy file (N x hidden_size)")
  parser.add_argument("--pooling", choices=POOLINGS, default=None,
                      help="default: the imported sentence-transformers model's, else mean")
  parser.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                      help="unit-length vectors (default: as the imported model does, else off)")
  parser.add_argument("--field", default="text", help=".jsonl: the field holding the text")
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--max-seq-len", type=int, default=None,
                      help="tokens per text, [CLS] and [SEP] included")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")


# ---- sentence-transformers directories (read by import-hf) -------------------------------

def _read_json(path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise DataError(f"{path} cannot be read as JSON ({e})") from e


def _modules(hf_dir: str) -> list[dict]:
  path = os.path.join(hf_dir, "modules.json")
  return _read_json(path) if os.path.isfile(path) else []


def transformer_dir(hf_dir: str) -> str:
  """The folder of a sentence-transformers directory that holds the Hugging Face model
  (its root, or a subfolder such as 0_Transformer); hf_dir itself for a plain HF model."""
  for m in _modules(hf_dir):
    if m.get("type", "").endswith(".Transformer") and m.get("path"):
      return os.path.join(hf_dir, m["path"])
  return hf_dir


def sentence_transformers_settings(hf_dir: str) -> dict | None:
  """{pooling, normalize, max_seq_len} of a sentence-transformers directory, else None."""
  modules = _modules(hf_dir)
  if not modules:
    return None
  kinds = [m.get("type", "").rsplit(".", 1)[-1] for m in modules]
  other = [k for k in kinds if k not in ("Transformer", "Pooling", "Normalize")]
  settings = dict(pooling=None, normalize="Normalize" in kinds, max_seq_len=None,
                  unsupported=other)
  for m, kind in zip(modules, kinds):
    if kind == "Pooling":
      cfg = _read_json(os.path.join(hf_dir, m.get("path", ""), "config.json"))
      modes = cfg.get("pooling_mode")  # sentence-transformers >= 5: a name (or names)
      if modes is None:  # older files: one flag per mode
        modes = [k[len("pooling_mode_"):] for k, v in cfg.items()
                 if k.startswith("pooling_mode_") and v is True]
      modes = [modes] if isinstance(modes, str) else list(modes)
      names = {"mean_tokens": "mean", "cls_token": "cls"}
      settings["pooling"] = "+".join(names.get(x, x) for x in modes)
  model_dir = transformer_dir(hf_dir)
  for name, key in (("sentence_bert_config.json", "max_seq_length"),
                    ("tokenizer_config.json", "model_max_length")):
    path = os.path.join(model_dir, name)
    value = _read_json(path).get(key) if os.path.isfile(path) else None
    if isinstance(value, int) and 0 < value < 1_000_000:
      settings["max_seq_len"] = value
      break
  return settings


def write_settings(workdir: str, settings: dict | None):
  """DIR/sentence_transformers.json, or none when `settings` is None."""
  path = os.path.join(workdir, SETTINGS_FILE)
  if settings is None:
    if os.path.isfile(path):
      os.remove(path)  # from an earlier import into the same workdir
    return
  with open(path, "w", encoding="utf-8") as f:
    json.dump(settings, f, indent=2)


def describe_settings(settings: dict) -> str:
  text = (f"pooling {settings['pooling']}, normalize {settings['normalize']}, "
          f"max_seq_len {settings['max_seq_len']}")
  if settings.get("unsupported"):
    text += f" (modules plmjax does not run: {', '.join(settings['unsupported'])})"
  return text


def read_settings(workdir: str) -> dict:
  path = os.path.join(workdir, SETTINGS_FILE)
  return _read_json(path) if os.path.isfile(path) else {}


# ---- the model ------------------------------------------------------------------------

def load_bert(workdir: str, step=None):
  """(config, ModelConfig, tokenizer, params) of a BERT workdir, any head."""
  config = workdir_lib.read_config(workdir)
  model_cfg = ModelConfig.from_config(config.model)
  if model_cfg.arch != "bert":
    raise ConfigError(f"{workdir} holds a {model_cfg.arch!r} model; this command needs BERT")
  tokenizer = load_tokenizer(workdir_lib.tokenizer_dir(workdir))
  if tokenizer.cls_id is None or tokenizer.sep_id is None:
    raise DataError(f"tokenizer {tokenizer.path} has no [CLS]/[SEP]; this command needs a "
                    "BERT tokenizer")
  params, _ = checkpoint.load_params(workdir, step)
  return config, model_cfg, tokenizer, params


def encoder_params(params: dict) -> dict:
  """The BertModel weights of any BERT head's tree, without the pooler."""
  return {k: v for k, v in params["bert"].items() if k != "pooler"}


def pool(hidden_BxLxD, mask_BxL, pooling: str, normalize: bool):
  """Mean over the unmasked tokens, or the first token; float32."""
  hidden_BxLxD = hidden_BxLxD.astype(jnp.float32)
  if pooling == "cls":
    x_BxD = hidden_BxLxD[:, 0]
  else:
    m_BxLx1 = mask_BxL[..., None].astype(jnp.float32)
    x_BxD = (hidden_BxLxD * m_BxLx1).sum(1) / jnp.maximum(m_BxLx1.sum(1), 1e-9)
  if normalize:
    x_BxD = x_BxD / jnp.maximum(jnp.linalg.norm(x_BxD, axis=-1, keepdims=True), 1e-12)
  return x_BxD


class Placement:
  """The mesh, the logical-axis rules and the weights' shardings that `run_batches` uses."""

  def __init__(self, config, model, mesh_overrides=()):
    mesh_cfg = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    for item in mesh_overrides:
      if not item.startswith("--config.mesh."):
        raise ConfigError(f"this command takes only --config.mesh.* overrides (got {item})")
    holder = ml_collections.ConfigDict(dict(mesh=mesh_cfg))
    config_lib.apply_overrides(holder, list(mesh_overrides))
    heads = config.model.num_heads
    if heads % holder.mesh.tensor:
      raise ConfigError(f"--config.mesh.tensor={holder.mesh.tensor} must divide the model's "
                        f"{heads} heads")
    self.mesh = sharding.make_mesh(holder.mesh, jax.local_devices())
    self.rules = tuple(tuple(r) for r in config.sharding.logical_axis_rules)
    ids = np.zeros((1, 8), np.int32)
    with MeshRules(self.mesh, self.rules):
      boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), ids, None, ids + 1,
                                                deterministic=True))["params"]
      self.params = sharding.logical_shardings(boxed, self.mesh, self.rules)


def buckets(max_len: int) -> list[int]:
  """Padded lengths: powers of two from 16, then max_len."""
  out, n = [], 16
  while n < max_len:
    out.append(n)
    n *= 2
  return out + [max_len]


def rows(tokenizer, texts, max_len: int) -> list[list[int]]:
  """[CLS] ids [SEP] per text, the ids cut to fit max_len."""
  return [[tokenizer.cls_id] + ids[:max_len - 2] + [tokenizer.sep_id]
          for ids in tokenizer.encode_batch(list(texts))]


def run_batches(fn, params, id_rows, pad_id: int, batch_size: int, max_len: int,
                desc: str, place: Placement) -> np.ndarray:
  """fn(params, ids_BxL, mask_BxL) on every row, batched by length, on `place`'s mesh
  (rows over data x fsdp, weights as its shardings say); results in the rows' order."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  ways = sharding.batch_parallelism(place.mesh)
  batch_size = -(-min(batch_size, max(len(id_rows), 1)) // ways) * ways
  rows_sharding = sharding.batch_sharding(place.mesh)
  params = jax.device_put(params, place.params)
  fn = jax.jit(fn, in_shardings=(place.params, rows_sharding, rows_sharding),
               out_shardings=rows_sharding)
  order = np.argsort([-len(r) for r in id_rows], kind="stable")
  sizes = buckets(max_len)
  out = [None] * len(id_rows)
  starts = range(0, len(order), batch_size)
  for start in tqdm(starts, desc=desc, disable=len(starts) < 10, file=sys.stderr):
    idx = order[start:start + batch_size]
    length = next(b for b in sizes if b >= len(id_rows[idx[0]]))
    ids_BxL = np.full((batch_size, length), pad_id, np.int32)
    mask_BxL = np.zeros((batch_size, length), np.int32)
    for b, i in enumerate(idx):
      ids_BxL[b, :len(id_rows[i])] = id_rows[i]
      mask_BxL[b, :len(id_rows[i])] = 1
    with MeshRules(place.mesh, place.rules):
      result = np.asarray(jax.device_get(fn(params, ids_BxL, mask_BxL)))
    for b, i in enumerate(idx):
      out[i] = result[b]
  return np.stack(out) if out else np.zeros((0,), np.float32)


def embed(workdir: str, texts, *, pooling: str | None = None, normalize: bool | None = None,
          batch_size: int = 64, max_seq_len: int | None = None, step=None,
          mesh_overrides=()) -> np.ndarray:
  """N x hidden_size float32 embeddings of `texts` (see the module docstring)."""
  config, model_cfg, tokenizer, params = load_bert(workdir, step)
  settings = read_settings(workdir)
  if settings.get("unsupported") and pooling is None:
    raise ConfigError(f"{workdir} was imported from a sentence-transformers model with modules "
                      f"plmjax does not run ({', '.join(settings['unsupported'])}); pass "
                      "--pooling to embed with the encoder alone")
  pooling = pooling or settings.get("pooling") or "mean"
  if pooling not in POOLINGS:
    raise ConfigError(f"pooling {pooling!r} (from {SETTINGS_FILE}) is not supported; pass "
                      f"--pooling {' or --pooling '.join(POOLINGS)}")
  normalize = settings.get("normalize", False) if normalize is None else normalize
  max_len = max_seq_len or min(settings.get("max_seq_len") or config.data.max_seq_len,
                               model_cfg.max_position_embeddings)
  if not 2 < max_len <= model_cfg.max_position_embeddings:
    raise ConfigError(f"--max-seq-len {max_len} must be in 3..{model_cfg.max_position_embeddings} "
                      "(the model's positions)")
  if batch_size < 1:
    raise ConfigError(f"--batch-size {batch_size} must be positive")
  model = bert.BertModel(model_cfg, add_pooling_layer=False)

  def forward(p, ids_BxL, mask_BxL):
    hidden = model.apply({"params": p}, ids_BxL, None, mask_BxL, deterministic=True)["hidden"]
    return pool(hidden, mask_BxL, pooling, normalize)

  pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
  out = run_batches(forward, encoder_params(params), rows(tokenizer, texts, max_len), pad,
                    batch_size, max_len, "embed", Placement(config, model, mesh_overrides))
  return out.reshape(len(texts), model_cfg.hidden_size).astype(np.float32)


def read_texts(path: str, field: str = "text") -> list[str]:
  """Lines of a .txt file, or the texts of a .jsonl file's lines."""
  if not os.path.isfile(path):
    raise DataError(f"--input {path}: no such file")
  with open(path, encoding="utf-8") as f:
    lines = f.read().splitlines()
  if not path.endswith(".jsonl"):
    return lines
  texts = []
  for n, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      value = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{path}:{n}: not valid JSON ({e})") from None
    if isinstance(value, dict):
      value = value.get(field)
    if not isinstance(value, str):
      raise DataError(f"{path}:{n}: expected a JSON string or an object with a text field "
                      f"{field!r} (--field)")
    texts.append(value)
  return texts


def main(args, overrides):
  texts = read_texts(args.input, args.field)
  if not texts:
    raise UserError(f"--input {args.input} holds no texts")
  vectors = embed(args.workdir, texts, pooling=args.pooling, normalize=args.normalize,
                  batch_size=args.batch_size, max_seq_len=args.max_seq_len, step=args.step,
                  mesh_overrides=overrides)
  np.save(args.output, vectors)
  print(f"plmjax: wrote {vectors.shape[0]} x {vectors.shape[1]} embeddings to {args.output}")
  return 0
