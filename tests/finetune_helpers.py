"""A tiny 'pretrained' BERT workdir and synthetic task files for the fine-tuning tests."""

import json

import flax.linen as nn
import jax
import numpy as np

from plmjax.config import base_config
from plmjax.data.tokenizer import load_tokenizer
from plmjax.data.tokenizer_train import train_tokenizer
from plmjax.models import build_model
from plmjax.models.config import ModelConfig
from plmjax.train import checkpoint

from synthetic import synthetic_texts

SEQ = 32


def make_init_workdir(root) -> str:
  """Random-weight BERT (hidden 32, 1 layer) with a 200-piece tokenizer, as import-hf writes."""
  tok_dir = root / "tok"
  train_tokenizer(synthetic_texts(60, seed=1), 200, "unigram", str(tok_dir / "tokenizer"),
                  kind="bert")
  tok = load_tokenizer(str(tok_dir))
  config = base_config("bert")
  config.model.update(num_layers=1, hidden_size=32, num_heads=2, intermediate_size=64,
                      vocab_size=tok.vocab_size, max_position_embeddings=SEQ)
  model = build_model(ModelConfig.from_config(config.model), "pretraining")
  ids = np.ones((1, 8), np.int32)
  params = nn.meta.unbox(jax.jit(lambda: model.init(jax.random.PRNGKey(0), ids))()["params"])
  workdir = str(root / "init")
  checkpoint.write_params_workdir(workdir, config, jax.device_get(params),
                                  tokenizer_dir=str(tok_dir))
  return workdir


def words(n: int, seed: int = 3) -> list[str]:
  """Distinct single words of the synthetic language."""
  seen = []
  for w in " ".join(synthetic_texts(20, seed=seed)).lower().replace(".", "").split():
    if w not in seen:
      seen.append(w)
  return seen[:n]


def write_jsonl(path, rows) -> str:
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return str(path)
