"""Model FLOPs per token and MFU.

Training FLOPs = 6 x (multiply-adds of the matmuls, forward) following Kaplan et al. and
the PaLM appendix (forward 2 FLOPs per multiply-add, backward twice the forward):

  per token, per layer:  6 * (4*D*D + 2*D*I)            (q, k, v, out; MLP in, out)
                       + 6 * 2 * D * T_attn              (Q.K^T and A.V; T_attn = L for
                                                          BERT, L for GPT as PaLM counts)
  heads:  BERT  6 * P/L * (D*D + D*V)  (transform + decoder at the P masked positions
                                        of an L-token row) + 6 * D*D / L (pooler) ;
          GPT   6 * D*V                 (LM head at every position)

Embedding look-ups are not counted. MFU = achieved model FLOP/s / peak FLOP/s.

T5 (encoder-decoder): a token is an input or a target token, so a row of S inputs and T
targets is S + T tokens, and flops_per_token = plmjax.models.t5.training_flops(cfg, S, T)
/ (S + T): 6 x the weight multiply-adds each token touches (encoder: q, k, v, o and the
feed-forward; decoder: self- and cross-attention projections, feed-forward and the output
projection; cross-attention k, v over the S encoder states) + 6 * 2 * (S*S per encoder
layer + T*(T + S) per decoder layer) * H*d_kv for the attention matmuls. Packed rows count
their full length, as GPT's packed rows do.
"""

import functools
import time

import jax
import jax.numpy as jnp

from plmjax.models import t5

# Dense peak FLOP/s per device for the compute dtypes (vendor figures, no sparsity).
PEAK_FLOPS = {
    # device_kind substring: {dtype: flop/s}
    "TPU v4": {"bfloat16": 275e12, "float32": 275e12 / 2},
    "TPU v5 lite": {"bfloat16": 197e12, "float32": 197e12 / 2},
    "TPU v5e": {"bfloat16": 197e12, "float32": 197e12 / 2},
    "TPU v5p": {"bfloat16": 459e12, "float32": 459e12 / 2},
    "TPU v5": {"bfloat16": 459e12, "float32": 459e12 / 2},
    "TPU v6": {"bfloat16": 918e12, "float32": 918e12 / 2},
    "H200": {"bfloat16": 989e12, "float32": 67e12},
    "H100": {"bfloat16": 989e12, "float32": 67e12},
    "A100": {"bfloat16": 312e12, "float32": 19.5e12},
    "L4": {"bfloat16": 121e12, "float32": 30e12},
}


def flops_per_token(model_cfg, seq_len: int, masked_per_seq: int | None = None,
                    target_len: int = 0) -> float:
  """Training FLOPs per token (see the module docstring for the formula); T5 needs
  target_len (data.max_target_len)."""
  if model_cfg.arch == "t5":
    return t5.training_flops(model_cfg, seq_len, target_len) / (seq_len + target_len)
  d, i, v, n = (model_cfg.hidden_size, model_cfg.intermediate_size, model_cfg.vocab_size,
                model_cfg.num_layers)
  per_layer = 6 * (4 * d * d + 2 * d * i) + 6 * 2 * d * seq_len
  if model_cfg.arch == "bert":
    predicted = seq_len if masked_per_seq is None else masked_per_seq
    head = 6 * predicted / seq_len * (d * d + d * v) + 6 * d * d / seq_len
  else:
    head = 6 * d * v
  return n * per_layer + head


def pretrain_flops(config, model_cfg) -> tuple[int, float]:
  """(tokens per example, training FLOPs per token) of a pretraining row of `config`:
  BERT/GPT max_seq_len tokens; T5 max_seq_len inputs + max_target_len targets."""
  d = config.data
  if model_cfg.arch == "t5":
    return d.max_seq_len + d.max_target_len, flops_per_token(
        model_cfg, d.max_seq_len, target_len=d.max_target_len)
  masked = d.max_predictions_per_seq if model_cfg.arch == "bert" else None
  return d.max_seq_len, flops_per_token(model_cfg, d.max_seq_len, masked)


def peak_flops_per_device(dtype: str, override: float = 0.0) -> tuple[float, str]:
  """(peak FLOP/s, where it came from): the override, the table, or a measured matmul."""
  if override > 0:
    return override, "config"
  kind = jax.devices()[0].device_kind
  for key, peaks in PEAK_FLOPS.items():
    if key.lower() in kind.lower():
      return peaks.get(dtype, peaks["bfloat16"]), f"table ({key})"
  return measured_matmul_peak(dtype), f"measured matmul on {kind}"


@functools.lru_cache(maxsize=None)
def measured_matmul_peak(dtype: str = "float32", n: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of a large square matmul on one device: the practical peak."""
  x = jnp.ones((n, n), dtype) / n
  f = jax.jit(lambda a: a @ a)
  f(x).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    f(x).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best
