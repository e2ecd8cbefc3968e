"""k-means over pooled image embeddings (scikit-learn), with one contact sheet per cluster."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from blipkit.errors import UsageError
from blipkit.extras import require

__all__ = ["kmeans", "write_clusters"]


def kmeans(embeddings: np.ndarray, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(labels (N,), distance to the cluster centre (N,)) of L2-normalised embeddings (N, E)."""
    KMeans = require("sklearn.cluster", "blipkit cluster", "eval", "scikit-learn").KMeans

    if not 1 <= k <= len(embeddings):
        raise UsageError(f"k must be between 1 and the number of images ({len(embeddings)}), got {k}")
    km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(embeddings)
    distances = np.linalg.norm(embeddings - km.cluster_centers_[km.labels_], axis=1)
    return km.labels_, distances


def write_clusters(
    paths: list[str], labels: np.ndarray, distances: np.ndarray, out: str | os.PathLike, per_sheet: int = 64
) -> list[Path]:
    """``assignments.csv`` (path, cluster, distance) and ``cluster_XX.png`` (closest images first)."""
    from blipkit.retrieval.plots import contact_sheet

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "assignments.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "cluster", "distance"])
        for path, label, dist in zip(paths, labels.tolist(), distances.tolist(), strict=True):
            writer.writerow([path, label, f"{dist:.6f}"])
    sheets = []
    width = max(2, len(str(int(labels.max()))))
    for c in sorted(set(labels.tolist())):
        members = sorted(np.flatnonzero(labels == c).tolist(), key=lambda i: distances[i])[:per_sheet]
        sheet = out / f"cluster_{c:0{width}d}.png"
        contact_sheet([paths[i] for i in members], sheet, labels=[Path(paths[i]).name for i in members])
        sheets.append(sheet)
    return sheets
