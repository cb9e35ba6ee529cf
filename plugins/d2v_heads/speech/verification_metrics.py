"""Speaker verification and diarization metrics: EER, minDCF, cosine trial scoring, DER.

Pure functions on numbers (no model code), so they are tested against hand-computed values:

* **EER** (equal error rate): the error rate where the false-rejection rate of target trials
  equals the false-acceptance rate of non-target trials, read off the ROC by linear
  interpolation between the two thresholds that bracket the crossing; in percent.
* **minDCF**: NIST's detection cost ``C_miss * P_target * P_miss + C_fa * (1 - P_target) * P_fa``
  minimised over thresholds and normalised by the cost of the best trivial system
  (``min(C_miss * P_target, C_fa * (1 - P_target))``); ``P_target = 0.01`` by default (the
  VoxCeleb1-O convention of ECAPA-TDNN and most papers; VoxSRC uses 0.05).
* **DER** (diarization error rate, frame-level as in EEND/s3prl): per frame, missed speech
  ``max(0, n_ref - n_sys)``, false alarm ``max(0, n_sys - n_ref)`` and speaker confusion
  ``min(n_ref, n_sys) - n_correct``, summed and divided by the reference speech
  (``sum n_ref``). Speaker labels of a recording are arbitrary, so system speakers are mapped
  to reference speakers by the assignment with the most matching frames (brute force over
  permutations up to 7 speakers, greedy beyond). No forgiveness collar (frame scoring).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

MAX_EXACT_SPEAKERS = 7


def _error_curves(scores: Sequence[float], labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """False-rejection and false-acceptance rates at every threshold between distinct scores
    (a trial is accepted when its score is at least the threshold), from "accept all" to
    "reject all"."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if s.shape != y.shape or s.ndim != 1:
        raise ValueError("scores and labels must be 1-D and of the same length")
    targets, nontargets = int((y == 1).sum()), int((y == 0).sum())
    if targets == 0 or nontargets == 0:
        raise ValueError("EER/minDCF need at least one target (label 1) and one non-target (label 0) trial")
    order = np.argsort(s, kind="stable")
    s, y = s[order], y[order]
    # boundaries after each run of equal scores: everything up to the boundary is rejected
    ends = np.r_[np.flatnonzero(np.diff(s)) + 1, len(s)]
    rejected_targets = np.r_[0, np.cumsum(y == 1)[ends - 1]]
    rejected_nontargets = np.r_[0, np.cumsum(y == 0)[ends - 1]]
    frr = rejected_targets / targets
    far = (nontargets - rejected_nontargets) / nontargets
    return frr, far


def equal_error_rate(scores: Sequence[float], labels: Sequence[int]) -> float:
    """EER in percent for trial ``scores`` (higher = same speaker) and ``labels`` (1 target, 0 not)."""
    frr, far = _error_curves(scores, labels)
    diff = frr - far  # rises from -1 (accept all) to +1 (reject all)
    i = int(np.flatnonzero(diff >= 0)[0])
    if i == 0 or diff[i] == 0:
        return 100.0 * float((frr[i] + far[i]) / 2)
    # linear interpolation between points i-1 (diff < 0) and i (diff > 0)
    alpha = diff[i - 1] / (diff[i - 1] - diff[i])
    return 100.0 * float(frr[i - 1] + alpha * (frr[i] - frr[i - 1]))


def min_dcf(scores: Sequence[float], labels: Sequence[int], *, p_target: float = 0.01,
            c_miss: float = 1.0, c_fa: float = 1.0) -> float:
    """Normalised minimum detection cost (see the module doc)."""
    frr, far = _error_curves(scores, labels)
    cost = c_miss * p_target * frr + c_fa * (1.0 - p_target) * far
    return float(cost.min() / min(c_miss * p_target, c_fa * (1.0 - p_target)))


