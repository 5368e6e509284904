"""`plmjax import-hf`: a Hugging Face BERT / GPT-2 / T5 directory -> a plmjax workdir.

  plmjax import-hf --model HF_DIR --workdir DIR [--head HEAD] [--overwrite] [--config.a.b=V ...]

HF_DIR holds config.json and model.safetensors (sharded or not) or
pytorch_model.bin. The workdir gets config.json, tokenizer/ (the model's
WordPiece / byte-level BPE files plus a tokenizer.json, read by plmjax's data
code) and a params-only checkpoint at step 0, which `finetune --init`,
`export` and `generate` accept. Head weights the source lacks (say, the MLM
head of a sentence-embedding BertModel) are initialised and reported; head
weights the chosen head does not use are dropped and reported.
"""

import json
import os
import shutil
import tempfile

import flax.linen as nn
import jax
import numpy as np
from safetensors.numpy import load_file

from plmjax import workdir as workdir_lib
from plmjax import config as config_lib
from plmjax import embed as embed_lib
from plmjax.errors import CheckpointError, UserError
from plmjax.export import hf_config, hf_tokenizer, hf_weights, t5_weights
from plmjax.models import HEADS, build_model
from plmjax.models.config import ModelConfig
from plmjax.models.transformer import unstack_layers
from plmjax.train import checkpoint


class HFImportError(UserError):
  """An HF directory that cannot be imported (missing files, target not empty)."""


def add_arguments(parser):
  parser.add_argument("--model", required=True, help="Hugging Face model directory")
  parser.add_argument("--workdir", required=True, help="plmjax workdir to create")
  heads = sorted({h for arch in HEADS.values() for h in arch})
  parser.add_argument("--head", default=None, choices=heads,
                      help="plmjax head (default: from config.json's architectures)")
  parser.add_argument("--overwrite", action="store_true",
                      help="write into --workdir even when it is not empty")


def main(args, overrides):
  report = import_hf(args.model, args.workdir, head=args.head, overrides=overrides,
                     overwrite=args.overwrite)
  print(format_report(report, args.model, args.workdir))


def format_report(report: dict, hf_dir: str, workdir: str) -> str:
  lines = [f"imported {report['num_tensors']} tensors ({report['num_params']:,} parameters) of "
           f"{report['class']} from {hf_dir} as plmjax {report['arch']} head "
           f"{report['head']!r} into {workdir}"]
  for key, what in (("initialised", "initialised (absent in the source)"),
                    ("dropped", f"dropped (unused by head {report['head']!r})"),
                    ("ignored", "ignored (buffers and tied copies)")):
    if report[key]:
      lines.append(f"  {what}: {', '.join(report[key])}")
  if report["tokenizer_files"]:
    lines.append(f"  tokenizer: {', '.join(report['tokenizer_files'])} -> "
                 f"{workdir_lib.tokenizer_dir(workdir)}")
  else:
    lines.append(f"  warning: {hf_dir} has no tokenizer files; pass --config.data.tokenizer=... "
                 "when fine-tuning")
  if report.get("sentence_transformers"):
    settings = embed_lib.describe_settings(report["sentence_transformers"])
    lines.append(f"  sentence-transformers: {settings} -> "
                 f"{os.path.join(workdir, embed_lib.SETTINGS_FILE)} (`plmjax embed` defaults)")
  return "\n".join(lines)


def read_hf_config(hf_dir: str) -> dict:
  path = os.path.join(hf_dir, "config.json")
  if not os.path.isdir(hf_dir):
    raise HFImportError(f"--model {hf_dir} is not a directory; give a Hugging Face model folder "
                       "(config.json + model.safetensors or pytorch_model.bin)")
  if not os.path.isfile(path):
    raise HFImportError(f"{path} does not exist; --model must be a Hugging Face model folder")
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise HFImportError(f"{path} is not valid JSON ({e})") from e


def read_hf_weights(hf_dir: str) -> tuple[dict[str, np.ndarray], str]:
  """All tensors of the directory as numpy, and the file name(s) they came from."""
  single = os.path.join(hf_dir, "model.safetensors")
  if os.path.isfile(single):
    return _load_safetensors(single), "model.safetensors"
  for index_name, loader in (("model.safetensors.index.json", _load_safetensors),
                             ("pytorch_model.bin.index.json", _load_torch)):
    index = os.path.join(hf_dir, index_name)
    if os.path.isfile(index):
      with open(index) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
      state = {}
      for name in files:
        state.update(loader(os.path.join(hf_dir, name)))
      return state, index_name
  bin_path = os.path.join(hf_dir, "pytorch_model.bin")
  if os.path.isfile(bin_path):
    return _load_torch(bin_path), "pytorch_model.bin"
  raise HFImportError(f"{hf_dir} has no weights: expected model.safetensors, "
                     "model.safetensors.index.json or pytorch_model.bin")


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
  try:
    return load_file(path)
  except Exception as e:  # safetensors raises SafetensorError / OSError
    raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from e


def _load_torch(path: str) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError as e:
    raise HFImportError(f"reading {path} needs PyTorch (pip install torch), or save the model "
                       "as safetensors (model.save_pretrained(dir)) and import that") from e
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pickle and zip errors of all kinds
    raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({e})") from e
  # bf16 has no numpy type in torch; float32 holds it exactly.
  return {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy()
          for k, v in state.items() if isinstance(v, torch.Tensor)}


def _check_workdir(workdir: str, overwrite: bool):
  if os.path.isdir(workdir) and os.listdir(workdir) and not overwrite:
    raise HFImportError(f"--workdir {workdir} exists and is not empty; pass --overwrite or choose "
                       "another directory")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise HFImportError(f"--workdir {workdir} exists and is not a directory")


