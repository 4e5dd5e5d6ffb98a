"""Dataset folders in, evaluation data out: corpus, speaker split, verification trials, mixtures.

* ``Corpus``: an audiofolder whose ``metadata.csv`` has ``file_name, speaker_id`` (optional
  ``gender``, ``language``, ``split``).
* ``speaker_split``: training vs held-out speakers (the ``split`` column, else a seeded split).
  Held-out speakers never reach a training step (probe, x-vector head).
* ``Trials``: verification pairs, read from ``enroll_file,test_file,target`` or generated from the
  held-out speakers.
* ``Mixtures``: multi-speaker recordings with RTTM references (counting, diarization), read from
  a folder or generated from held-out speakers with the recipe of ``data/demo_mixtures``.

A missing or malformed data file raises a ``UserError`` (a ``ValueError``) naming the file and the
row, so the command line prints it as one line.
"""

from __future__ import annotations

import csv
import json
import logging
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from delulu_hf.atomic import atomic_write, atomic_write_json
from delulu_hf.errors import UserError
from delulu_hf.evaluation.features import SAMPLE_RATE, AudioItem
from delulu_hf.segments import Segment, read_rttm, write_rttm

logger = logging.getLogger(__name__)

__all__ = [
    "Corpus",
    "MissingDataFile",
    "Mixture",
    "Mixtures",
    "SpeakerSplit",
    "Trials",
    "generate_mixtures",
    "generate_trials",
    "read_trials",
    "speaker_split",
]


class MissingDataFile(UserError, FileNotFoundError):
    """A file named by the data (``metadata.csv``, an audio file, an RTTM) does not exist."""


def _read_csv(path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    if not path.is_file():
        raise MissingDataFile(f"{path} does not exist")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise UserError(f"{path}: missing column(s) {missing}; found {reader.fieldnames}")
        rows = []
        for n, row in enumerate(reader, start=2):
            empty = [c for c in required if not (row.get(c) or "").strip()]
            if empty:
                raise UserError(f"{path}:{n}: empty {empty} in row {row}")
            rows.append({k: (v or "").strip() for k, v in row.items() if k is not None})
    if not rows:
        raise UserError(f"{path} has no rows")
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
                raise UserError(f"{root / metadata}: file {name!r} is listed twice")
            seen.add(name)
            if not (root / name).is_file():
                raise MissingDataFile(f"{root / metadata}: file {name!r} does not exist under {root}")
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
                raise UserError(f"{path}:{n}: {col} {row[col]!r} is not in {corpus.root / 'metadata.csv'}")
        if row["target"] not in ("0", "1"):
            raise UserError(f"{path}:{n}: target must be 0 or 1, got {row['target']!r}")
        enroll.append(row["enroll_file"])
        test.append(row["test_file"])
        target.append(int(row["target"]))
    trials = Trials(enroll, test, np.array(target, dtype=np.int64), source=str(path))
    if trials.n_target == 0 or trials.n_nontarget == 0:
        raise UserError(f"{path}: needs both target and non-target trials")
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
                raise MissingDataFile(f"{root / metadata}: mixture {name!r} does not exist under {root}")
            if not row["num_speakers"].isdigit() or int(row["num_speakers"]) < 1:
                raise UserError(f"{root / metadata}: num_speakers of {name!r} is {row['num_speakers']!r}")
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
    stamp.unlink(missing_ok=True)  # files are about to change: a crash must not leave an old stamp
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
            atomic_write(
                output_dir / f"{name}.flac",
                lambda tmp, audio=audio: sf.write(tmp, audio, SAMPLE_RATE, subtype="PCM_16", format="FLAC"),
            )
            write_rttm(output_dir / f"{name}.rttm", name, segments)
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
    atomic_write_json(stamp, settings)  # last: the folder counts as generated only when complete
    return Mixtures.load(output_dir, prefix="generated/")
