"""The train state, sharded from the start, built in one place.

  state = {"step": int32[], "params": tree, "opt_state": tree, "rng": key data}
  + "loss_scale": {"scale": float32[], "counter": int32[]} for model.dtype=float16

`Layout` is what the state and a batch look like on the mesh (abstract shapes and
shardings), computed without allocating anything, so `plmjax compile` can use it with
devices that are not attached. `create` then fills it: restore the newest readable
checkpoint of the workdir; else load initial weights (`init_params`: the --init of
pretrain and finetune, made by `params_from_workdir`); else initialise. The loss scale is
saved in the checkpoint's meta, beside the RNG.
"""

import dataclasses
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from plmjax import workdir as workdir_lib
from plmjax.errors import CheckpointError
from plmjax.models.transformer import match_layer_layout
from plmjax.train import checkpoint, sharding
from plmjax.train.optimizer import make_optimizer
from plmjax.train.step import initial_loss_scale, model_inputs

@dataclasses.dataclass
class Layout:
  mesh: jax.sharding.Mesh
  rules: tuple
  tx: optax.GradientTransformation
  abstract: dict  # ShapeDtypeStructs of the state, with their shardings
  shardings: dict  # NamedShardings of the state
  batch_sharding: jax.sharding.NamedSharding

  def context(self):
    """The mesh and logical-axis rules: enter it to trace or run the model."""
    return MeshRules(self.mesh, self.rules)


class MeshRules:
  """Enters the mesh and the logical-axis rules (needed while tracing the model)."""

  def __init__(self, mesh, rules):
    self.mesh, self.rules = mesh, rules

  def __enter__(self):
    self._rules = nn.logical_axis_rules(self.rules)
    self._rules.__enter__()
    self._mesh = jax.set_mesh(self.mesh) if hasattr(jax, "set_mesh") else self.mesh
    self._mesh.__enter__()
    return self

  def __exit__(self, *exc):
    self._mesh.__exit__(*exc)
    self._rules.__exit__(*exc)


def _init_fn(model, example_batch):
  shapes = {k: ((1,) + tuple(v.shape[1:]), v.dtype) for k, v in example_batch.items()}

  def init_boxed(rng):
    # Parameters depend on the input shapes only: one row of zeros stands for the batch.
    row = {k: jnp.zeros(shape, dtype) for k, (shape, dtype) in shapes.items()}
    return model.init({"params": rng, "dropout": rng}, row["input_ids"], **model_inputs(row),
                      deterministic=True)["params"]
  return init_boxed


def layout(config, model, example_batch: dict, devices=None) -> Layout:
  """`example_batch`: arrays or ShapeDtypeStructs of one batch (only shapes are read)."""
  mesh = sharding.make_mesh(config.mesh, devices)
  sharding.check_batch(config.train.batch_size, config.train.grad_accum_steps, mesh)
  rules = tuple(tuple(r) for r in config.sharding.logical_axis_rules)
  tx = make_optimizer(config.train)
  repl = sharding.replicated(mesh)
  key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
  with MeshRules(mesh, rules):
    boxed = jax.eval_shape(_init_fn(model, example_batch), key)
    param_sharding = sharding.logical_shardings(boxed, mesh, rules)
  abstract_params = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      nn.meta.unbox(boxed), param_sharding)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  opt_sharding = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, param_sharding,
                                       transform_non_params=lambda _: repl)
  shardings = dict(step=repl, params=param_sharding, opt_state=opt_sharding, rng=repl)
  rng_shape = jax.eval_shape(lambda: jax.random.key_data(jax.random.PRNGKey(0)))
  shapes = dict(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params,
                opt_state=abstract_opt, rng=rng_shape)
  if config.model.dtype == "float16":
    shapes["loss_scale"] = jax.eval_shape(lambda: initial_loss_scale(config.train))
    shardings["loss_scale"] = jax.tree.map(lambda _: repl, shapes["loss_scale"])
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          shapes, shardings)
  return Layout(mesh, rules, tx, abstract, shardings, sharding.batch_sharding(mesh))