def _abstract_params(model):
  ids = np.ones((1, 2), np.int32)
  return nn.meta.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), ids))["params"])


def _init_params(model, seed: int):
  ids = np.ones((1, 2), np.int32)
  init = jax.jit(lambda key: model.init(key, ids)["params"])  # one compile, not one per op
  return jax.tree.map(np.asarray, nn.meta.unbox(init(jax.random.key(seed))))


def import_hf(hf_dir: str, workdir: str, *, head: str | None = None, overrides=(),
              overwrite: bool = False) -> dict:
  """Converts HF_DIR into a plmjax workdir; returns a report dict."""
  st_dir, hf_dir = hf_dir, embed_lib.transformer_dir(hf_dir)  # sentence-transformers: its model
  hf = read_hf_config(hf_dir)
  source = os.path.join(hf_dir, "config.json")
  model_cfg, default_head, cls = hf_config.from_hf_config(hf, source)
  arch = model_cfg.arch
  head = head or default_head
  if head not in HEADS[arch]:
    raise HFImportError(f"--head {head} does not fit a {arch} model; use one of "
                       f"{', '.join(HEADS[arch])}")
  _check_workdir(workdir, overwrite)

  config = config_lib.base_config(arch)
  config.model.update(model_cfg.to_dict())
  config.task.head = head
  labels = hf_config.label_names(hf)
  if head in ("sequence_classification", "token_classification") and labels:
    config.task.labels = tuple(labels)  # as fine-tuning configs name them; export writes id2label
  config.data.max_seq_len = min(config.data.max_seq_len, model_cfg.max_position_embeddings)
  config_lib.apply_overrides(config, list(overrides))
  model_cfg = ModelConfig.from_config(config.model)

  state, weights_name = read_hf_weights(hf_dir)
  weights_source = os.path.join(hf_dir, weights_name)
  model = build_model(model_cfg, head)
  abstract = _abstract_params(model)
  if arch == "t5":
    state, ignored = t5_weights.normalise_hf_names(state, model_cfg.tie_word_embeddings,
                                                   weights_source)
    tied = []
    found, missing, unused = t5_weights.from_hf_state_dict(state, abstract, weights_source)
    # T5ForConditionalGeneration has no optional head: every tensor must be there and used.
    _raise_on_mismatch(missing, unused, weights_source, hf, head_names=False)
    names = {}
  else:
    state, ignored = hf_weights.normalise_hf_names(state, arch)
    tied = [k for k in hf_weights.TIED[arch] if k in state]
    hf_weights.check_tied(state, arch, weights_source)
    found, missing, unused = hf_weights.from_hf_state_dict(state, abstract, arch, weights_source)
    _raise_on_mismatch(missing, unused, weights_source, hf)
    names = {hf_weights.hf_name(p): p for p in hf_weights.flatten(abstract)}
  flat = dict(found)
  if missing:  # head weights only (checked above): initialise them as training would
    init = hf_weights.flatten(_init_params(model, config.train.seed))
    flat.update({names[n]: init[names[n]] for n in missing})
  params = hf_weights.unflatten(flat)

  with tempfile.TemporaryDirectory() as tmp:
    tok_dir = os.path.join(tmp, "tokenizer")
    tokenizer_files = hf_tokenizer.import_hf_tokenizer(hf_dir, tok_dir, arch)
    if overwrite:  # no stale checkpoint (a later step would win) or tokenizer may survive
      for sub in (workdir_lib.checkpoint_dir(workdir), workdir_lib.tokenizer_dir(workdir)):
        shutil.rmtree(sub, ignore_errors=True)
    checkpoint.write_params_workdir(workdir, config, params, step=0,
                                    tokenizer_dir=tok_dir if tokenizer_files else None)
  sentence = embed_lib.sentence_transformers_settings(st_dir)
  embed_lib.write_settings(workdir, sentence)  # `plmjax embed`'s defaults (None: none)
  per_layer = hf_weights.flatten(unstack_layers(hf_weights.unflatten(found)))  # HF's count
  return dict(arch=arch, head=head, num_tensors=len(per_layer), sentence_transformers=sentence,
              num_params=int(sum(v.size for v in found.values())), initialised=missing,
              dropped=unused, ignored=sorted(ignored + tied), tokenizer_files=tokenizer_files or [],
              **{"class": cls})


def _raise_on_mismatch(missing: list[str], unused: list[str], source: str, hf: dict,
                       head_names: bool = True):
  """Base-model tensors must all be there and all be used: else config and weights disagree.
  head_names=False: no tensor belongs to an optional head (T5)."""
  def is_head(name):
    return head_names and hf_weights.is_head_name(name)

  base_missing = [n for n in missing if not is_head(n)]
  base_unused = [n for n in unused if not is_head(n)]
  if not base_missing and not base_unused:
    return
  layers = hf.get("num_hidden_layers", hf.get("n_layer", hf.get("num_layers")))
  parts = []
  if base_missing:
    parts.append(f"missing {len(base_missing)} tensor(s) the config needs "
                 f"({', '.join(base_missing[:4])}{', ...' if len(base_missing) > 4 else ''})")
  if base_unused:
    parts.append(f"{len(base_unused)} tensor(s) the config has no place for "
                 f"({', '.join(base_unused[:4])}{', ...' if len(base_unused) > 4 else ''})")
  raise CheckpointError(f"{source} does not match config.json (num layers {layers}): "
                        f"{'; '.join(parts)}")
