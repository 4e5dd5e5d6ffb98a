#!/usr/bin/env python
"""Which teacher features give speaker-informative cluster ids? Purity/NMI per label feature.

    python training/compare_label_features.py --output results/label_features
    python training/compare_label_features.py --teacher b6-vox2-ft_lm.pt --k 256 --windows 0.5,1,2

For each featurizer (ReDimNet backbone frames, the embedding head over sliding windows of each
``--windows`` length, and MFCC), fits k-means on the training split, assigns every frame and scores
the ids against the speakers, through the same code as ``prepare_labels.py --report``. Writes
``results.json``, ``results.md`` and ``label_features.png`` to ``--output``. The logic is
``delulu_hf.labels.compare_label_features``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shlex
import sys
from dataclasses import field
from typing import Optional

from delulu_hf.atomic import atomic_write_json, atomic_write_text
from delulu_hf.cli import ArgumentParser, main_entry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(kw_only=True)
class CompareLabelFeaturesArguments:
    """Every option of ``compare_label_features.py``; each field is a ``--field_name`` flag."""

    data: str = os.path.join(REPO, "data", "demo_corpus")
    split: str = "train"
    teacher: str = os.path.join(REPO, "data", "demo_teacher")
    windows: str = field(
        default="0.25,0.5,1,2", metadata={"help": "window lengths in seconds, comma-separated ('' for none)"}
    )
    mfcc: bool = field(default=True, metadata={"help": "include the MFCC control (--no_mfcc: leave it out)"})
    k: int = 100
    max_frames: int = 60_000
    fit_hours: Optional[float] = None
    n_init: int = 3
    seed: int = 0
    speaker_column: str = "speaker_id"
    output: str = field(metadata={"help": "folder for results.json, results.md and the plot"})

    def __post_init__(self) -> None:
        try:
            self.window_list()
        except ValueError:
            raise ValueError(f"--windows {self.windows!r}: expected seconds separated by commas") from None

    def window_list(self) -> list[float]:
        return [float(w) for w in self.windows.split(",") if w.strip()]


def parse_args(argv: list[str] | None = None) -> CompareLabelFeaturesArguments:
    parser = ArgumentParser(
        CompareLabelFeaturesArguments, prog="compare_label_features.py", description=__doc__
    )
    return parser.parse_one(argv)


def markdown(results: dict, command: str) -> str:
    lines = [
        "# Cluster ids vs speakers, per label feature",
        "",
        f"command: `{command}`",
        "",
        "| features | dim | k | perplexity | speaker purity | speaker NMI | clusters/speaker |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, d in results.items():
        spk = d.get("speaker", {})
        lines.append(
            f"| {name} | {d['feature_dim']} | {d['k']} | {d['perplexity']:.1f} | {spk.get('purity', 0):.3f} | "
            f"{spk.get('nmi', 0):.3f} | {spk.get('per_speaker_clusters_used_mean', 0):.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(results)
    purity = [results[n].get("speaker", {}).get("purity", 0.0) for n in names]
    nmi = [results[n].get("speaker", {}).get("nmi", 0.0) for n in names]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 3, 3.6))
    ax.bar(x - 0.2, nmi, 0.4, label="speaker NMI")
    ax.bar(x + 0.2, purity, 0.4, label="speaker purity")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_title("cluster ids vs training speakers")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from delulu_hf import labels
    from delulu_hf.audio import load_audio_dataset
    from delulu_hf.configuration_delulu import DeluluConfig

    windows = args.window_list()
    featurizers = {"redimnet backbone": labels.load_featurizer(args.teacher)}
    for seconds in windows:
        featurizers[f"redimnet window {seconds:g} s"] = labels.load_featurizer(
            args.teacher, output="window-embedding", window_seconds=seconds
        )
    if args.mfcc:
        featurizers["mfcc"] = labels.load_featurizer("mfcc")
    # only the 16 ms frame geometry matters here: the model's defaults
    config = DeluluConfig(num_clusters=args.k, label_teacher_name=None, label_feature_dim=None)
    dataset = load_audio_dataset(
        args.data, split=args.split, min_samples=labels.EncoderFrames.from_config(config).receptive_field
    )
    results = labels.compare_label_features(
        dataset,
        featurizers,
        config,
        k=args.k,
        speaker_column=args.speaker_column,
        max_frames=args.max_frames,
        fit_hours=args.fit_hours,
        n_init=args.n_init,
        seed=args.seed,
    )
    command = shlex.join(
        ["python", "training/compare_label_features.py", *(sys.argv[1:] if argv is None else argv)]
    )
    os.makedirs(args.output, exist_ok=True)
    payload = {"command": command, "data": args.data, "split": args.split, "k": args.k, "features": results}
    atomic_write_json(os.path.join(args.output, "results.json"), payload, sort_keys=False)
    text = markdown(results, command)
    atomic_write_text(os.path.join(args.output, "results.md"), text)
    plot(results, os.path.join(args.output, "label_features.png"))
    print(text)
    return 0


if __name__ == "__main__":
    main_entry(main)
