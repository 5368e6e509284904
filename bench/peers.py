"""plmjax's pretraining step against Hugging Face PyTorch on the same device, same run.

  python bench/peers.py --layers 4 --hidden 512 --heads 8 --intermediate 2048 \
      --vocab 30522 --seq-len 128 --batch 16 --dtype float32     # BERT-Small
  python bench/peers.py --config configs/gpt2_small.py --batch 8

Same model size, sequence length, batch, dropout and optimiser (global-norm clipping
then AdamW: optax in plmjax, torch.nn.utils.clip_grad_norm_ + torch.optim.AdamW in
PyTorch) for `BertForPreTraining` (MLM + NSP) or `GPT2LMHeadModel`. Hugging Face
computes the MLM logits at every position (loss only at the masked ones); plmjax
gathers the masked positions first, as original BERT does. The two take turns each
repeat (see pretrain_step.interleaved_timings) so load from other processes hits
both alike. The matmul peak for MFU is the higher of XLA's and PyTorch's 2048x2048
matmul, sampled around every repeat. Flags are those of bench/pretrain_step.py.

Prints a line per framework (tokens/s=N, ...) and `ratio plmjax/hf tokens/s=X`.
"""

import argparse
import statistics
import sys
import time

import pretrain_step as ps


class HFStep:
  """One call = one training step of the Hugging Face PyTorch model on a fixed batch."""

  def __init__(self, config, batch: dict):
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    self.torch = torch
    m, t = config.model, config.train
    torch.manual_seed(0)
    if m.arch == "bert":
      hf_cfg = transformers.BertConfig(
          vocab_size=m.vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
          num_attention_heads=m.num_heads, intermediate_size=m.intermediate_size,
          max_position_embeddings=m.max_position_embeddings, type_vocab_size=m.type_vocab_size,
          hidden_dropout_prob=m.dropout_rate, attention_probs_dropout_prob=m.attention_dropout_rate,
          layer_norm_eps=m.layer_norm_eps)
      self.model = transformers.BertForPreTraining(hf_cfg)
      labels = torch.full(batch["input_ids"].shape, -100, dtype=torch.long)
      labels.scatter_(1, torch.as_tensor(batch["masked_positions"], dtype=torch.long),
                      torch.as_tensor(batch["masked_labels"], dtype=torch.long))
      self.inputs = dict(
          input_ids=torch.as_tensor(batch["input_ids"], dtype=torch.long),
          token_type_ids=torch.as_tensor(batch["token_type_ids"], dtype=torch.long),
          attention_mask=torch.as_tensor(batch["attention_mask"], dtype=torch.long),
          labels=labels,
          next_sentence_label=torch.as_tensor(batch["nsp_labels"], dtype=torch.long))
    else:
      hf_cfg = transformers.GPT2Config(
          vocab_size=m.vocab_size, n_positions=m.max_position_embeddings, n_embd=m.hidden_size,
          n_layer=m.num_layers, n_head=m.num_heads, n_inner=m.intermediate_size,
          resid_pdrop=m.dropout_rate, embd_pdrop=m.dropout_rate,
          attn_pdrop=m.attention_dropout_rate, layer_norm_epsilon=m.layer_norm_eps)
      self.model = transformers.GPT2LMHeadModel(hf_cfg)
      ids = torch.as_tensor(batch["input_ids"], dtype=torch.long)
      self.inputs = dict(input_ids=ids, labels=ids)  # the model shifts labels itself
    self.model.train()
    self.attn_impl = getattr(self.model.config, "_attn_implementation", "?")
    self.clip = t.grad_clip_norm
    self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=t.learning_rate,
                                       betas=(t.adam_b1, t.adam_b2), eps=t.adam_eps,
                                       weight_decay=t.weight_decay)
    self.autocast = m.dtype == "bfloat16"
    self()

  def __call__(self):
    torch = self.torch
    self.optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
      loss = self.model(**self.inputs).loss
    loss.backward()
    if self.clip > 0:
      torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
    self.optimizer.step()
    return loss.item()


class BothFrameworksProbe(ps.MatmulProbe):
  """The matmul peak as the higher of XLA's and PyTorch's 2048x2048 matmul, so that
  neither framework's MFU is flattered by the other's slower matmul."""

  def __init__(self, dtype: str, n: int = 2048):
    import torch  # pylint: disable=g-import-not-at-top
    super().__init__(dtype, n)
    self.t = torch.ones((n, n), dtype=getattr(torch, dtype)) / n
    self.pairs = []

  def measure(self, tries: int = 3) -> float:
    xla = super().measure(tries)
    best = float("inf")
    for _ in range(tries):
      t0 = time.perf_counter()
      _ = self.t @ self.t
      best = min(best, time.perf_counter() - t0)
    self.pairs.append((xla, self.flops / best))
    self.samples[-1] = max(self.pairs[-1])
    return self.samples[-1]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ps.add_arguments(p)
  args, overrides = p.parse_known_args(argv)
  if any(not o.startswith("--config.") for o in overrides):
    p.error(f"unrecognized arguments: {' '.join(overrides)}")
  config = ps.build_config(args, overrides)
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  print(ps.describe(config))
  print(ps.device_line() + f"; torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"transformers {transformers.__version__}")
  batch = ps.synthetic_batch(config)
  probe = BothFrameworksProbe(config.model.dtype)
  ours = ps.PlmjaxStep(config, batch)
  t0 = time.perf_counter()
  hf = HFStep(config, batch)
  print(f"plmjax: {ours.n_params / 1e6:.2f}M parameters, compiled in {ours.compile_s:.1f} s; "
        f"hf: {sum(x.numel() for x in hf.model.parameters()) / 1e6:.2f}M parameters, "
        f"attention {hf.attn_impl}, first step {time.perf_counter() - t0:.1f} s")
  times = ps.interleaved_timings({"plmjax": ours, "hf": hf}, args.warmup, args.repeats,
                                 args.steps, probe)
  print("matmul peak samples (GFLOP/s, XLA / torch): " + ", ".join(
      f"{x / 1e9:.0f}/{t / 1e9:.0f}" for x, t in probe.pairs))
  print(ps.FLOPS_FORMULA)
  arch = config.model.arch
  peer_name = "BertForPreTraining" if arch == "bert" else "GPT2LMHeadModel"
  for name, label in (("plmjax", f"plmjax {arch}"), ("hf", f"hf-pytorch {peer_name}")):
    # The same useful FLOPs for both: HF's logits at unmasked positions are not useful.
    print(ps.result_line(label, times[name], ours.tokens_per_step, ours.flops_per_token, probe))
  ratio = statistics.median(times["hf"]) / statistics.median(times["plmjax"])
  per_repeat = [h / o for h, o in zip(times["hf"], times["plmjax"])]
  print(f"ratio plmjax/hf tokens/s={ratio:.2f} (per repeat {min(per_repeat):.2f}-"
        f"{max(per_repeat):.2f})")
  return 0


if __name__ == "__main__":
  sys.path.insert(0, ps.ROOT)
  sys.exit(main())
