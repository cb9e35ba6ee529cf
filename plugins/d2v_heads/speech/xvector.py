"""Speaker embeddings and verification: Hugging Face's ``Data2VecAudioForXVector`` head.

``projector`` (Linear ``input_dim -> tdnn_dim[0]``) -> a TDNN stack (dilated 1-D convs + ReLU,
``tdnn_dim``/``tdnn_kernel``/``tdnn_dilation``) -> statistics pooling (mean and standard
deviation over the valid frames, concatenated) -> ``feature_extractor`` (Linear, the x-vector
``embeddings``) -> ``classifier`` (Linear ``xvector_output_dim -> xvector_output_dim``, the
``logits``) -> additive-margin softmax (AM-Softmax, scale 30, margin 0.4) against
``objective.weight`` ``(xvector_output_dim, num_labels)``. Verification scores a trial list by
the cosine similarity of the embeddings and reports EER and minDCF.

Hugging Face quirks reproduced exactly (parity):

* AM-Softmax is applied to the ``classifier`` output (the ``logits``, ``xvector_output_dim``
  wide), not to the embeddings; ``logits`` are therefore not per-speaker scores (those are
  ``scale * cos(logits, objective.weight)``, what :meth:`XVectorHead.predict` uses).
* The number of pooled TDNN frames of a padded example is computed as if the TDNN were not
  dilated (``L - sum(kernel - 1)``), so with dilation it pools a few frames whose receptive
  field reaches into the padding (``L - sum(dilation * (kernel - 1))`` would be exact); an
  unpadded batch pools every TDNN frame.
* The standard deviation is the unbiased one (``torch.std``).

Spec usage::

    head: {name: xvector, num_labels: 1211, trials: data/voxceleb1/veri_test2.txt}

Batch keys read: ``labels`` (speaker ids, training), ``ids`` and ``speakers`` (evaluation).
Without ``trials`` the evaluation scores every pair of evaluated utterances (same speaker =
target trial), which suits small held-out sets.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from d2v import hookimpl
from d2v.api.errors import SpecError
from d2v import EncoderOutput, Head, HeadOutput
from d2v_heads.shared.label_names import resolve_label_names
from d2v_heads.shared.layer_sum import head_input, make_layer_weights, valid_frames
from d2v_heads.shared.top_k import ranked
from d2v_heads.speech.verification_metrics import cosine_trial_scores, verification_summary


@hookimpl
def d2v_register(register):
    register("head", "xvector", "d2v_heads.speech.xvector:XVectorHead",
             summary="x-vector speaker embeddings: TDNN, statistics pooling, AM-Softmax (HF Data2VecAudioForXVector); "
                     "cosine trial scoring, EER, minDCF")


def read_trials(path: str | Path) -> list[tuple[int, str, str]]:
    """A VoxCeleb-style trial list: lines ``<1|0> <enroll utterance> <test utterance>``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise SpecError(f"xvector: trial list '{path}' does not exist (expected lines '<1|0> <enroll id> <test id>', "
                        f"e.g. VoxCeleb1's veri_test2.txt).")
    trials = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 3 or fields[0] not in ("0", "1"):
            raise SpecError(f"{path}:{n}: expected '<1|0> <enroll id> <test id>', got {line!r}.")
        trials.append((int(fields[0]), fields[1], fields[2]))
    if not trials:
        raise SpecError(f"xvector: trial list '{path}' has no trials.")
    return trials


def all_pair_trials(ids: Sequence[str], speakers: Sequence[str]) -> list[tuple[int, str, str]]:
    """Every unordered pair of distinct utterances; target when the speakers match."""
    return [(int(speakers[i] == speakers[j]), ids[i], ids[j])
            for i in range(len(ids)) for j in range(i + 1, len(ids))]


