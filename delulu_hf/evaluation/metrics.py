"""Scores and labels (or speaker segments) in, speaker metrics out: EER, minDCF, DER, DET curves.

These are the numbers every table of the project is built from, so each follows one published
definition (see ``shared/docs/evaluation-protocols.md``) and is tested against hand-computed
cases and a brute-force reference:

* EER: the point where the false-acceptance rate equals the false-rejection rate, linearly
  interpolated between the two ROC points that bracket it (scikit-learn's ``roc_curve``).
* minDCF: the NIST SRE detection cost, minimised over thresholds and *normalised* by the cost of
  the best trivial system, so 1.0 means "no better than always rejecting/accepting".
* DER: (false alarm + missed + confusion) / scored reference speech, with the optimal one-to-one
  speaker mapping (Hungarian algorithm), computed by ``pyannote.metrics`` (collar and overlap as
  pyannote defines them). RTTM files are read and written by ``delulu_hf.segments``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_curve

from delulu_hf.atomic import atomic_write

__all__ = [
    "compute_eer",
    "compute_min_dcf",
    "diarization_error_rate",
    "plot_det_curves",
]


def _check_scores(scores: Iterable[float], labels: Iterable[int]) -> tuple[np.ndarray, np.ndarray]:
    """Validate trial scores/labels and return them as float64 / int arrays."""
    scores = np.asarray(scores if hasattr(scores, "__len__") else list(scores), dtype=np.float64)
    labels = np.asarray(labels if hasattr(labels, "__len__") else list(labels))
    if scores.ndim != 1 or labels.ndim != 1 or len(scores) != len(labels):
        raise ValueError(
            f"scores and labels must be 1-D and of equal length, got {scores.shape} and {labels.shape}"
        )
    if not np.all(np.isfinite(scores)):
        bad = int(np.flatnonzero(~np.isfinite(scores))[0])
        raise ValueError(f"score of trial {bad} is not finite ({scores[bad]})")
    unique = set(np.unique(labels).tolist())
    if not unique <= {0, 1}:  # bools compare equal to 0 and 1
        raise ValueError(f"labels must be 0 (non-target) or 1 (target), got values {sorted(unique)}")
    labels = labels.astype(np.int64)
    if labels.sum() == 0 or labels.sum() == len(labels):
        raise ValueError("need at least one target (1) and one non-target (0) trial")
    return scores, labels


def _finite_thresholds(thresholds: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Replace roc_curve's leading ``inf`` ("accept nothing") by the next float above the top score.

    The operating point is the same, but the threshold stays a finite, JSON-serialisable number.
    """
    thresholds = thresholds.copy()
    thresholds[~np.isfinite(thresholds)] = np.nextafter(scores.max(), np.inf)
    return thresholds


def compute_eer(scores: Sequence[float], labels: Sequence[int]) -> tuple[float, float]:
    """Equal error rate of a set of verification trials.

    Args:
        scores: one score per trial, higher = more likely the same speaker.
        labels: 1 for target (same speaker) trials, 0 for non-target trials.

    Returns:
        ``(eer, threshold)``: the EER as a fraction in [0, 1] and the score threshold at which it is
        reached (accept when ``score >= threshold``), both linearly interpolated between the two
        ROC points where ``FNR - FPR`` changes sign.
    """
    scores, labels = _check_scores(scores, labels)
    # drop_intermediate=False keeps every threshold, so the interpolated threshold is exact too.
    fpr, tpr, thresholds = roc_curve(labels, scores, pos_label=1, drop_intermediate=False)
    thresholds = _finite_thresholds(thresholds, scores)
    fnr = 1.0 - tpr
    diff = fnr - fpr  # starts at 1 (accept nothing) and ends at -1 (accept everything)
    i = int(np.flatnonzero(diff <= 0)[0])  # first point at or past the crossing; i >= 1
    if diff[i] == 0:
        return float(fpr[i]), float(thresholds[i])
    # The ROC is piecewise linear between operating points: solve FPR = FNR on segment [i-1, i].
    t = diff[i - 1] / (diff[i - 1] - diff[i])
    eer = fpr[i - 1] + t * (fpr[i] - fpr[i - 1])
    threshold = thresholds[i - 1] + t * (thresholds[i] - thresholds[i - 1])
    return float(eer), float(threshold)


