"""QA fine-tuning on answers inside longer words: plmjax against Hugging Face PyTorch.

  python bench/qa_vs_hf.py [--train 800 --eval 200 --steps 1500 --batch 16 --lr 3e-3
      --layers 2 --hidden 64 --seq-len 64 --seeds 0,1,2 --torch-threads 1]

A synthetic SQuAD-style set whose answers sit inside longer whitespace words: the name
in "Greta's", each year in "(1895-1943)", the name in "Lanka-folk", a name before a
comma. One random-weight BertForQuestionAnswering (with a WordPiece vocab.txt built from
the set's characters, name syllables, fixed words and two-digit numbers) is saved as a
Hugging Face directory; plmjax imports it (`import-hf --head question_answering`) and
fine-tunes it with `finetune.run`, and PyTorch fine-tunes the same weights with the same
data in the same batch order (plmjax's BatchIterator), steps, learning-rate schedule
(linear warmup 10%, linear decay), AdamW settings, clipping and no dropout, features and
decoding as transformers' run_qa.py (offset mapping, n_best 20, max answer 30 tokens).
Both are scored with the official SQuAD EM/F1 normalisation.

PyTorch runs twice: as transformers builds BERT (`nn.Embedding(padding_idx=0)`: the [PAD]
embedding row never gets a gradient) and as `hf-pad-trained`, with that row trained as plmjax
(and the original BERT) train it; the QA softmax covers padding positions in all three, so
only the second has plmjax's arithmetic (its losses agree with plmjax's to float noise).

Prints per seed `seed S: plmjax exact_match=.. f1=.. | hf ... | hf-pad-trained ...` and each
one's mean train loss over every fifth (--log-parts) of the run, then `mean: ...` and `whole-word
answers: exact_match=..` (the best any decoder restricted to whole whitespace words could
score on the eval set).
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "pe", "da", "gri", "sto", "lan")
THINGS = ("boat", "house", "garden", "letters", "mill", "bridge", "farm", "shop")
FILLER = ("the", "old", "town", "was", "quiet", "and", "many", "people", "came", "by", "road",
          "in", "spring", "rain", "fell", "often")


def _name(rng) -> str:
  return "".join(rng.choice(SYLLABLES, int(rng.integers(2, 4)))).capitalize()


def make_rows(n: int, seed: int) -> list[dict]:
  """Records {question, context, answers: {text, answer_start}}; every answer is part of a
  longer whitespace word of its context."""
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(n):
    owner, friend, style = _name(rng), _name(rng), _name(rng)
    thing = str(rng.choice(THINGS))
    y1 = int(rng.integers(1000, 2000))
    y2 = y1 + int(rng.integers(1, 90))
    before = " ".join(rng.choice(FILLER, int(rng.integers(1, 8))))
    after = " ".join(rng.choice(FILLER, int(rng.integers(1, 5))))
    context = (f"{before.capitalize()}. {owner}'s {thing} ({y1}-{y2}) was known to "
               f"{friend}, and to the {style}-folk. {after.capitalize()}.")
    kind = int(rng.integers(0, 5))
    question, answer, at = [
        (f"whose {thing} was it?", owner, context.index(f"{owner}'s")),
        (f"when was the {thing} built?", str(y1), context.index(f"({y1}") + 1),
        (f"until when did the {thing} stand?", str(y2), context.index(f"-{y2})") + 1),
        ("who knew it?", friend, context.index(f"{friend},")),
        ("which folk knew it?", style, context.index(f"{style}-"))][kind]
    assert context[at:at + len(answer)] == answer
    rows.append(dict(question=question, context=context,
                     answers={"text": [answer], "answer_start": [at]}))
  return rows


def whole_word_exact_match(rows) -> float:
  """EM of the whitespace words that hold each answer (what whole-word spans can reach)."""
  from plmjax.finetune import metrics  # pylint: disable=g-import-not-at-top
  preds, refs = [], []
  for r in rows:
    text, at = r["answers"]["text"][0], r["answers"]["answer_start"][0]
    c = r["context"]
    start = c.rfind(" ", 0, at) + 1
    end = c.find(" ", at + len(text))
    preds.append(c[start:end if end >= 0 else len(c)])
    refs.append([text])
  return metrics.squad_scores(preds, refs)["exact_match"]


def wordpiece_vocab(rows) -> list[str]:
  """A deterministic WordPiece vocabulary for the set: specials, characters, the name
  syllables, the set's fixed words and two-digit numbers (a trained one varies run to run)."""
  import re  # pylint: disable=g-import-not-at-top
  texts = [(r["question"] + " " + r["context"]).lower() for r in rows]
  chars = sorted({c for t in texts for c in t if not c.isspace()})
  questions = {w for r in rows for w in re.findall(r"\w+", r["question"].lower())}
  words = sorted((questions | set(FILLER) | set(THINGS) | {"known", "to", "and", "folk"})
                 - set(chars))
  vocab = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars
           + ["##" + c for c in chars if c.isalnum()] + list(SYLLABLES)
           + ["##" + x for x in SYLLABLES] + words + [f"{d:02d}" for d in range(100)]
           + [f"##{d:02d}" for d in range(100)])
  return list(dict.fromkeys(vocab))


