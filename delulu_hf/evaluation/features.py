"""Feature extraction for the evaluation tasks: once per model and audio set, batched, cached.

Every task reads the same kind of thing: for each audio item, one vector per *stream* (a layer of
an encoder, or an utterance embedding), and for the downstream x-vector task the frame-level
hidden states. ``extract_features`` runs an ``Encoder`` over the items once, batching items of
similar length so little compute goes to padding, and stores the result in a safetensors file
whose name is a hash of the model, the items and the settings; a second task or a second run
reads it back instead of re-running the model.

Encoders (``load_encoder``):

* a DELULU folder / Hub id, or any transformers audio encoder whose forward takes
  ``input_values`` (HuBERT, WavLM, wav2vec 2.0, ...): streams ``layer_0`` (the input embeddings)
  to ``layer_L`` (the last layer), from ``output_hidden_states=True``;
* a ReDimNet teacher (a ``save_pretrained`` folder or an official ``.pt`` checkpoint): streams
  ``frames`` (the pre-pooling frame features the DELULU labels come from) and ``embedding``
  (the teacher's own speaker embedding);
* ``mfcc``: a baseline that needs no model; streams ``mfcc`` (30 MFCCs per 10 ms frame) and
  ``mfcc_mean_std`` (utterance mean and standard deviation).

Frame-level streams are pooled by the time-mean over valid frames (the zero-shot protocol of the
DELULU card); utterance-level streams are stored as they come.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
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

from delulu_hf.audio import load_audio

logger = logging.getLogger(__name__)

SAMPLE_RATE = 16000
CACHE_FORMAT = 1  # bump when the stored layout changes, so old caches are not misread

__all__ = [
    "AudioItem",
    "Encoder",
    "EncoderOutput",
    "FeatureSet",
    "MfccEncoder",
    "TeacherEncoder",
    "TransformersEncoder",
    "extract_features",
    "length_batches",
    "load_encoder",
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
            raise ValueError(f"cannot read audio item {key!r} ({path}): {err}") from err
        num_samples = int(round(info.frames * SAMPLE_RATE / info.samplerate))
        if num_samples <= 0:
            raise ValueError(f"audio item {key!r} ({path}) is empty")
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
# Encoders
# --------------------------------------------------------------------------------------------------


@dataclass
class EncoderOutput:
    """What an encoder returns for one batch.

    ``frames[name]`` is ``(batch_size, num_frames, dim)`` with ``frame_lengths[i]`` valid frames for
    item i; ``embeddings[name]`` is ``(batch_size, dim)``.
    """

    frames: dict[str, torch.Tensor]
    frame_lengths: torch.Tensor
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)


class Encoder:
    """Base class: turns a padded batch of 16 kHz waveforms into named streams.

    Subclasses set ``name`` (for results), ``kind``, ``frame_streams`` / ``embedding_streams``
    (the order is the order of ``per_layer`` results), ``primary`` (the stream reported as "the
    last layer"), ``frame_hop_seconds`` and ``min_samples``, and implement ``encode``.
    """

    name: str
    kind: str
    frame_streams: list[str]
    embedding_streams: list[str] = []
    primary: str
    frame_hop_seconds: float
    min_samples: int = 400
    device: torch.device = torch.device("cpu")

    @property
    def streams(self) -> list[str]:
        return list(self.frame_streams) + list(self.embedding_streams)

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this encoder's outputs in the cache key (weights, settings)."""
        raise NotImplementedError

    def encode(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> EncoderOutput:
        """Encode ``(batch_size, num_samples)`` right-padded audio with ``lengths`` valid samples each."""
        raise NotImplementedError


def _files_fingerprint(folder: str | Path) -> list[tuple[str, int, int]]:
    """Name, size and modification time of the files in a model folder: changes when weights change."""
    folder = Path(folder)
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file())


class MfccEncoder(Encoder):
    """MFCC baseline: no model, no training; the floor every learned encoder should clear."""

    kind = "mfcc"

    def __init__(self, n_mfcc: int = 30, n_mels: int = 40, device: str | torch.device = "cpu") -> None:
        import torchaudio

        self.name = "mfcc"
        self.n_mfcc = n_mfcc
        self.n_mels = n_mels
        self.hop_length = 160
        self.device = torch.device(device)
        self.transform = torchaudio.transforms.MFCC(
            sample_rate=SAMPLE_RATE,
            n_mfcc=n_mfcc,
            melkwargs={"n_fft": 512, "win_length": 400, "hop_length": self.hop_length, "n_mels": n_mels},
        ).to(self.device)
        self.frame_streams = ["mfcc"]
        self.embedding_streams = ["mfcc_mean_std"]
        self.primary = "mfcc_mean_std"
        self.frame_hop_seconds = self.hop_length / SAMPLE_RATE

    def fingerprint(self) -> dict[str, Any]:
        return {"kind": self.kind, "n_mfcc": self.n_mfcc, "n_mels": self.n_mels, "hop": self.hop_length}

    def encode(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> EncoderOutput:
        # One item at a time: the centred STFT reflects each item's own edges, so the result does not
        # depend on which other items share the batch (padding would change the last frames).
        per_item = [self.transform(w[:n].to(self.device)).T for w, n in zip(waveforms, lengths.tolist())]
        frame_lengths = torch.tensor([len(m) for m in per_item], device=self.device)
        mfcc = torch.nn.utils.rnn.pad_sequence(per_item, batch_first=True)  # (B, T, n_mfcc)
        mean = torch.stack([m.mean(0) for m in per_item])
        std = torch.stack([m.std(0) if len(m) > 1 else torch.zeros_like(m[0]) for m in per_item])
        return EncoderOutput(
            frames={"mfcc": mfcc},
            frame_lengths=frame_lengths,
            embeddings={"mfcc_mean_std": torch.cat([mean, std], dim=-1)},
        )


def _default_feature_extractor(config):
    """DELULU's input convention when a folder ships no ``preprocessor_config.json``; else None (raw audio)."""
    if getattr(config, "model_type", None) == "delulu":
        from delulu_hf import default_feature_extractor

        return default_feature_extractor(config)
    return None


class TransformersEncoder(Encoder):
    """Any transformers speech encoder that takes ``input_values``: every hidden state is a stream.

    Inputs are prepared by the model's own feature extractor when it ships one
    (``preprocessor_config.json``: normalisation, attention-mask convention), by DELULU's default
    one for a DELULU folder without it, and otherwise raw waveforms are passed with an attention
    mask.
    """

    kind = "transformers"

    def __init__(
        self, model_id: str, device: str | torch.device = "cpu", trust_remote_code: bool = False, dtype=None
    ) -> None:
        # DELULU is registered with the Auto classes by delulu_hf/__init__.py, already imported here.
        from transformers import AutoFeatureExtractor, AutoModel

        self.device = torch.device(device)
        model = AutoModel.from_pretrained(model_id, trust_remote_code=trust_remote_code, dtype=dtype)
        try:
            feature_extractor = AutoFeatureExtractor.from_pretrained(
                model_id, trust_remote_code=trust_remote_code
            )
        except (OSError, ValueError):
            feature_extractor = None
        self._setup(model.to(self.device), feature_extractor, model_id)
        self._in_memory = False

    @classmethod
    def from_model(cls, model, feature_extractor=None, name: str = "model") -> TransformersEncoder:
        """Wrap an in-memory model (tests, notebooks) without saving it first; its weights are hashed
        for the cache key."""
        self = cls.__new__(cls)
        self.device = next(model.parameters()).device
        self._setup(model, feature_extractor, name)
        self._in_memory = True
        return self

    def _setup(self, model, feature_extractor, name: str) -> None:
        from delulu_hf.modeling_delulu import receptive_field

        self.name = self.model_id = name
        self.model = model.eval()
        self.config = model.config
        self.feature_extractor = feature_extractor or _default_feature_extractor(self.config)
        self.frame_streams = [f"layer_{i}" for i in range(int(self.config.num_hidden_layers) + 1)]
        self.embedding_streams = []
        self.primary = self.frame_streams[-1]
        if hasattr(self.config, "conv_stride") and hasattr(self.config, "conv_kernel"):
            self.frame_hop_seconds = math.prod(self.config.conv_stride) / SAMPLE_RATE
            self.min_samples = receptive_field(self.config)  # shorter input gives no frame at all
        else:
            raise ValueError(
                f"{name}: {type(model).__name__} is not a convolutional speech encoder (no conv_stride/conv_kernel "
                "in its config); supported: DELULU, HuBERT, WavLM, wav2vec 2.0, data2vec-audio, ..."
            )

    def fingerprint(self) -> dict[str, Any]:
        fp: dict[str, Any] = {"kind": self.kind, "model": self.model_id, "config": self.config.to_diff_dict()}
        if os.path.isdir(self.model_id):
            fp["files"] = _files_fingerprint(self.model_id)
        if getattr(self, "_in_memory", False):  # weights only live in memory: hash them
            digest = hashlib.sha256()
            for name, tensor in sorted(self.model.state_dict().items()):
                digest.update(name.encode())
                digest.update(tensor.detach().float().cpu().numpy().tobytes())
            fp["weights_sha256"] = digest.hexdigest()
        if self.feature_extractor is not None:
            fp["feature_extractor"] = self.feature_extractor.to_dict()
        return fp

    def _inputs(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.feature_extractor is None:
            mask = torch.arange(waveforms.shape[1])[None] < lengths[:, None]
            return {"input_values": waveforms, "attention_mask": mask.long()}
        arrays = [w[:n].numpy() for w, n in zip(waveforms, lengths.tolist())]
        inputs = self.feature_extractor(arrays, sampling_rate=SAMPLE_RATE, padding=True, return_tensors="pt")
        # Models trained without attention masks (group-norm wav2vec2/HuBERT Base) must not get one;
        # their extractor says so with return_attention_mask=False.
        return {k: v for k, v in inputs.items() if k in ("input_values", "attention_mask")}

    def encode(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> EncoderOutput:
        inputs = {k: v.to(self.device) for k, v in self._inputs(waveforms, lengths).items()}
        inputs["input_values"] = inputs["input_values"].to(self.model.dtype)
        out = self.model(**inputs, output_hidden_states=True, return_dict=True)
        hidden = out.hidden_states
        if hidden is None or len(hidden) != len(self.frame_streams):
            raise RuntimeError(
                f"{self.name}: expected {len(self.frame_streams)} hidden states with output_hidden_states=True, "
                f"got {None if hidden is None else len(hidden)}"
            )
        if hasattr(self.model, "_get_feat_extract_output_lengths"):
            frame_lengths = self.model._get_feat_extract_output_lengths(lengths.to(self.device))
        else:
            frame_lengths = torch.full((len(lengths),), hidden[-1].shape[1], device=self.device)
        frame_lengths = torch.clamp(frame_lengths.long(), min=1, max=hidden[-1].shape[1])
        return EncoderOutput(frames=dict(zip(self.frame_streams, hidden)), frame_lengths=frame_lengths)


class TeacherEncoder(Encoder):
    """A ReDimNet teacher (``delulu_hf.teacher.load_teacher``): its frame features and its embedding."""

    kind = "teacher"

    def __init__(self, spec: str, device: str | torch.device = "cpu") -> None:
        from delulu_hf.teacher import load_teacher

        self.name = str(spec)
        self.spec = str(spec)
        self.device = torch.device(device)
        self.teacher = load_teacher(spec, device=self.device)
        self.frame_streams = ["frames"]
        self.embedding_streams = ["embedding"]
        self.primary = "embedding"
        self.frame_hop_seconds = float(self.teacher.frame_hop_seconds)
        self.min_samples = 1024  # covers the centred STFT's reflection padding with room to spare

    def fingerprint(self) -> dict[str, Any]:
        fp: dict[str, Any] = {"kind": self.kind, "spec": self.spec}
        if os.path.isdir(self.spec):
            fp["files"] = _files_fingerprint(self.spec)
        elif os.path.isfile(self.spec):
            stat = os.stat(self.spec)
            fp["file"] = [stat.st_size, stat.st_mtime_ns]
        return fp

    def encode(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> EncoderOutput:
        waveforms, lengths = waveforms.to(self.device), lengths.to(self.device)
        frames = self.teacher.frame_features(waveforms, lengths)
        embedding = self.teacher(waveforms, lengths)
        frame_lengths = torch.clamp(self.teacher.frame_lengths(lengths), max=frames.shape[1])
        return EncoderOutput(
            frames={"frames": frames}, frame_lengths=frame_lengths, embeddings={"embedding": embedding}
        )


def _is_teacher_folder(path: Path) -> bool:
    config = path / "config.json"
    if not config.is_file():
        return False
    with open(config, encoding="utf-8") as f:
        return json.load(f).get("model_type") == "redimnet"


def load_encoder(
    model: str, device: str | torch.device = "cpu", trust_remote_code: bool = False, dtype=None
) -> Encoder:
    """Pick the encoder for a model spec.

    ``"mfcc"`` is the baseline; a folder whose ``config.json`` says ``model_type: redimnet`` or a
    ``.pt`` file is a ReDimNet teacher; anything else is passed to ``transformers.AutoModel``
    (a local DELULU folder, a Hub id, ...). Nothing is downloaded unless ``model`` is a Hub id.
    """
    if model.lower() == "mfcc":
        return MfccEncoder(device=device)
    path = Path(model)
    if (path.is_dir() and _is_teacher_folder(path)) or (path.is_file() and path.suffix == ".pt"):
        return TeacherEncoder(model, device=device)
    if path.is_file():
        raise ValueError(f"model {model!r} is a file but not a ReDimNet .pt checkpoint")
    return TransformersEncoder(model, device=device, trust_remote_code=trust_remote_code, dtype=dtype)


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


def _save_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


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
    bar = tqdm(total=round(total_seconds, 1), unit="audio-s", desc=description, disable=not progress)
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
            bar.update(round(float(batch_lengths.sum()) / SAMPLE_RATE, 1))
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
        _save_atomic(cache_path, tensors, {"info": json.dumps(info)})
        result.stats["cache_file"] = str(cache_path)
    return result
