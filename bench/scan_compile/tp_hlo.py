"""Compile gpt2_medium TP=4 scanned for v5e-8; dump the optimised HLO for inspection."""
import sys, time
import jax
from plmjax import config as config_lib
from plmjax.data.pipeline import batch_spec
from plmjax.models import build_model
from plmjax.train import state as state_lib, topologies
from plmjax.train.objectives import PRETRAINING
from plmjax.train.trainer import jit_steps

overrides = sys.argv[2:]
config = config_lib.load_config("configs/gpt2_medium.py", overrides)
model_cfg = config_lib.validate(config)
target = topologies.parse("v5e-8")
devices = target.devices()
model = build_model(model_cfg, config.task.head)
spec = batch_spec(config, config.train.batch_size)
lay = state_lib.layout(config, model, {k: jax.ShapeDtypeStruct(*v) for k, v in spec.items()}, devices)
batch = {k: jax.ShapeDtypeStruct(s, d, sharding=lay.batch_sharding) for k, (s, d) in spec.items()}
train_step, _ = jit_steps(lay, model, PRETRAINING[model_cfg.arch], config.train)
t0 = time.time()
with lay.context():
  compiled = train_step.lower(lay.abstract, batch).compile()
print("compiled", time.time() - t0, compiled.memory_analysis().temp_size_in_bytes / 2**30)
open(sys.argv[1], "w").write(compiled.as_text())
