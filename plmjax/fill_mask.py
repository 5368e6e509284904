"""`plmjax fill-mask`: a BERT's guesses for the [MASK] tokens of a text.

  plmjax fill-mask --workdir runs/bert_base "The capital of France is [MASK]." [--top-k 5]

For a workdir with an MLM head: pretrained (`plmjax pretrain`, head pretraining) or
imported with one (BertForPreTraining / BertForMaskedLM; --head pretraining or mlm). A
model imported without MLM weights (a BertModel: import-hf reports the head as
initialised) guesses at random; for a sentence-transformers import this warns.
Each "[MASK]" in the text becomes the mask token; the text is encoded as one row
[CLS] text [SEP] and the MLM head's softmax at each mask gives the top-k tokens, as
Hugging Face's fill-mask pipeline scores them. One line per guess:

  0.4122  paris   the capital of france is paris.

(probability, token, the text with the mask filled by it); with several masks, a block
per mask, the others left as [MASK]. --json prints the pipeline's dicts (score, token,
token_str, sequence) instead.
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from plmjax.embed import encoder_params, load_bert, read_settings
from plmjax.errors import ConfigError, UserError
from plmjax.models import bert

MASK = "[MASK]"


def add_arguments(parser):
  parser.add_argument("--workdir", required=True, help="a BERT workdir with an MLM head")
  parser.add_argument("text", help=f"text with one or more {MASK}")
  parser.add_argument("--top-k", type=int, default=5)
  parser.add_argument("--json", action="store_true", help="print JSON (one list per mask)")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")


def mlm_params(params: dict, workdir: str) -> dict:
  """The BertForMaskedLM tree (encoder + cls/predictions) of a pretraining or mlm head."""
  predictions = params.get("cls", {}).get("predictions")
  if predictions is None:
    raise ConfigError(f"{workdir} has no MLM head (its parameters hold "
                      f"{', '.join(sorted(params))}); fill-mask needs a pretrained BERT or one "
                      "imported with --head pretraining or mlm")
  return {"bert": encoder_params(params), "cls": {"predictions": predictions}}


def encode_masked(tokenizer, text: str) -> list[int]:
  """[CLS] text [SEP] with each literal [MASK] as the mask id (a sentencepiece tokenizer
  reads "[MASK]" as characters; the text around the masks is encoded piece by piece)."""
  if tokenizer.mask_id is None:
    raise ConfigError(f"tokenizer {tokenizer.path} has no {MASK} token")
  ids = []
  for i, part in enumerate(text.split(MASK)):
    if i:
      ids.append(tokenizer.mask_id)
    ids += tokenizer.encode(part) if part.strip() else []
  return [tokenizer.cls_id] + ids + [tokenizer.sep_id]


def fill_mask(workdir: str, text: str, *, top_k: int = 5, step=None) -> list[list[dict]]:
  """Per mask, the top_k guesses as {score, token, token_str, sequence}."""
  config, model_cfg, tokenizer, params = load_bert(workdir, step)
  del config
  if read_settings(workdir):
    print(f"plmjax: warning: {workdir} was imported from a sentence-transformers model, which "
          "has no MLM head: import-hf initialised it at random, so these guesses mean nothing",
          file=sys.stderr)
  if top_k < 1:
    raise ConfigError(f"--top-k {top_k} must be positive")
  ids = encode_masked(tokenizer, text)
  masks = [i for i, t in enumerate(ids) if t == tokenizer.mask_id]
  if not masks:
    raise UserError(f"the text has no {MASK}; put one where a word should be guessed")
  if len(ids) > model_cfg.max_position_embeddings:
    raise UserError(f"the text is {len(ids)} tokens with [CLS] and [SEP]; the model takes at "
                    f"most {model_cfg.max_position_embeddings}")
  model = bert.BertForMaskedLM(model_cfg)

  @jax.jit
  def probs(p, ids_1xL, positions_1xP):
    out = model.apply({"params": p}, ids_1xL, masked_positions=positions_1xP,
                      deterministic=True)
    return jax.nn.softmax(out["mlm_logits"].astype(jnp.float32), axis=-1)

  probs_PxV = np.asarray(probs(mlm_params(params, workdir), np.array([ids], np.int32),
                               np.array([masks], np.int32))[0])
  k = min(top_k, probs_PxV.shape[-1])
  out = []
  for p, pos in enumerate(masks):
    top = np.argsort(-probs_PxV[p], kind="stable")[:k]
    guesses = []
    for t in top:
      filled = list(ids)
      filled[pos] = int(t)
      guesses.append(dict(score=float(probs_PxV[p, t]), token=int(t),
                          token_str=tokenizer.decode([int(t)]),
                          sequence=tokenizer.decode(filled[1:-1])))
    out.append(guesses)
  return out


def main(args, overrides):
  if overrides:
    raise ConfigError(f"fill-mask takes no --config overrides (got {overrides[0]})")
  results = fill_mask(args.workdir, args.text, top_k=args.top_k, step=args.step)
  if args.json:
    print(json.dumps(results if len(results) > 1 else results[0]))
    return 0
  for m, guesses in enumerate(results):
    if len(results) > 1:
      print(f"{MASK} #{m + 1}:")
    width = max(len(g["token_str"]) for g in guesses)
    for g in guesses:
      print(f"{g['score']:.4f}  {g['token_str']:<{width}}  {g['sequence']}")
  return 0
