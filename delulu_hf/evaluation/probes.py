"""Features and labels in, probe results out: speaker identification, profiling, speaker counting.

* ``identification``: closed-set linear probe, utterances split within each speaker.
* ``profiling``: gender and language probes (linear and kNN) trained on training speakers and
  tested on held-out speakers, so a probe cannot lean on speaker identity.
* ``counting``: number of speakers in a mixture, linear and kNN probes, split by mixture.

Every probe reads time-mean features (one vector per item and layer) and reports every layer.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from delulu_hf.evaluation.data import Corpus, Mixtures, SpeakerSplit
from delulu_hf.evaluation.features import FeatureSet
from delulu_hf.evaluation.report import summarise_layers

__all__ = ["counting", "identification", "profiling"]


def _probe_scores(
    x_train: np.ndarray, y_train: Sequence, x_test: np.ndarray, y_test: Sequence, seed: int, knn: bool
) -> dict[str, Any]:
    """Linear probe (standardised logistic regression) and optionally cosine kNN; accuracy, macro-F1."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    labels = sorted(set(y_train) | set(y_test))
    out: dict[str, Any] = {}
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    predictions = {"linear": probe.fit(x_train, y_train).predict(x_test)}
    if knn:
        k = min(5, len(y_train))
        neighbours = KNeighborsClassifier(n_neighbors=k, metric="cosine")
        predictions["knn"] = neighbours.fit(x_train, y_train).predict(x_test)
        out["knn_k"] = k
    for name, pred in predictions.items():
        out[name] = {
            "accuracy": float(accuracy_score(y_test, pred)),
            "macro_f1": float(f1_score(y_test, pred, labels=labels, average="macro", zero_division=0)),
        }
    return out


def identification(
    features: FeatureSet,
    corpus: Corpus,
    seed: int = 0,
    test_fraction: float = 0.25,
    progress: bool = True,
) -> dict[str, Any]:
    """Closed-set speaker identification: a linear probe per layer, utterances split within speakers.

    Each speaker with >= 2 utterances gives ``max(1, round(test_fraction * n))`` test utterances
    (at least one stays for training); speakers with one utterance are skipped and counted.
    """
    rng = random.Random(seed)
    by_speaker: dict[str, list[str]] = {}
    for r in corpus.rows:
        by_speaker.setdefault(r["speaker_id"], []).append(r["file_name"])
    train, test = [], []
    skipped = 0
    for speaker in sorted(by_speaker):
        files = sorted(by_speaker[speaker])
        if len(files) < 2:
            skipped += 1
            continue
        rng.shuffle(files)
        n_test = min(len(files) - 1, max(1, round(test_fraction * len(files))))
        test += [(f, speaker) for f in files[:n_test]]
        train += [(f, speaker) for f in files[n_test:]]
    n_speakers = len({s for _, s in train})
    if n_speakers < 2:
        raise ValueError(f"identification needs >= 2 speakers with >= 2 utterances, got {n_speakers}")
    rows_train, rows_test = features.rows([f for f, _ in train]), features.rows([f for f, _ in test])
    y_train, y_test = [s for _, s in train], [s for _, s in test]
    per_layer = []
    layers = tqdm(features.streams, desc="identification", unit="layer", disable=not progress)
    for k, stream in enumerate(layers):
        x = features.pooled[stream]
        scores = _probe_scores(x[rows_train], y_train, x[rows_test], y_test, seed, knn=False)
        per_layer.append({"layer": stream, "index": k, **scores["linear"]})
    result = summarise_layers(per_layer, features.primary, "accuracy", lower_is_better=False)
    result.update(
        n_speakers=n_speakers,
        n_train=len(train),
        n_test=len(test),
        n_speakers_skipped=skipped,
        chance=1.0 / n_speakers,
        probe="StandardScaler + LogisticRegression on time-mean features",
        split=f"utterances within speakers, test fraction {test_fraction}",
        seed=seed,
    )
    return result