def cosine_trial_scores(embeddings: dict[str, Tensor], trials: Sequence[tuple[int, str, str]]) -> tuple[list[float], list[int]]:
    """Cosine similarity of each trial's two embeddings; returns ``(scores, labels)``."""
    scores, labels = [], []
    for label, enroll, test in trials:
        a, b = embeddings[enroll].double(), embeddings[test].double()
        scores.append(float(torch.nn.functional.cosine_similarity(a, b, dim=0)))
        labels.append(int(label))
    return scores, labels


def verification_summary(scores: Sequence[float], labels: Sequence[int], *, p_target: float = 0.01) -> dict[str, float]:
    """``eer`` (percent), ``min_dcf`` and the number of ``trials``."""
    return {"eer": equal_error_rate(scores, labels), "min_dcf": min_dcf(scores, labels, p_target=p_target),
            "trials": float(len(scores))}


# --------------------------------------------------------------------------- diarization


def best_speaker_mapping(overlap: np.ndarray) -> list[tuple[int, int]]:
    """(reference, system) speaker pairs maximising the total ``overlap[ref, sys]`` (frames
    where both speak); exact up to ``MAX_EXACT_SPEAKERS`` speakers, greedy beyond."""
    n_ref, n_sys = overlap.shape
    if min(n_ref, n_sys) == 0:
        return []
    if max(n_ref, n_sys) <= MAX_EXACT_SPEAKERS:
        best, best_pairs = -1.0, []
        if n_ref <= n_sys:
            for perm in itertools.permutations(range(n_sys), n_ref):
                total = float(sum(overlap[r, s] for r, s in enumerate(perm)))
                if total > best:
                    best, best_pairs = total, list(enumerate(perm))
        else:
            for perm in itertools.permutations(range(n_ref), n_sys):
                total = float(sum(overlap[r, s] for s, r in enumerate(perm)))
                if total > best:
                    best, best_pairs = total, [(r, s) for s, r in enumerate(perm)]
        return best_pairs
    pairs, used_ref, used_sys = [], set(), set()
    for flat in np.argsort(-overlap, axis=None, kind="stable"):
        r, s = divmod(int(flat), n_sys)
        if r not in used_ref and s not in used_sys:
            pairs.append((r, s))
            used_ref.add(r)
            used_sys.add(s)
    return pairs


def diarization_counts(pred: Tensor, target: Tensor, *, permute: bool = True) -> dict[str, float]:
    """Additive DER counts for one recording: boolean ``(T, S)`` system and reference speaker
    activity. ``permute``: map system speakers to reference speakers optimally (diarization);
    False scores label ``k`` against label ``k`` (fixed classes, e.g. voice activity)."""
    p = pred.detach().bool().cpu().numpy()
    r = target.detach().bool().cpu().numpy()
    n_ref, n_sys = r.sum(1), p.sum(1)
    if permute:
        overlap = r.T.astype(np.int64) @ p.astype(np.int64)  # (S_ref, S_sys)
        pairs = best_speaker_mapping(overlap)
        correct = np.zeros(r.shape[0], dtype=np.int64)
        for ref, sys in pairs:
            correct += r[:, ref] & p[:, sys]
    else:
        correct = (r & p).sum(1)
    return {
        "der_miss": float(np.maximum(n_ref - n_sys, 0).sum()),
        "der_false_alarm": float(np.maximum(n_sys - n_ref, 0).sum()),
        "der_confusion": float((np.minimum(n_ref, n_sys) - correct).sum()),
        "der_speech": float(n_ref.sum()),
    }


def diarization_summary(counts: dict[str, float]) -> dict[str, float]:
    """``der`` and its parts ``der_miss``/``der_false_alarm``/``der_confusion``, in percent of
    the reference speech."""
    speech = counts.get("der_speech", 0.0)
    if not speech:
        return {}
    parts = {key: 100.0 * counts.get(key, 0.0) / speech for key in ("der_miss", "der_false_alarm", "der_confusion")}
    return {"der": sum(parts.values()), **parts}


__all__ = [
    "best_speaker_mapping",
    "cosine_trial_scores",
    "diarization_counts",
    "diarization_summary",
    "equal_error_rate",
    "min_dcf",
    "verification_summary",
]
