"""Diagnostics: labelled items (and speakers) in, label-quality numbers, plots and a report out.

Before any pretraining: are the clusters degenerate (occupancy, entropy/perplexity, dead and
dominant clusters), do they carry speaker identity (purity, NMI against the speaker column), and
are teacher and encoder frames aligned (a plot of which teacher frames feed each encoder frame)?
``compare_label_features`` answers the speaker question for several featurizers on the same data
through the same fit/map path as the real labels.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Union

import numpy as np

from delulu_hf.atomic import atomic_write_text
from delulu_hf.errors import UserError
from delulu_hf.labels.alignment import EncoderFrames, alignment_index
from delulu_hf.labels.centroids import Centroids
from delulu_hf.labels.extract import LABEL_COLUMN, LabelSkip
from delulu_hf.labels.features import featurizer_provenance
from delulu_hf.labels.kmeans import fit_centroids
from delulu_hf.labels.map import add_cluster_ids, skipped_items
from delulu_hf.teacher.base import SpeakerTeacher

__all__ = [
    "cluster_diagnostics",
    "compare_label_features",
    "plot_alignment",
    "plot_occupancy",
    "write_report",
]

PathLike = Union[str, os.PathLike]


def _entropy_bits(counts: np.ndarray) -> float:
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log2(p)).sum())


def cluster_diagnostics(
    cluster_ids: Iterable[Sequence[int] | None],
    k: int,
    speakers: Iterable[Any] | None = None,
    dominant_factor: float = 5.0,
) -> dict[str, Any]:
    """Label-quality numbers: the paper's "degenerate clusters" check and speaker structure.

    Streams over items and keeps only a ``(speakers, k)`` count table, so memory does not grow
    with the corpus.

    Args:
        cluster_ids: per item, its ids (``None`` = skipped item).
        k: number of clusters.
        speakers: per item, its speaker label (enables purity, NMI and per-speaker spread).
        dominant_factor: a cluster is dominant if it holds more than this many times ``1/k``.

    Returns:
        A JSON-ready dict: ``counts``, ``entropy_bits``, ``perplexity`` (``2**entropy``, at most
        ``k``), ``normalized_entropy``, ``dead_clusters``, ``dominant_clusters``, ``top_shares`` and,
        with speakers, ``speaker`` = {``purity``, ``nmi`` (arithmetic normalisation, as
        ``sklearn.metrics.normalized_mutual_info_score``), ``speaker_normalized_mi`` (I/H(speaker),
        the analogue of HuBERT's phone-normalised MI), per-speaker cluster spread}.
    """
    from sklearn.metrics import mutual_info_score

    per_speaker: dict[str, np.ndarray] = {}
    counts = np.zeros(k, dtype=np.int64)
    items = skipped = 0
    speaker_iter = iter(speakers) if speakers is not None else None
    for ids in cluster_ids:
        speaker = next(speaker_iter) if speaker_iter is not None else None
        if ids is None:
            skipped += 1
            continue
        item_counts = np.bincount(np.asarray(ids, dtype=np.int64), minlength=k)[:k]
        counts += item_counts
        items += 1
        if speaker_iter is not None:
            key = str(speaker)
            if key not in per_speaker:
                per_speaker[key] = np.zeros(k, dtype=np.int64)
            per_speaker[key] += item_counts
    total = int(counts.sum())
    entropy = _entropy_bits(counts)
    shares = counts / max(total, 1)
    order = np.argsort(-counts, kind="stable")
    report: dict[str, Any] = {
        "k": k,
        "items": items,
        "skipped_items": skipped,
        "frames": total,
        "counts": counts.tolist(),
        "entropy_bits": entropy,
        "perplexity": float(2.0**entropy),
        "normalized_entropy": entropy / math.log2(k) if k > 1 else 0.0,
        "used_clusters": int((counts > 0).sum()),
        "dead_clusters": np.flatnonzero(counts == 0).tolist(),
        "dominant_clusters": [
            {"cluster": int(c), "share": float(shares[c])} for c in order if shares[c] > dominant_factor / k
        ],
        "top_shares": [{"cluster": int(c), "share": float(shares[c])} for c in order[:10]],
    }
    if per_speaker and total > 0:
        names = sorted(per_speaker)
        table = np.stack([per_speaker[name] for name in names])  # (speakers, clusters)
        speaker_entropy = _entropy_bits(table.sum(axis=1))
        mi_bits = mutual_info_score(None, None, contingency=table) / math.log(2)
        mean_entropy = (speaker_entropy + entropy) / 2
        spread = [
            {
                "speaker": name,
                "frames": int(row.sum()),
                "clusters_used": int((row > 0).sum()),
                "perplexity": float(2.0 ** _entropy_bits(row)),
                "top_cluster_share": float(row.max() / max(row.sum(), 1)),
            }
            for name, row in zip(names, table)
        ]
        perplexities = np.array([s["perplexity"] for s in spread])
        report["speaker"] = {
            "speakers": len(names),
            "purity": float(table.max(axis=0).sum() / total),
            "nmi": float(mi_bits / mean_entropy) if mean_entropy > 0 else 1.0,
            "speaker_normalized_mi": float(mi_bits / speaker_entropy) if speaker_entropy > 0 else 0.0,
            "mutual_information_bits": float(mi_bits),
            "speaker_entropy_bits": speaker_entropy,
            "per_speaker_clusters_used_mean": float(np.mean([s["clusters_used"] for s in spread])),
            "per_speaker_perplexity_mean": float(perplexities.mean()),
            "per_speaker_perplexity_median": float(np.median(perplexities)),
            "per_speaker": spread,
        }
    return report


def _iter_column(dataset, column: str, batch_size: int = 1000) -> Iterator[Any]:
    """Values of one column, read batch by batch so memory stays flat."""
    for table in dataset.select_columns([column]).with_format("arrow").iter(batch_size=batch_size):
        yield from table[column].to_pylist()


def plot_occupancy(diagnostics: dict[str, Any], path: PathLike, title: str = "") -> None:
    """Bar chart of the cluster shares, sorted, with the uniform share for reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.asarray(diagnostics["counts"], dtype=np.float64)
    shares = np.sort(counts / max(counts.sum(), 1))[::-1]
    fig, ax = plt.subplots(figsize=(9, 3.5))
    ax.bar(np.arange(len(shares)), shares, width=1.0, color="tab:blue")
    ax.axhline(1.0 / len(shares), color="tab:red", linestyle="--", linewidth=1, label="uniform 1/k")
    ax.set_xlabel("cluster (sorted by occupancy)")
    ax.set_ylabel("share of frames")
    ax.set_title(
        title
        or f"k={diagnostics['k']}: perplexity {diagnostics['perplexity']:.1f}, dead {len(diagnostics['dead_clusters'])}, "
        f"dominant {len(diagnostics['dominant_clusters'])}"
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_alignment(
    num_samples: int,
    frames: EncoderFrames,
    teacher_hop: int,
    mode: str,
    path: PathLike,
    sample_rate: int = 16000,
    first_frames: int = 12,
    title: str = "",
) -> dict[str, Any]:
    """Plot which teacher frames feed each encoder frame for one item; return the numbers.

    Top: the first ``first_frames`` encoder spans with their centres, the teacher frame centres,
    and a line from each encoder centre to the teacher frames it uses. Bottom: over the whole
    item, encoder centre time vs the (weighted) time of the teacher frames used; a correct
    alignment lies on the diagonal. The returned dict has the maximum offset in ms.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    index, weight = alignment_index(num_samples, frames, teacher_hop, mode)
    to_ms = 1000.0 / sample_rate
    enc_centre = frames.centres(len(index)) * to_ms
    used_time = (index * teacher_hop * weight).sum(axis=1) / weight.sum(axis=1) * to_ms
    offsets = used_time - enc_centre
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6.5))
    shown = min(first_frames, len(index))
    teacher_shown = int(index[:shown].max()) + 2
    top.vlines(np.arange(teacher_shown) * teacher_hop * to_ms, 0, 1, color="tab:orange", linewidth=1)
    for i in range(shown):
        start = i * frames.hop * to_ms
        y = 1.3 + 0.25 * (i % 4)
        top.plot([start, start + frames.receptive_field * to_ms], [y, y], color="tab:blue", linewidth=3)
        top.plot(enc_centre[i], y, "o", color="navy")
        for j, w in zip(index[i], weight[i]):
            if w > 0:
                top.plot([enc_centre[i], j * teacher_hop * to_ms], [y, 1.0], color="gray", linewidth=0.8)
    top.set_yticks([0.5, 1.6])
    top.set_yticklabels(["teacher frame centres", "encoder frame spans"])
    top.set_xlabel("time (ms)")
    top.set_title(
        title
        or f"alignment {mode!r}: teacher hop {teacher_hop * to_ms:.0f} ms, encoder hop "
        f"{frames.hop * to_ms:.0f} ms, receptive field {frames.receptive_field * to_ms:.1f} ms"
    )
    bottom.plot(enc_centre, used_time, ".", markersize=3, label="teacher time used")
    bottom.plot(enc_centre, enc_centre, "-", color="gray", linewidth=0.8, label="diagonal")
    bottom.set_xlabel("encoder frame centre (ms)")
    bottom.set_ylabel("teacher time used (ms)")
    bottom.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return {
        "num_samples": int(num_samples),
        "encoder_frames": int(len(index)),
        "teacher_frames": int(1 + num_samples // teacher_hop),
        "mode": mode,
        "max_abs_offset_ms": float(np.abs(offsets).max()),
        "mean_offset_ms": float(offsets.mean()),
    }


def write_report(
    report_dir: PathLike,
    dataset,
    centroids: Centroids,
    config: Any,
    *,
    teacher_hop: int,
    speaker_column: str | None = "speaker_id",
    name_column: str | None = None,
    skipped: Sequence[LabelSkip] = (),
    skipped_before: Sequence[dict[str, Any]] = (),
    sample_rate: int = 16000,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``occupancy.json``/``.png``, ``alignment.json``/``.png`` and ``report.json`` for a
    labelled map-style dataset; returns the report dict.

    ``report["skipped"]`` is the one list of items without labels: ``skipped_before`` (items that
    never reached the dataset, e.g. dropped when decoding: ``{"name", "reason"}``) and then the
    dataset's items with a null ``cluster_ids`` (their reasons from ``skipped``);
    ``skipped_count`` is its length."""
    report_dir = os.fspath(report_dir)
    os.makedirs(report_dir, exist_ok=True)
    frames = EncoderFrames.from_config(config)
    speakers = None
    if speaker_column and speaker_column in dataset.column_names:
        speakers = _iter_column(dataset, speaker_column)
    diagnostics = cluster_diagnostics(_iter_column(dataset, LABEL_COLUMN), centroids.k, speakers)
    atomic_write_text(os.path.join(report_dir, "occupancy.json"), json.dumps(diagnostics, indent=2) + "\n")
    plot_occupancy(diagnostics, os.path.join(report_dir, "occupancy.png"))
    alignment_info = None
    first = next(((i, ids) for i, ids in enumerate(_iter_column(dataset, LABEL_COLUMN)) if ids), None)
    if first is not None:
        # The column keeps frames, not samples: use the shortest length with this item's frame count.
        num_samples = (len(first[1]) - 1) * frames.hop + frames.receptive_field
        alignment_info = plot_alignment(
            num_samples,
            frames,
            teacher_hop,
            centroids.alignment or "nearest",
            os.path.join(report_dir, "alignment.png"),
            sample_rate=sample_rate,
        )
        alignment_info["item"] = first[0]
        atomic_write_text(
            os.path.join(report_dir, "alignment.json"), json.dumps(alignment_info, indent=2) + "\n"
        )
    known = {s.index: s for s in skipped}
    skipped_list = [dict({"stage": "decode"}, **item) for item in skipped_before] + [
        dict(item, reason=known[item["index"]].reason if item["index"] in known else None, stage="label")
        for item in skipped_items(dataset, name_column)
    ]
    summary = {key: value for key, value in diagnostics.items() if key not in ("counts",)}
    if "speaker" in summary:
        summary["speaker"] = {key: value for key, value in summary["speaker"].items() if key != "per_speaker"}
    report = {
        "centroids": {key: value for key, value in centroids.provenance.items() if key != "skipped"},
        "diagnostics": summary,
        "alignment": alignment_info,
        "skipped": skipped_list,
        "skipped_count": len(skipped_list),
        **(extra or {}),
    }
    atomic_write_text(
        os.path.join(report_dir, "report.json"), json.dumps(report, indent=2, default=str) + "\n"
    )
    return report


def compare_label_features(
    dataset,
    featurizers: dict[str, SpeakerTeacher],
    config: Any,
    *,
    k: int = 256,
    speaker_column: str = "speaker_id",
    cache_dir: PathLike | None = None,
    progress: bool = True,
    **fit_kwargs: Any,
) -> dict[str, dict[str, Any]]:
    """Fit, assign and diagnose one label set per featurizer on the same items and speakers.

    The question it answers before any pretraining: which features give cluster ids that carry
    speaker identity (purity/NMI against ``speaker_column``)? Every featurizer goes through the same
    ``fit_centroids`` / ``add_cluster_ids`` / ``cluster_diagnostics`` path as the real labels, so the
    numbers are those ``prepare_labels --report`` would give. ``fit_kwargs`` go to ``fit_centroids``.
    Returns ``{name: diagnostics}`` (without per-cluster counts and per-speaker rows).
    """
    from tqdm.auto import tqdm

    if speaker_column not in dataset.column_names:
        raise UserError(f"the dataset has no {speaker_column!r} column to score clusters against")
    out: dict[str, dict[str, Any]] = {}
    for name, teacher in tqdm(featurizers.items(), desc="label features", disable=not progress):
        centroids = fit_centroids(dataset, teacher, config, k=k, **fit_kwargs)
        keep = {
            key: fit_kwargs[key]
            for key in ("alignment", "normalization", "device", "bf16")
            if key in fit_kwargs
        }
        labelled = add_cluster_ids(dataset, teacher, centroids, config, cache_dir=cache_dir, **keep)
        diag = cluster_diagnostics(
            _iter_column(labelled, LABEL_COLUMN), centroids.k, _iter_column(labelled, speaker_column)
        )
        diag.pop("counts", None)
        diag.get("speaker", {}).pop("per_speaker", None)
        diag["teacher"] = featurizer_provenance(teacher)["name"]
        diag["feature_dim"] = int(teacher.feature_dim)
        out[name] = diag
    return out
