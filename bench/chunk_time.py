"""make_chunks time before/after the NSP rules (needs the old bert_examples.py saved as
/tmp/init_old_bert_examples.py: git show 248cb45:plmjax/data/bert_examples.py)."""
import sys, time, numpy as np
sys.path.insert(0, "/tmp")
from plmjax.data.corpus import TokenizedCorpus
from plmjax.data import bert_examples as new
import init_old_bert_examples as old
rng = np.random.default_rng(0)
seg_len = rng.integers(5, 60, size=2_000_000)   # ~65M tokens, 2M segments
segs_per_doc = 40
off = np.r_[0, np.cumsum(seg_len)]
c = TokenizedCorpus(np.zeros(1, np.int32), off, np.arange(0, len(seg_len) + 1, segs_per_doc))
for name, f in (("before (HEAD)", lambda: old.make_chunks(c, 125, 0.1, np.random.default_rng(0))),
                ("after, nsp=False", lambda: new.make_chunks(c, 125, 0.1, np.random.default_rng(0))),
                ("after, nsp=True", lambda: new.make_chunks(c, 125, 0.1, np.random.default_rng(0), np.random.default_rng(1)))):
  t = time.perf_counter(); ch = f(); dt = time.perf_counter() - t
  print(f"{name}: {len(ch)} chunks in {dt:.2f} s")