def compute_min_dcf(
    scores: Sequence[float],
    labels: Sequence[int],
    p_target: float = 0.01,
    c_miss: float = 1.0,
    c_fa: float = 1.0,
) -> tuple[float, float]:
    """Normalised minimum detection cost (NIST SRE).

    ``C_det(t) = c_miss * P_miss(t) * p_target + c_fa * P_fa(t) * (1 - p_target)``, minimised over
    thresholds and divided by ``C_def = min(c_miss * p_target, c_fa * (1 - p_target))``, the cost of
    always rejecting or always accepting. Some toolkits report the un-normalised value, which is
    100x smaller at ``p_target = 0.01``; this one is normalised.

    Returns:
        ``(min_dcf, threshold)``; accept when ``score >= threshold``.
    """
    if not 0.0 < p_target < 1.0:
        raise ValueError(f"p_target must be in (0, 1), got {p_target}")
    if c_miss <= 0 or c_fa <= 0:
        raise ValueError(f"c_miss and c_fa must be positive, got {c_miss}, {c_fa}")
    scores, labels = _check_scores(scores, labels)
    fpr, tpr, thresholds = roc_curve(labels, scores, pos_label=1, drop_intermediate=False)
    thresholds = _finite_thresholds(thresholds, scores)
    c_det = c_miss * (1.0 - tpr) * p_target + c_fa * fpr * (1.0 - p_target)
    c_def = min(c_miss * p_target, c_fa * (1.0 - p_target))
    best = int(np.argmin(c_det))
    return float(c_det[best] / c_def), float(thresholds[best])


# --------------------------------------------------------------------------------------------------
# Diarization
# --------------------------------------------------------------------------------------------------

Triple = tuple[float, float, str]


def _check_segments(segments: Iterable, what: str) -> list[Triple]:
    """``(start, end, speaker)`` triples from tuples, dicts or objects; empty segments dropped."""
    out = []
    for k, seg in enumerate(segments):
        if isinstance(seg, Mapping):
            start, end, speaker = seg["start"], seg["end"], seg["speaker"]
        elif all(hasattr(seg, a) for a in ("start", "end", "speaker")):  # e.g. delulu_hf.segments.Segment
            start, end, speaker = seg.start, seg.end, seg.speaker
        else:
            try:
                start, end, speaker = seg
            except (TypeError, ValueError):
                raise ValueError(f"{what} segment {k} must be (start, end, speaker), got {seg!r}") from None
        start, end = float(start), float(end)
        if not (np.isfinite(start) and np.isfinite(end)) or end < start:
            raise ValueError(f"{what} segment {k} {seg!r} has end < start or a non-finite time")
        if end > start:  # empty segments carry no speech
            out.append((start, end, str(speaker)))
    return out


def _annotation(segments: list[Triple]):
    """A ``pyannote.core.Annotation`` in which each speaker talks at most once at any instant.

    pyannote counts a label twice where two of its tracks overlap; here a speaker listed twice over
    the same time is one speaker (as a frame-level reference sees it). So each speaker's segments are
    merged, and the merged speech is cut at every original boundary of that speaker: the collars
    pyannote puts around reference boundaries stay exactly where the input has boundaries.
    """
    from pyannote.core import Annotation
    from pyannote.core import Segment as Span

    by_speaker: dict[str, list[tuple[float, float]]] = {}
    for start, end, speaker in segments:
        by_speaker.setdefault(speaker, []).append((start, end))
    annotation = Annotation()
    track = 0
    for speaker, spans in by_speaker.items():
        cuts = sorted({t for span in spans for t in span})
        merged: list[list[float]] = []
        for start, end in sorted(spans):
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        for start, end in merged:
            inside = [t for t in cuts if start <= t <= end]
            for a, b in zip(inside[:-1], inside[1:]):
                annotation[Span(a, b), track] = speaker
                track += 1
    return annotation


