"""T5 span-corruption examples, made on the fly and deterministic in (seed, epoch, index).

Each document is cut into *runs* of `span_corruption.lengths(...).tokens` tokens (T5's
split_tokens: consecutive pieces, the document's last one shorter; runs of one token
are dropped, as they have nothing to corrupt). A run corrupts to inputs and targets
whose lengths depend only on its length, never on the random draws, so they always fit
data.max_seq_len / data.max_target_len.

Example i is run i (or, with packing, row i), corrupted with the generator
example_rng(seed, epoch, i): a new noise mask every epoch. Keys:

  input_ids        [S]  corrupted inputs (sentinels, </s>), padded with <pad>=0
  decoder_input_ids [T] the targets shifted right, <pad> (T5's decoder start) first
  targets          [T]  sentinel + span tokens ..., </s>, padded
  loss_weights     [T]  1.0 at real target tokens
  attention_mask   [S]  1 at real input tokens (without packing)

With packing (data.packing=True), the runs are assigned to rows once (from their
corrupted lengths, so the assignment holds in every epoch): the longest run left opens a
row, the shortest ones fill it while both its inputs and its targets fit. A run's
inputs and targets are segment k of the row in both stacks; in place of attention_mask:

  encoder_segment_ids, encoder_positions [S]   1..k per run, 0 at padding; positions
  decoder_segment_ids, decoder_positions [T]   restart at each run (and the decoder
                                               input restarts with <pad>)
"""

import numpy as np

from plmjax.data import span_corruption
from plmjax.data.corpus import TokenizedCorpus
from plmjax.errors import DataError

MIN_RUN = 2  # shorter runs (a document's last token) have nothing to corrupt


def batch_spec(config, batch_size: int) -> dict[str, tuple[tuple[int, ...], type]]:
  """{key: (shape, dtype)} of a batch of T5Examples (plmjax.data.pipeline.batch_spec)."""
  b, s, t = batch_size, config.data.max_seq_len, config.data.max_target_len
  i32 = np.int32
  spec = dict(input_ids=((b, s), i32), decoder_input_ids=((b, t), i32), targets=((b, t), i32),
              loss_weights=((b, t), np.float32))
  if config.data.packing:
    spec.update(encoder_segment_ids=((b, s), i32), encoder_positions=((b, s), i32),
                decoder_segment_ids=((b, t), i32), decoder_positions=((b, t), i32))
  else:
    spec["attention_mask"] = ((b, s), i32)
  return spec


