"""Heavy-tail exponent ("alpha") of a weight matrix's eigenvalue spectrum, numpy only.

The estimator is WeightWatcher's (``weightwatcher`` 0.7, ``pl_package="WW"``,
its default), re-implemented so that peelnb computes it itself:

1. **Spectrum.** The eigenvalues of ``W^T W`` are the squared singular values
   of ``W`` (float64 SVD; no normalization by the matrix size). Eigenvalues at
   or below `EVALS_THRESH` (1e-5) are dropped; the rest are sorted.
2. **Fit, for each candidate xmin.** Every eigenvalue except the largest is a
   candidate ``xmin``. The tail ``x >= xmin`` (``n`` eigenvalues) gets the
   maximum-likelihood exponent of a continuous power law
   ``p(x) ~ x^(-alpha)`` on ``[xmin, inf)``::

       alpha = 1 + n / sum(log(x / xmin))

   and the Kolmogorov-Smirnov distance ``D`` between the tail's empirical CDF
   (``0, 1/n, ..., (n-1)/n``) and the fitted CDF ``1 - (x / xmin)^(1 - alpha)``
   (``D = 1`` where ``alpha <= 1``).
3. **Choice of xmin.** The candidate with the smallest ``D`` (the first one
   on ties) gives ``alpha``.
4. **Few eigenvalues.** With fewer than `SMALL_N` (20) eigenvalues, as in
   WeightWatcher, the exponent is the bias-corrected ``1 + (n - 1) / sum(log(x
   / xmin))`` and tails shorter than `SMALL_N_MIN_TAIL` (8) are not
   candidates; ``xmin`` still minimizes ``D``. (WeightWatcher's small-sample
   code also computes a second objective, ``D - 0.868 / sqrt(n)``, but the
   fit it returns is chosen by ``D``; that is what it reports, so that is
   what peelnb does.) When no tail is long enough, the whole spectrum is the
   tail; a spectrum of equal values has no tail and gives NaN.

Larger alpha means a thinner tail: in WeightWatcher's reading, a less trained
(less correlated) matrix; well-trained layers have alpha of about 2-6.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EVALS_THRESH = 1e-5
"""Eigenvalues at or below this are dropped before the fit (WeightWatcher's ``EVALS_THRESH``)."""
SMALL_N = 20
"""Below this many eigenvalues the small-sample estimator is used (WeightWatcher's ``SMALL_N_CUTOFF``)."""
SMALL_N_MIN_TAIL = 8
"""Shortest tail the small-sample estimator considers."""


@dataclass(frozen=True)
class PowerLawFit:
    """A power law fitted to the tail of a spectrum.

    Attributes
    ----------
    alpha : float
        Exponent of the tail density ``p(x) ~ x^(-alpha)``; NaN when there is nothing to fit.
    xmin : float
        Where the tail starts.
    ks_distance : float
        Kolmogorov-Smirnov distance between the tail and the fitted law.
    n_tail : int
        Eigenvalues in the tail (``x >= xmin``).
    n_evals : int
        Eigenvalues fitted (above `EVALS_THRESH`).
    """

    alpha: float
    xmin: float
    ks_distance: float
    n_tail: int
    n_evals: int


def eigenvalues(weight: np.ndarray) -> np.ndarray:
    """Eigenvalues of ``W^T W`` (squared singular values of ``W``), float64, ascending.

    Parameters
    ----------
    weight : numpy.ndarray
        A 2-D matrix, either orientation (``W`` and ``W^T`` share their nonzero spectrum).

    Returns
    -------
    numpy.ndarray
        ``min(W.shape)`` eigenvalues, ascending.

    Raises
    ------
    ValueError
        If ``weight`` is not a 2-D matrix of finite numbers.

    Examples
    --------
    >>> eigenvalues(np.diag([3.0, 1.0])).tolist()
    [1.0, 9.0]
    """
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim != 2 or min(w.shape) == 0:
        raise ValueError(f"expected a non-empty 2-D weight matrix, got an array of shape {w.shape}")
    if not np.isfinite(w).all():
        raise ValueError("the weight matrix holds NaN or inf; its spectrum is undefined")
    return np.sort(np.linalg.svd(w, compute_uv=False) ** 2)


def _candidates(x: np.ndarray, *, corrected: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tail sizes n, exponents and KS distances for every candidate xmin ``x[i]``, i < len(x) - 1.

    A candidate whose exponent is not above 1 gets ``D = 1``, and so does,
    for the small-sample estimator, a tail shorter than `SMALL_N_MIN_TAIL` or
    of equal values.
    """
    N = len(x)
    logs = np.log(x)
    n = (N - np.arange(N - 1)).astype(np.float64)
    suffix = np.cumsum(logs[::-1])[::-1][:-1]  # sum(log x[i:]) for i < N - 1
    spread = suffix - n * logs[:-1]  # sum(log(x[i:] / x[i]))
    with np.errstate(divide="ignore", invalid="ignore"):
        alphas = 1.0 + ((n - 1.0) if corrected else n) / spread
    ks = np.ones(N - 1)
    for i in range(N - 1):
        if corrected and (n[i] < SMALL_N_MIN_TAIL or not spread[i] > 1e-12):
            continue
        if alphas[i] > 1:
            ks[i] = np.max(np.abs(1.0 - (x[i:] / x[i]) ** (1.0 - alphas[i]) - np.arange(n[i]) / n[i]))
    return n, alphas, ks


def fit_power_law(evals: np.ndarray) -> PowerLawFit:
    """Fit a power law to the tail of a spectrum, choosing xmin by the Kolmogorov-Smirnov distance.

    See the module notes for the exact estimator (WeightWatcher's).

    Parameters
    ----------
    evals : numpy.ndarray
        Eigenvalues (any order); those at or below `EVALS_THRESH` are ignored.

    Returns
    -------
    PowerLawFit
        alpha NaN when fewer than two eigenvalues remain.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> sample = (1 - rng.random(5000)) ** (-1 / 1.5)   # Pareto: density ~ x^-2.5 on [1, inf)
    >>> round(fit_power_law(sample).alpha, 1)
    2.5
    """
    x = np.sort(np.asarray(evals, dtype=np.float64).ravel())
    x = x[x > EVALS_THRESH]
    N = len(x)
    if N < 2:
        return PowerLawFit(np.nan, np.nan, np.nan, 0, N)
    if not float(np.sum(np.log(x / x[0]))) > 1e-12:  # equal eigenvalues: no tail to fit
        return PowerLawFit(np.nan, float(x[0]), np.nan, N, N)
    small = N < SMALL_N
    _, alphas, ks = _candidates(x, corrected=small)
    if small and N < SMALL_N_MIN_TAIL:  # no candidate tail is long enough: the whole spectrum is the tail
        alphas[0] = 1.0 + (N - 1.0) / float(np.sum(np.log(x / x[0])))
        ks[0] = float(np.max(np.abs(np.arange(N) / N - (1.0 - (x / x[0]) ** (1.0 - alphas[0])))))
    i = int(np.argmin(ks))
    return PowerLawFit(float(alphas[i]), float(x[i]), float(ks[i]), int(N - i), N)


def matrix_alpha(weight: np.ndarray) -> float:
    """Heavy-tail exponent of one weight matrix: `fit_power_law` of `eigenvalues`.

    Parameters
    ----------
    weight : numpy.ndarray
        A 2-D weight matrix.

    Returns
    -------
    float
        alpha (NaN when the matrix has fewer than two eigenvalues above `EVALS_THRESH`).

    Examples
    --------
    >>> w = np.random.default_rng(0).standard_normal((256, 64))
    >>> bool(matrix_alpha(w) > 2)   # an untrained (random) matrix: a thin tail
    True
    """
    return fit_power_law(eigenvalues(weight)).alpha
