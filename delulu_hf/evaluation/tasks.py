"""Speaker evaluation tasks on frozen features, and the results writers.

Protocols (``shared/docs/evaluation-protocols.md``):

* ``verification`` (zero-shot): cosine of time-mean features, every layer; EER, minDCF(0.01),
  minDCF(0.05) on held-out speakers' trials; DET curve.
* ``verification_downstream``: the SUPERB x-vector recipe (softmax-weighted layer sum, TDNN, mean+std
  pooling, AM-softmax s=30 m=0.4) trained on the training speakers' frozen features, scored on the
  same held-out trials. The head is the encoder's own x-vector class (``DeluluForXVector``,
  ``WavLMForXVector``, ...) when it has one, else transformers' ``Wav2Vec2ForXVector`` head.
* ``identification``: closed-set linear probe, utterances split within each speaker.
* ``profiling``: gender and language probes (linear and kNN) trained on training speakers and
  tested on held-out speakers, so a probe cannot lean on speaker identity.
* ``counting``: number of speakers in generated mixtures, linear and kNN probes.
* ``diarization``: sliding-window embeddings of mixtures, agglomerative clustering with the known
  or an estimated number of speakers, DER at collar 0 and 0.5 with overlap scored.

Every function takes features already extracted (``delulu_hf.evaluation.features``) and returns
a JSON-ready dict whose numbers come with their counts and seed.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from delulu_hf.evaluation.features import SAMPLE_RATE, AudioItem, Encoder, FeatureSet, TransformersEncoder
from delulu_hf.evaluation.metrics import (
    Segment,
    compute_eer,
    compute_min_dcf,
    diarization_error_rate,
    plot_det_curves,
    read_rttm,
    write_rttm,
)

logger = logging.getLogger(__name__)

TASKS = (
    "verification",
    "verification_downstream",
    "identification",
    "profiling",
    "counting",
    "diarization",
)

__all__ = [
    "TASKS",
    "Corpus",
    "Mixture",
    "Mixtures",
    "SpeakerSplit",
    "Trials",
    "counting",
    "diarization",
    "diarization_windows",
    "downstream_verification",
    "estimate_num_speakers",
    "generate_mixtures",
    "generate_trials",
    "identification",
    "profiling",
    "read_trials",
    "results_markdown",
    "run_evaluation",
    "speaker_split",
    "write_results",
    "zero_shot_verification",
]


# --------------------------------------------------------------------------------------------------
# Data: corpus, speaker split, trials, mixtures
# --------------------------------------------------------------------------------------------------


def _read_csv(path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; found {reader.fieldnames}")
        rows = []
        for n, row in enumerate(reader, start=2):
            empty = [c for c in required if not (row.get(c) or "").strip()]
            if empty:
                raise ValueError(f"{path}:{n}: empty {empty} in row {row}")
            rows.append({k: (v or "").strip() for k, v in row.items() if k is not None})
    if not rows:
        raise ValueError(f"{path} has no rows")
    return rows


@dataclass
class Corpus:
    """An audiofolder: ``metadata.csv`` with ``file_name, speaker_id`` (optional ``gender``,
    ``language``, ``split``), file names relative to ``root``."""

    root: Path
    rows: list[dict[str, str]]

    @classmethod
    def load(cls, root: str | Path, metadata: str = "metadata.csv") -> Corpus:
        root = Path(root)
        rows = _read_csv(root / metadata, ["file_name", "speaker_id"])
        seen: set[str] = set()
        for row in rows:
            name = row["file_name"]
            if name in seen:
                raise ValueError(f"{root / metadata}: file {name!r} is listed twice")
            seen.add(name)
            if not (root / name).is_file():
                raise FileNotFoundError(f"{root / metadata}: file {name!r} does not exist under {root}")
        return cls(root=root, rows=rows)

    @property
    def files(self) -> list[str]:
        return [r["file_name"] for r in self.rows]

    @property
    def speaker_of(self) -> dict[str, str]:
        return {r["file_name"]: r["speaker_id"] for r in self.rows}

    def has_column(self, name: str) -> bool:
        return any(r.get(name) for r in self.rows)

    def items(self) -> list[AudioItem]:
        return [AudioItem.from_file(name, self.root / name) for name in self.files]


@dataclass
class SpeakerSplit:
    """Training and held-out speakers. ``source`` says where the split came from."""

    train: list[str]
    test: list[str]
    source: str


def speaker_split(corpus: Corpus, seed: int = 0, test_fraction: float = 0.5) -> SpeakerSplit:
    """Held-out speakers from the ``split`` column, or a seeded split of speakers when there is none.

    A speaker with any utterance marked ``test`` is a test speaker and none of its utterances is
    used for training: test speakers must never reach a training step.
    """
    speakers = sorted({r["speaker_id"] for r in corpus.rows})
    if corpus.has_column("split"):
        test = sorted({r["speaker_id"] for r in corpus.rows if r.get("split") == "test"})
        train = sorted(set(speakers) - set(test))
        mixed = sorted({r["speaker_id"] for r in corpus.rows if r.get("split") != "test"} & set(test))
        if mixed:
            logger.warning("%d test speaker(s) also have non-test utterances; kept as test only", len(mixed))
        return SpeakerSplit(train=train, test=test, source="metadata split column")
    rng = random.Random(seed)
    shuffled = speakers[:]
    rng.shuffle(shuffled)
    n_test = max(1, round(len(speakers) * test_fraction))
    return SpeakerSplit(
        train=sorted(shuffled[n_test:]),
        test=sorted(shuffled[:n_test]),
        source=f"seeded speaker split ({seed})",
    )


@dataclass
class Trials:
    """Verification trials: pairs of file names and a 0/1 target label."""

    enroll: list[str]
    test: list[str]
    target: np.ndarray
    source: str

    def __len__(self) -> int:
        return len(self.target)

    @property
    def n_target(self) -> int:
        return int(self.target.sum())

    @property
    def n_nontarget(self) -> int:
        return len(self) - self.n_target

    def files(self) -> list[str]:
        return sorted(set(self.enroll) | set(self.test))

    def subset(self, keep: np.ndarray) -> Trials:
        idx = np.flatnonzero(keep)
        return Trials(
            [self.enroll[i] for i in idx], [self.test[i] for i in idx], self.target[idx], self.source
        )


def read_trials(path: str | Path, corpus: Corpus) -> Trials:
    """Read ``enroll_file,test_file,target`` (paths relative to the corpus root, target 1/0)."""
    path = Path(path)
    rows = _read_csv(path, ["enroll_file", "test_file", "target"])
    known = set(corpus.files)
    enroll, test, target = [], [], []
    for n, row in enumerate(rows, start=2):
        for col in ("enroll_file", "test_file"):
            if row[col] not in known:
                raise ValueError(f"{path}:{n}: {col} {row[col]!r} is not in {corpus.root / 'metadata.csv'}")
        if row["target"] not in ("0", "1"):
            raise ValueError(f"{path}:{n}: target must be 0 or 1, got {row['target']!r}")
        enroll.append(row["enroll_file"])
        test.append(row["test_file"])
        target.append(int(row["target"]))
    trials = Trials(enroll, test, np.array(target, dtype=np.int64), source=str(path))
    if trials.n_target == 0 or trials.n_nontarget == 0:
        raise ValueError(f"{path}: needs both target and non-target trials")
    return trials


def generate_trials(
    corpus: Corpus, speakers: Sequence[str], seed: int = 0, nontarget_ratio: float = 1.0
) -> Trials:
    """All target pairs among ``speakers``' utterances plus seeded non-target pairs.

    ``round(nontarget_ratio * n_target)`` distinct non-target pairs are drawn uniformly (fewer when
    fewer exist).
    """
    wanted = set(speakers)
    by_speaker: dict[str, list[str]] = {}
    for r in corpus.rows:
        if r["speaker_id"] in wanted:
            by_speaker.setdefault(r["speaker_id"], []).append(r["file_name"])
    files = sorted(f for fs in by_speaker.values() for f in fs)
    speaker_of = corpus.speaker_of
    pairs = [
        (a, b) for fs in by_speaker.values() for i, a in enumerate(sorted(fs)) for b in sorted(fs)[i + 1 :]
    ]
    n_possible = sum(1 for i, a in enumerate(files) for b in files[i + 1 :] if speaker_of[a] != speaker_of[b])
    n_non = min(n_possible, round(nontarget_ratio * len(pairs)))
    if not pairs or n_non == 0:
        raise ValueError(
            f"cannot build trials: {len(by_speaker)} speaker(s) with {len(files)} utterance(s) among the "
            "held-out speakers; need >= 2 speakers and a speaker with >= 2 utterances"
        )
    rng = random.Random(seed)
    nontarget: set[tuple[str, str]] = set()
    while len(nontarget) < n_non:
        a, b = rng.sample(files, 2)
        if speaker_of[a] != speaker_of[b]:
            nontarget.add((min(a, b), max(a, b)))
    trials = [(a, b, 1) for a, b in pairs] + [(a, b, 0) for a, b in sorted(nontarget)]
    return Trials(
        [t[0] for t in trials],
        [t[1] for t in trials],
        np.array([t[2] for t in trials], dtype=np.int64),
        source=f"generated (seed {seed}, non-target ratio {nontarget_ratio})",
    )


@dataclass
class Mixture:
    """One multi-speaker recording: its key in feature sets, path, speaker count and reference."""

    key: str
    path: Path
    num_speakers: int
    reference: list[Segment] | None = None


@dataclass
class Mixtures:
    """Multi-speaker recordings, from a folder (``metadata.csv`` with ``file_name, num_speakers``
    and, for diarization, ``rttm_file``; paths relative to the folder) or generated."""

    entries: list[Mixture]
    source: str

    @classmethod
    def load(cls, root: str | Path, metadata: str = "metadata.csv", prefix: str = "") -> Mixtures:
        root = Path(root)
        entries = []
        for row in _read_csv(root / metadata, ["file_name", "num_speakers"]):
            name = row["file_name"]
            if not (root / name).is_file():
                raise FileNotFoundError(f"{root / metadata}: mixture {name!r} does not exist under {root}")
            if not row["num_speakers"].isdigit() or int(row["num_speakers"]) < 1:
                raise ValueError(f"{root / metadata}: num_speakers of {name!r} is {row['num_speakers']!r}")
            reference = None
            if row.get("rttm_file"):
                by_file = read_rttm(root / row["rttm_file"])
                reference = [seg for segs in by_file.values() for seg in segs]
            entries.append(Mixture(prefix + name, root / name, int(row["num_speakers"]), reference))
        return cls(entries=entries, source=str(root))

    def __add__(self, other: Mixtures) -> Mixtures:
        keys = {m.key for m in self.entries}
        clash = [m.key for m in other.entries if m.key in keys]
        if clash:
            raise ValueError(f"mixture key {clash[0]!r} appears in both {self.source} and {other.source}")
        return Mixtures(self.entries + other.entries, f"{self.source} + {other.source}")

    @property
    def counts(self) -> Counter:
        return Counter(m.num_speakers for m in self.entries)

    def items(self) -> list[AudioItem]:
        return [AudioItem.from_file(m.key, m.path) for m in self.entries]


def generate_mixtures(
    corpus: Corpus,
    speakers: Sequence[str],
    counts: dict[int, int],
    output_dir: str | Path,
    seed: int = 0,
    utterances_per_speaker: int = 3,
    seconds_range: tuple[float, float] = (6.0, 9.0),
) -> Mixtures:
    """Conversations of ``k`` held-out speakers, ``counts[k]`` of them, with RTTM references.

    The recipe of ``data/demo_mixtures`` (``delulu_hf.demo_corpus.build_conversation``: alternating
    turns, random gaps and overlaps, per-speaker gains; references from each turn's energy VAD), so
    generated classes (e.g. single-speaker "conversations" for counting) match shipped ones.
    The folder is reused when it was generated with the same settings.
    """
    import soundfile as sf

    from delulu_hf.audio import load_audio
    from delulu_hf.demo_corpus import build_conversation, write_csv_atomic
    from delulu_hf.segments import write_rttm as write_segments

    output_dir = Path(output_dir)
    settings = {
        "corpus": str(corpus.root),
        "speakers": sorted(speakers),
        "counts": {str(k): v for k, v in sorted(counts.items())},
        "seed": seed,
        "utterances_per_speaker": utterances_per_speaker,
        "seconds_range": list(seconds_range),
    }
    stamp = output_dir / "generation.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == settings:
        return Mixtures.load(output_dir, prefix="generated/")
    by_speaker: dict[str, list[str]] = {}
    for r in corpus.rows:
        if r["speaker_id"] in set(speakers):
            by_speaker.setdefault(r["speaker_id"], []).append(r["file_name"])
    pool = sorted(by_speaker)
    too_many = [k for k in counts if k > len(pool)]
    if too_many:
        raise ValueError(f"cannot mix {max(too_many)} speakers from {len(pool)} held-out speakers")
    rng = np.random.default_rng(seed)
    output_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for k, n in sorted(counts.items()):
        for i in range(n):
            chosen = sorted(rng.choice(pool, size=k, replace=False).tolist())
            utts = {}
            for spk in chosen:
                files = by_speaker[spk]
                picked = rng.choice(files, size=min(utterances_per_speaker, len(files)), replace=False)
                utts[spk] = [load_audio(corpus.root / f, name=f) for f in picked]
            audio, segments = build_conversation(utts, rng, target_seconds=float(rng.uniform(*seconds_range)))
            name = f"gen_{k}spk_{i:03d}"
            tmp = output_dir / f".{name}.tmp.flac"
            sf.write(tmp, audio, SAMPLE_RATE, subtype="PCM_16", format="FLAC")
            os.replace(tmp, output_dir / f"{name}.flac")
            write_segments(output_dir / f"{name}.rttm", name, segments)
            rows.append(
                {
                    "file_name": f"{name}.flac",
                    "num_speakers": len({s.speaker for s in segments}),
                    "rttm_file": f"{name}.rttm",
                    "speakers": " ".join(chosen),
                }
            )
    write_csv_atomic(
        output_dir / "metadata.csv", rows, ["file_name", "num_speakers", "rttm_file", "speakers"]
    )
    tmp = output_dir / ".generation.json.tmp"
    tmp.write_text(json.dumps(settings))
    os.replace(tmp, stamp)
    return Mixtures.load(output_dir, prefix="generated/")


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------


def _l2norm(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _verification_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    eer, threshold = compute_eer(scores, labels)
    return {
        "eer": eer,
        "eer_threshold": threshold,
        "min_dcf_0.01": compute_min_dcf(scores, labels, p_target=0.01)[0],
        "min_dcf_0.05": compute_min_dcf(scores, labels, p_target=0.05)[0],
    }


def _best(per_layer: list[dict[str, Any]], key: str, lower_is_better: bool, primary: str) -> int:
    """Index of the best layer; on a tie the primary (last) layer wins, then the earliest."""
    values = np.array([entry[key] for entry in per_layer], dtype=np.float64)
    target = values.min() if lower_is_better else values.max()
    tied = [i for i, v in enumerate(values) if v == target]
    return next((i for i in tied if per_layer[i]["layer"] == primary), tied[0])


def _summary(
    per_layer: list[dict[str, Any]], primary: str, key: str, lower_is_better: bool
) -> dict[str, Any]:
    """Top-level numbers = the primary (last) layer; ``best_layer`` indexes ``per_layer``.

    The best layer is picked on the test data itself, so it is an optimistic number; it is
    reported next to the last layer, never instead of it.
    """
    last = next(entry for entry in per_layer if entry["layer"] == primary)
    best = _best(per_layer, key, lower_is_better, primary)
    return {
        **{k: v for k, v in last.items() if k != "index"},
        "best_layer": best,
        "best_layer_name": per_layer[best]["layer"],
        f"best_layer_{key}": per_layer[best][key],
        "per_layer": per_layer,
    }


# --------------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------------


def zero_shot_verification(
    features: FeatureSet,
    trials: Trials,
    output_dir: str | Path | None = None,
    seed: int | None = None,
    speaker_of: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Cosine scoring of time-mean features for every stream; EER and minDCF per layer.

    Returns the summary dict plus ``_curves`` (scores/labels of the last and best layers, used for
    the DET plot; removed before writing JSON).
    """
    enroll, test = features.rows(trials.enroll), features.rows(trials.test)
    labels = trials.target
    per_layer, scores_of = [], {}
    for k, stream in enumerate(features.streams):
        emb = _l2norm(features.pooled[stream].astype(np.float64))
        scores = np.einsum("nd,nd->n", emb[enroll], emb[test])
        scores_of[stream] = scores
        per_layer.append({"layer": stream, "index": k, **_verification_metrics(scores, labels)})
    result = _summary(per_layer, features.primary, "eer", lower_is_better=True)
    files = trials.files()
    result.update(
        n_target=trials.n_target,
        n_nontarget=trials.n_nontarget,
        n_utterances=len(files),
        n_speakers=len({speaker_of[f] for f in files}) if speaker_of else None,
        trials=trials.source,
        seed=seed,
        scoring="cosine of time-mean features",
    )
    curves = {f"zero-shot {features.primary} (last)": (scores_of[features.primary], labels)}
    best_name = result["best_layer_name"]
    if best_name != features.primary:
        curves[f"zero-shot {best_name} (best)"] = (scores_of[best_name], labels)
    result["_curves"] = curves
    if output_dir is not None:
        path = plot_det_curves(
            curves, Path(output_dir) / "det_verification.png", title="Zero-shot verification"
        )
        result["det_curve"] = path.name
    return result


class _CachedHiddenStates(nn.Module):
    """Stands in for a frozen base model inside an x-vector head: returns cached hidden states.

    The x-vector classes run ``outputs = self.<base>(input_values, ...)`` and then read
    ``outputs.hidden_states`` / ``outputs.last_hidden_state``. Passing the cached, stacked states
    ``(batch, num_layers, frames, dim)`` as ``input_values`` lets the head's own forward run
    unchanged while the encoder, which is frozen anyway, is not re-run every epoch.
    """

    def forward(self, input_values: torch.Tensor, attention_mask=None, **kwargs):
        from transformers.modeling_outputs import BaseModelOutput

        layers = tuple(input_values.unbind(dim=1))
        return BaseModelOutput(last_hidden_state=layers[-1], hidden_states=layers, attentions=None)


def _build_xvector_head(
    encoder: Encoder, num_layers: int, dim: int, num_labels: int, overrides: dict[str, Any] | None = None
) -> tuple[nn.Module, str]:
    """The encoder's own x-vector head when it has one, else transformers' Wav2Vec2ForXVector head.

    ``overrides`` replace head settings of the config (``tdnn_dim``, ``tdnn_kernel``,
    ``tdnn_dilation``, ``xvector_output_dim``); the defaults are the SUPERB / Wav2Vec2 ones.
    """
    overrides = dict(overrides or {})
    from transformers import MODEL_FOR_AUDIO_XVECTOR_MAPPING, AutoModelForAudioXVector, Wav2Vec2Config
    from transformers.models.wav2vec2.modeling_wav2vec2 import Wav2Vec2ForXVector

    config = getattr(encoder, "config", None)
    if isinstance(encoder, TransformersEncoder) and type(config) in MODEL_FOR_AUDIO_XVECTOR_MAPPING:
        config = config.__class__.from_dict(config.to_dict())
        config.use_weighted_layer_sum = True
        config.num_labels = num_labels
        for key, value in overrides.items():
            setattr(config, key, value)
        model = AutoModelForAudioXVector.from_config(config)
    else:
        # The SUPERB recipe with Wav2Vec2's defaults; the tiny base it builds is replaced below.
        config = Wav2Vec2Config(
            hidden_size=dim,
            num_hidden_layers=num_layers - 1,
            num_attention_heads=1,
            intermediate_size=4,
            conv_dim=(4,),
            conv_stride=(1,),
            conv_kernel=(1,),
            num_conv_pos_embeddings=2,
            num_conv_pos_embedding_groups=1,
            use_weighted_layer_sum=True,
            num_labels=num_labels,
            **overrides,
        )
        model = Wav2Vec2ForXVector(config)
    prefix = model.base_model_prefix
    if not isinstance(getattr(model, prefix, None), nn.Module):
        raise TypeError(f"{type(model).__name__} has no base model attribute {prefix!r} to replace")
    setattr(model, prefix, _CachedHiddenStates())
    return model, type(model).__name__


def _tdnn_context(model: nn.Module) -> int:
    """Frames the TDNN stack consumes (sum of (kernel - 1) * dilation) plus two for a std."""
    config = model.config
    return sum((k - 1) * d for k, d in zip(config.tdnn_kernel, config.tdnn_dilation)) + 2


def _stack_frames(
    features: FeatureSet, row: int, streams: Sequence[str], start: int = 0, length: int | None = None
) -> np.ndarray:
    """``(layers, frames, dim)`` cached frames of one item, optionally the crop ``[start, start + length)``."""
    end = None if length is None else start + length
    return np.stack([features.item_frames(row, s)[start:end] for s in streams])


def downstream_verification(
    encoder: Encoder,
    features: FeatureSet,
    train_files: Sequence[str],
    speaker_of: dict[str, str],
    trials: Trials,
    output_dir: str | Path | None = None,
    seed: int = 0,
    epochs: int = 10,
    batch_size: int = 32,
    crop_seconds: float = 3.0,
    lr: float = 1e-3,
    device: str | torch.device = "cpu",
    progress: bool = True,
    head_overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train an x-vector head (AM-softmax) on training speakers' frozen frame features; score trials.

    ``features`` must hold frames for ``train_files`` and every trial file. Trials that involve a
    training speaker are dropped (and counted): test speakers must be unseen by the head.
    """
    if features.frames is None:
        raise ValueError("downstream verification needs features extracted with with_frames=True")
    streams = list(features.frame_streams)
    dims = {features.frames[s].shape[-1] for s in streams}
    if len(dims) != 1:  # a weighted layer sum needs equal widths; use the last frame stream
        streams = streams[-1:]
    dim = features.frames[streams[-1]].shape[-1]

    train_speakers = sorted({speaker_of[f] for f in train_files})
    keep = np.array(
        [
            speaker_of[a] not in train_speakers and speaker_of[b] not in train_speakers
            for a, b in zip(trials.enroll, trials.test)
        ]
    )
    n_dropped = int((~keep).sum())
    trials = trials.subset(keep)
    if trials.n_target == 0 or trials.n_nontarget == 0:
        raise ValueError("no held-out trials left after removing trials with training speakers")
    if len(train_speakers) < 2:
        raise ValueError(f"downstream verification needs >= 2 training speakers, got {len(train_speakers)}")

    torch.manual_seed(seed)
    model, head_name = _build_xvector_head(encoder, len(streams), dim, len(train_speakers), head_overrides)
    model.to(device).train()
    context = _tdnn_context(model)
    hop = encoder.frame_hop_seconds
    crop = max(context, round(crop_seconds / hop))
    label_of = {s: i for i, s in enumerate(train_speakers)}
    train_rows = features.rows(train_files)
    lengths = np.diff(features.offsets)
    usable = [r for r in train_rows if lengths[r] >= context]
    if len(usable) < len(train_rows):
        logger.warning(
            "%d training item(s) shorter than the TDNN context skipped", len(train_rows) - len(usable)
        )
    key_of = features.keys
    labels_all = np.array([label_of[speaker_of[key_of[r]]] for r in usable])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    rng = np.random.default_rng(seed)
    losses: list[float] = []
    steps_per_epoch = math.ceil(len(usable) / batch_size)
    bar = tqdm(total=epochs * steps_per_epoch, desc="x-vector head", disable=not progress)
    for _ in range(epochs):
        order = rng.permutation(len(usable))
        for b in range(steps_per_epoch):
            idx = order[b * batch_size : (b + 1) * batch_size]
            rows = [usable[i] for i in idx]
            length = min(crop, *(int(lengths[r]) for r in rows))
            batch = []
            for r in rows:
                start = int(rng.integers(0, lengths[r] - length + 1))
                batch.append(_stack_frames(features, r, streams, start, length))
            inputs = torch.from_numpy(np.stack(batch)).float().to(device)
            labels = torch.from_numpy(labels_all[idx]).to(device)
            loss = model(input_values=inputs, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()

    model.eval()
    test_files = trials.files()
    embeddings = {}
    with torch.inference_mode():
        for f in test_files:
            frames = _stack_frames(features, int(features.rows([f])[0]), streams)
            if frames.shape[1] < context:  # shorter than the TDNN's context: tile it so pooling has frames
                frames = np.tile(frames, (1, math.ceil(context / frames.shape[1]), 1))
            emb = model(input_values=torch.from_numpy(frames[None]).float().to(device)).embeddings
            embeddings[f] = emb[0].cpu().numpy()
    enroll = _l2norm(np.stack([embeddings[f] for f in trials.enroll]).astype(np.float64))
    test = _l2norm(np.stack([embeddings[f] for f in trials.test]).astype(np.float64))
    scores = np.einsum("nd,nd->n", enroll, test)
    result: dict[str, Any] = {
        **_verification_metrics(scores, trials.target),
        "n_target": trials.n_target,
        "n_nontarget": trials.n_nontarget,
        "n_trials_dropped_training_speaker": n_dropped,
        "n_train_speakers": len(train_speakers),
        "n_train_utterances": len(usable),
        "head": head_name,
        "layers": streams,
        "epochs": epochs,
        "steps": len(losses),
        "batch_size": batch_size,
        "crop_seconds": crop * hop,
        "lr": lr,
        "final_loss": float(np.mean(losses[-steps_per_epoch:])) if losses else None,
        "trials": trials.source,
        "seed": seed,
    }
    if getattr(model.config, "use_weighted_layer_sum", False) and hasattr(model, "layer_weights"):
        weights = torch.softmax(model.layer_weights.detach().float().cpu(), dim=-1).tolist()
        result["layer_weights"] = dict(zip(streams, weights))
    result["_curves"] = {f"downstream {head_name}": (scores, trials.target)}
    if output_dir is not None and losses:
        result["loss_curve"] = _plot_losses(losses, Path(output_dir) / "downstream_loss.png").name
    return result


def _plot_losses(losses: Sequence[float], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(np.arange(1, len(losses) + 1), losses)
    ax.set_xlabel("step")
    ax.set_ylabel("AM-softmax loss")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------
# Probes: identification, profiling, counting
# --------------------------------------------------------------------------------------------------


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
    for k, stream in enumerate(features.streams):
        x = features.pooled[stream]
        scores = _probe_scores(x[rows_train], y_train, x[rows_test], y_test, seed, knn=False)
        per_layer.append({"layer": stream, "index": k, **scores["linear"]})
    result = _summary(per_layer, features.primary, "accuracy", lower_is_better=False)
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
) -> dict[str, Any]:
    """Linear + kNN probes per layer on (file, label) pairs; summary on the primary layer."""
    rows_train, rows_test = features.rows([f for f, _ in train]), features.rows([f for f, _ in test])
    y_train, y_test = [y for _, y in train], [y for _, y in test]
    per_layer = []
    for k, stream in enumerate(features.streams):
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
    result = _summary(per_layer, features.primary, "accuracy", lower_is_better=False)
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
        entry = _probe_task(features, train, test, seed)
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
    features: FeatureSet, mixtures: Mixtures, seed: int = 0, test_fraction: float = 0.5
) -> dict[str, Any]:
    """Number of speakers per mixture from time-mean features: linear and kNN probes, split by mixture."""
    files = [m.key for m in mixtures.entries]
    counts = [m.num_speakers for m in mixtures.entries]
    train_idx, test_idx = _stratified_split(counts, test_fraction, seed)
    if not test_idx or len(set(counts[i] for i in train_idx)) < 2:
        raise ValueError(f"counting needs >= 2 speaker counts with >= 2 mixtures each, got {Counter(counts)}")
    train = [(files[i], counts[i]) for i in train_idx]
    test = [(files[i], counts[i]) for i in test_idx]
    result = _probe_task(features, train, test, seed)
    result.update(split=f"mixtures stratified by count, test fraction {test_fraction}", data=mixtures.source)
    return result


# --------------------------------------------------------------------------------------------------
# Diarization
# --------------------------------------------------------------------------------------------------


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
    x = _l2norm(embeddings - embeddings.mean(0, keepdims=True))
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
    x = _l2norm(embeddings - embeddings.mean(0, keepdims=True))
    k = min(k, len(embeddings))
    return AgglomerativeClustering(n_clusters=k, metric="cosine", linkage="average").fit_predict(x)


def _hypothesis(centres: np.ndarray, labels: np.ndarray, speech: list[tuple[float, float]]) -> list[Segment]:
    """Each instant takes the label of the nearest window centre; restricted to speech regions."""
    order = np.argsort(centres)
    centres, labels = centres[order], labels[order]
    bounds = np.concatenate([[-np.inf], (centres[1:] + centres[:-1]) / 2, [np.inf]])
    segments: list[Segment] = []
    for k, label in enumerate(labels):
        for a, b in _intersect([(bounds[k], bounds[k + 1])], speech):
            if segments and segments[-1][2] == f"spk{label}" and abs(segments[-1][1] - a) < 1e-9:
                segments[-1] = (segments[-1][0], b, segments[-1][2])
            else:
                segments.append((a, b, f"spk{label}"))
    return segments


def diarization(
    features: FeatureSet,
    windows: Sequence[AudioItem],
    mixtures: Mixtures,
    output_dir: str | Path | None = None,
    min_speech_fraction: float = 0.5,
    max_speakers: int = 8,
    seed: int | None = None,
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
    result = _summary(per_layer, features.primary, "der_known_collar_0", lower_is_better=True)
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


# --------------------------------------------------------------------------------------------------
# Results writers
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
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in (
        ("results.json", json.dumps(_jsonable(results), indent=2) + "\n"),
        ("results.md", results_markdown(results)),
    ):
        path = output_dir / name
        tmp = path.with_name(f".{name}.{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
        paths.append(path)
    return paths[0], paths[1]


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
# Runner
# --------------------------------------------------------------------------------------------------


def run_evaluation(
    model: str,
    data: str | Path,
    output: str | Path,
    tasks: Sequence[str] = ("verification", "identification", "profiling"),
    trials: str | Path | None = None,
    mixtures: str | Path | None = None,
    device: str = "cpu",
    batch_seconds: float = 60.0,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    trust_remote_code: bool = False,
    nontarget_ratio: float = 1.0,
    downstream_epochs: int = 10,
    downstream_batch_size: int = 32,
    downstream_crop_seconds: float = 3.0,
    downstream_lr: float = 1e-3,
    downstream_head_overrides: dict[str, Any] | None = None,
    frames_max_seconds: float = 20.0,
    window_seconds: float = 1.5,
    window_hop_seconds: float = 0.75,
    counting_counts: Sequence[int] = (1, 2, 3, 4),
    mixtures_per_count: int = 12,
    encoder: Encoder | None = None,
    command: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the requested tasks for one model and write ``results.json``, ``results.md`` and plots.

    Features are extracted once per audio set (corpus, mixtures, diarization windows) and cached
    under ``cache_dir`` (default ``output/cache``). A task that cannot run on the given data
    (for instance profiling without a ``gender`` column) is recorded with an ``error`` entry and
    the others still run.
    """
    from delulu_hf.evaluation.features import extract_features, load_encoder

    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; choose from {list(TASKS)}")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(cache_dir) if cache_dir is not None else output / "cache"
    if encoder is None:
        encoder = load_encoder(model, device=device, trust_remote_code=trust_remote_code)
    corpus = Corpus.load(data)
    split = speaker_split(corpus, seed)
    speaker_of = corpus.speaker_of
    results: dict[str, Any] = {
        "model": model,
        "data": str(data),
        "mixtures": str(mixtures) if mixtures else None,
        "seed": seed,
        "command": command,
        "encoder": {
            "kind": encoder.kind,
            "streams": encoder.streams,
            "primary": encoder.primary,
            "frame_hop_seconds": encoder.frame_hop_seconds,
        },
        "speaker_split": {
            "source": split.source,
            "n_train_speakers": len(split.train),
            "n_test_speakers": len(split.test),
        },
        "extraction": {},
        "tasks": {},
    }
    extract = dict(cache_dir=cache_dir, batch_seconds=batch_seconds, progress=progress)

    corpus_tasks = [
        t for t in tasks if t in ("verification", "verification_downstream", "identification", "profiling")
    ]
    features = None
    if corpus_tasks:
        with_frames = "verification_downstream" in tasks
        max_frames = round(frames_max_seconds / encoder.frame_hop_seconds) if with_frames else None
        features = extract_features(
            encoder,
            corpus.items(),
            with_frames=with_frames,
            max_frames=max_frames,
            description="corpus",
            **extract,
        )
        results["extraction"]["corpus"] = features.stats

    trial_set = None
    if "verification" in tasks or "verification_downstream" in tasks:
        trials_path = Path(trials) if trials else Path(data) / "trials.csv"
        if trials_path.is_file():
            trial_set = read_trials(trials_path, corpus)
        else:
            trial_set = generate_trials(corpus, split.test, seed=seed, nontarget_ratio=nontarget_ratio)

    def run(name: str, fn, *args, **kwargs) -> None:
        logger.info("task %s", name)
        try:
            results["tasks"][name] = fn(*args, **kwargs)
        except ValueError as err:  # data that does not support the task: record it, run the others
            logger.error("task %s failed: %s", name, err)
            results["tasks"][name] = {"error": str(err)}

    if "verification" in tasks:
        run("verification", zero_shot_verification, features, trial_set, None, seed, speaker_of)
    if "verification_downstream" in tasks:
        train_files = [r["file_name"] for r in corpus.rows if r["speaker_id"] in set(split.train)]
        run(
            "verification_downstream",
            downstream_verification,
            encoder,
            features,
            train_files,
            speaker_of,
            trial_set,
            output,
            seed=seed,
            epochs=downstream_epochs,
            batch_size=downstream_batch_size,
            crop_seconds=downstream_crop_seconds,
            lr=downstream_lr,
            device=device,
            progress=progress,
            head_overrides=downstream_head_overrides,
        )
    curves = {}
    for name in ("verification", "verification_downstream"):
        curves.update(results["tasks"].get(name, {}).get("_curves", {}))
    if curves:
        det = plot_det_curves(curves, output / "det_verification.png", title=f"Verification: {model}")
        for name in ("verification", "verification_downstream"):
            if "_curves" in results["tasks"].get(name, {}):
                results["tasks"][name]["det_curve"] = det.name
    if "identification" in tasks:
        run("identification", identification, features, corpus, seed=seed)
    if "profiling" in tasks:
        run("profiling", profiling, features, corpus, split, seed=seed)

    if "counting" in tasks or "diarization" in tasks:
        given = Mixtures.load(mixtures) if mixtures else None
        present = given.counts if given is not None else Counter()
        per_count = int(np.median(list(present.values()))) if present else mixtures_per_count
        # Counting covers every count in counting_counts: counts the given mixtures lack (the demo
        # ships 2-4 speakers, no single-speaker "conversations") are generated the same way from
        # held-out speakers. Diarization uses the given mixtures, or generated ones when none.
        missing = {}
        if "counting" in tasks or given is None:
            missing = {k: per_count for k in counting_counts if k not in present}
        generated = None
        if missing:
            try:
                generated = generate_mixtures(
                    corpus, split.test, missing, output / "generated_mixtures", seed=seed
                )
                results["generated_mixtures"] = {
                    "folder": "generated_mixtures",
                    "counts": dict(sorted(generated.counts.items())),
                    "speakers": "held-out (test) speakers",
                    "seed": seed,
                }
            except ValueError as err:
                logger.error("mixture generation failed: %s", err)
                results["generated_mixtures"] = {"error": str(err)}
        count_set = given + generated if given is not None and generated is not None else given or generated
        diarization_set = given if given is not None else generated
        if "counting" in tasks:
            if count_set is None:
                results["tasks"]["counting"] = {"error": "no mixtures given and none could be generated"}
            else:
                mix_features = extract_features(encoder, count_set.items(), description="mixtures", **extract)
                results["extraction"]["mixtures"] = mix_features.stats
                run("counting", counting, mix_features, count_set, seed=seed)
        if "diarization" in tasks:
            windows = (
                diarization_windows(diarization_set, window_seconds, window_hop_seconds)
                if diarization_set
                else []
            )
            if not windows:
                results["tasks"]["diarization"] = {"error": "no mixture with an RTTM reference"}
            else:
                window_features = extract_features(encoder, windows, description="windows", **extract)
                results["extraction"]["windows"] = window_features.stats
                run("diarization", diarization, window_features, windows, diarization_set, output, seed=seed)
    write_results(results, output)
    return results
