"""Scratch: how fast a tiny T5 learns the reverse task (settings from argv)."""
import os
import sys, json, pathlib, tempfile
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import test_seq2seq as T
import numpy as np, jax, flax.linen as nn
from plmjax import cli
from plmjax.config import base_config
from plmjax.data.tokenizer import load_tokenizer
from plmjax.data.tokenizer_train import train_tokenizer
from plmjax.models import build_model
from plmjax.models.config import ModelConfig
from plmjax.train import checkpoint

hidden, steps, lr, heads = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
root = pathlib.Path(tempfile.mkdtemp())
rng = np.random.default_rng(0)
texts = [" ".join(rng.choice(T.WORDS, 12)) for _ in range(400)]
train_tokenizer(texts, len(T.WORDS) + 140, "bpe", str(root / "tok" / "tokenizer"), kind="t5")
tok = load_tokenizer(str(root / "tok"))
config = base_config("t5")
config.model.update(num_layers=2, num_decoder_layers=2, hidden_size=hidden, num_heads=heads,
                    attention_head_dim=16, intermediate_size=2 * hidden, vocab_size=tok.vocab_size,
                    max_position_embeddings=64, initializer_range=float(sys.argv[5]), tie_word_embeddings=bool(int(sys.argv[6])))
model = build_model(ModelConfig.from_config(config.model), "seq2seq")
params = jax.jit(lambda: model.init(jax.random.PRNGKey(0), np.ones((1, 8), np.int32)))()
init = str(root / "init")
checkpoint.write_params_workdir(init, config, jax.device_get(nn.meta.unbox(params["params"])),
                                tokenizer_dir=str(root / "tok"))
train = T.bench.write_jsonl(root / "train.jsonl", T.rows(512, 0))
dev = T.bench.write_jsonl(root / "dev.jsonl", T.rows(32, 1))
argv = ["finetune", "--config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "finetune", "seq2seq.py"), "--init", init,
        "--workdir", str(root / "run"), f"--config.data.train={train}", f"--config.data.eval={dev}",
        "--config.data.max_seq_len=8", "--config.data.max_target_len=8", "--config.task.max_new_tokens=8",
        "--config.model.dropout_rate=0", "--config.model.attention_dropout_rate=0",
        "--config.train.epochs=0", f"--config.train.steps={steps}", "--config.train.batch_size=32",
        f"--config.train.learning_rate={lr}", f"--config.train.eval_every_steps={steps // 4}",
        "--config.train.log_every_steps=8", "--config.checkpoint.async_save=false"]
assert cli.main(argv) == 0
