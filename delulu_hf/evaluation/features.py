"""Audio items and an ``Encoder`` in, a cached ``FeatureSet`` (pooled streams, optional frames) out.

Every task reads the same kind of thing: for each audio item, one vector per *stream* (a layer of
an encoder, or an utterance embedding), and for the downstream x-vector task the frame-level
hidden states. ``extract_features`` runs an ``Encoder`` (``delulu_hf.evaluation.encoders``) over
the items once, batching items of similar length so little compute goes to padding, and stores
the result in a safetensors file whose name is a hash of the model, the items and the settings;
a second task or a second run reads it back instead of re-running the model.

Frame-level streams are pooled by the time-mean over valid frames (the zero-shot protocol of the
DELULU card); utterance-level streams are stored as they come.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from delulu_hf.atomic import atomic_save_safetensors
from delulu_hf.audio import load_audio
from delulu_hf.errors import UserError
from delulu_hf.evaluation.encoders import SAMPLE_RATE, Encoder

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the stored layout changes, so old caches are not misread

__all__ = [
    "SAMPLE_RATE",
    "AudioItem",
    "FeatureSet",
    "extract_features",
    "l2_normalize",
    "length_batches",
]


# --------------------------------------------------------------------------------------------------
# Audio items
# --------------------------------------------------------------------------------------------------


def _decode(path: str) -> np.ndarray:
    """Decode a file to float32 mono 16 kHz through the project's one audio decoder."""
    return load_audio(path, sampling_rate=SAMPLE_RATE, name=path)


@dataclass(frozen=True)
class AudioItem:
    """One piece of audio to encode: a whole file, or a ``[start, start + duration)`` crop of it.

    ``key`` names the item in the feature set (the ``file_name`` of a corpus row, or
    ``"<file>@<start>"`` for a diarization window). ``num_samples`` is the length at 16 kHz; it is
    what batching sorts by, so it must be known before decoding (``soundfile.info`` gives it).
    """

    key: str
    path: str
    num_samples: int
    start_sample: int = 0

    @property
    def seconds(self) -> float:
        return self.num_samples / SAMPLE_RATE

    @classmethod
    def from_file(cls, key: str, path: str | Path) -> AudioItem:
        import soundfile as sf

        path = str(path)
        try:
            info = sf.info(path)
        except Exception as err:
            raise UserError(f"cannot read audio item {key!r} ({path}): {err}") from err
        num_samples = int(round(info.frames * SAMPLE_RATE / info.samplerate))
        if num_samples <= 0:
            raise UserError(f"audio item {key!r} ({path}) is empty")
        return cls(key=key, path=path, num_samples=num_samples)


class _AudioReader:
    """Decodes items, keeping the last few files so many windows of one recording decode it once."""

    def __init__(self, capacity: int = 8) -> None:
        self.capacity = capacity
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()

    def __call__(self, item: AudioItem) -> np.ndarray:
        audio = self._cache.get(item.path)
        if audio is None:
            audio = _decode(item.path)
            self._cache[item.path] = audio
            if len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(item.path)
        crop = audio[item.start_sample : item.start_sample + item.num_samples]
        if len(crop) < item.num_samples:  # header length and decoded length can differ by a few samples
            crop = np.pad(crop, (0, item.num_samples - len(crop)))
        return crop