def create(lay: Layout, model, example_batch, seed: int, workdir: str, config,
           init_params: Callable | None = None, warn=print):
  """(state, meta): meta is the restored checkpoint's (None for a fresh start)."""
  found = None
  if workdir_lib.checkpoint_steps(workdir, config):  # (a manager would create the directory)
    mngr = checkpoint.manager(workdir, config)
    try:
      found = checkpoint.restore_latest_readable(
          mngr, lay.abstract["params"], lay.abstract["opt_state"], warn)
    finally:
      mngr.close()
  repl = lay.shardings["step"]
  if found is not None:
    step, params, opt_state, meta = found
    state = dict(step=jnp.int32(step), params=params, opt_state=opt_state,
                 rng=np.asarray(meta["rng"], np.uint32))
    if "loss_scale" in lay.abstract:
      if "loss_scale" not in meta:
        warn(f"the checkpoint of step {step} has no loss scale (its run was not float16): "
             f"it starts at config.train.loss_scale_init={config.train.loss_scale_init:g}")
      state["loss_scale"] = initial_loss_scale(config.train, meta.get("loss_scale"))
    return jax.device_put(state, lay.shardings), meta
  init_rng, dropout_rng = jax.random.split(jax.random.PRNGKey(seed))
  if init_params is not None:
    params = jax.device_put(init_params(lay.abstract["params"]), lay.shardings["params"])
  else:
    with lay.context():
      params = jax.jit(lambda r: nn.meta.unbox(_init_fn(model, example_batch)(r)),
                       out_shardings=lay.shardings["params"])(init_rng)
  opt_state = jax.jit(lay.tx.init, out_shardings=lay.shardings["opt_state"])(params)
  state = dict(step=jax.device_put(jnp.int32(0), repl), params=params, opt_state=opt_state,
               rng=jax.device_put(jax.random.key_data(dropout_rng), repl))
  if "loss_scale" in lay.abstract:
    state["loss_scale"] = jax.device_put(initial_loss_scale(config.train),
                                         lay.shardings["loss_scale"])
  return state, None


def abstract_params(model, example_batch: dict) -> dict:
  """ShapeDtypeStructs of `model`'s parameters, as `layout` finds them but without a mesh
  (`example_batch`: arrays or ShapeDtypeStructs, e.g. from pipeline.batch_spec)."""
  key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
  return nn.meta.unbox(jax.eval_shape(_init_fn(model, example_batch), key))


def params_from_workdir(init: str, abstract: dict, initializer_range: float, seed: int = 0, *,
                        step: int | None = None, hint: str = "") -> tuple[dict, int]:
  """(params, step): --init's weights (host numpy; its newest checkpoint, or `step`) in the
  tree of `abstract`. A parameter whose path is in the checkpoint must have its shape; the
  others (a head --init lacks) start fresh: normal(initializer_range) kernels, zero
  biases, unit scales, as the models initialise them."""
  pretrained, step = checkpoint.load_params(init, step)
  pretrained = match_layer_layout(pretrained, abstract)  # model.scan_layers may differ
  flat = {_name(p): v for p, v in jax.tree_util.tree_flatten_with_path(pretrained)[0]}
  rng = np.random.default_rng(seed)
  fresh, used = [], set()

  def pick(path, leaf):
    name = _name(path)
    if name in flat:
      value = flat[name]
      if tuple(value.shape) != tuple(leaf.shape):
        raise CheckpointError(f"--init {init}: parameter {name} has shape {tuple(value.shape)} "
                              f"there but {tuple(leaf.shape)} under this config{hint}")
      used.add(name)
      return np.asarray(value, leaf.dtype)
    fresh.append(name)
    leaf_name = name.rsplit("/", 1)[-1]
    if leaf_name == "bias":
      return np.zeros(leaf.shape, leaf.dtype)
    if leaf_name == "scale":
      return np.ones(leaf.shape, leaf.dtype)
    return (rng.standard_normal(leaf.shape) * initializer_range).astype(leaf.dtype)

  params = jax.tree_util.tree_map_with_path(pick, abstract)
  if not used:
    top = sorted({n.split("/", 1)[0] for n in flat})
    raise CheckpointError(f"the checkpoint in {init} shares no parameter with this model (it "
                          f"has {', '.join(top)}/..., the model needs "
                          f"{', '.join(sorted(abstract))}/...)")
  if jax.process_index() == 0:
    print(f"plmjax: {len(used)} tensors from {init} (step {step}); newly initialised: "
          f"{', '.join(fresh) or 'none'}; not used: {_summary(sorted(set(flat) - used))}",
          flush=True)
  return params, step


def _name(path) -> str:
  return "/".join(str(getattr(p, "key", p)) for p in path)


def _summary(names, limit: int = 4) -> str:
  if not names:
    return "none"
  more = f" and {len(names) - limit} more" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more