class TDNNLayer(nn.Module):
    """A dilated 1-D conv + ReLU whose weight is kept as HF's ``kernel`` Linear
    ``(out, kernel_size * in)`` (``(k, in)`` blocks per output channel)."""

    def __init__(self, in_dim: int, out_dim: int, kernel_size: int, dilation: int):
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.kernel_size, self.dilation = kernel_size, dilation
        self.kernel = nn.Linear(in_dim * kernel_size, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        weight = self.kernel.weight.view(self.out_dim, self.kernel_size, self.in_dim).transpose(1, 2)
        y = nn.functional.conv1d(x.transpose(1, 2), weight, self.kernel.bias, dilation=self.dilation)
        return torch.relu(y.transpose(1, 2))


class AMSoftmaxLoss(nn.Module):
    """Additive-margin softmax: ``scale * (cos(x, w_y) - margin)`` for the true class,
    ``scale * cos(x, w_k)`` for the others, then cross-entropy; ``weight`` is ``(dim, classes)``
    and drawn from N(0, 1) as Hugging Face initialises it."""

    def __init__(self, dim: int, num_labels: int, *, scale: float = 30.0, margin: float = 0.4):
        super().__init__()
        self.scale, self.margin, self.num_labels = float(scale), float(margin), int(num_labels)
        self.weight = nn.Parameter(torch.randn(dim, num_labels))

    def cosine(self, x: Tensor) -> Tensor:
        return nn.functional.normalize(x, dim=1) @ nn.functional.normalize(self.weight, dim=0)

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        labels = labels.flatten()
        cos = self.cosine(x)
        target = nn.functional.one_hot(labels, self.num_labels).bool()
        return nn.functional.cross_entropy(self.scale * torch.where(target, cos - self.margin, cos), labels)


class XVectorHead(Head):
    """x-vector head (defaults: Hugging Face's ``Data2VecAudioConfig``).

    Parameters (keyword-only): ``input_dim``/``num_layers`` (injected), ``num_labels`` or
    ``label_names`` (training speakers), ``use_weighted_layer_sum``, ``tdnn_dim``,
    ``tdnn_kernel``, ``tdnn_dilation``, ``xvector_output_dim``, ``amsoftmax_scale``,
    ``amsoftmax_margin`` (HF fixes them at 30 and 0.4), ``trials`` (a trial list for
    evaluation), ``p_target`` (minDCF prior).
    """

    tasks = ("speaker-embedding",)
    pair_tasks = ("speaker-verification",)

    def __init__(
        self,
        *,
        input_dim: int,
        num_labels: int | None = None,
        label_names: list[str] | None = None,
        use_weighted_layer_sum: bool = False,
        num_layers: int | None = None,
        tdnn_dim: Sequence[int] = (512, 512, 512, 512, 1500),
        tdnn_kernel: Sequence[int] = (5, 3, 3, 1, 1),
        tdnn_dilation: Sequence[int] = (1, 2, 3, 1, 1),
        xvector_output_dim: int = 512,
        amsoftmax_scale: float = 30.0,
        amsoftmax_margin: float = 0.4,
        trials: str | None = None,
        p_target: float = 0.01,
    ) -> None:
        super().__init__()
        self.tdnn_dim = [int(d) for d in tdnn_dim]
        self.tdnn_kernel = [int(k) for k in tdnn_kernel]
        self.tdnn_dilation = [int(d) for d in tdnn_dilation]
        if not (len(self.tdnn_dim) == len(self.tdnn_kernel) == len(self.tdnn_dilation)) or not self.tdnn_dim:
            raise SpecError("xvector: tdnn_dim, tdnn_kernel and tdnn_dilation must be non-empty and of the same "
                            f"length, got {len(self.tdnn_dim)}, {len(self.tdnn_kernel)} and {len(self.tdnn_dilation)}.")
        self.label_names = resolve_label_names(num_labels, label_names, "xvector")
        self.num_labels = len(self.label_names)
        self.input_dim = int(input_dim)
        self.xvector_output_dim = int(xvector_output_dim)
        self.trials_path = trials
        self.trials = read_trials(trials) if trials else None
        self.p_target = float(p_target)
        self.use_weighted_layer_sum = bool(use_weighted_layer_sum)
        self.needs_hidden_states = self.use_weighted_layer_sum
        self.layer_weights = make_layer_weights(self.use_weighted_layer_sum, num_layers)

        self.projector = nn.Linear(self.input_dim, self.tdnn_dim[0])
        widths = [self.tdnn_dim[0]] + self.tdnn_dim
        self.tdnn = nn.ModuleList(
            TDNNLayer(widths[i], widths[i + 1], self.tdnn_kernel[i], self.tdnn_dilation[i]) for i in range(len(self.tdnn_dim))
        )
        self.feature_extractor = nn.Linear(2 * self.tdnn_dim[-1], self.xvector_output_dim)
        self.classifier = nn.Linear(self.xvector_output_dim, self.xvector_output_dim)
        self.objective = AMSoftmaxLoss(self.xvector_output_dim, self.num_labels,
                                       scale=amsoftmax_scale, margin=amsoftmax_margin)

    def hf_config(self) -> dict[str, Any]:
        return {
            "use_weighted_layer_sum": self.use_weighted_layer_sum,
            "tdnn_dim": list(self.tdnn_dim),
            "tdnn_kernel": list(self.tdnn_kernel),
            "tdnn_dilation": list(self.tdnn_dilation),
            "xvector_output_dim": self.xvector_output_dim,
            "id2label": {str(i): name for i, name in enumerate(self.label_names)},
            "label2id": {name: i for i, name in enumerate(self.label_names)},
        }

    def pooled_frames(self, valid: Tensor) -> Tensor:
        """TDNN frames pooled per example, by Hugging Face's (undilated) length formula."""
        for kernel in self.tdnn_kernel:
            valid = valid - kernel + 1
        return valid

    # ------------------------------------------------------------------ forward / loss
    def forward(self, encoder_output: EncoderOutput, batch: dict[str, Any] | None = None) -> HeadOutput:
        x = self.projector(head_input(encoder_output, self.layer_weights))
        batch_size, frames = x.shape[:2]
        for layer in self.tdnn:
            x = layer(x)
        if encoder_output.padding_mask is None:
            stats = torch.cat([x.mean(dim=1), x.std(dim=1)], dim=-1)
        else:
            lengths = self.pooled_frames(valid_frames(encoder_output.padding_mask, batch_size, frames, x.device))
            if int(lengths.min()) < 2:
                raise SpecError(f"xvector: an utterance leaves {int(lengths.min())} TDNN frame(s) to pool (needs >= 2 "
                                f"for a standard deviation); drop shorter clips (processor min_samples).")
            stats = torch.stack([torch.cat([x[i, :n].mean(dim=0), x[i, :n].std(dim=0)])
                                 for i, n in enumerate(lengths.tolist())])
        embeddings = self.feature_extractor(stats)
        logits = self.classifier(embeddings)
        labels = (batch or {}).get("labels")
        loss = None
        if labels is not None:
            labels = torch.as_tensor(labels, device=logits.device).long()
            if bool((labels >= 0).all()):
                loss = self.objective(logits, labels)
        return HeadOutput(logits=logits, loss=loss, extras={"embeddings": embeddings})

    # ------------------------------------------------------------------ evaluation
    def predict(self, output: HeadOutput, batch: dict[str, Any] | None = None) -> list[str]:
        """The closest training speaker per utterance (cosine to ``objective.weight``)."""
        return [self.label_names[i] for i in self.objective.cosine(output.logits).argmax(-1).tolist()]

    def describe(self, output: HeadOutput, batch: dict[str, Any], *, top_k: int = 5, decode: Any = None) -> list[dict]:
        """Per utterance: its x-vector ``embedding`` (Hugging Face's ``embeddings``), the closest
        training ``speaker`` and the ``top_k`` training speakers by cosine similarity."""
        cosine = self.objective.cosine(output.logits.detach().float()).cpu()
        out = []
        for embedding, row in zip(output.extras["embeddings"].detach().float().cpu(), cosine):
            top = ranked(row, self.label_names, top_k)
            out.append({"embedding": embedding.tolist(), "speaker": top[0]["label"], "top_k": top})
        return out

    def score_pair(self, first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
        """Speaker verification: the cosine similarity of the two x-vectors (higher = more
        likely the same speaker; the threshold is the operating point chosen on a trial list)."""
        a, b = torch.tensor(first["embedding"]), torch.tensor(second["embedding"])
        return {"score": float(nn.functional.cosine_similarity(a, b, dim=0))}

    def references(self, batch: dict[str, Any]) -> list[Any]:
        speakers = batch.get("speakers")
        return list(speakers) if speakers is not None else super().references(batch)

    def eval_counts(self, output: HeadOutput, batch: dict[str, Any]) -> dict[str, Any]:
        """Per-utterance ids, speakers and embeddings (lists, concatenated over batches)."""
        embeddings = output.extras["embeddings"].detach().float().cpu()
        ids = list(batch.get("ids") or [])
        if len(ids) != embeddings.shape[0]:
            raise SpecError("xvector evaluation needs the utterance ids in the batch ('ids').")
        counts: dict[str, Any] = {"xv_ids": ids, "xv_embeddings": embeddings.tolist()}
        speakers = batch.get("speakers")
        if speakers is not None:
            counts["xv_speakers"] = [str(s) for s in speakers]
        return counts

    def summarize(self, counts: dict[str, Any]) -> dict[str, float]:
        ids = counts.get("xv_ids") or []
        if not ids:
            return {}
        embeddings = {i: torch.tensor(e) for i, e in zip(ids, counts["xv_embeddings"])}
        if self.trials is not None:
            missing = sorted({u for _, a, b in self.trials for u in (a, b) if u not in embeddings})
            if missing:
                raise SpecError(f"xvector: {len(missing)} utterance(s) of the trial list {self.trials_path} were not "
                                f"evaluated, e.g. {', '.join(missing[:3])}; evaluate the split the trials come from "
                                f"(utterance ids must match the trial list).")
            trials = self.trials
        else:
            speakers = counts.get("xv_speakers")
            if not speakers:
                raise SpecError("xvector: without a trial list the evaluation pairs utterances by speaker, but the "
                                "batches carry no 'speakers'; use a speaker dataset (voxceleb) or set trials.")
            trials = all_pair_trials(ids, speakers)
        scores, labels = cosine_trial_scores(embeddings, trials)
        if len(set(labels)) < 2:
            return {"trials": float(len(labels))}
        return verification_summary(scores, labels, p_target=self.p_target)


__all__ = ["AMSoftmaxLoss", "TDNNLayer", "XVectorHead", "all_pair_trials", "read_trials"]
