"""Scratch: T5 greedy generation throughput, plmjax vs HF PyTorch generate, same weights.

  python gen_speed.py [BATCH SRC_LEN NEW_TOKENS]   (T5 1.1 small sizes, random weights)
"""
import os
import sys, time
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import numpy as np, torch, transformers
from test_t5 import params_from_hf, plmjax_config
from plmjax.models import build_model
from plmjax.seq2seq_decoding import generate_seq2seq_ids

batch, src_len, new = (int(a) for a in (sys.argv[1:] or [16, 48, 32]))
torch.manual_seed(0)
torch.set_num_threads(2)
hf = transformers.T5ForConditionalGeneration(transformers.T5Config(
    vocab_size=32128, d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_decoder_layers=8,
    num_heads=6, feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0)).eval()
with torch.no_grad():  # an lm_head of its own (transformers 5 ties it at construction)
  hf.lm_head.weight = torch.nn.Parameter(0.05 * torch.randn_like(hf.shared.weight))
model = build_model(plmjax_config(hf.config), "seq2seq")
params = params_from_hf(hf, model, False)
rng = np.random.default_rng(0)
sources = [rng.integers(3, 32000, src_len - 1).tolist() + [1] for _ in range(batch)]
kw = dict(max_new_tokens=new, eos_id=1, pad_id=0, batch_size=batch)
generate_seq2seq_ids(model, params, sources, **kw)  # compile
t = time.perf_counter()
ours = generate_seq2seq_ids(model, params, sources, **kw)
t_ours = time.perf_counter() - t
ids = torch.tensor(sources)
with torch.no_grad():
  hf.generate(ids, max_new_tokens=2, do_sample=False, decoder_start_token_id=0, eos_token_id=1,
              pad_token_id=0)
  t = time.perf_counter()
  out = hf.generate(ids, max_new_tokens=new, do_sample=False, decoder_start_token_id=0,
                    eos_token_id=1, pad_token_id=0)
  t_hf = time.perf_counter() - t
theirs = [row[1:] for row in out.tolist()]
theirs = [r[:r.index(1)] if 1 in r else r for r in theirs]
theirs = [[x for x in r if x != 0] if len(r) < new else r for r in theirs]
n = sum(len(r) for r in ours)
same = sum(a == b for a, b in zip(ours, theirs))
print(f"batch {batch} source {src_len} new {new}: plmjax {t_ours:.2f} s ({n / t_ours:.0f} tok/s), "
      f"hf {t_hf:.2f} s ({sum(len(r) for r in theirs) / t_hf:.0f} tok/s); identical rows {same}/{batch}")
