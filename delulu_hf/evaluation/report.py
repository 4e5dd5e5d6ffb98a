"""Task results in, the evaluation's outputs out: per-layer summaries, results.json, results.md, plots.

Every task reports the same shape: the numbers of the primary (last) layer at the top level,
``per_layer`` with every layer, and ``best_layer`` indexing it (``summarise_layers``).
``write_results`` writes ``results.json`` (the input of ``delulu_hf.hub`` and the model card) and a
Markdown table of the headline numbers, both atomically; keys starting with ``_`` (in-memory data
such as DET-curve scores) are dropped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from delulu_hf.atomic import atomic_write, atomic_write_json, atomic_write_text

__all__ = ["best_layer", "plot_losses", "results_markdown", "summarise_layers", "write_results"]


# --------------------------------------------------------------------------------------------------
# Per-layer summary
# --------------------------------------------------------------------------------------------------


def best_layer(per_layer: list[dict[str, Any]], key: str, lower_is_better: bool, primary: str) -> int:
    """Index of the best layer; on a tie the primary (last) layer wins, then the earliest."""
    values = np.array([entry[key] for entry in per_layer], dtype=np.float64)
    target = values.min() if lower_is_better else values.max()
    tied = [i for i, v in enumerate(values) if v == target]
    return next((i for i in tied if per_layer[i]["layer"] == primary), tied[0])


def summarise_layers(
    per_layer: list[dict[str, Any]], primary: str, key: str, lower_is_better: bool
) -> dict[str, Any]:
    """Top-level numbers = the primary (last) layer; ``best_layer`` indexes ``per_layer``.

    The best layer is picked on the test data itself, so it is an optimistic number; it is
    reported next to the last layer, never instead of it.
    """
    last = next(entry for entry in per_layer if entry["layer"] == primary)
    best = best_layer(per_layer, key, lower_is_better, primary)
    return {
        **{k: v for k, v in last.items() if k != "index"},
        "best_layer": best,
        "best_layer_name": per_layer[best]["layer"],
        f"best_layer_{key}": per_layer[best][key],
        "per_layer": per_layer,
    }


# --------------------------------------------------------------------------------------------------
# results.json / results.md
# --------------------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def write_results(results: dict[str, Any], output_dir: str | Path) -> tuple[Path, Path]:
    """Write ``results.json`` and ``results.md`` atomically; keys starting with ``_`` are dropped."""
    output_dir = Path(output_dir)
    json_path, md_path = output_dir / "results.json", output_dir / "results.md"
    atomic_write_json(json_path, _jsonable(results), sort_keys=False)
    atomic_write_text(md_path, results_markdown(results))
    return json_path, md_path


def _fmt(value: Any, percent: bool = False) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{100 * value:.2f}%" if percent else f"{value:.4f}"
    return str(value)


def results_markdown(results: dict[str, Any]) -> str:
    """A Markdown table of the headline numbers (last layer and best layer), with counts and seeds."""
    lines = [
        f"# Speaker evaluation: `{results.get('model')}`",
        "",
        f"- data: `{results.get('data')}`"
        + (f", mixtures: `{results['mixtures']}`" if results.get("mixtures") else ""),
        f"- seed: {results.get('seed')}",
        f"- command: `{results.get('command', '')}`",
        "",
        "Best layer: picked on the test data by the task's main metric (EER, accuracy, DER); optimistic.",
        "",
        "| task | metric | last layer | best layer | counts |",
        "|---|---|---|---|---|",
    ]
    tasks = results.get("tasks", {})

    def row(task: str, metric: str, entry: dict, key: str, counts: str, percent: bool = True) -> None:
        best = "-"
        if "per_layer" in entry:
            b = entry["per_layer"][entry["best_layer"]]
            best = f"{_fmt(b.get(key), percent)} ({b['layer']})"
        last = f"{_fmt(entry.get(key), percent)} ({entry.get('layer', '-')})"
        lines.append(f"| {task} | {metric} | {last} | {best} | {counts} |")

    if "verification" in tasks:
        v = tasks["verification"]
        counts = f"{v['n_target']} target / {v['n_nontarget']} non-target trials"
        row("verification (zero-shot)", "EER", v, "eer", counts)
        row("verification (zero-shot)", "minDCF 0.01", v, "min_dcf_0.01", counts, percent=False)
        row("verification (zero-shot)", "minDCF 0.05", v, "min_dcf_0.05", counts, percent=False)
    if "verification_downstream" in tasks:
        d = tasks["verification_downstream"]
        counts = f"{d['n_target']}/{d['n_nontarget']} trials, {d['n_train_speakers']} train speakers, {d['epochs']} epochs"
        for metric, key, pct in (("EER", "eer", True), ("minDCF 0.01", "min_dcf_0.01", False)):
            lines.append(
                f"| verification (downstream {d['head']}) | {metric} | {_fmt(d[key], pct)} (weighted sum) | - | {counts} |"
            )
    if "identification" in tasks:
        i = tasks["identification"]
        row(
            "identification",
            "accuracy",
            i,
            "accuracy",
            f"{i['n_speakers']} speakers, {i['n_test']} test utts",
        )
    if "profiling" in tasks:
        for attribute, p in tasks["profiling"].items():
            if not isinstance(p, dict):
                continue
            if "skipped" in p:
                lines.append(f"| profiling: {attribute} | - | skipped: {p['skipped']} | - | - |")
                continue
            counts = f"{p['n_test']} test items, {p['n_test_speakers']} held-out speakers"
            row(f"profiling: {attribute}", "accuracy (linear)", p, "accuracy", counts)
            row(f"profiling: {attribute}", "macro-F1 (linear)", p, "macro_f1", counts)
            row(f"profiling: {attribute}", "accuracy (kNN)", p, "knn_accuracy", counts)
    if "counting" in tasks:
        c = tasks["counting"]
        counts = f"{c['n_test']} test mixtures, classes {c['classes_test']}"
        row("counting", "accuracy (linear)", c, "accuracy", counts)
        row("counting", "accuracy (kNN)", c, "knn_accuracy", counts)
    if "diarization" in tasks:
        d = tasks["diarization"]
        counts = f"{d['n_files']} mixtures, oracle SAD, overlap scored"
        for key, label in (
            ("der_known_collar_0", "DER, known #spk, collar 0"),
            ("der_known_collar_0.5", "DER, known #spk, collar 0.5"),
            ("der_estimated_collar_0", "DER, estimated #spk, collar 0"),
            ("der_estimated_collar_0.5", "DER, estimated #spk, collar 0.5"),
        ):
            row("diarization", label, d, key, counts)
    for name, entry in tasks.items():
        if isinstance(entry, dict) and "error" in entry:
            lines.append(f"| {name} | - | failed: {entry['error']} | - | - |")
    extraction = results.get("extraction")
    if extraction:
        lines += ["", "Feature extraction:", ""]
        for name, stats in extraction.items():
            speed = stats.get("audio_seconds_per_second")
            cached = " (read from cache)" if stats.get("cached") else ""
            lines.append(
                f"- {name}: {stats.get('num_items')} items, {stats.get('audio_seconds', 0):.1f} audio-s, "
                f"{_fmt(speed)} audio-s/s on {stats.get('device')}{cached}"
            )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# Plots (the DET plot is ``delulu_hf.evaluation.metrics.plot_det_curves``)
# --------------------------------------------------------------------------------------------------


def plot_losses(losses: Sequence[float], path: str | Path) -> Path:
    """Save the training-loss curve of the downstream x-vector head as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    try:
        ax.plot(np.arange(1, len(losses) + 1), losses)
        ax.set_xlabel("step")
        ax.set_ylabel("AM-softmax loss")
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        path = Path(path)
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
    return path
