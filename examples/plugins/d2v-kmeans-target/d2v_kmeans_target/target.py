"""A HuBERT-style target: classify which cluster the teacher's feature falls in.

data2vec regresses the teacher's top-K layer average ``y`` directly. This target keeps the
same teacher and the same ``y`` (it reuses :class:`d2v_targets.data2vec.Data2VecTarget` for
it), but turns it into a discrete label: the index of ``y``'s nearest centroid in an online
k-means codebook (:class:`~d2v_kmeans_target.kmeans.OnlineKMeans`) that follows the drifting
EMA teacher. The student's prediction (the objective's regression head or decoder output,
``D`` wide as for data2vec) goes through a linear classifier over the ``K`` clusters and the
loss is cross-entropy against the cluster ids (HuBERT, Hsu et al. 2021, with its offline
k-means of a fixed teacher made online).

Fit with the ``Target`` contract (``forward(teacher_output, mask) -> (N, D)``,
``loss(prediction, target)``): ``forward`` returns the teacher features themselves, so the
objectives, their stats and the collapse guard work unchanged; the discretisation happens
in ``loss``. The codebook is updated in ``build`` (training only), which both objectives call
once per batch with every non-padded position of the teacher's output.

The classifier and the codebook need the encoder width ``D``, which a target is not told when
it is built. data2vec 2.0 hands it over when it asks the target for its decoder
(``make_decoder(kind, input_dim, ...)``, before the optimizer exists); for data2vec 1.0, whose
regression head is built by the objective, set ``dim`` in the spec.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from d2v.api.errors import SpecError
from d2v import EncoderOutput
from d2v_kmeans_target.kmeans import OnlineKMeans
from d2v_targets.data2vec import Data2VecTarget, channel_std


class KMeansTarget(Data2VecTarget):
    """Cluster ids of the teacher's top-K layer average, predicted with cross-entropy.

    * ``clusters``: ``K``, the number of centroids (and classes);
    * ``top_k``, ``layer_norm``, ``final_norm``, ``eps``: the teacher feature that is clustered,
      as for the ``data2vec`` target (``top_k: 1`` clusters the top layer alone, as HuBERT's
      second iteration clusters one layer);
    * ``centroid_decay``, ``init_iterations``, ``restart_below``, ``seed``: the online k-means
      (see :class:`~d2v_kmeans_target.kmeans.OnlineKMeans`);
    * ``dim``: the encoder width; only needed with the ``data2vec`` (1.0) objective;
    * ``sync_stats``: all-reduce the logged standard deviations across processes in training.
    """

    def __init__(
        self,
        *,
        clusters: int = 64,
        top_k: int = 8,
        layer_norm: str | None = "instance",
        final_norm: str | None = None,
        centroid_decay: float = 0.99,
        init_iterations: int = 10,
        restart_below: float = 0.1,
        seed: int = 0,
        dim: int | None = None,
        eps: float = 1e-5,
        sync_stats: bool = True,
    ):
        super().__init__(top_k=top_k, layer_norm=layer_norm, final_norm=final_norm, loss="l2",
                         reduction="sum", eps=eps, sync_stats=sync_stats)
        if clusters < 2:
            raise SpecError(f"kmeans target: clusters must be >= 2, got {clusters}.")
        if not 0.0 <= centroid_decay < 1.0:
            raise SpecError(f"kmeans target: centroid_decay must be in [0, 1), got {centroid_decay}.")
        if init_iterations < 0 or restart_below < 0:
            raise SpecError("kmeans target: init_iterations and restart_below must be >= 0, "
                            f"got {init_iterations} and {restart_below}.")
        self.clusters = int(clusters)
        self.kmeans_options = {"decay": float(centroid_decay), "init_iterations": int(init_iterations),
                               "restart_below": float(restart_below), "seed": int(seed)}
        self.codebook: OnlineKMeans | None = None
        self.classifier: nn.Linear | None = None
        if dim is not None:
            self.set_dim(int(dim))

    def extra_repr(self) -> str:
        return (f"clusters={self.clusters}, top_k={self.top_k}, layer_norm={self.layer_norm}, "
                f"final_norm={self.final_norm}")

    # ---------------------------------------------------------------- width
    def set_dim(self, dim: int) -> None:
        """Create the codebook and the classifier for ``dim``-wide features (once)."""
        if self.codebook is not None:
            if self.codebook.centroids.shape[1] != dim:
                raise SpecError(f"kmeans target: dim={self.codebook.centroids.shape[1]} in the spec, "
                                f"but the encoder is {dim} wide; remove dim or set it to {dim}.")
            return
        self.codebook = OnlineKMeans(self.clusters, dim, **self.kmeans_options)
        self.classifier = nn.Linear(dim, self.clusters)

    def make_decoder(self, kind: str, input_dim: int, *, grid: tuple[int, int] | None = None, **options):
        """data2vec 2.0's decoder, unchanged; the call tells the target the encoder width."""
        self.set_dim(int(input_dim))
        return super().make_decoder(kind, input_dim, grid=grid, **options)

    def _require_codebook(self) -> OnlineKMeans:
        if self.codebook is None:
            raise SpecError("kmeans target: the encoder width is unknown (the data2vec 1.0 objective does not pass it "
                            "to its target); set model.objective.target.dim to model.encoder's dim.")
        return self.codebook

    # ---------------------------------------------------------------- targets
    @torch.no_grad()
    def build(self, teacher_output: EncoderOutput, skip_tokens: int = 0) -> Tensor:
        """The teacher features ``(B, T, D)``, as data2vec's; their non-padded rows initialise
        the codebook on the first call and update it on every training call."""
        y = super().build(teacher_output, skip_tokens)
        codebook = self._require_codebook()
        padding_mask = teacher_output.padding_mask
        if padding_mask is not None:
            rows = y[~padding_mask[:, skip_tokens:].bool()]
        else:
            rows = y.reshape(-1, y.shape[-1])
        if not bool(codebook.ready):
            codebook.initialize(rows)
        elif self.training:
            codebook.update(rows)
        return y

    def cluster_ids(self, target: Tensor) -> Tensor:
        """The class of each target row ``(N, D)``: its nearest centroid."""
        return self._require_codebook().assign(target)

    def logits(self, prediction: Tensor) -> Tensor:
        """``(N, K)`` cluster scores from the student's ``(N, D)`` prediction."""
        self._require_codebook()
        return self.classifier(prediction).float()

    # ---------------------------------------------------------------- loss
    def loss(self, prediction: Tensor, target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Summed cross-entropy between the prediction's cluster scores and the target's
        cluster ids (the objective divides by the number of masked positions).

        Stats: ``target_std`` and ``pred_std`` as data2vec's (the collapse guard reads them),
        ``accuracy`` (share of positions whose cluster is predicted right) and
        ``perplexity`` (how many clusters the targets spread over)."""
        if prediction.shape[0] != target.shape[0]:
            raise ValueError(f"prediction has {prediction.shape[0]} rows but target has {target.shape[0]}")
        ids = self.cluster_ids(target)
        logits = self.logits(prediction)
        value = F.cross_entropy(logits, ids, reduction="sum")
        sync = self.sync_stats and self.training
        with torch.no_grad():
            stats = {
                "target_std": channel_std(target, sync=sync),
                "pred_std": channel_std(prediction, sync=sync),
                "accuracy": (logits.argmax(-1) == ids).float().mean(),
                "perplexity": self.codebook.perplexity(ids),
            }
        return value, stats
