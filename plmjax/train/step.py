"""The train and eval steps: pure functions of (state, batch), jitted by the caller.

state = {"step": int32[], "params": tree, "opt_state": tree, "rng": key data}, and for
model.dtype=float16 also "loss_scale": {"scale": float32[], "counter": int32[]}.
The train step's metrics: the objective's sums, `grad_norm`, `batch_loss` (the loss it
differentiated, unscaled) and `finite` (loss and gradient norm finite); with a loss scale
also `overflow` (the scaler skipped this update; see `dynamic_loss_scale`).
"""

from typing import Callable

import jax
import jax.numpy as jnp
import jmp
import numpy as np
import optax

from plmjax.train.objectives import Objective

MODEL_INPUTS = ("token_type_ids", "attention_mask", "segment_ids", "position_ids",
                "masked_positions", "cls_positions",
                # T5 (plmjax/data/t5_examples.py)
                "decoder_input_ids", "encoder_segment_ids", "decoder_segment_ids",
                "encoder_positions", "decoder_positions")
_ARGUMENT = {"decoder_input_ids": "decoder_input_ids_BxT"}  # the model's name for the key


def model_inputs(batch: dict) -> dict:
  return {_ARGUMENT.get(k, k): batch[k] for k in MODEL_INPUTS if k in batch}


def initial_loss_scale(train_cfg, saved: dict | None = None) -> dict:
  """state["loss_scale"]: `saved` (a checkpoint's meta["loss_scale"]) or train.loss_scale_init.
  counter: overflow-free steps since the scale last changed (torch's growth tracker)."""
  saved = saved or dict(scale=train_cfg.loss_scale_init, counter=0)
  return dict(scale=np.float32(saved["scale"]), counter=np.int32(saved["counter"]))


def dynamic_loss_scale(loss_scale: dict, train_cfg) -> jmp.DynamicLossScale:
  """torch.amp.GradScaler's rule: the loss is multiplied by the scale before
  differentiation and the gradients divided by it; a step whose gradients are not finite
  is skipped and halves the scale (not below 1); `train.loss_scale_growth_interval` finite
  steps in a row double it."""
  return jmp.DynamicLossScale(loss_scale["scale"], loss_scale["counter"],
                              period=train_cfg.loss_scale_growth_interval, factor=2)


def make_train_step(model, tx: optax.GradientTransformation, objective: Objective,
                    train_cfg) -> Callable:
  """The train step; with state["loss_scale"] (model.dtype=float16) it scales the loss.
  Without one, nothing of the scaler is traced: the float32/bfloat16 step is unchanged."""
  accum = train_cfg.grad_accum_steps
  skip_nonfinite = train_cfg.nonfinite == "skip"

  def micro_grads(params, micro, totals, rng, scaler):
    def loss_fn(p):
      out = model.apply({"params": p}, micro["input_ids"], **model_inputs(micro),
                        deterministic=False, rngs={"dropout": rng})
      sums = objective.sums(out, micro)
      loss = objective.loss(sums, totals)
      return (loss if scaler is None else scaler.scale(loss)), sums
    return jax.grad(loss_fn, has_aux=True)(params)

  def train_step(state, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    totals = objective.totals(batch)
    scaler = (dynamic_loss_scale(state["loss_scale"], train_cfg) if "loss_scale" in state
              else None)
    if accum == 1:
      grads, sums = micro_grads(state["params"], batch, totals, rng, scaler)
    else:
      # Micro-batch j takes rows j, j+A, j+2A, ...: every device keeps an equal share.
      micro_BxX = jax.tree.map(
          lambda x: jnp.swapaxes(x.reshape((-1, accum) + x.shape[1:]), 0, 1), batch)

      def body(carry, i_micro):
        i, micro = i_micro
        g, s = micro_grads(state["params"], micro, totals, jax.random.fold_in(rng, i), scaler)
        return jax.tree.map(jnp.add, carry, (g, s)), None

      zeros = jax.eval_shape(lambda: micro_grads(
          state["params"], jax.tree.map(lambda x: x[0], micro_BxX), totals, rng, scaler))
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
      (grads, sums), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro_BxX))

    if scaler is not None:  # before clipping and the optimiser, as torch's unscale_
      grads = scaler.unscale(grads)
    loss = objective.loss(sums, totals)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    if skip_nonfinite or scaler is not None:  # keep the old state when this update is not finite
      params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                       (params, opt_state), (state["params"], state["opt_state"]))
    new_state = dict(state, step=state["step"] + 1, params=params, opt_state=opt_state)
    metrics = dict(sums, grad_norm=grad_norm)
    counted, extra = finite, {}
    if scaler is not None:
      # Overflowing float16 gradients are routine: the scaler skips the update and halves
      # the scale. Its business only while the (unscaled, float32) loss is finite and the
      # scale can still go down; anything else is a real non-finite step for train.nonfinite.
      grads_finite = jnp.isfinite(grad_norm)  # as every gradient is (unless the norm > 3e38)
      can_lower = scaler.loss_scale > scaler.min_loss_scale
      overflow = ~grads_finite & jnp.isfinite(loss) & can_lower
      adjusted = scaler.adjust(grads_finite)
      new_state["loss_scale"] = dict(scale=adjusted.loss_scale, counter=adjusted.counter)
      metrics["grad_norm"] = jnp.where(finite, grad_norm, 0.0)  # averaged over applied updates
      counted, extra = finite | overflow, dict(overflow=overflow)
    if skip_nonfinite:  # a skipped update adds nothing to the logged averages
      metrics = jax.tree.map(lambda x: jnp.where(counted, x, jnp.zeros_like(x)), metrics)
    # batch_loss: the objective's own sums may hold a key named "loss"; never overwrite it.
    return new_state, dict(metrics, batch_loss=loss, finite=finite, **extra)

  return train_step


def make_eval_step(model, objective: Objective) -> Callable:

  def eval_step(params, batch):
    out = model.apply({"params": params}, batch["input_ids"], **model_inputs(batch),
                      deterministic=True)
    return objective.sums(out, batch)

  return eval_step
