"""Speaker metrics: EER, normalised minDCF, diarization error rate, DET curves.

These are the numbers every table of the project is built from, so each follows one published
definition (see ``shared/docs/evaluation-protocols.md``) and is tested against hand-computed
cases and a brute-force reference:

* EER: the point where the false-acceptance rate equals the false-rejection rate, linearly
  interpolated between the two ROC points that bracket it (scikit-learn's ``roc_curve``).
* minDCF: the NIST SRE detection cost, minimised over thresholds and *normalised* by the cost of
  the best trivial system, so 1.0 means "no better than always rejecting/accepting".
* DER: (false alarm + missed + confusion) / scored reference speech, with the optimal one-to-one
  speaker mapping (Hungarian algorithm) and pyannote's collar and overlap conventions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import roc_curve

Segment = tuple[float, float, str]

__all__ = [
    "compute_eer",
    "compute_min_dcf",
    "diarization_error_rate",
    "plot_det_curves",
    "read_rttm",
    "write_rttm",
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


def _check_segments(segments: Iterable, what: str) -> list[Segment]:
    out = []
    for k, seg in enumerate(segments):
        if isinstance(seg, Mapping):
            start, end, speaker = seg["start"], seg["end"], seg["speaker"]
        elif all(hasattr(seg, a) for a in ("start", "end", "speaker")):  # e.g. demo_corpus.Segment
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


def _active_speakers(segments: list[Segment], points: list[float]) -> list[frozenset[str]]:
    """Speakers active in each interval ``[points[k], points[k+1])``, by one sweep over the segments.

    ``points`` must be sorted and contain every segment boundary. A speaker listed twice over the
    same time counts once (sets), as in pyannote.
    """
    events = sorted([(s, 1, spk) for s, _, spk in segments] + [(e, -1, spk) for _, e, spk in segments])
    counts: dict[str, int] = {}
    out, k = [], 0
    for t in points[:-1]:
        while k < len(events) and events[k][0] <= t:
            _, step, spk = events[k]
            counts[spk] = counts.get(spk, 0) + step
            k += 1
        out.append(frozenset(spk for spk, c in counts.items() if c > 0))
    return out


def _scored_regions(
    reference: list[Segment], hypothesis: list[Segment], collar: float, skip_overlap: bool
) -> list[tuple[float, float]]:
    """Regions where errors count, as sorted disjoint intervals.

    Like pyannote.metrics without an explicit UEM: the extent of reference and hypothesis together,
    minus ``collar / 2`` on each side of every reference boundary, minus regions where two or more
    reference speakers talk when ``skip_overlap``.
    """
    everything = reference + hypothesis
    if not everything:
        return []
    extent = (min(s for s, _, _ in everything), max(e for _, e, _ in everything))
    removed: list[tuple[float, float]] = []
    if collar > 0:
        for start, end, _ in reference:
            for t in (start, end):
                removed.append((t - collar / 2, t + collar / 2))
    if skip_overlap:
        points = sorted({t for s, e, _ in reference for t in (s, e)})
        for (a, b), active in zip(zip(points[:-1], points[1:]), _active_speakers(reference, points)):
            if len(active) >= 2:
                removed.append((a, b))
    regions = [extent]
    for r0, r1 in removed:
        nxt = []
        for a, b in regions:
            if r1 <= a or r0 >= b:
                nxt.append((a, b))
                continue
            if a < r0:
                nxt.append((a, r0))
            if r1 < b:
                nxt.append((r1, b))
        regions = nxt
    return sorted(regions)


def diarization_error_rate(
    reference: Iterable[Segment],
    hypothesis: Iterable[Segment],
    collar: float = 0.0,
    skip_overlap: bool = False,
) -> dict[str, float]:
    """Diarization error rate with the optimal speaker mapping, computed exactly on segment times.

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
    regions = _scored_regions(ref, hyp, collar, skip_overlap)

    # Elementary intervals: between consecutive boundaries nothing changes, so every interval has a
    # fixed set of reference and hypothesis speakers.
    points = {t for s, e, _ in ref + hyp for t in (s, e)}
    points.update(t for a, b in regions for t in (a, b))
    points = sorted(points)
    ref_ids = {spk: k for k, spk in enumerate(sorted({spk for _, _, spk in ref}))}
    hyp_ids = {spk: k for k, spk in enumerate(sorted({spk for _, _, spk in hyp}))}

    intervals = []  # (duration, ref speaker ids, hyp speaker ids)
    region_idx = 0
    active = zip(_active_speakers(ref, points), _active_speakers(hyp, points))
    for (a, b), (r_names, h_names) in zip(zip(points[:-1], points[1:]), active):
        mid = (a + b) / 2
        while region_idx < len(regions) and regions[region_idx][1] <= mid:
            region_idx += 1
        if region_idx == len(regions) or not regions[region_idx][0] <= mid:
            continue  # outside the scored regions
        if r_names or h_names:
            intervals.append((b - a, {ref_ids[x] for x in r_names}, {hyp_ids[x] for x in h_names}))

    # Optimal mapping: maximise the total time a hypothesis speaker coincides with its reference
    # speaker, over the scored regions only (as pyannote does after cropping to the UEM).
    cooc = np.zeros((len(ref_ids), len(hyp_ids)))
    for dur, r, h in intervals:
        for i in r:
            for j in h:
                cooc[i, j] += dur
    mapping: dict[int, int] = {}
    if cooc.size:
        rows, cols = linear_sum_assignment(cooc, maximize=True)
        mapping = {int(j): int(i) for i, j in zip(rows, cols) if cooc[i, j] > 0}

    total = missed = false_alarm = confusion = 0.0
    for dur, r, h in intervals:
        n_ref, n_hyp = len(r), len(h)
        n_correct = sum(1 for j in h if mapping.get(j, -1) in r)
        total += dur * n_ref
        missed += dur * max(0, n_ref - n_hyp)
        false_alarm += dur * max(0, n_hyp - n_ref)
        confusion += dur * (min(n_ref, n_hyp) - n_correct)
    errors = false_alarm + missed + confusion
    if total > 0:
        der = errors / total
    else:
        der = 0.0 if errors == 0 else float("inf")
    return {"der": der, "false_alarm": false_alarm, "missed": missed, "confusion": confusion, "total": total}


