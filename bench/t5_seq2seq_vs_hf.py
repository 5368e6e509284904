"""Seq2seq fine-tuning: plmjax (finetune.run, configs/finetune/seq2seq.py) against a
PyTorch loop with Hugging Face's T5ForConditionalGeneration on the same weights, batches
(plmjax's BatchIterator), AdamW (decay on all but layer norms), warmup + linear decay,
clipping 1.0, dropout 0, loss = HF's labels loss (-100 on padding). Greedy generate for
exact_match/rougeL on both sides.

  python seq2seq_vs_hf.py [STEPS EVAL_EVERY]
"""
import json, os, pathlib, sys, tempfile, time
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import numpy as np, jax, flax.linen as nn, torch, transformers
import test_seq2seq as T
from plmjax import config as config_lib
from plmjax.config import base_config
from plmjax.data.tokenizer import load_tokenizer
from plmjax.data.tokenizer_train import train_tokenizer
from plmjax.export import export
from plmjax.finetune import completion, data, finetune
from plmjax.models import build_model
from plmjax.models.config import ModelConfig
from plmjax.train import checkpoint

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 64
every = int(sys.argv[2]) if len(sys.argv) > 2 else 16
root = pathlib.Path(tempfile.mkdtemp())
rng = np.random.default_rng(0)
texts = [" ".join(rng.choice(T.WORDS, 12)) for _ in range(400)]
train_tokenizer(texts, len(T.WORDS) + 140, "bpe", str(root / "tok" / "tokenizer"), kind="t5")
tok = load_tokenizer(str(root / "tok"))
cfg = base_config("t5")
cfg.model.update(num_layers=2, num_decoder_layers=2, hidden_size=64, num_heads=4,
                 attention_head_dim=16, intermediate_size=128, vocab_size=tok.vocab_size,
                 max_position_embeddings=64)
model = build_model(ModelConfig.from_config(cfg.model), "seq2seq")
params = jax.jit(lambda: model.init(jax.random.PRNGKey(0), np.ones((1, 8), np.int32)))()
init = str(root / "init")
checkpoint.write_params_workdir(init, cfg, jax.device_get(nn.meta.unbox(params["params"])),
                                tokenizer_dir=str(root / "tok"))
hf_dir = str(root / "hf")
export.export(init, hf_dir)
train = T.bench.write_jsonl(root / "train.jsonl", T.rows(512, 0))
dev = T.bench.write_jsonl(root / "dev.jsonl", T.rows(32, 1))
overrides = [f"--config.data.train={train}", f"--config.data.eval={dev}",
             "--config.data.max_seq_len=8", "--config.data.max_target_len=8",
             "--config.task.max_new_tokens=8", "--config.model.dropout_rate=0",
             "--config.model.attention_dropout_rate=0", "--config.train.epochs=0",
             f"--config.train.steps={steps}", "--config.train.batch_size=32",
             "--config.train.learning_rate=3e-3", f"--config.train.eval_every_steps={every}",
             "--config.train.log_every_steps=1", "--config.checkpoint.async_save=false"]


def config():
  return config_lib.load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "finetune", "seq2seq.py"))


t0 = time.perf_counter()
finetune.run(config(), init, str(root / "run"), overrides)
t1 = time.perf_counter()
rows = [json.loads(l) for l in open(root / "run" / "metrics.jsonl")]
jax_losses = [r["loss"] for r in rows if "split" not in r]
jax_evals = {r["step"]: r for r in rows if r.get("split") == "eval"}

c = config()
finetune.prepare_config(c, init, overrides)
finetune.schedule(c, 512)
t = c.train
torch.set_num_threads(1)
hf = transformers.T5ForConditionalGeneration.from_pretrained(hf_dir, dropout_rate=0.0)
hf.train()
decay = [p for n, p in hf.named_parameters() if "layer_norm" not in n]
no_decay = [p for n, p in hf.named_parameters() if "layer_norm" in n]
opt = torch.optim.AdamW([dict(params=decay, weight_decay=t.weight_decay),
                         dict(params=no_decay, weight_decay=0.0)], lr=t.learning_rate,
                        betas=(t.adam_b1, t.adam_b2), eps=t.adam_eps)
sched = transformers.get_linear_schedule_with_warmup(opt, t.warmup_steps, t.steps)
trn = finetune.load_split(c, tok, "train")
ev = finetune.load_split(c, tok, "eval")


def hf_loss(b):
  labels = np.where(b["loss_weights"] > 0, b["targets"], -100).astype(np.int64)
  return hf(input_ids=torch.tensor(b["input_ids"][:, :8], dtype=torch.long),
            attention_mask=torch.tensor(b["attention_mask"]), labels=torch.tensor(labels)).loss


def hf_eval():
  hf.eval()
  with torch.no_grad():
    loss = hf_loss(ev.arrays).item()
    texts = []
    for ex in ev.examples:
      ids = hf.generate(torch.tensor([ex["source_ids"]]), max_new_tokens=8, do_sample=False)[0]
      texts.append(tok.decode([i for i in ids.tolist()[1:] if i not in (0, 1)]))
  hf.train()
  return dict(loss=loss, **completion.scores(texts, [ex["target"] for ex in ev.examples]))


batches = data.BatchIterator(trn.arrays, t.batch_size, seed=t.seed)
hf_losses, hf_evals = [], {}
for step in range(1, t.steps + 1):
  loss = hf_loss(next(batches))
  opt.zero_grad()
  loss.backward()
  torch.nn.utils.clip_grad_norm_(hf.parameters(), t.grad_clip_norm)
  opt.step()
  sched.step()
  hf_losses.append(loss.item())
  if step % every == 0:
    hf_evals[step] = hf_eval()
t2 = time.perf_counter()
diffs = [abs(a - b) for a, b in zip(jax_losses, hf_losses)]
for s in sorted(hf_evals):
  j, h = jax_evals[s], hf_evals[s]
  print(f"step {s}: plmjax loss={j['loss']:.4f} exact_match={j['exact_match']:.3f} "
        f"rougeL={j['rougeL']:.3f} | hf loss={h['loss']:.4f} exact_match={h['exact_match']:.3f} "
        f"rougeL={h['rougeL']:.3f}")
print(f"train loss: max_abs_diff={max(diffs):.2e} over {len(diffs)} steps; first "
      f"{jax_losses[0]:.4f} vs {hf_losses[0]:.4f}; seconds plmjax {t1 - t0:.1f} hf {t2 - t1:.1f}")
