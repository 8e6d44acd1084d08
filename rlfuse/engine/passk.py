"""pass@k from n samples per problem, the unbiased estimator of "Evaluating Large Language Models Trained on
Code" (Chen et al., 2021, eq. 1): pass@k = E[1 - C(n - c, k) / C(n, k)] over problems, with c of n correct."""

from __future__ import annotations

from typing import Dict, Iterable, List, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n - c, k) / C(n, k): the chance that k of the n samples, drawn without replacement, hold a correct one.

    Computed as 1 - prod_{i = n - c + 1}^{n} (1 - k / i), the paper's numerically stable form: no binomial
    coefficient is formed, so large n neither overflows nor loses precision.

    Raises:
        ValueError: not 0 <= c <= n, or not 1 <= k <= n.
    """
    if not 0 <= c <= n:
        raise ValueError(f"the number correct c must be in [0, n] = [0, {n}], got {c}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n] = [1, {n}] (n samples per problem), got {k}")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def mean_pass_at_k(num_samples: int, num_correct: Sequence[int], ks: Iterable[int]) -> Dict[int, float]:
    """``{k: mean over problems of pass_at_k(num_samples, c, k)}`` for problems with ``num_correct`` c each.

    Raises:
        ValueError: no problems, or as :func:`pass_at_k`.
    """
    if not num_correct:
        raise ValueError("num_correct is empty: pass@k needs at least one problem")
    return {k: sum(pass_at_k(num_samples, c, k) for c in num_correct) / len(num_correct) for k in ks}


def default_ks(num_samples: int) -> List[int]:
    """1, 2, 4, ... up to ``num_samples``, and ``num_samples`` itself."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    ks, k = [], 1
    while k < num_samples:
        ks.append(k)
        k *= 2
    return ks + [num_samples]
