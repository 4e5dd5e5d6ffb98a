"""Mixtures and window features in, diarization results out: windows, clustering, speaker count, DER.

Each mixture with a reference is cut into sliding windows (``diarization_windows``), every window
is embedded by its time-mean features, and the windows of one recording are clustered
(agglomerative, cosine, average linkage) into the known number of speakers or the number
estimated from the eigengap of the affinity's Laplacian (``estimate_num_speakers``). Each instant
takes the label of the nearest window centre, restricted to the reference's speech (oracle SAD).
DER per mixture comes from ``delulu_hf.evaluation.metrics.diarization_error_rate`` at collar 0
and 0.5 with overlap scored; errors are summed over mixtures before dividing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from delulu_hf.evaluation.data import Mixtures
from delulu_hf.evaluation.features import SAMPLE_RATE, AudioItem, FeatureSet, l2_normalize
from delulu_hf.evaluation.metrics import diarization_error_rate
from delulu_hf.evaluation.report import summarise_layers
from delulu_hf.segments import Segment, write_rttm

__all__ = ["diarization", "diarization_windows", "estimate_num_speakers"]


def _merge(intervals: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _intersect(
    a: Sequence[tuple[float, float]], b: Sequence[tuple[float, float]]
) -> list[tuple[float, float]]:
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if lo < hi:
            out.append((lo, hi))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def diarization_windows(
    mixtures: Mixtures, window_seconds: float = 1.5, hop_seconds: float = 0.75
) -> list[AudioItem]:
    """Sliding windows over every mixture that has a reference; the last one is aligned to the end."""
    items = []
    win, hop = round(window_seconds * SAMPLE_RATE), round(hop_seconds * SAMPLE_RATE)
    with_reference = {m.key for m in mixtures.entries if m.reference is not None}
    for whole in mixtures.items():
        if whole.key not in with_reference:
            continue
        n = whole.num_samples
        starts = list(range(0, max(n - win, 0) + 1, hop))
        if starts[-1] + win < n:
            starts.append(n - win)
        for s in starts:
            items.append(
                AudioItem(key=f"{whole.key}@{s}", path=whole.path, num_samples=min(win, n), start_sample=s)
            )
    return items


def estimate_num_speakers(embeddings: np.ndarray, max_speakers: int = 8) -> int:
    """Eigengap of the normalised Laplacian of the (positive) cosine affinity of centred embeddings.

    Centring on the recording's mean removes what all windows share (channel, recording) so that
    cosine similarity reflects speaker differences; the number of near-zero eigenvalues of the
    Laplacian counts the well-separated groups.
    """
    n = len(embeddings)
    if n < 3:
        return 1
    x = l2_normalize(embeddings - embeddings.mean(0, keepdims=True))
    affinity = np.clip(x @ x.T, 0.0, None)
    np.fill_diagonal(affinity, 1.0)
    degree = affinity.sum(1)
    inv = 1.0 / np.sqrt(np.maximum(degree, 1e-12))
    laplacian = np.eye(n) - inv[:, None] * affinity * inv[None, :]
    eigenvalues = np.sort(np.linalg.eigvalsh(laplacian))
    k_max = min(max_speakers, n - 1)
    gaps = np.diff(eigenvalues[: k_max + 1])
    return int(np.argmax(gaps)) + 1


def _cluster(embeddings: np.ndarray, k: int) -> np.ndarray:
    from sklearn.cluster import AgglomerativeClustering

    if k <= 1 or len(embeddings) <= 1:
        return np.zeros(len(embeddings), dtype=np.int64)
    x = l2_normalize(embeddings - embeddings.mean(0, keepdims=True))
    k = min(k, len(embeddings))
    return AgglomerativeClustering(n_clusters=k, metric="cosine", linkage="average").fit_predict(x)


def _hypothesis(centres: np.ndarray, labels: np.ndarray, speech: list[tuple[float, float]]) -> list[Segment]:
    """Each instant takes the label of the nearest window centre; restricted to speech regions."""
    order = np.argsort(centres)
    centres, labels = centres[order], labels[order]
    bounds = np.concatenate([[-np.inf], (centres[1:] + centres[:-1]) / 2, [np.inf]])
    segments: list[Segment] = []
    for k, label in enumerate(labels):
        speaker = f"spk{label}"
        for a, b in _intersect([(bounds[k], bounds[k + 1])], speech):
            if segments and segments[-1].speaker == speaker and abs(segments[-1].end - a) < 1e-9:
                segments[-1] = segments[-1]._replace(end=float(b))
            else:
                segments.append(Segment(float(a), float(b), speaker))
    return segments


def diarization(
    features: FeatureSet,
    windows: Sequence[AudioItem],
    mixtures: Mixtures,
    output_dir: str | Path | None = None,
    min_speech_fraction: float = 0.5,
    max_speakers: int = 8,
    seed: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Cluster window embeddings per mixture; DER (collar 0 and 0.5, overlap scored) per layer.

    Speech activity is the reference's (oracle SAD), so the numbers measure the embeddings and the
    clustering, not a voice-activity detector; windows with less than ``min_speech_fraction``
    speech are not clustered. Overlapped speech is scored, and a single label per instant misses
    every overlapped speaker but one.
    """
    reference_of = {m.key: m.reference for m in mixtures.entries}
    by_file: dict[str, list[AudioItem]] = {}
    for w in windows:
        by_file.setdefault(w.key.rsplit("@", 1)[0], []).append(w)
    collars = (0.0, 0.5)
    per_layer = []
    hypotheses: dict[str, list[Segment]] = {}
    count_correct = 0
    primary_totals: dict[str, dict[str, float]] = {}
    bar = tqdm(
        total=len(features.streams) * len(by_file), desc="diarization", unit="mixture", disable=not progress
    )
    for k, stream in enumerate(features.streams):
        sums = {(mode, c): Counter() for mode in ("known", "estimated") for c in collars}
        correct = 0
        for name, file_windows in sorted(by_file.items()):
            reference = reference_of[name]
            speech = _merge([(s, e) for s, e, _ in reference])
            starts = np.array([w.start_sample / SAMPLE_RATE for w in file_windows])
            durations = np.array([w.seconds for w in file_windows])
            coverage = np.array(
                [
                    sum(b - a for a, b in _intersect([(s, s + d)], speech)) / d
                    for s, d in zip(starts, durations)
                ]
            )
            keep = coverage >= min_speech_fraction
            if not keep.any():
                keep[:] = True
            emb = features.pooled[stream][features.rows([w.key for w in file_windows])][keep]
            centres = (starts + durations / 2)[keep]
            n_true = len({spk for _, _, spk in reference})
            k_est = estimate_num_speakers(emb, max_speakers)
            correct += int(k_est == n_true)
            for mode, n_clusters in (("known", n_true), ("estimated", k_est)):
                hyp = _hypothesis(centres, _cluster(emb, n_clusters), speech)
                if stream == features.primary and mode == "known":
                    hypotheses[name] = hyp
                for c in collars:
                    der = diarization_error_rate(reference, hyp, collar=c, skip_overlap=False)
                    sums[(mode, c)].update(
                        {key: der[key] for key in ("false_alarm", "missed", "confusion", "total")}
                    )
            bar.update(1)
        entry: dict[str, Any] = {"layer": stream, "index": k}
        for (mode, c), s in sums.items():
            errors = s["false_alarm"] + s["missed"] + s["confusion"]
            entry[f"der_{mode}_collar_{c:g}"] = errors / s["total"] if s["total"] > 0 else 0.0
            if stream == features.primary:
                primary_totals[f"{mode}_collar_{c:g}"] = {
                    key: float(s[key]) for key in ("false_alarm", "missed", "confusion", "total")
                }
        entry["count_accuracy"] = correct / len(by_file) if by_file else 0.0
        if stream == features.primary:
            count_correct = correct
        per_layer.append(entry)
    bar.close()
    result = summarise_layers(per_layer, features.primary, "der_known_collar_0", lower_is_better=True)
    result.update(
        {
            "der": result["der_known_collar_0"],
            "seconds": primary_totals,
            "n_files": len(by_file),
            "n_files_without_reference": len(mixtures.entries) - len(by_file),
            "n_windows": len(windows),
            "speakers_per_file": dict(
                sorted(Counter(len({s for *_, s in reference_of[f]}) for f in by_file).items())
            ),
            "estimated_count_correct": count_correct,
            "window_seconds": windows[0].seconds if windows else None,
            "speech_activity": "oracle (reference)",
            "overlap": "scored",
            "clustering": "agglomerative, cosine, average linkage, recording-mean centred",
            "speaker_count_estimate": f"eigengap of the normalised Laplacian, max {max_speakers}",
            "data": mixtures.source,
            "seed": seed,
        }
    )
    if output_dir is not None:
        rttm_dir = Path(output_dir) / "diarization_rttm"
        rttm_dir.mkdir(parents=True, exist_ok=True)
        for name, hyp in hypotheses.items():
            file_id = Path(name).stem
            write_rttm(rttm_dir / f"{file_id}.rttm", file_id, hyp)
        result["hypotheses"] = rttm_dir.name
    return result
