"""Online k-means: a codebook of ``K`` centroids that follows a drifting teacher.

HuBERT clusters a fixed teacher's features once, offline, between training iterations. Here
the teacher is an EMA of the student and drifts every update, so the centroids follow it
online instead (the "EMA k-means" of VQ-VAE's codebook updates):

1. **initialise** from the first batch seen: ``K`` distinct vectors drawn with a seeded
   generator, refined by a few Lloyd iterations on that batch;
2. **update** on every training batch: each centroid moves towards the mean of the vectors
   assigned to it, ``c <- c + (1 - decay) * (mean - c)``;
3. **restart** dead centroids: a centroid whose usage (EMA of the fraction of vectors it wins)
   falls below ``restart_below / K`` jumps to the batch vector worst served by the codebook.

Everything is deterministic given the batches and ``seed``. Under ``torch.distributed`` the
per-cluster sums and counts are all-reduced, and initialisation and restarts are broadcast
from process 0, so every process keeps the same codebook.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn


def squared_distances(x: Tensor, centroids: Tensor) -> Tensor:
    """``(N, K)`` squared Euclidean distances between rows of ``x`` ``(N, D)`` and ``centroids``."""
    x, centroids = x.float(), centroids.float()
    cross = x @ centroids.T
    return (x * x).sum(-1, keepdim=True) - 2.0 * cross + (centroids * centroids).sum(-1)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class OnlineKMeans(nn.Module):
    """``K`` centroids in ``D`` dimensions, kept as buffers (saved in checkpoints, never trained).

    ``decay``: how much of a centroid survives one update (0.99 follows the teacher over ~100
    updates); ``init_iterations``: Lloyd iterations on the first batch; ``restart_below``: a
    centroid is dead when its usage is below ``restart_below / K``; ``seed``: the draw of the
    initial centroids.
    """

    def __init__(self, clusters: int, dim: int, *, decay: float = 0.99, init_iterations: int = 10,
                 restart_below: float = 0.1, seed: int = 0):
        super().__init__()
        self.clusters = int(clusters)
        self.decay = float(decay)
        self.init_iterations = int(init_iterations)
        self.restart_below = float(restart_below)
        self.seed = int(seed)
        self.register_buffer("centroids", torch.zeros(self.clusters, dim))
        self.register_buffer("usage", torch.zeros(self.clusters))
        self.register_buffer("ready", torch.zeros((), dtype=torch.bool))

    def extra_repr(self) -> str:
        return f"clusters={self.clusters}, dim={self.centroids.shape[1]}, decay={self.decay}"

    @torch.no_grad()
    def assign(self, x: Tensor) -> Tensor:
        """Index ``(N,)`` of the nearest centroid of each row of ``x`` ``(N, D)``."""
        return squared_distances(x, self.centroids).argmin(-1)

    def _counts_and_sums(self, x: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
        counts = torch.bincount(ids, minlength=self.clusters).float()
        sums = torch.zeros_like(self.centroids).index_add_(0, ids, x)
        if _distributed():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        return counts, sums

    def _broadcast(self) -> None:
        if _distributed():
            dist.broadcast(self.centroids, 0)
            dist.broadcast(self.usage, 0)

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Seeded draw of ``K`` rows of ``x`` ``(N, D)``, then Lloyd iterations on ``x``."""
        x = x.detach().float()
        generator = torch.Generator().manual_seed(self.seed)
        if x.shape[0] >= self.clusters:
            picks = torch.randperm(x.shape[0], generator=generator)[: self.clusters]
        else:  # too few vectors: repeats, which the restarts separate later
            picks = torch.randint(x.shape[0], (self.clusters,), generator=generator)
        centroids = x[picks.to(x.device)].clone()
        for _ in range(self.init_iterations):
            ids = squared_distances(x, centroids).argmin(-1)
            counts = torch.bincount(ids, minlength=self.clusters).float()
            sums = torch.zeros_like(centroids).index_add_(0, ids, x)
            filled = counts > 0
            centroids[filled] = sums[filled] / counts[filled, None]
        self.centroids.copy_(centroids)
        ids = self.assign(x)
        self.usage.copy_(torch.bincount(ids, minlength=self.clusters).float() / x.shape[0])
        self.ready.fill_(True)
        self._broadcast()

    @torch.no_grad()
    def update(self, x: Tensor) -> Tensor:
        """One EMA step towards the batch ``x`` ``(N, D)``; returns the batch's assignments."""
        x = x.detach().float()
        ids = self.assign(x)
        counts, sums = self._counts_and_sums(x, ids)
        filled = counts > 0
        means = sums[filled] / counts[filled, None]
        self.centroids[filled] += (1.0 - self.decay) * (means - self.centroids[filled])
        self.usage.mul_(self.decay).add_((1.0 - self.decay) * counts / counts.sum().clamp(min=1.0))
        self._restart_dead(x, ids)
        return ids

    def _restart_dead(self, x: Tensor, ids: Tensor) -> None:
        dead = (self.usage < self.restart_below / self.clusters).nonzero().flatten()
        if dead.numel() == 0:
            return
        # the vectors farthest from their centroid, one per dead centroid
        error = (x - self.centroids[ids]).pow(2).sum(-1)
        worst = error.topk(min(dead.numel(), x.shape[0])).indices
        dead = dead[: worst.numel()]
        self.centroids[dead] = x[worst]
        self.usage[dead] = 1.0 / self.clusters
        self._broadcast()

    def perplexity(self, ids: Tensor) -> Tensor:
        """``exp`` of the entropy of the clusters' share of ``ids``: K when all are used evenly."""
        share = torch.bincount(ids, minlength=self.clusters).float()
        share = share / share.sum().clamp(min=1.0)
        return torch.exp(-(share * share.clamp(min=1e-12).log()).sum())
