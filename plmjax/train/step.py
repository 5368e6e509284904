"""The train and eval steps: pure functions of (state, batch), jitted by the caller.

state = {"step": int32[], "params": tree, "opt_state": tree, "rng": key data}.
The train step's metrics: the objective's sums, `grad_norm`, `batch_loss` (the loss it
differentiated) and `finite` (loss and gradient norm finite).
"""

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from plmjax.train.objectives import Objective

MODEL_INPUTS = ("token_type_ids", "attention_mask", "segment_ids", "position_ids",
                "masked_positions", "cls_positions")


def model_inputs(batch: dict) -> dict:
  return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def make_train_step(model, tx: optax.GradientTransformation, objective: Objective,
                    train_cfg) -> Callable:
  accum = train_cfg.grad_accum_steps
  skip_nonfinite = train_cfg.nonfinite == "skip"

  def micro_grads(params, micro, totals, rng):
    def loss_fn(p):
      out = model.apply({"params": p}, micro["input_ids"], **model_inputs(micro),
                        deterministic=False, rngs={"dropout": rng})
      sums = objective.sums(out, micro)
      return objective.loss(sums, totals), sums
    return jax.grad(loss_fn, has_aux=True)(params)

  def train_step(state, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    totals = objective.totals(batch)
    if accum == 1:
      grads, sums = micro_grads(state["params"], batch, totals, rng)
    else:
      # Micro-batch j takes rows j, j+A, j+2A, ...: every device keeps an equal share.
      micro_BxX = jax.tree.map(
          lambda x: jnp.swapaxes(x.reshape((-1, accum) + x.shape[1:]), 0, 1), batch)

      def body(carry, i_micro):
        i, micro = i_micro
        g, s = micro_grads(state["params"], micro, totals, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, carry, (g, s)), None

      zeros = jax.eval_shape(lambda: micro_grads(
          state["params"], jax.tree.map(lambda x: x[0], micro_BxX), totals, rng))
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
      (grads, sums), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro_BxX))

    loss = objective.loss(sums, totals)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    if skip_nonfinite:  # keep the old state when this update is not finite
      params, opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                       (params, opt_state), (state["params"], state["opt_state"]))
    new_state = dict(state, step=state["step"] + 1, params=params, opt_state=opt_state)
    metrics = dict(sums, grad_norm=grad_norm)
    if skip_nonfinite:  # a skipped update adds nothing to the logged averages
      metrics = jax.tree.map(lambda x: jnp.where(finite, x, jnp.zeros_like(x)), metrics)
    # batch_loss: the objective's own sums may hold a key named "loss"; never overwrite it.
    return new_state, dict(metrics, batch_loss=loss, finite=finite)

  return train_step


def make_eval_step(model, objective: Objective) -> Callable:

  def eval_step(params, batch):
    out = model.apply({"params": params}, batch["input_ids"], **model_inputs(batch),
                      deterministic=True)
    return objective.sums(out, batch)

  return eval_step
