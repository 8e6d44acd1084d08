"""pass@k: the stable product form against a brute-force enumeration of every k-subset of the n samples."""

import itertools
import math
from fractions import Fraction

import pytest

from rlfuse.engine.passk import default_ks, mean_pass_at_k, pass_at_k


def enumerated_pass_at_k(n, c, k):
    """The fraction of k-subsets of n samples (c of them correct) that hold a correct one, counted exactly."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    hits = sum(any(samples[i] for i in subset) for subset in subsets)
    return Fraction(hits, len(subsets))


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 10])
def test_matches_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(float(enumerated_pass_at_k(n, c, k)), abs=1e-12), (n, c, k)


def test_edge_values():
    assert pass_at_k(8, 0, 4) == 0.0
    assert pass_at_k(8, 8, 1) == 1.0
    assert pass_at_k(8, 5, 4) == 1.0  # fewer than k wrong samples: every k-subset holds a correct one
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the fraction correct


def test_large_n_is_stable():
    n, c, k = 2000, 7, 500
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12)


def test_mean_over_problems():
    counts = [0, 1, 4]
    result = mean_pass_at_k(4, counts, [1, 2])
    for k in (1, 2):
        oracle = sum(float(enumerated_pass_at_k(4, c, k)) for c in counts) / 3
        assert result[k] == pytest.approx(oracle)


@pytest.mark.parametrize("n, c, k, word", [(4, 5, 1, "c"), (4, -1, 1, "c"), (4, 1, 0, "k"), (4, 1, 5, "k")])
def test_bad_arguments(n, c, k, word):
    with pytest.raises(ValueError, match=f"{word} must be"):
        pass_at_k(n, c, k)


def test_default_ks():
    assert default_ks(1) == [1]
    assert default_ks(8) == [1, 2, 4, 8]
    assert default_ks(6) == [1, 2, 4, 6]
    with pytest.raises(ValueError):
        mean_pass_at_k(4, [], [1])