def read_rttm(path: str | Path) -> dict[str, list[Segment]]:
    """Read an RTTM file into ``{file_id: [(start, end, speaker), ...]}`` (SPEAKER lines only)."""
    out: dict[str, list[Segment]] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            fields = line.split()
            if not fields or fields[0] != "SPEAKER":
                continue
            if len(fields) < 8:
                raise ValueError(f"{path}:{n}: SPEAKER line needs at least 8 fields, got {line.strip()!r}")
            start, dur = float(fields[3]), float(fields[4])
            out.setdefault(fields[1], []).append((start, start + dur, fields[7]))
    return out


def write_rttm(path: str | Path, file_id: str, segments: Iterable[Segment]) -> None:
    """Write segments as RTTM SPEAKER lines (the format md-eval, pyannote and dscore read)."""
    with open(path, "w", encoding="utf-8") as f:
        for start, end, speaker in sorted(segments):
            f.write(f"SPEAKER {file_id} 1 {start:.3f} {end - start:.3f} <NA> <NA> {speaker} <NA> <NA>\n")


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
    for name, (scores, labels) in curves.items():
        eer, _ = compute_eer(scores, labels)
        DetCurveDisplay.from_predictions(
            np.asarray(labels), np.asarray(scores), pos_label=1, name=f"{name} (EER {100 * eer:.2f}%)", ax=ax
        )
    ax.set_xlabel("False acceptance rate")
    ax.set_ylabel("False rejection (miss) rate")
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