def make_runs(corpus: TokenizedCorpus, run_length: int) -> tuple[np.ndarray, np.ndarray]:
  """(start, end) token offsets of every run: each document cut every run_length tokens."""
  bounds = np.asarray(corpus.document_starts(), np.int64)
  counts = -(-np.diff(bounds) // run_length)  # runs per document
  doc = np.repeat(np.arange(len(counts)), counts)
  k = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
  start = bounds[doc] + k * run_length
  end = np.minimum(start + run_length, bounds[doc + 1])
  keep = end - start >= MIN_RUN
  return start[keep], end[keep]


def pack_runs(input_lens: np.ndarray, target_lens: np.ndarray, max_inputs: int,
              max_targets: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Groups runs into rows whose inputs and targets both fit; (row_offsets, runs)."""
  order = rng.permutation(len(input_lens))  # so that rows mix documents
  order = order[np.argsort(-input_lens[order], kind="stable")].tolist()
  n_in, n_tg = input_lens.tolist(), target_lens.tolist()
  items, offsets = [], [0]
  i, j = 0, len(order) - 1
  while i <= j:
    items.append(order[i])
    room_in, room_tg = max_inputs - n_in[order[i]], max_targets - n_tg[order[i]]
    i += 1
    while j >= i and n_in[order[j]] <= room_in and n_tg[order[j]] <= room_tg:
      items.append(order[j])
      room_in -= n_in[order[j]]
      room_tg -= n_tg[order[j]]
      j -= 1
    offsets.append(len(items))
  return np.asarray(offsets, np.int64), np.asarray(items, np.int64)


class T5Examples:
  """Map-style source: `example(index, epoch)` -> dict of fixed-shape numpy arrays."""

  def __init__(self, corpus: TokenizedCorpus, tokenizer, *, max_seq_len: int,
               max_target_len: int, noise_density: float = 0.15,
               mean_noise_span_length: float = 3.0, packing: bool = False, seed: int = 0):
    self.corpus = corpus
    self.max_seq_len, self.max_target_len = max_seq_len, max_target_len
    self.noise_density, self.mean_noise_span_length = noise_density, mean_noise_span_length
    self.packing, self.seed = packing, seed
    self.pad_id, self.eos_id = tokenizer.pad_id, tokenizer.eos_id
    self.sentinel_id = tokenizer.sentinel_id
    self.lengths = span_corruption.lengths(max_seq_len, max_target_len, noise_density,
                                           mean_noise_span_length)
    self.run_start, self.run_end = make_runs(corpus, self.lengths.tokens)
    if not len(self.run_start):
      raise DataError(f"the corpus has no document of at least {MIN_RUN} tokens to corrupt; "
                      "give it more text")
    if packing:
      table = np.array([span_corruption.corrupted_lengths(n, noise_density,
                                                          mean_noise_span_length)
                        for n in range(self.lengths.tokens + 1)], np.int64)
      sizes = table[self.run_end - self.run_start]
      self.row_offsets, self.row_runs = pack_runs(
          sizes[:, 0], sizes[:, 1], max_seq_len, max_target_len,
          np.random.default_rng([seed, 0x5435504b]))

  def __len__(self) -> int:
    return len(self.row_offsets) - 1 if self.packing else len(self.run_start)

  def runs_of(self, index: int) -> list[int]:
    """The runs that make example `index`."""
    if not self.packing:
      return [index]
    return self.row_runs[self.row_offsets[index]:self.row_offsets[index + 1]].tolist()

  def corrupt_run(self, r: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) of run r under a fresh noise mask, each ending with </s>."""
    tokens = np.asarray(self.corpus.tokens[int(self.run_start[r]):int(self.run_end[r])])
    mask = span_corruption.noise_mask(len(tokens), self.noise_density,
                                      self.mean_noise_span_length, rng)
    return span_corruption.corrupt(tokens, mask, self.sentinel_id, self.eos_id)

  def example(self, index: int, epoch: int = 0) -> dict[str, np.ndarray]:
    rng = span_corruption.example_rng(self.seed, epoch, index)
    pairs = [self.corrupt_run(r, rng) for r in self.runs_of(index)]
    enc = _layout([p[0] for p in pairs], self.max_seq_len, self.pad_id)
    dec = _layout([p[1] for p in pairs], self.max_target_len, self.pad_id)
    ids_S, seg_S, pos_S = enc
    targets_T, seg_T, pos_T = dec
    # Shift right within each segment: a run's decoder input starts with <pad>.
    decoder_T = np.where(pos_T == 0, self.pad_id, np.roll(targets_T, 1)).astype(np.int32)
    out = dict(input_ids=ids_S, decoder_input_ids=decoder_T, targets=targets_T,
               loss_weights=(seg_T > 0).astype(np.float32))
    if self.packing:
      out.update(encoder_segment_ids=seg_S, encoder_positions=pos_S,
                 decoder_segment_ids=seg_T, decoder_positions=pos_T)
    else:
      out["attention_mask"] = (seg_S > 0).astype(np.int32)
    return out


def _layout(parts: list[np.ndarray], length: int, pad_id: int):
  """Sequences one after another in a row: (ids, segment ids 1..k, positions), padded."""
  ids_L = np.full(length, pad_id, np.int32)
  seg_L = np.zeros(length, np.int32)
  pos_L = np.zeros(length, np.int32)
  n = 0
  for k, part in enumerate(parts):
    ids_L[n:n + len(part)] = part
    seg_L[n:n + len(part)] = k + 1
    pos_L[n:n + len(part)] = np.arange(len(part))
    n += len(part)
  return ids_L, seg_L, pos_L