def length_batches(num_samples: Sequence[int], batch_seconds: float, max_items: int = 256) -> list[list[int]]:
    """Group item indices into batches of similar length.

    Items are sorted longest first (so an out-of-memory error shows on the first batch, not after an
    hour) and a batch grows while ``batch_size * longest_item`` stays within ``batch_seconds`` of
    audio. An item longer than the budget gets a batch of its own.
    """
    if batch_seconds <= 0:
        raise ValueError(f"batch_seconds must be positive, got {batch_seconds}")
    budget = batch_seconds * SAMPLE_RATE
    order = sorted(range(len(num_samples)), key=lambda i: (-num_samples[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = num_samples[current[0]] if current else num_samples[i]
        if current and ((len(current) + 1) * longest > budget or len(current) >= max_items):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


# --------------------------------------------------------------------------------------------------
# Extraction + cache
# --------------------------------------------------------------------------------------------------


@dataclass
class FeatureSet:
    """Features of a list of items: ``pooled[stream]`` is ``(num_items, dim)`` float32, row i = ``keys[i]``.

    With frames, ``frames[stream][offsets[i]:offsets[i + 1]]`` are item i's valid frames (float16,
    centre-cropped to at most ``max_frames`` when extraction was asked to).
    """

    keys: list[str]
    streams: list[str]
    frame_streams: list[str]
    primary: str
    pooled: dict[str, np.ndarray]
    frames: dict[str, np.ndarray] | None = None
    offsets: np.ndarray | None = None
    stats: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._index = {k: i for i, k in enumerate(self.keys)}

    def rows(self, keys: Sequence[str]) -> np.ndarray:
        """Row indices of ``keys`` (KeyError naming the first missing key)."""
        try:
            return np.array([self._index[k] for k in keys], dtype=np.int64)
        except KeyError as err:
            raise KeyError(f"no features for item {err.args[0]!r}") from None

    def item_frames(self, row: int, stream: str) -> np.ndarray:
        if self.frames is None or self.offsets is None:
            raise ValueError("this feature set was extracted without frames")
        return self.frames[stream][self.offsets[row] : self.offsets[row + 1]]


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), so a dot product is a cosine."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _cache_key(
    encoder: Encoder, items: Sequence[AudioItem], with_frames: bool, max_frames: int | None
) -> str:
    payload = {
        "format": CACHE_FORMAT,
        "encoder": encoder.fingerprint(),
        "items": [(it.key, it.path, it.start_sample, it.num_samples) for it in items],
        "data_files": sorted({(it.path, *_stat(it.path)) for it in items}),
        "frames": with_frames,
        "max_frames": max_frames,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _stat(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def _load_cache(path: Path) -> FeatureSet:
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        meta = f.metadata()
        info = json.loads(meta["info"])
        pooled = {s: f.get_tensor(f"pooled/{s}") for s in info["streams"]}
        frames = offsets = None
        if info["with_frames"]:
            frames = {s: f.get_tensor(f"frames/{s}") for s in info["frame_streams"]}
            offsets = f.get_tensor("offsets")
    return FeatureSet(
        keys=info["keys"],
        streams=info["streams"],
        frame_streams=info["frame_streams"],
        primary=info["primary"],
        pooled=pooled,
        frames=frames,
        offsets=offsets,
        stats={**info["stats"], "cached": True, "cache_file": str(path)},
    )


def extract_features(
    encoder: Encoder,
    items: Sequence[AudioItem],
    cache_dir: str | Path | None = None,
    with_frames: bool = False,
    max_frames: int | None = None,
    batch_seconds: float = 60.0,
    progress: bool = True,
    description: str = "extracting",
) -> FeatureSet:
    """Encode ``items`` once (or read the cached result) and pool every stream.

    Args:
        encoder: from ``load_encoder``.
        items: the audio to encode; keys must be unique.
        cache_dir: where the safetensors cache lives; ``None`` disables caching. A cache written with
            frames also serves requests without frames.
        with_frames: also keep frame-level features of the frame streams (float16), for the
            downstream x-vector task.
        max_frames: centre-crop stored frames to this many per item (bounds memory; pooling still
            uses every frame).
        batch_seconds: padded audio per batch (batch_size * longest item), in seconds.

    Returns:
        A ``FeatureSet``; ``stats`` holds ``audio_seconds``, ``wall_seconds`` and
        ``audio_seconds_per_second`` of the extraction that produced it.
    """
    keys = [it.key for it in items]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"duplicate item key {dup!r}")
    short = [it for it in items if it.num_samples < encoder.min_samples]
    if short:
        raise ValueError(
            f"item {short[0].key!r} has {short[0].num_samples} samples; {encoder.name} needs at least "
            f"{encoder.min_samples} ({len(short)} items too short)"
        )
    cache_path = None
    if cache_dir is not None:
        cache_dir = Path(cache_dir)
        candidates = [(True, _cache_key(encoder, items, True, max_frames))]
        if not with_frames:
            candidates.append((False, _cache_key(encoder, items, False, None)))
        for frames_flag, key in candidates:
            path = cache_dir / f"features-{key}.safetensors"
            if path.is_file():
                logger.info("reading cached features from %s", path)
                return _load_cache(path)
            if frames_flag == with_frames:
                cache_path = path

    reader = _AudioReader()
    lengths = [it.num_samples for it in items]
    batches = length_batches(lengths, batch_seconds)
    pooled: dict[str, list[np.ndarray]] = {s: [None] * len(items) for s in encoder.streams}
    frames: dict[str, list[np.ndarray]] = {s: [None] * len(items) for s in encoder.frame_streams}
    total_seconds = sum(lengths) / SAMPLE_RATE
    start = time.perf_counter()
    # Whole seconds of audio: the bar's position is the rounded running total of samples, so it is
    # an integer that never passes ``total`` (no float drift, no negative ETA).
    bar = tqdm(total=round(total_seconds), unit="s", desc=f"{description} (audio)", disable=not progress)
    done_samples = 0
    with torch.inference_mode():
        for batch in batches:
            longest = lengths[batch[0]]
            waveforms = torch.zeros(len(batch), longest)
            for j, i in enumerate(batch):
                waveforms[j, : lengths[i]] = torch.from_numpy(reader(items[i]))
            batch_lengths = torch.tensor([lengths[i] for i in batch])
            try:
                out = encoder.encode(waveforms, batch_lengths)
            except Exception as err:
                names = ", ".join(items[i].key for i in batch[:3])
                raise RuntimeError(
                    f"{encoder.name} failed on the batch with items {names}...: {err}"
                ) from err
            frame_lengths = out.frame_lengths.cpu().tolist()
            for name, tensor in out.frames.items():
                tensor = tensor.float()
                for j, i in enumerate(batch):
                    valid = tensor[j, : frame_lengths[j]]
                    pooled[name][i] = valid.mean(0).cpu().numpy()
                    if with_frames:
                        if max_frames is not None and len(valid) > max_frames:
                            offset = (len(valid) - max_frames) // 2
                            valid = valid[offset : offset + max_frames]
                        frames[name][i] = valid.to(torch.float16).cpu().numpy()
            for name, tensor in out.embeddings.items():
                for j, i in enumerate(batch):
                    pooled[name][i] = tensor[j].float().cpu().numpy()
            done_samples += int(batch_lengths.sum())
            bar.update(round(done_samples / SAMPLE_RATE) - bar.n)
    bar.close()
    wall = time.perf_counter() - start
    stats = {
        "audio_seconds": total_seconds,
        "wall_seconds": wall,
        "audio_seconds_per_second": total_seconds / wall if wall > 0 else float("inf"),
        "num_items": len(items),
        "num_batches": len(batches),
        "batch_seconds": batch_seconds,
        "device": str(encoder.device),
    }
    result = FeatureSet(
        keys=keys,
        streams=encoder.streams,
        frame_streams=list(encoder.frame_streams),
        primary=encoder.primary,
        pooled={s: np.stack(v).astype(np.float32) for s, v in pooled.items()},
        stats={**stats, "cached": False},
    )
    if with_frames:
        counts = [len(f) for f in frames[encoder.frame_streams[0]]]
        result.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        result.frames = {s: np.concatenate(v) for s, v in frames.items()}
    if cache_path is not None:
        tensors = {f"pooled/{s}": torch.from_numpy(v) for s, v in result.pooled.items()}
        if with_frames:
            tensors.update({f"frames/{s}": torch.from_numpy(v) for s, v in result.frames.items()})
            tensors["offsets"] = torch.from_numpy(result.offsets)
        info = {
            "keys": keys,
            "streams": result.streams,
            "frame_streams": result.frame_streams,
            "primary": result.primary,
            "with_frames": with_frames,
            "encoder": encoder.name,
            "stats": stats,
        }
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        atomic_save_safetensors(tensors, cache_path, metadata={"info": json.dumps(info)})
        result.stats["cache_file"] = str(cache_path)
    return result
