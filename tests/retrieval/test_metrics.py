"""Recall@K on handmade cases: positions, ties, duplicates, -1 padding, dropped queries."""
from __future__ import annotations

import math

import numpy as np
import pytest

from retrieval import recall_at_k
from retrieval.metrics import first_hit_rank


def test_recall_counts_first_positive_position():
    ids = np.array([[5, 1, 2, 3],     # positive 1 at rank 1 (0-based)
                    [7, 8, 9, 4],     # positive 4 at rank 3
                    [0, 1, 2, 3]])    # positive 9 never found
    positives = [np.array([1]), np.array([4, 99]), np.array([9])]
    res = recall_at_k(ids, positives, ks=(1, 2, 4))
    assert res.queries == 3 and res.dropped == 0
    assert res.recall[1] == 0.0
    assert res.recall[2] == pytest.approx(100 / 3)
    assert res.recall[4] == pytest.approx(200 / 3)


def test_queries_without_positives_are_dropped_and_counted():
    ids = np.array([[1, 2], [3, 4], [5, 6]])
    positives = [np.array([1]), np.array([], np.int64), np.array([6])]
    res = recall_at_k(ids, positives, ks=(1, 2))
    assert (res.queries, res.dropped) == (2, 1)
    assert res.recall == {1: 50.0, 2: 100.0}   # the dropped query is not a miss


def test_all_dropped_gives_nan_not_zero():
    res = recall_at_k(np.array([[1]]), [np.array([], np.int64)], ks=(1,))
    assert res.queries == 0 and res.dropped == 1 and math.isnan(res.recall[1])


def test_ties_and_duplicates_are_positions():
    # a database image repeated at several rotations occupies several positions (no dedupe):
    # the positive behind two copies of a negative is found at K=3, not K=2
    ids = np.array([[10, 10, 11, 12]])
    res = recall_at_k(ids, [np.array([11])], ks=(1, 2, 3))
    assert res.recall == {1: 0.0, 2: 0.0, 3: 100.0}
    # equal scores do not matter to recall: only the order given
    assert first_hit_rank(np.array([[3, 4]]), [np.array([4])])[0] == 1


def test_padding_minus_one_never_matches_and_short_lists_are_used_whole():
    ids = np.array([[-1, -1, 2]])
    res = recall_at_k(ids, [np.array([-1, 2])], ks=(1, 3, 10))
    assert res.recall == {1: 0.0, 3: 100.0, 10: 100.0}


def test_bad_shapes_and_ks_raise():
    with pytest.raises(ValueError, match="positive lists"):
        recall_at_k(np.zeros((2, 3), int), [np.array([1])])
    with pytest.raises(ValueError, match=">= 1"):
        recall_at_k(np.zeros((1, 3), int), [np.array([1])], ks=(0,))
