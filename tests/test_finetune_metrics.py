"""Metric functions against hand-computed values (GLUE, seqeval entity F1, SQuAD)."""

import numpy as np
import pytest
import scipy.stats

from plmjax.finetune import metrics


def test_classification_metrics_by_hand():
  preds, labels = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]
  assert metrics.accuracy(preds, labels) == pytest.approx(0.6)
  # tp=2, fp=1, fn=1: F1 = 2*2 / (3 + 3)
  assert metrics.binary_f1(preds, labels) == pytest.approx(4 / 6)
  # MCC = (tp*tn - fp*fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = (2-1)/sqrt(3*3*2*2)
  assert metrics.matthews_corr(preds, labels) == pytest.approx(1 / 6)
  assert metrics.matthews_corr([0, 0, 0], [0, 1, 0]) == 0.0  # constant prediction
  assert metrics.matthews_corr([2, 0, 1], [2, 0, 1]) == pytest.approx(1.0)
  assert metrics.binary_f1([0, 0], [0, 0]) == 0.0


def test_correlations_match_scipy_with_ties():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 5, 40).astype(float)  # many ties
  y = x + rng.normal(0, 1.5, 40)
  assert metrics.pearson(x, y) == pytest.approx(scipy.stats.pearsonr(x, y)[0])
  assert metrics.spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y)[0])
  assert metrics.spearman([1, 2, 3], [10, 20, 1000]) == pytest.approx(1.0)
  assert metrics.pearson([1, 1, 1], [1, 2, 3]) == 0.0


def test_get_entities_chunking_edge_cases():
  assert metrics.get_entities(["B-PER", "I-PER", "O", "B-LOC"]) == [("PER", 0, 1), ("LOC", 3, 3)]
  # An I- tag after O starts a chunk (IOB1), a type change splits one, B after B splits.
  assert metrics.get_entities(["O", "I-PER", "I-PER"]) == [("PER", 1, 2)]
  assert metrics.get_entities(["B-PER", "I-LOC"]) == [("PER", 0, 0), ("LOC", 1, 1)]
  assert metrics.get_entities(["B-ORG", "B-ORG", "I-ORG"]) == [("ORG", 0, 0), ("ORG", 1, 2)]
  assert metrics.get_entities(["O", "O"]) == []
  assert metrics.get_entities(["S-LOC", "B-PER", "E-PER"]) == [("LOC", 0, 0), ("PER", 1, 2)]


def test_entity_f1_by_hand():
  true = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
  pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "I-ORG"]]
  # true {PER 0-1, LOC 3}, {ORG 0}; pred {PER 0-1, ORG 3}, {ORG 0-1}: 1 right of 3 and 3.
  s = metrics.entity_scores(true, pred)
  assert (s["precision"], s["recall"], s["f1"]) == pytest.approx((1 / 3, 1 / 3, 1 / 3))
  # A partial span is wrong; no predictions at all: precision 0, F1 0.
  s = metrics.entity_scores([["B-PER", "I-PER"]], [["B-PER", "O"]])
  assert s == dict(precision=0.0, recall=0.0, f1=0.0)
  s = metrics.entity_scores([["B-PER", "O", "B-LOC"]], [["B-PER", "O", "O"]])
  assert (s["precision"], s["recall"], s["f1"]) == pytest.approx((1.0, 0.5, 2 / 3))
  with pytest.raises(ValueError):
    metrics.entity_scores([["O"]], [])


def test_squad_normalisation_em_and_f1():
  assert metrics.normalize_answer("The  Quick, brown fox!") == "quick brown fox"
  assert metrics.normalize_answer("an apple a day") == "apple day"
  assert metrics.normalize_answer("theory") == "theory"  # articles only as whole words
  assert metrics.squad_exact("the Eiffel Tower.", "Eiffel tower") == 1.0
  # pred 'cat sat' vs truth 'cat sat down': precision 1, recall 2/3 -> F1 0.8
  assert metrics.squad_f1("the cat sat", "a cat sat down") == pytest.approx(0.8)
  assert metrics.squad_f1("dog", "cat") == 0.0
  assert metrics.squad_f1("", "cat") == 0.0
  scores = metrics.squad_scores(["Denver Broncos", "in 1990"],
                                [["Broncos", "the Denver Broncos"], ["1990s", "the year 1990"]])
  # EM: 1 of 2. F1: 1.0 and max(0, F1('in 1990', 'year 1990') = 0.5).
  assert scores == pytest.approx(dict(exact_match=50.0, f1=75.0))