def diarization_error_rate(
    reference: Iterable[Triple],
    hypothesis: Iterable[Triple],
    collar: float = 0.0,
    skip_overlap: bool = False,
) -> dict[str, float]:
    """Diarization error rate with the optimal speaker mapping, by ``pyannote.metrics``.

    ``pyannote.metrics.diarization.DiarizationErrorRate`` does the work (Hungarian mapping on the
    scored regions, collars, overlap); this function adapts the inputs and the edge cases:

    * scored region: an explicit UEM spanning reference and hypothesis together (what pyannote
      approximates, with a warning, when given none; passing it keeps that behaviour and silences
      the warning), minus the collars and, with ``skip_overlap``, the overlapped reference speech;
    * a speaker listed twice over the same time counts once (see ``_annotation``);
    * ``der`` is ``inf`` when there is no reference speech but some false alarm (pyannote says 1.0).

    Args:
        reference: ``(start, end, speaker)`` tuples (or dicts / objects with those keys), seconds.
        hypothesis: same format; hypothesis labels need not match reference labels.
        collar: total width (seconds) of the no-score zone centred on every reference boundary,
            as pyannote defines it (``collar=0.5`` removes 0.25 s either side; md-eval's
            ``-c 0.25``).
        skip_overlap: when True, regions where the reference has two or more speakers are not
            scored. The default scores overlap (each missing overlapped speaker is missed speech).

    Returns:
        ``{"der", "false_alarm", "missed", "confusion", "total"}``; the last four in seconds, where
        ``total`` is the scored reference speech (overlap counted once per speaker). ``der`` is
        0 when there is nothing to score and no false alarm, ``inf`` when only false alarms.
    """
    if collar < 0:
        raise ValueError(f"collar must be >= 0, got {collar}")
    ref = _check_segments(reference, "reference")
    hyp = _check_segments(hypothesis, "hypothesis")

    from pyannote.core import Segment as Span
    from pyannote.core import Timeline
    from pyannote.metrics.diarization import DiarizationErrorRate

    everything = ref + hyp
    extent = [Span(min(s for s, _, _ in everything), max(e for _, e, _ in everything))] if everything else []
    metric = DiarizationErrorRate(collar=collar, skip_overlap=skip_overlap)
    parts = metric(_annotation(ref), _annotation(hyp), uem=Timeline(extent), detailed=True)
    false_alarm, missed = float(parts["false alarm"]), float(parts["missed detection"])
    confusion, total = float(parts["confusion"]), float(parts["total"])
    errors = false_alarm + missed + confusion
    if total > 0:
        der = errors / total
    else:
        der = 0.0 if errors == 0 else float("inf")
    return {"der": der, "false_alarm": false_alarm, "missed": missed, "confusion": confusion, "total": total}


# --------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------


def plot_det_curves(
    curves: Mapping[str, tuple[Sequence[float], Sequence[int]]], path: str | Path, title: str | None = None
) -> Path:
    """Save a DET plot (miss vs false-alarm rate on normal-deviate axes) with one curve per system.

    Args:
        curves: ``{legend label: (scores, labels)}``; the EER is appended to each label.
        path: PNG file to write.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import DetCurveDisplay

    fig, ax = plt.subplots(figsize=(5.5, 5.0))
    try:
        for name, (scores, labels) in curves.items():
            eer, _ = compute_eer(scores, labels)
            DetCurveDisplay.from_predictions(
                np.asarray(labels),
                np.asarray(scores),
                pos_label=1,
                name=f"{name} (EER {100 * eer:.2f}%)",
                ax=ax,
            )
        ax.set_xlabel("False acceptance rate")
        ax.set_ylabel("False rejection (miss) rate")
        ax.grid(True, alpha=0.3)
        if title:
            ax.set_title(title)
        fig.tight_layout()
        path = Path(path)
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)
    return path
