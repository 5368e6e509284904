"""The prediction forward: model inputs picked from a featurised batch, padded batches cut."""

import flax.linen as nn
import jax
import numpy as np

from plmjax.config import base_config
from plmjax.finetune import predict
from plmjax.models import build_model
from plmjax.models.config import ModelConfig


def _tiny_classifier():
  c = base_config("bert")
  c.model.update(num_layers=1, hidden_size=32, num_heads=2, intermediate_size=64, vocab_size=50,
                 max_position_embeddings=16, num_labels=3)
  model = build_model(ModelConfig.from_config(c.model), "sequence_classification")
  params = model.init(jax.random.key(0), np.ones((1, 8), np.int32))["params"]
  return model, nn.meta.unbox(params)


def _arrays(n=5, length=8):
  rng = np.random.default_rng(0)
  lengths = rng.integers(3, length + 1, n)
  mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
  return dict(input_ids=rng.integers(5, 50, (n, length)).astype(np.int32) * mask,
              token_type_ids=(np.arange(length)[None] >= lengths[:, None] // 2).astype(np.int32)
              * mask,
              attention_mask=mask, labels=rng.integers(0, 3, n).astype(np.int32),
              weights=np.ones(n, np.float32))


def test_make_forward_passes_the_model_inputs():
  model, params = _tiny_classifier()
  arrays = _arrays()
  got = predict.make_forward(model, ("logits",))(params, arrays)  # extra keys are ignored
  want = model.apply({"params": params}, arrays["input_ids"],
                     token_type_ids=arrays["token_type_ids"],
                     attention_mask=arrays["attention_mask"], deterministic=True)
  assert set(got) == {"logits"}
  np.testing.assert_allclose(got["logits"], want["logits"], rtol=1e-6)
  unmasked = model.apply({"params": params}, arrays["input_ids"], deterministic=True)
  assert not np.allclose(got["logits"], unmasked["logits"])  # the mask was used


def test_run_model_covers_every_row_once():
  model, params = _tiny_classifier()
  arrays = _arrays(n=5)
  out = predict.run_model(model, params, arrays, ("logits",), batch_size=4)  # 4 + 1 padded
  want = predict.make_forward(model, ("logits",))(params, arrays)["logits"]
  assert out["logits"].shape == (5, 3)
  np.testing.assert_allclose(out["logits"], want, rtol=1e-5, atol=1e-6)
