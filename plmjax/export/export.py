"""`plmjax export`: a workdir's checkpoint -> a Hugging Face (PyTorch) model directory.

  plmjax export --workdir DIR --out OUT [--step N] [--dtype float32|bfloat16|float16]
                [--overwrite]

OUT gets config.json, model.safetensors and the tokenizer files, so that
`transformers` loads it with `from_pretrained` (AutoModelFor... of the head,
AutoTokenizer). Needs no torch: weights are written with safetensors.numpy.
"""

import json
import os
import secrets
import shutil

import jax
import numpy as np
from safetensors.numpy import save_file

from plmjax import workdir as workdir_lib
from plmjax.errors import CheckpointError, UserError
from plmjax.export import hf_config, hf_tokenizer, hf_weights, t5_weights
from plmjax.models import build_model
from plmjax.models.config import ModelConfig
from plmjax.train import checkpoint


class ExportError(UserError):
  """An export that cannot be written (target exists, bad options)."""


def add_arguments(parser):
  parser.add_argument("--workdir", required=True,
                      help="plmjax workdir (from pretrain, finetune or import-hf)")
  parser.add_argument("--out", required=True, help="directory to write the Hugging Face model to")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  parser.add_argument("--dtype", default="float32", help="weight dtype: float32 (default), "
                      "bfloat16 or float16")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace OUT when it exists and is not empty")


def main(args, overrides):
  if overrides:
    raise ExportError(f"export takes no config overrides (got {' '.join(overrides)})")
  summary = export(args.workdir, args.out, step=args.step, dtype=args.dtype,
                   overwrite=args.overwrite)
  print(f"exported step {summary['step']} of {args.workdir} as {summary['class']} "
        f"({summary['num_tensors']} tensors, {summary['num_params']:,} parameters, "
        f"{summary['dtype']}) to {args.out}")
  if not summary["tokenizer_files"]:
    print(f"warning: {args.workdir} has no tokenizer/ folder; {args.out} has no tokenizer files")


def check_target(out: str, overwrite: bool):
  if os.path.exists(out) and not os.path.isdir(out):
    raise ExportError(f"--out {out} exists and is not a directory; choose another path")
  if os.path.isdir(out) and os.listdir(out) and not overwrite:
    raise ExportError(f"--out {out} exists and is not empty; pass --overwrite to replace it "
                      "or choose another directory")


def check_params(params, cfg: ModelConfig, head: str, workdir: str):
  """The checkpoint's tree must be exactly the head's (names and shapes)."""
  model = build_model(cfg, head)
  ids = np.ones((1, 2), np.int32)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), ids))["params"]
  want = {p: tuple(v.shape) for p, v in hf_weights.flatten(_unbox(abstract)).items()}
  have = {p: tuple(np.shape(v)) for p, v in hf_weights.flatten(params).items()}
  problems = [f"missing {'/'.join(p)}" for p in sorted(set(want) - set(have))]
  problems += [f"unexpected {'/'.join(p)}" for p in sorted(set(have) - set(want))]
  problems += [f"{'/'.join(p)} has shape {have[p]}, config implies {want[p]}"
               for p in sorted(set(want) & set(have)) if want[p] != have[p]]
  if problems:
    more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
    raise CheckpointError(
        f"the checkpoint in {workdir} does not match its config.json (head {head!r}): "
        f"{'; '.join(problems[:5])}{more}")


def _unbox(tree):
  import flax.linen as nn  # local: only this check needs flax's metadata boxes
  return nn.meta.unbox(tree)


def _label_names(config) -> list[str] | None:
  task = config.get("task") or {}
  for key in ("label_names", "labels"):
    names = task.get(key) if hasattr(task, "get") else None
    if names and all(isinstance(n, str) for n in names):
      return list(names)
  return None


def export(workdir: str, out: str, *, step: int | None = None, dtype: str = "float32",
           overwrite: bool = False) -> dict:
  """Writes the Hugging Face directory; returns a summary dict."""
  if dtype not in hf_weights.DTYPES:
    raise ExportError(f"--dtype {dtype!r} is not supported; use {', '.join(hf_weights.DTYPES)}")
  check_target(out, overwrite)
  config = workdir_lib.read_config(workdir)
  cfg = ModelConfig.from_config(config.model)
  head = config.task.head
  cls = hf_config.hf_class(cfg.arch, head)
  params, step = checkpoint.load_params(workdir, step)
  params = _unbox(hf_weights.unwrap(params))
  check_params(params, cfg, head, workdir)
  if cfg.arch == "t5":
    state = t5_weights.to_hf_state_dict(params, dtype)
  else:
    state = hf_weights.to_hf_state_dict(params, cfg.arch, dtype)

  parent = os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  # Write next to OUT and swap in at the end: a failed export leaves OUT untouched.
  # os.mkdir, not tempfile.mkdtemp: OUT gets the umask's mode, not mkdtemp's 0o700.
  tmp = os.path.join(parent, f".export-{secrets.token_hex(8)}")
  os.mkdir(tmp)
  try:
    tokenizer_files, special_ids = [], {}
    tok_dir = workdir_lib.tokenizer_dir(workdir)
    if os.path.isdir(tok_dir) and os.listdir(tok_dir):
      tokenizer_files = hf_tokenizer.write_hf_tokenizer(
          tok_dir, tmp, kind=cfg.arch, model_max_length=cfg.max_position_embeddings)
      special_ids = _special_ids(os.path.join(tmp, "tokenizer.json"), cfg.arch)
    hf = hf_config.to_hf_config(cfg, head, dtype=dtype, label_names=_label_names(config),
                                **special_ids)
    config_json, weights = os.path.join(tmp, "config.json"), os.path.join(tmp, "model.safetensors")
    with open(config_json, "w") as f:
      json.dump(hf, f, indent=2)
      f.write("\n")
    save_file(state, weights, metadata={"format": "pt"})
    shutil.copymode(config_json, weights)  # safetensors writes 0o600; open() follows the umask
    if os.path.isdir(out):
      shutil.rmtree(out)
    os.replace(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return dict(step=step, dtype=dtype, head=head, num_tensors=len(state),
              num_params=int(sum(v.size for v in state.values())), tokenizer_files=tokenizer_files,
              **{"class": cls})


def _special_ids(tokenizer_json: str, arch: str) -> dict:
  from tokenizers import Tokenizer
  tok = Tokenizer.from_file(tokenizer_json)
  if arch == "bert":
    return dict(pad_token_id=tok.token_to_id("[PAD]"))
  if arch == "t5":
    return dict(pad_token_id=tok.token_to_id(hf_tokenizer.T5_SPECIALS["pad_token"]),
                eos_token_id=tok.token_to_id(hf_tokenizer.T5_SPECIALS["eos_token"]))
  eos = tok.token_to_id(hf_tokenizer.GPT_EOS)
  pad = tok.token_to_id("<pad>")
  return dict(bos_token_id=eos, eos_token_id=eos, pad_token_id=pad)