def write_hf_model(out_dir: str, rows, args, seed: int):
  """A random-weight BertForQuestionAnswering + a WordPiece vocab.txt for `rows`."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  vocab = wordpiece_vocab(rows)
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "vocab.txt"), "w", encoding="utf-8") as f:
    f.writelines(p + "\n" for p in vocab)
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
    json.dump({"do_lower_case": True, "tokenizer_class": "BertTokenizer"}, f)
  torch.manual_seed(seed)
  cfg = transformers.BertConfig(
      vocab_size=len(vocab), hidden_size=args.hidden, num_hidden_layers=args.layers,
      num_attention_heads=args.heads, intermediate_size=4 * args.hidden,
      max_position_embeddings=args.seq_len, hidden_dropout_prob=0.0,
      attention_probs_dropout_prob=0.0)
  transformers.BertForQuestionAnswering(cfg).save_pretrained(out_dir)


def write_jsonl(path: str, rows) -> str:
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return path


def run_plmjax(hf_dir: str, train_path: str, eval_path: str, tmp: str, args, seed: int) -> dict:
  from plmjax.export.import_hf import import_hf  # pylint: disable=g-import-not-at-top
  from plmjax.finetune import finetune  # pylint: disable=g-import-not-at-top
  from plmjax.finetune.tasks import finetune_config  # pylint: disable=g-import-not-at-top

  init = os.path.join(tmp, f"init{seed}")
  import_hf(hf_dir, init, head="question_answering")
  c = finetune_config(type="qa", labels=(), text_field="question", text_b_field="context",
                      label_field="answers", doc_stride=args.seq_len // 2, max_query_len=16)
  c.data.update(train=train_path, eval=eval_path, max_seq_len=args.seq_len)
  c.model.update(dropout_rate=0.0, attention_dropout_rate=0.0)
  c.train.update(epochs=0, steps=args.steps, batch_size=args.batch, learning_rate=args.lr,
                 warmup_ratio=0.1, log_every_steps=log_every(args), seed=seed)
  c.checkpoint.update(async_save=False, every_steps=10 ** 6)
  workdir = os.path.join(tmp, f"plmjax{seed}")
  result = finetune.run(c, init, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    losses = [r["loss"] for r in map(json.loads, f) if "split" not in r]
  return dict(exact_match=result.eval_metrics["exact_match"], f1=result.eval_metrics["f1"],
              losses=losses)


def log_every(args) -> int:
  return max(args.steps // args.log_parts, 1)


def hf_features(tok, rows, args, with_targets: bool):
  """transformers' run_qa.py preprocessing: windows, offsets, char -> token targets."""
  enc = tok([r["question"] for r in rows], [r["context"] for r in rows],
            truncation="only_second", max_length=args.seq_len, stride=args.seq_len // 2,
            return_overflowing_tokens=True, return_offsets_mapping=True,
            padding="max_length")
  example = enc.pop("overflow_to_sample_mapping")
  starts, ends, offsets = [], [], []
  for i, offs in enumerate(enc["offset_mapping"]):
    seq = enc.sequence_ids(i)
    offsets.append([o if seq[k] == 1 else None for k, o in enumerate(offs)])
    r = rows[example[i]]
    a = r["answers"]["answer_start"][0]
    b = a + len(r["answers"]["text"][0])
    first = seq.index(1)
    last = len(seq) - 1 - seq[::-1].index(1)
    if not (offs[first][0] <= a and offs[last][1] >= b):
      starts.append(0)
      ends.append(0)
      continue
    s = first
    while s <= last and offs[s][0] <= a:
      s += 1
    e = last
    while e >= first and offs[e][1] >= b:
      e -= 1
    starts.append(s - 1)
    ends.append(e + 1)
  arrays = {k: np.array(enc[k]) for k in ("input_ids", "token_type_ids", "attention_mask")}
  if with_targets:
    arrays.update(start_positions=np.array(starts), end_positions=np.array(ends))
  return arrays, example, offsets


def hf_answers(rows, example, offsets, start_NxL, end_NxL, n_best=20, max_len=30):
  best = {}
  for i in range(len(start_NxL)):
    offs = offsets[i]
    for s in np.argsort(-start_NxL[i])[:n_best]:
      for e in np.argsort(-end_NxL[i])[:n_best]:
        if offs[s] is None or offs[e] is None or e < s or e - s + 1 > max_len:
          continue
        score = start_NxL[i, s] + end_NxL[i, e]
        if score > best.get(example[i], (-np.inf,))[0]:
          best[example[i]] = (score, offs[s][0], offs[e][1])
  return [r["context"][best[j][1]:best[j][2]] if j in best else ""
          for j, r in enumerate(rows)]


