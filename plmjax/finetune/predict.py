"""`plmjax predict`: a fine-tuned workdir applied to a .jsonl/.tsv/.csv file.

  plmjax predict --workdir runs/sst2 --input reviews.jsonl [--output preds.jsonl]

The input has the fields the task was trained with (plmjax.finetune.data.task_fields;
labels are not needed). One JSON line per input record:

  classification  {"label": "positive", "score": 0.97, "scores": {"negative": 0.03, ...}}
  regression      {"score": 3.8}
  tagging         {"tokens": ["John", "lives", ...], "tags": ["B-PER", "O", ...]}
  qa              {"answer": "Denver Broncos"}
  completion      {"completion": "..."}   (greedy, or --num-beams; at most
                                         task.max_new_tokens or --max-new-tokens)
  seq2seq         {"target": "..."}       (the same; sources cut to data.max_seq_len)
"""

import json
import sys

import jax
import numpy as np

from plmjax import workdir as workdir_lib
from plmjax.data.tokenizer import load_tokenizer
from plmjax.errors import ConfigError
from plmjax.finetune import completion, data, features, seq2seq, tasks
from plmjax.models import build_model
from plmjax.models.config import ModelConfig
from plmjax.train import checkpoint
from plmjax.train.step import model_inputs


def add_arguments(parser):
  parser.add_argument("--workdir", required=True, help="a `plmjax finetune` workdir")
  parser.add_argument("--input", required=True, help=".jsonl, .tsv or .csv file")
  parser.add_argument("--output", default="-", help="output .jsonl (default: stdout)")
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  parser.add_argument("--max-new-tokens", type=int, default=0,
                      help="completion/seq2seq: tokens per record (default: "
                           "config.task.max_new_tokens)")
  parser.add_argument("--num-beams", type=int, default=1,
                      help="completion/seq2seq: 1 is greedy")


def make_forward(model, keys):
  """forward(params, batch) -> the `keys` outputs of `model` on `batch`, without dropout.

  The batch holds input_ids and any of train.step.MODEL_INPUTS; jit the result.
  """
  def forward(params, batch):
    out = model.apply({"params": params}, batch["input_ids"], **model_inputs(batch),
                      deterministic=True)
    return {k: out[k] for k in keys}
  return forward


def run_model(model, params, arrays: dict, keys, batch_size: int = 32) -> dict:
  """`keys` outputs of `model` for every row of `arrays` (one compilation, padded batches)."""
  forward = jax.jit(make_forward(model, keys))
  params = jax.device_put(params)
  outs = {k: [] for k in keys}
  for batch in data.eval_batches(arrays, batch_size):
    inputs = dict(model_inputs(batch), input_ids=batch["input_ids"])
    for k, v in jax.device_get(forward(params, inputs)).items():
      outs[k].append(np.asarray(v))
  n = len(arrays["input_ids"])
  return {k: np.concatenate(v)[:n] for k, v in outs.items()}


def _softmax(x):
  z = np.exp(x - x.max(axis=-1, keepdims=True))
  return z / z.sum(axis=-1, keepdims=True)


def predictions(task, feats: features.Features, outputs: dict) -> list[dict]:
  labels = list(task.labels)
  if task.type == "classification":
    probs = _softmax(outputs["logits"])
    return [dict(label=labels[int(p.argmax())], score=float(p.max()),
                 scores={name: float(v) for name, v in zip(labels, p)}) for p in probs]
  if task.type == "regression":
    return [dict(score=float(v)) for v in outputs["logits"][:, 0]]
  if task.type == "tagging":
    tags = features.tag_predictions(feats, outputs["logits"], labels)
    return [dict(tokens=ex["words"], tags=t) for ex, t in zip(feats.examples, tags)]
  answers = features.qa_answers(feats, outputs["start_logits"], outputs["end_logits"],
                                n_best=task.n_best, max_answer_len=task.max_answer_len)
  return [dict(answer=a) for a in answers]


def predict(workdir: str, input_spec: str, *, batch_size: int = 32, step=None,
            max_new_tokens: int = 0, num_beams: int = 1) -> list[dict]:
  config = workdir_lib.read_config(workdir)
  if "task" not in config or "type" not in config.task:
    raise ConfigError(f"{workdir} is not a `plmjax finetune` workdir (its config.json has no "
                      "task.type)")
  task = config.task
  tokenizer = load_tokenizer(workdir_lib.tokenizer_dir(workdir))
  params, _ = checkpoint.load_params(workdir, step)
  records = data.read_records(input_spec, key="--input")
  model = build_model(ModelConfig.from_config(config.model), task.head)
  if task.type == "completion":
    fields = data.task_fields(task, records)
    prompts = [completion.prompt_ids(
        tokenizer, completion.field_text(r, fields.text_field, "config.task.text_field"))
               for r in records]
    texts = completion.complete(model, params, tokenizer, prompts,
                                max_new_tokens or task.max_new_tokens, batch_size=batch_size,
                                num_beams=num_beams)
    return [dict(completion=t) for t in texts]
  if task.type == "seq2seq":
    return seq2seq.predict(model, params, tokenizer, task, records, config.data.max_seq_len,
                           max_new_tokens=max_new_tokens, batch_size=batch_size,
                           num_beams=num_beams)
  feats = features.featurize(task, tokenizer, records, config.data.max_seq_len,
                             with_labels=False)
  outputs = run_model(model, params, feats.arrays, tasks.OUTPUTS[task.type], batch_size)
  return predictions(task, feats, outputs)


def main(args, overrides):
  if overrides:
    raise ConfigError(f"predict takes no --config overrides (got {overrides[0]})")
  rows = predict(args.workdir, args.input, batch_size=args.batch_size, step=args.step,
                 max_new_tokens=args.max_new_tokens, num_beams=args.num_beams)
  out = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")
  try:
    out.writelines(json.dumps(r) + "\n" for r in rows)
  finally:
    if out is not sys.stdout:
      out.close()
  return 0
