"""The pretraining input pipeline: source -> tokens -> examples -> shuffled batches.

  it = make_pretrain_iterator(config, tokenizer, split="train", batch_size=B,
                              process_index=jax.process_index(),
                              process_count=jax.process_count())
  batch = next(it)           # dict of numpy arrays, leading dimension B
  state = it.get_state()     # JSON-serialisable; save it with the checkpoint
  it.set_state(state)        # continue exactly where `state` was taken

Each process reads only its shard of the documents and tokenises it once, or, for a
directory made by `plmjax data prepare` (prepared.py), reads its documents' tokens on
demand. With `cache_dir` (pretrain passes WORKDIR/data_cache), a raw source is first
prepared there (prepare.py), once, and read the same way on every later start. A grain
MapDataset indexes the examples: shuffled per epoch from config.train.seed
(eval: in order), repeated forever, each example made on the fly from
(seed, epoch, index), batched. The position is grain's iterator state.
"""

import grain
import numpy as np

from plmjax.data import prepare, prepared, sources
from plmjax.data.bert_examples import BertExamples
from plmjax.data.bert_packing import PackedBertExamples
from plmjax.data.corpus import TokenizedCorpus, tokenize_documents
from plmjax.data.gpt_examples import GptExamples
from plmjax.data import t5_examples
from plmjax.data.tokenizer import check_special_tokens, check_vocab
from plmjax.errors import ConfigError, DataError

SPLITS = ("train", "eval")