def run_hf(hf_dir: str, train_rows, eval_rows, args, seed: int, train_pad: bool) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from plmjax.finetune import data, metrics  # pylint: disable=g-import-not-at-top

  torch.manual_seed(seed)
  torch.set_num_threads(args.torch_threads)
  tok = transformers.BertTokenizerFast(os.path.join(hf_dir, "vocab.txt"), do_lower_case=True)
  model = transformers.BertForQuestionAnswering.from_pretrained(hf_dir)
  if train_pad:  # as plmjax (and the original BERT): the [PAD] embedding gets gradients too
    model.bert.embeddings.word_embeddings.padding_idx = None
  train, _, _ = hf_features(tok, train_rows, args, True)
  decay = [p for n, p in model.named_parameters() if not ("bias" in n or "LayerNorm" in n)]
  rest = [p for n, p in model.named_parameters() if "bias" in n or "LayerNorm" in n]
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                           {"params": rest, "weight_decay": 0.0}],
                          lr=args.lr, betas=(0.9, 0.999), eps=1e-6)
  warmup = int(round(0.1 * args.steps))
  sched = transformers.get_linear_schedule_with_warmup(opt, warmup, args.steps)
  # The batches plmjax's fine-tuning draws (its BatchIterator, same seed): same order.
  batches = data.BatchIterator(train, args.batch, seed=seed)
  model, losses, total = model.train(), [], 0.0
  for step in range(1, args.steps + 1):
    batch = {k: torch.as_tensor(v, dtype=torch.long) for k, v in next(batches).items()}
    loss = model(**batch).loss
    total += float(loss)
    if step % log_every(args) == 0:
      losses.append(total / log_every(args))
      total = 0.0
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
  model.eval()
  feats, example, offsets = hf_features(tok, eval_rows, args, False)
  with torch.no_grad():
    out = model(**{k: torch.as_tensor(v, dtype=torch.long) for k, v in feats.items()})
  answers = hf_answers(eval_rows, example, offsets, out.start_logits.numpy(),
                        out.end_logits.numpy())
  return dict(metrics.squad_scores(answers, [r["answers"]["text"] for r in eval_rows]),
              losses=losses)


WHO = ("plmjax", "hf", "hf-pad-trained")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--train", type=int, default=800)
  p.add_argument("--eval", type=int, default=200)
  p.add_argument("--steps", type=int, default=1500)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--lr", type=float, default=3e-3)
  p.add_argument("--layers", type=int, default=2)
  p.add_argument("--hidden", type=int, default=64)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--seq-len", type=int, default=64)
  p.add_argument("--seeds", default="0")
  p.add_argument("--log-parts", type=int, default=5,
                 help="mean train loss printed for each of this many parts of the run")
  p.add_argument("--torch-threads", type=int, default=1,
                 help="PyTorch's intra-op threads (more only slow this tiny model down)")
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  train_rows, eval_rows = make_rows(args.train, 1000), make_rows(args.eval, 2000)
  got = []
  with tempfile.TemporaryDirectory() as tmp:
    train_path = write_jsonl(os.path.join(tmp, "train.jsonl"), train_rows)
    eval_path = write_jsonl(os.path.join(tmp, "eval.jsonl"), eval_rows)
    for seed in [int(s) for s in args.seeds.split(",")]:
      hf_dir = os.path.join(tmp, f"hf{seed}")
      write_hf_model(hf_dir, train_rows, args, seed)
      t0 = time.time()
      ours = run_plmjax(hf_dir, train_path, eval_path, tmp, args, seed)
      t1 = time.time()
      theirs = run_hf(hf_dir, train_rows, eval_rows, args, seed, train_pad=False)
      t2 = time.time()
      padded = run_hf(hf_dir, train_rows, eval_rows, args, seed, train_pad=True)
      got.append((ours, theirs, padded))
      print(f"seed {seed}: plmjax exact_match={ours['exact_match']:.1f} f1={ours['f1']:.1f} "
            f"({t1 - t0:.0f}s) | hf exact_match={theirs['exact_match']:.1f} "
            f"f1={theirs['f1']:.1f} ({t2 - t1:.0f}s) | hf-pad-trained exact_match="
            f"{padded['exact_match']:.1f} f1={padded['f1']:.1f}", flush=True)
      for who, r in zip(WHO, got[-1]):
        print(f"  {who} train loss every {log_every(args)} steps: "
              f"{' '.join(f'{x:.4f}' for x in r['losses'])}", flush=True)
  mean = {f"{who}_{k}": float(np.mean([g[i][k] for g in got]))
          for i, who in enumerate(WHO) for k in ("exact_match", "f1")}
  print("mean: " + " | ".join(f"{who} exact_match={mean[who + '_exact_match']:.1f} "
                              f"f1={mean[who + '_f1']:.1f}" for who in WHO))
  print(f"whole-word answers: exact_match={whole_word_exact_match(eval_rows):.1f}")
  return mean


if __name__ == "__main__":
  main()
