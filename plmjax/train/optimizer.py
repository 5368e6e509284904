"""AdamW with warmup + decay, a weight-decay mask, and global-norm clipping (optax)."""

import jax
import optax


def learning_rate_schedule(train_cfg) -> optax.Schedule:
  """Linear warmup from 0 to the peak, then linear/cosine decay (or constant) to the end."""
  peak = train_cfg.learning_rate
  warmup = min(train_cfg.warmup_steps, train_cfg.steps)
  end = peak * train_cfg.end_learning_rate_ratio
  decay_steps = max(train_cfg.steps - warmup, 1)
  if train_cfg.decay == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=train_cfg.end_learning_rate_ratio)
  elif train_cfg.decay == "linear":
    decay = optax.linear_schedule(peak, end, decay_steps)
  else:
    decay = optax.constant_schedule(peak)
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def weight_decay_mask(params):
  """True for matrices and embeddings; False for biases and LayerNorm scales/biases."""
  def decays(path, _):
    name = [p.key for p in path if hasattr(p, "key")][-1]
    return name in ("kernel", "embedding")
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(train_cfg) -> optax.GradientTransformation:
  parts = []
  if train_cfg.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(train_cfg.grad_clip_norm))
  parts.append(optax.adamw(
      learning_rate_schedule(train_cfg), b1=train_cfg.adam_b1, b2=train_cfg.adam_b2,
      eps=train_cfg.adam_eps, weight_decay=train_cfg.weight_decay, mask=weight_decay_mask))
  return optax.chain(*parts)