def max_pairs_per_row(config) -> int:
  """Packed BERT pairs per row: config.data.max_pairs_per_row, or max_seq_len // 32."""
  value = config.data.get("max_pairs_per_row", 0)
  return value if value > 0 else max(1, config.data.max_seq_len // 32)


def batch_spec(config, batch_size: int) -> dict[str, tuple[tuple[int, ...], type]]:
  """{key: (shape, dtype)} of the batches make_pretrain_iterator gives, without reading
  data (plmjax compile). tests/test_pipeline.py holds it to the real batches."""
  if config.model.arch == "t5":
    return t5_examples.batch_spec(config, batch_size)
  d, b, length = config.data, batch_size, config.data.max_seq_len
  i32, f32 = np.int32, np.float32
  rows = ((b, length), i32)
  if config.model.arch == "gpt":
    spec = dict(input_ids=rows, targets=rows, loss_weights=((b, length), f32))
    if d.packing:
      spec.update(segment_ids=rows, position_ids=rows)
    return spec
  p = d.max_predictions_per_seq
  spec = dict(input_ids=rows, token_type_ids=rows, attention_mask=rows,
              masked_positions=((b, p), i32), masked_labels=((b, p), i32),
              masked_weights=((b, p), f32))
  if d.packing:
    s = max_pairs_per_row(config)
    spec.update(segment_ids=rows, position_ids=rows, cls_positions=((b, s), i32),
                nsp_labels=((b, s), i32), nsp_weights=((b, s), f32))
  else:
    spec["nsp_labels"] = ((b,), i32)
    if not d.nsp:
      spec["nsp_weights"] = ((b,), f32)
  return spec


def check_data_config(config, tokenizer):
  """The checks that need the tokenizer (config values alone: plmjax.config.validate)."""
  check_special_tokens(tokenizer, config.model.arch)
  check_vocab(tokenizer, config.model.vocab_size)


def load_corpus(config, tokenizer, *, split: str = "train", process_index: int = 0,
                process_count: int = 1) -> TokenizedCorpus:
  if split not in SPLITS:
    raise ValueError(f"split={split!r}; use 'train' or 'eval'")
  key = f"config.data.{split}"
  docs = sources.read_documents(config.data[split], process_index=process_index,
                                process_count=process_count,
                                tfds_data_dir=config.data.tfds_data_dir or None, key=key)
  where = f" (process {process_index} of {process_count})" if process_count > 1 else ""
  try:
    return tokenize_documents(docs, tokenizer, name=f"{key}={config.data[split]!r}{where}")
  except DataError as e:
    if process_count == 1:
      raise
    raise DataError(f"{e}: this process's shard is empty (fewer documents than "
                    "processes?)") from e


def open_corpus(config, tokenizer, *, split: str = "train", process_index: int = 0,
                process_count: int = 1, cache_dir: str | None = None) -> TokenizedCorpus:
  """config.data[split] as a corpus: a prepared directory is read lazily; a raw source is
  prepared under `cache_dir` first if given, else tokenised into memory (load_corpus)."""
  spec, key = config.data[split], f"config.data.{split}"
  where = dict(process_index=process_index, process_count=process_count, key=key)
  if prepared.is_unfinished(spec) and not prepared.is_prepared(spec):
    raise DataError(f"{key}={spec!r} is an unfinished `plmjax data prepare` output (no "
                    f"{prepared.MANIFEST}): run the same command again to finish it")
  if not prepared.is_prepared(spec) and cache_dir and spec:
    tfds_dir = config.data.tfds_data_dir or None
    spec = prepare.prepare_cached(spec, tokenizer, cache_dir, split=split,
                                  tfds_data_dir=tfds_dir, **where)
    where.update(process_index=0, process_count=1)  # the cache holds only this share
  if prepared.is_prepared(spec):
    return prepared.open_corpus(spec, tokenizer, model_vocab_size=config.model.vocab_size,
                                **where)
  return load_corpus(config, tokenizer, split=split, process_index=process_index,
                     process_count=process_count)


def make_examples(config, tokenizer, corpus: TokenizedCorpus, cache_dir: str | None = None):
  """The map-style example source config.model.arch and config.data ask for; BERT keeps
  its chunk and row tables under `cache_dir` for the next start (index_cache.py)."""
  d, seed = config.data, config.train.seed
  if config.model.arch == "t5":
    return t5_examples.T5Examples(
        corpus, tokenizer, max_seq_len=d.max_seq_len, max_target_len=d.max_target_len,
        noise_density=d.noise_density, mean_noise_span_length=d.mean_noise_span_length,
        packing=d.packing, seed=seed)
  if config.model.arch == "gpt":
    lazy = not isinstance(corpus.tokens, np.ndarray)
    return (prepared.StreamGptExamples if lazy else GptExamples)(
        corpus, tokenizer, max_seq_len=d.max_seq_len, packing=d.packing)
  kwargs = dict(max_seq_len=d.max_seq_len, max_predictions_per_seq=d.max_predictions_per_seq,
                mask_prob=d.mask_prob, short_seq_prob=d.short_seq_prob,
                whole_word_masking=d.whole_word_masking, nsp=d.nsp, seed=seed,
                cache_dir=cache_dir)
  if d.packing:
    return PackedBertExamples(corpus, tokenizer, max_pairs_per_row=max_pairs_per_row(config),
                              **kwargs)
  return BertExamples(corpus, tokenizer, **kwargs)


class _Example:
  """Global index k of the repeated dataset -> the example for (epoch, index)."""

  def __init__(self, examples, n: int):
    self.examples, self.n = examples, n

  def __call__(self, k: int, index: int):
    return self.examples.example(index, epoch=k // self.n)


def _check_absl_flags_parsed():
  """Grain's worker processes read absl flags (google/grain#1355), which a plain script
  never parses; the plmjax command parses them at start, as absl.app.run would."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    raise ConfigError("config.data.num_workers>0 starts grain worker processes, which read "
                      "absl flags: call absl.flags.FLAGS(sys.argv[:1]) once before building "
                      "the iterator (the plmjax command does), or set config.data.num_workers=0")


class PretrainIterator:
  """Endless batches; `get_state`/`set_state` save and restore the position."""

  def __init__(self, examples, *, batch_size: int, shuffle: bool, seed: int, num_workers: int = 0,
               num_threads: int = 1, split: str = "train", num_tokens: int = 0):
    self.examples = examples
    self.examples_per_epoch = len(examples)
    self.batch_size = batch_size
    self.num_tokens = num_tokens
    self.split = split
    self.num_workers = num_workers
    ds = grain.MapDataset.range(self.examples_per_epoch)
    if shuffle:
      ds = ds.shuffle(seed=seed % 2**32)
    ds = ds.repeat(None).map_with_index(_Example(examples, self.examples_per_epoch))
    ds = ds.batch(batch_size, drop_remainder=True)
    if num_workers > 0:
      _check_absl_flags_parsed()
      it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0)).mp_prefetch(
          grain.MultiprocessingOptions(num_workers=num_workers))
    else:
      # One background thread keeps a few batches ready; more threads only fight over the GIL.
      it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                   prefetch_buffer_size=4 if num_threads else 0))
    self._it = iter(it_ds)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._it)

  def get_state(self) -> dict:
    return dict(position=self._it.get_state(), examples_per_epoch=self.examples_per_epoch,
                batch_size=self.batch_size, split=self.split, num_workers=self.num_workers)

  def set_state(self, state: dict):
    for key in ("examples_per_epoch", "batch_size", "split", "num_workers"):
      if state.get(key) != getattr(self, key):
        raise DataError(f"the saved data position has {key}={state.get(key)!r} but this run has "
                        f"{getattr(self, key)!r}: the data or batch settings changed since it was "
                        "saved")
    self._it.set_state(state["position"])

  def close(self):
    if hasattr(self._it, "close"):
      self._it.close()


def make_pretrain_iterator(config, tokenizer, *, split: str = "train", batch_size: int,
                           process_index: int = 0, process_count: int = 1,
                           num_threads: int = 1, cache_dir: str | None = None) -> PretrainIterator:
  """Batches of this process's share of config.data[split] (see the module docstring)."""
  if batch_size <= 0:
    raise ConfigError(f"per-process batch size {batch_size} must be positive")
  if split not in SPLITS:
    raise ValueError(f"split={split!r}; use 'train' or 'eval'")
  if prepared.is_prepared(config.data[split]):  # its checks name the directory: first
    prepared.check_manifest(prepared.read_manifest(config.data[split]), config.data[split],
                            tokenizer, config.model.vocab_size, f"config.data.{split}")
  check_data_config(config, tokenizer)
  corpus = open_corpus(config, tokenizer, split=split, process_index=process_index,
                       process_count=process_count, cache_dir=cache_dir)
  examples = make_examples(config, tokenizer, corpus, cache_dir)
  return PretrainIterator(examples, batch_size=batch_size, shuffle=split == "train",
                          seed=config.train.seed, num_workers=config.data.num_workers,
                          num_threads=num_threads, split=split, num_tokens=corpus.num_tokens)