def _probe_task(
    features: FeatureSet,
    train: Sequence[tuple[str, str]],
    test: Sequence[tuple[str, str]],
    seed: int,
    description: str = "probe",
    progress: bool = True,
) -> dict[str, Any]:
    """Linear + kNN probes per layer on (file, label) pairs; summary on the primary layer."""
    rows_train, rows_test = features.rows([f for f, _ in train]), features.rows([f for f, _ in test])
    y_train, y_test = [y for _, y in train], [y for _, y in test]
    per_layer = []
    layers = tqdm(features.streams, desc=description, unit="layer", disable=not progress)
    for k, stream in enumerate(layers):
        x = features.pooled[stream]
        scores = _probe_scores(x[rows_train], y_train, x[rows_test], y_test, seed, knn=True)
        per_layer.append(
            {
                "layer": stream,
                "index": k,
                "accuracy": scores["linear"]["accuracy"],
                "macro_f1": scores["linear"]["macro_f1"],
                "knn_accuracy": scores["knn"]["accuracy"],
                "knn_macro_f1": scores["knn"]["macro_f1"],
            }
        )
    result = summarise_layers(per_layer, features.primary, "accuracy", lower_is_better=False)
    result.update(
        n_train=len(train),
        n_test=len(test),
        classes_train=dict(sorted(Counter(y_train).items())),
        classes_test=dict(sorted(Counter(y_test).items())),
        knn_k=min(5, len(train)),
        majority_baseline=max(Counter(y_test).values()) / len(y_test),
        seed=seed,
    )
    return result


def profiling(
    features: FeatureSet,
    corpus: Corpus,
    split: SpeakerSplit,
    attributes: Sequence[str] = ("gender", "language"),
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Gender / language probes trained on training speakers, tested on held-out speakers.

    Attributes missing from the metadata are reported as skipped; rows with an empty value are
    left out and counted.
    """
    result: dict[str, Any] = {"split": split.source, "seed": seed}
    train_speakers, test_speakers = set(split.train), set(split.test)
    for attribute in attributes:
        if not corpus.has_column(attribute):
            result[attribute] = {"skipped": f"no {attribute!r} column in metadata.csv"}
            continue
        rows = [r for r in corpus.rows if r.get(attribute)]
        train = [(r["file_name"], r[attribute]) for r in rows if r["speaker_id"] in train_speakers]
        test = [(r["file_name"], r[attribute]) for r in rows if r["speaker_id"] in test_speakers]
        if len({y for _, y in train}) < 2 or not test:
            result[attribute] = {
                "skipped": f"needs >= 2 {attribute} classes among training speakers and held-out items",
                "classes_train": dict(Counter(y for _, y in train)),
                "n_test": len(test),
            }
            continue
        entry = _probe_task(features, train, test, seed, f"profiling: {attribute}", progress)
        entry.update(
            n_train_speakers=len({r["speaker_id"] for r in rows if r["speaker_id"] in train_speakers}),
            n_test_speakers=len({r["speaker_id"] for r in rows if r["speaker_id"] in test_speakers}),
            n_missing_value=len(corpus.rows) - len(rows),
        )
        result[attribute] = entry
    return result


def _stratified_split(labels: Sequence, test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Per-class split of indices; a class with one item goes to training."""
    rng = random.Random(seed)
    by_class: dict[Any, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    train, test = [], []
    for y in sorted(by_class):
        idx = by_class[y][:]
        rng.shuffle(idx)
        n_test = min(len(idx) - 1, max(1, round(test_fraction * len(idx)))) if len(idx) > 1 else 0
        test += idx[:n_test]
        train += idx[n_test:]
    return sorted(train), sorted(test)


def counting(
    features: FeatureSet,
    mixtures: Mixtures,
    seed: int = 0,
    test_fraction: float = 0.5,
    progress: bool = True,
) -> dict[str, Any]:
    """Number of speakers per mixture from time-mean features: linear and kNN probes, split by mixture."""
    files = [m.key for m in mixtures.entries]
    counts = [m.num_speakers for m in mixtures.entries]
    train_idx, test_idx = _stratified_split(counts, test_fraction, seed)
    if not test_idx or len(set(counts[i] for i in train_idx)) < 2:
        raise ValueError(f"counting needs >= 2 speaker counts with >= 2 mixtures each, got {Counter(counts)}")
    train = [(files[i], counts[i]) for i in train_idx]
    test = [(files[i], counts[i]) for i in test_idx]
    result = _probe_task(features, train, test, seed, "counting", progress)
    result.update(split=f"mixtures stratified by count, test fraction {test_fraction}", data=mixtures.source)
    return result
