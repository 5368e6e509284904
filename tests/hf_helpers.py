"""Shared by the Hugging Face export/import tests: tiny configs, random weights, parity."""

import json

import flax.linen as nn
import jax
import numpy as np
import torch
import transformers

from plmjax.export import hf_config
from plmjax.models import build_model
from plmjax.models.config import ModelConfig

BERT_HEADS = ("pretraining", "mlm", "sequence_classification", "token_classification",
              "question_answering")
# plmjax output key -> Hugging Face output attribute, per head.
OUTPUTS = {
    "pretraining": {"mlm_logits": "prediction_logits", "nsp_logits": "seq_relationship_logits"},
    "mlm": {"mlm_logits": "logits"},
    "sequence_classification": {"logits": "logits"},
    "token_classification": {"logits": "logits"},
    "question_answering": {"start_logits": "start_logits", "end_logits": "end_logits"},
    "lm": {"logits": "logits"},
}


def tiny_config(arch: str, vocab_size: int = 97, **kw) -> ModelConfig:
  values = dict(arch=arch, vocab_size=vocab_size, hidden_size=32, num_layers=2, num_heads=4,
                intermediate_size=48, max_position_embeddings=32, num_labels=3,
                layer_norm_eps=1e-12 if arch == "bert" else 1e-5)
  values.update(kw)
  return ModelConfig(**values)


def random_config(arch: str, seed: int) -> ModelConfig:
  """A small config with sizes drawn at random (seeded), to catch size-specific mix-ups."""
  rng = np.random.default_rng(seed)
  heads = int(rng.choice([2, 4]))
  return tiny_config(
      arch, vocab_size=int(rng.integers(50, 300)), hidden_size=heads * int(rng.choice([4, 8, 12])),
      num_layers=int(rng.integers(1, 4)), num_heads=heads,
      intermediate_size=int(rng.choice([24, 40, 64])),
      max_position_embeddings=int(rng.choice([16, 24, 40])),
      type_vocab_size=int(rng.choice([2, 3])), num_labels=int(rng.integers(2, 6)))


def random_params(cfg: ModelConfig, head: str, seed: int = 0):
  """Initialised params with every leaf perturbed (non-zero biases, LayerNorm scales != 1)."""
  model = build_model(cfg, head)
  # One jit compile instead of one per op: several times faster on a busy CPU.
  init = jax.jit(lambda key: model.init(key, np.ones((1, 4), np.int32))["params"])
  params = nn.meta.unbox(init(jax.random.key(seed)))
  leaves, tree = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  leaves = [np.asarray(x, np.float32) + rng.normal(0, 0.1, np.shape(x)).astype(np.float32)
            for x in leaves]
  return jax.tree.unflatten(tree, leaves)


def random_inputs(cfg: ModelConfig, seed: int = 0, batch: int = 2, length: int = 12):
  """Ids, token types and a padding mask (the second row padded at the end)."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, cfg.vocab_size, (batch, length)).astype(np.int32)
  types = rng.integers(0, 2, (batch, length)).astype(np.int32)
  mask = np.ones((batch, length), np.int32)
  mask[1, length - 4:] = 0
  ids[1, length - 4:] = 0
  types[1, length - 4:] = 0
  return ids, types, mask


def plmjax_outputs(cfg: ModelConfig, head: str, params, ids, types, mask) -> dict:
  model = build_model(cfg, head)
  if cfg.arch == "bert":
    out = jax.jit(lambda p: model.apply({"params": p}, ids, types, mask))(params)
  else:
    out = jax.jit(lambda p: model.apply({"params": p}, ids, attention_mask=mask))(params)
  return {k: np.asarray(v) for k, v in out.items()}


def hf_model_from_config(hf_cfg: dict):
  cls = getattr(transformers, hf_cfg["architectures"][0])
  config = transformers.AutoConfig.for_model(**hf_cfg)
  return cls(config).eval()


def hf_outputs(model, arch: str, head: str, ids, types, mask) -> dict:
  with torch.no_grad():
    kwargs = dict(input_ids=torch.tensor(ids, dtype=torch.long),
                  attention_mask=torch.tensor(mask, dtype=torch.long), output_hidden_states=True)
    if arch == "bert":
      kwargs["token_type_ids"] = torch.tensor(types, dtype=torch.long)
    out = model(**kwargs)
  hidden = out.hidden_states[-1] if getattr(out, "hidden_states", None) else out.last_hidden_state
  result = {"hidden": hidden.numpy()}
  for ours, theirs in OUTPUTS.get(head, {}).items():
    if hasattr(out, theirs) and getattr(out, theirs) is not None:
      result[ours] = getattr(out, theirs).numpy()
  return result


def max_diffs(ours: dict, theirs: dict, mask) -> dict:
  """Largest |difference| per output, at real (unpadded) positions for per-token outputs."""
  real = mask.astype(bool)
  diffs = {}
  for key, want in theirs.items():
    got = ours[key]
    assert got.shape == want.shape, (key, got.shape, want.shape)
    if got.ndim >= 2 and got.shape[:2] == real.shape:
      got, want = got[real], want[real]
    diffs[key] = float(np.max(np.abs(got - want)))
  return diffs


def hf_config_for(cfg: ModelConfig, head: str) -> dict:
  return json.loads(json.dumps(hf_config.to_hf_config(cfg, head)))


def wiki_lines(path, articles=slice(None)) -> list[str]:
  """Non-empty paragraphs of the chosen articles of wiki_sample.jsonl."""
  with open(path, encoding="utf-8") as f:
    docs = [json.loads(line)["text"] for line in f][articles]
  return [p.strip() for doc in docs for p in doc.split("\n") if p.strip()]


_TRAINED = {}


def trained_sentencepiece(wiki_sample, out_dir, kind="bert", model_type="unigram",
                          byte_fallback=False, vocab_size=1000) -> str:
  """A plmjax sentencepiece model trained on the first 25 articles (cached per session)."""
  from plmjax.data.tokenizer_train import train_tokenizer
  key = (str(wiki_sample), kind, model_type, byte_fallback, vocab_size)
  if key not in _TRAINED:
    prefix = f"{out_dir}/{kind}_{model_type}_{int(byte_fallback)}_{vocab_size}"
    _TRAINED[key] = train_tokenizer(wiki_lines(wiki_sample, slice(0, 25)), vocab_size,
                                    model_type, prefix, kind=kind, byte_fallback=byte_fallback)
  return _TRAINED[key]
