"""How often B is random: plmjax's BertExamples vs a counting-only copy of google-research/bert's
create_instances_from_document on the same segments (figures in bench/RESULTS.md)."""
import os, sys, random, numpy as np
from plmjax.data import sources, tokenizer as tk
from plmjax.data.tokenizer_train import train_tokenizer
from plmjax.data.corpus import tokenize_documents
from plmjax.data.bert_examples import BertExamples
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
wiki = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "wiki_sample.jsonl")
def google(c, L, seed=0, short=0.1):
  rng = random.Random(seed)
  seg_off = c.segment_offsets.tolist(); doc_off = c.document_offsets.tolist()
  n_random = n = 0; kept = 0
  for d in range(c.num_documents):
    doc = [seg_off[s+1]-seg_off[s] for s in range(doc_off[d], doc_off[d+1])]
    max_num = L - 3
    target = max_num if rng.random() >= short else rng.randint(2, max_num)
    chunk = []; length = 0; i = 0
    while i < len(doc):
      chunk.append(doc[i]); length += doc[i]
      if i == len(doc) - 1 or length >= target:
        a_end = 1 if len(chunk) < 2 else rng.randint(1, len(chunk) - 1)
        if len(chunk) == 1 or rng.random() < 0.5:
          n_random += 1; i -= len(chunk) - a_end
        n += 1
        chunk = []; length = 0
      i += 1
  return n, n_random / n
for vocab in (800, 8000):
  tok = tk.load_tokenizer(train_tokenizer(wiki, vocab, "unigram", f"/tmp/init_tok_u{vocab}", max_sentences=20000))
  c = tokenize_documents(sources.read_documents(wiki), tok)
  seglen = np.diff(c.segment_offsets)
  print(f"vocab {vocab}: {c.num_documents} docs, {c.num_segments} segments, {c.num_tokens} tokens, median segment {np.median(seglen):.0f} tokens")
  for L in (128, 512):
    ch = BertExamples(c, tok, max_seq_len=L, max_predictions_per_seq=20, seed=0).chunks
    n, g = google(c, L)
    print(f"  max_seq_len {L}: plmjax {len(ch)} examples, B random {ch.is_random.mean():.3f}; google loop {n} instances, B random {g:.3f}")
