"""Training-free scores of block features on a client's own data (FedStitch, DESIGN.md §5).

All in float64 on the client's [n, d] globally pooled features and its labels.
"""

from __future__ import annotations

import numpy as np
import torch


def pooled(z: torch.Tensor, prefix_tokens: int = 0) -> torch.Tensor:
    """Global average pool: a map [B, C, H, W] -> [B, C]; tokens [B, N, D] -> mean of the patch tokens."""
    if z.ndim == 4:
        return z.mean(dim=(2, 3))
    if z.ndim == 3:
        return z[:, prefix_tokens:].mean(dim=1)
    return z.reshape(z.shape[0], -1)


def linear_cka(features: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """Linear CKA between the features and one-hot labels; NaN when either side is constant.

    CKA = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) with centred X and Y (Kornblith et al. 2019).
    A client holding one class has a constant Y: its CKA says nothing, so it is NaN (not scored).
    """
    x = np.asarray(features, dtype=np.float64)
    x = x - x.mean(axis=0)
    y = np.eye(num_classes)[labels]
    y = y - y.mean(axis=0)
    cross = np.linalg.norm(y.T @ x) ** 2
    # ||Xc^T Xc||_F = ||Xc Xc^T||_F: take the smaller Gram matrix.
    gx = x.T @ x if x.shape[1] <= x.shape[0] else x @ x.T
    norm = np.linalg.norm(gx) * np.linalg.norm(y.T @ y)
    return float(cross / norm) if norm > 0 else float("nan")


def ncm_accuracy(features: np.ndarray, labels: np.ndarray) -> float:
    """Nearest-class-mean accuracy on the client's own samples (means from the same samples)."""
    x = np.asarray(features, dtype=np.float64)
    classes, inverse = np.unique(labels, return_inverse=True)
    if len(classes) < 2:
        return 1.0
    means = np.stack([x[inverse == k].mean(axis=0) for k in range(len(classes))])
    d = (x * x).sum(1)[:, None] - 2.0 * x @ means.T + (means * means).sum(1)[None, :]
    return float((d.argmin(axis=1) == inverse).mean())


def probe_accuracy(features: np.ndarray, labels: np.ndarray, num_classes: int, ridge: float = 1e-3) -> float:
    """Two-fold ridge linear-probe accuracy on the client's own samples (NaN with fewer than 4 samples)."""
    x = np.asarray(features, dtype=np.float64)
    n = len(x)
    if n < 4:
        return float("nan")
    folds = np.arange(n) % 2
    correct = 0
    for k in (0, 1):
        tr, te = folds != k, folds == k
        mu, sd = x[tr].mean(0), x[tr].std(0) + 1e-8
        a = np.hstack([(x[tr] - mu) / sd, np.ones((tr.sum(), 1))])
        b = np.hstack([(x[te] - mu) / sd, np.ones((te.sum(), 1))])
        gram = a.T @ a
        lam = ridge * np.trace(gram) / gram.shape[0]
        w = np.linalg.solve(gram + lam * np.eye(gram.shape[0]), a.T @ np.eye(num_classes)[labels[tr]])
        correct += int(((b @ w).argmax(1) == labels[te]).sum())
    return correct / n


def label_entropy(labels: np.ndarray, num_classes: int) -> float:
    """Entropy of the label histogram / log(num_classes): 0 = one class, 1 = perfectly balanced."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum() / np.log(num_classes)) if num_classes > 1 else 0.0


SCORES = {
    "cka": lambda f, y, c, ridge: linear_cka(f, y, c),
    "ncm": lambda f, y, c, ridge: ncm_accuracy(f, y),
    "probe": lambda f, y, c, ridge: probe_accuracy(f, y, c, ridge),
}
