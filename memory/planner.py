"""Order planning: which pending facts are edited together, and in what order.

`arrival` keeps feed order, `random` shuffles with a seed, `cluster` groups facts whose
relation embeddings are close (FAISS spherical k-means) so similar facts are solved in the
same batch, visiting clusters along a nearest-centroid chain; `spread` uses the clusters the other way round: each
batch takes every m-th fact of that chain (m = the number of batches), so near-identical facts land in different
batches instead of being solved against each other.
"""
from __future__ import annotations

import logging
import math
from typing import Literal, Sequence

import faiss
import numpy as np

log = logging.getLogger(__name__)

Order = Literal["arrival", "random", "cluster", "spread"]
ORDERS: tuple[str, ...] = ("arrival", "random", "cluster", "spread")


def chunk(items: Sequence[int], size: int) -> list[list[int]]:
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


def cluster_labels(vectors: np.ndarray, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Spherical k-means assignment of each row and the centroids."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    km = faiss.Kmeans(x.shape[1], k, niter=25, seed=seed, spherical=True, min_points_per_centroid=1,
                      verbose=False)
    km.train(x)
    _, labels = km.index.search(x, 1)
    return labels.ravel(), km.centroids


def _centroid_chain(centroids: np.ndarray, start: int, present: set[int]) -> list[int]:
    """Greedy walk visiting every cluster in `present`, each time to the most similar unvisited one."""
    chain, left = [start], set(present) - {start}
    while left:
        cur = centroids[chain[-1]]
        nxt = max(left, key=lambda c: float(centroids[c] @ cur))
        chain.append(nxt)
        left.remove(nxt)
    return chain


def cluster_order(vectors: np.ndarray, batch_size: int, seed: int = 0) -> list[int]:
    """Row indices ordered cluster by cluster (arrival order inside a cluster)."""
    n = len(vectors)
    k = max(1, math.ceil(n / batch_size))
    if k == 1:
        return list(range(n))
    labels, centroids = cluster_labels(vectors, k, seed)
    groups: dict[int, list[int]] = {}
    for i, c in enumerate(labels):
        groups.setdefault(int(c), []).append(i)
    chain = _centroid_chain(centroids, int(labels[0]), set(groups))
    return [i for c in chain for i in groups[c]]


def plan(ids: Sequence[int], vectors: np.ndarray | None, batch_size: int, order: str = "arrival",
         seed: int = 0) -> list[list[int]]:
    """Split fact `ids` (arrival order, rows of `vectors`) into batches of at most `batch_size`."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}; choose one of {', '.join(ORDERS)}")
    ids = list(ids)
    if order == "arrival" or len(ids) <= 1:
        return chunk(ids, batch_size)
    if order == "random":
        perm = np.random.default_rng(seed).permutation(len(ids))
        return chunk([ids[i] for i in perm], batch_size)
    if vectors is None or len(vectors) != len(ids):
        raise ValueError(f"{order} order needs one embedding per fact")
    chain = [ids[i] for i in cluster_order(vectors, batch_size, seed)]
    if order == "cluster":
        return chunk(chain, batch_size)
    m = math.ceil(len(ids) / batch_size)
    return [chain[b::m] for b in range(m)]
