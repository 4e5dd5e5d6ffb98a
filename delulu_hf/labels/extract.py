"""Dataset batches in, encoder-rate teacher features out: the front half that fit and map share.

``LabelBatch`` is the function ``datasets.map`` calls (and the fit calls on the same batches): it
decodes each item with ``delulu_hf.audio`` (soundfile, never FFmpeg), names and records items that
cannot be used, and hands the waveforms to ``AlignedFeatureExtractor``, which runs the teacher on
length-sorted, bounded batches and maps its 10 ms frames onto 16 ms encoder frames
(``alignment_index``). The fit collects those features; the map turns them into cluster ids.
The helpers below split the work across ``accelerate launch`` processes so that every process
sees exactly the batches a single process would.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import typing
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, Union

import numpy as np
import torch

from delulu_hf.labels.alignment import ALIGNMENTS, EncoderFrames, alignment_index
from delulu_hf.labels.features import featurizer_provenance, hop_samples, json_sha256
from delulu_hf.teacher.base import SpeakerTeacher

logger = logging.getLogger(__name__)

__all__ = [
    "LABELS_VERSION",
    "LABEL_COLUMN",
    "NORMALIZATIONS",
    "ON_ERROR",
    "AlignedFeatureExtractor",
    "LabelBatch",
    "LabelSkip",
    "Normalization",
    "OnError",
    "block_ranges",
    "default_work_dir",
    "dist_state",
    "item_seconds",
    "undecoded",
]

LABEL_COLUMN = "cluster_ids"
#: ``"l2"`` scales features to unit length before k-means (and before assignment).
Normalization = Literal["none", "l2"]
NORMALIZATIONS: tuple[str, ...] = typing.get_args(Normalization)
#: A bad item (undecodable, too short, non-finite features) raises naming it, or is skipped and recorded.
OnError = Literal["raise", "skip"]
ON_ERROR: tuple[str, ...] = typing.get_args(OnError)
# Bumped whenever the labelling arithmetic changes, so stale caches are never reused.
LABELS_VERSION = "1"


@dataclasses.dataclass
class LabelSkip:
    """An item left out because it could not be decoded or gave non-finite features."""

    index: int
    name: str
    reason: str


class AlignedFeatureExtractor:
    """Waveforms -> teacher features -> encoder-rate features, in length-sorted batches.

    Items are sorted by length and grouped so that a batch holds at most ``max_batch_seconds`` of
    padded audio and ``max_batch_size`` items: little compute is spent on padding and memory is
    bounded. The teacher runs in inference mode, in bf16 autocast on CUDA by default.

    Args:
        teacher: a ``SpeakerTeacher`` (ReDimNet, ``MFCCFeatures``, ...).
        frames: encoder geometry (``EncoderFrames`` or a config).
        alignment: ``"nearest"`` or ``"mean"`` (see ``alignment_index``).
        normalization: ``"none"`` or ``"l2"`` (unit-length features before k-means).
        device: where the teacher runs (CUDA when available by default).
        bf16: autocast the teacher to bfloat16 (default: on CUDA only).
    """

    def __init__(
        self,
        teacher: SpeakerTeacher,
        frames: Union[EncoderFrames, Any],
        alignment: str = "nearest",
        normalization: str = "none",
        device: Union[str, torch.device, None] = None,
        bf16: bool | None = None,
        max_batch_seconds: float = 64.0,
        max_batch_size: int = 64,
    ):
        if alignment not in ALIGNMENTS:
            raise ValueError(f"alignment must be one of {ALIGNMENTS}, got {alignment!r}")
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.teacher = teacher.to(self.device).eval()
        self.frames = EncoderFrames.from_config(frames)
        self.teacher_hop = hop_samples(teacher)
        self.alignment = alignment
        self.normalization = normalization
        self.bf16 = (self.device.type == "cuda") if bf16 is None else bool(bf16)
        self.max_batch_samples = int(max_batch_seconds * teacher.sample_rate)
        self.max_batch_size = max_batch_size

    @property
    def min_samples(self) -> int:
        """Shortest item that gives one encoder frame."""
        return self.frames.receptive_field

    def settings(self) -> dict[str, Any]:
        """Everything besides the weights that can change the features (for cache fingerprints)."""
        return {
            "alignment": self.alignment,
            "normalization": self.normalization,
            "bf16": self.bf16,
            "device_type": self.device.type,
            "max_batch_samples": self.max_batch_samples,
            "max_batch_size": self.max_batch_size,
            "conv_kernel": list(self.frames.conv_kernel),
            "conv_stride": list(self.frames.conv_stride),
            "teacher_hop": self.teacher_hop,
        }

    def plan_batches(self, lengths: Sequence[int]) -> list[list[int]]:
        """Group positions into length-sorted batches within the padded-sample budget."""
        order = np.argsort(np.asarray(lengths, dtype=np.int64), kind="stable")
        batches: list[list[int]] = []
        current: list[int] = []
        for position in order.tolist():
            length = int(lengths[position])  # ascending, so this is the batch's padded length
            if current and (
                len(current) >= self.max_batch_size or (len(current) + 1) * length > self.max_batch_samples
            ):
                batches.append(current)
                current = []
            current.append(position)
        if current:
            batches.append(current)
        return batches

    @torch.inference_mode()
    def teacher_features(self, waveforms: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad one batch and run the teacher: ``(B, T, D)`` float32 features and ``(B,)`` lengths."""
        lengths = torch.tensor([len(w) for w in waveforms], dtype=torch.long)
        padded_np = np.zeros((len(waveforms), int(lengths.max())), dtype=np.float32)
        for row, wave in enumerate(waveforms):
            padded_np[row, : len(wave)] = wave
        padded, lengths = torch.from_numpy(padded_np).to(self.device), lengths.to(self.device)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            features = self.teacher.frame_features(padded, lengths)
        expected = 1 + padded.shape[1] // self.teacher_hop
        if (
            features.ndim != 3
            or features.shape[1] != expected
            or features.shape[2] != self.teacher.feature_dim
        ):
            raise RuntimeError(
                f"teacher {self.teacher.name!r} returned {tuple(features.shape)} for {tuple(padded.shape)} input; "
                f"expected (batch, {expected}, {self.teacher.feature_dim})"
            )
        return features.float(), lengths

    @torch.inference_mode()
    def align(self, features: torch.Tensor, lengths: Sequence[int]) -> tuple[torch.Tensor, list[int]]:
        """Teacher features ``(B, T, D)`` -> encoder-rate features ``(sum of frame counts, D)``."""
        batch, num_teacher, dim = features.shape
        indices, weights, counts = [], [], []
        for row, length in enumerate(lengths):
            index, weight = alignment_index(int(length), self.frames, self.teacher_hop, self.alignment)
            indices.append(index + row * num_teacher)
            weights.append(weight)
            counts.append(index.shape[0])
        width = max(index.shape[1] for index in indices)
        index = np.concatenate([np.pad(i, ((0, 0), (0, width - i.shape[1])), mode="edge") for i in indices])
        weight = np.concatenate([np.pad(w, ((0, 0), (0, width - w.shape[1]))) for w in weights])
        flat = features.reshape(batch * num_teacher, dim)
        index_t = torch.from_numpy(index).to(features.device)
        if width == 1:
            aligned = flat[index_t[:, 0]]
        else:
            weight_t = torch.from_numpy(weight).to(features.device)
            aligned = (flat[index_t] * weight_t[..., None]).sum(dim=1)
        if self.normalization == "l2":
            aligned = torch.nn.functional.normalize(aligned, dim=-1)
        return aligned, counts

    def iter_features(
        self, waveforms: Sequence[np.ndarray]
    ) -> Iterator[tuple[list[int], torch.Tensor, list[int], list[bool]]]:
        """Yield ``(positions, aligned (M, D), frame counts, finite flags)`` batch by batch.

        ``positions`` index into ``waveforms``; each item's rows are consecutive in ``aligned``.
        """
        lengths = [len(w) for w in waveforms]
        for positions in self.plan_batches(lengths):
            features, _ = self.teacher_features([waveforms[p] for p in positions])
            aligned, counts = self.align(features, [lengths[p] for p in positions])
            finite_rows = torch.isfinite(aligned).all(dim=1)
            finite = [bool(part.all()) for part in torch.split(finite_rows, counts)]
            yield positions, aligned, counts, finite

    def fingerprint(self, teacher_info: dict[str, Any] | None = None) -> str:
        """Stable hash of the teacher weights and every setting that shapes the features
        (``teacher_info``: a ``featurizer_provenance`` already computed for this teacher)."""
        info = teacher_info if teacher_info is not None else featurizer_provenance(self.teacher)
        return json_sha256({"teacher": info, "settings": self.settings(), "version": LABELS_VERSION})


# ---------------------------------------------------------------------------------------------
# Dataset helpers (decoding, naming, sharding by process)
# ---------------------------------------------------------------------------------------------


def _audio_api():
    from delulu_hf.audio import AudioDecodeError, load_audio

    return load_audio, AudioDecodeError


def undecoded(dataset, audio_column: str):
    """Make datasets hand us raw ``{"path", "bytes"}`` so that ``delulu_hf.audio`` (soundfile)
    decodes, never the torchcodec/FFmpeg decoder of an ``Audio(decode=True)`` feature."""
    from datasets import Audio

    features = dataset.features
    if (
        features is not None
        and isinstance(features.get(audio_column), Audio)
        and features[audio_column].decode
    ):
        return dataset.cast_column(
            audio_column, Audio(sampling_rate=features[audio_column].sampling_rate, decode=False)
        )
    return dataset


def _item_name(
    batch: dict[str, list], row: int, index: int, name_column: str | None, audio_value: Any
) -> str:
    if name_column and name_column in batch:
        return str(batch[name_column][row])
    for column in ("file_name", "path", "id", "utterance_id"):
        if column in batch and batch[column][row] is not None:
            return str(batch[column][row])
    if isinstance(audio_value, dict) and audio_value.get("path"):
        return os.path.basename(str(audio_value["path"]))
    return f"#{index}"


def item_seconds(dataset, audio_column: str, sample_rate: int) -> np.ndarray:
    """Durations without decoding: list lengths of decoded ``{"array", "sampling_rate"}`` columns
    (read from Arrow offsets, no copy) or soundfile headers for ``{"path", "bytes"}`` audio."""
    import io

    import pyarrow as pa
    import pyarrow.compute as pc
    import soundfile

    seconds = []
    for table in dataset.with_format("arrow").iter(batch_size=1000):
        column = (
            table[audio_column].combine_chunks()
            if isinstance(table[audio_column], pa.ChunkedArray)
            else table[audio_column]
        )
        if pa.types.is_struct(column.type) and column.type.get_field_index("array") >= 0:
            lengths = pc.list_value_length(column.field("array")).to_numpy(zero_copy_only=False)
            rates = (
                column.field("sampling_rate").to_numpy(zero_copy_only=False)
                if column.type.get_field_index("sampling_rate") >= 0
                else np.full(len(lengths), sample_rate)
            )
            seconds.append(np.nan_to_num(lengths.astype(np.float64)) / rates)
            continue
        for value in column.to_pylist():
            try:
                if isinstance(value, dict) and value.get("bytes"):
                    seconds.append([soundfile.info(io.BytesIO(value["bytes"])).duration])
                elif isinstance(value, dict) and value.get("path"):
                    seconds.append([soundfile.info(value["path"]).duration])
                else:
                    seconds.append([soundfile.info(value).duration])
            except (RuntimeError, OSError, TypeError, soundfile.LibsndfileError):
                seconds.append([0.0])  # undecodable: the fit pass reports it when it gets there
    return np.concatenate(seconds) if seconds else np.zeros(0)


def dist_state():
    """accelerate's process state when several processes are running, else ``None``."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    # Without cpu=True, accelerate treats processes started on a machine without GPUs as unrelated.
    state = PartialState(cpu=not torch.cuda.is_available())
    return state if state.num_processes > 1 else None


def block_ranges(num_items: int, chunk_size: int, num_blocks: int) -> list[tuple[int, int]]:
    """Split ``range(num_items)`` into ``num_blocks`` contiguous ranges on chunk boundaries, so every
    process sees exactly the batches a single process would (identical padding, identical labels)."""
    num_chunks = math.ceil(num_items / chunk_size)
    bounds = [min(num_items, (num_chunks * b // num_blocks) * chunk_size) for b in range(num_blocks + 1)]
    return [(bounds[b], bounds[b + 1]) for b in range(num_blocks)]


def default_work_dir(tag: str) -> str:
    """``<HF datasets cache>/delulu_labels/<tag>``: where processes meet when no folder is given."""
    import datasets

    return os.path.join(str(datasets.config.HF_DATASETS_CACHE), "delulu_labels", tag)


class LabelBatch:
    """The function given to ``datasets.map``: decode a batch, label it, report bad items.

    Args:
        extractor: waveforms -> encoder-rate features.
        assign: encoder-rate features ``(M, D)`` -> cluster ids ``(M,)`` (a ``ClusterAssigner``);
            ``None`` for the fit, which passes ``on_features`` instead.
        on_error: ``"raise"`` (``AudioDecodeError`` naming the item) or ``"skip"`` (recorded in ``skipped``).
        on_features: fit only: ``callback(item_indices, aligned, counts, good)`` instead of assignment.
    """

    def __init__(
        self,
        extractor: AlignedFeatureExtractor,
        assign: Callable[[torch.Tensor], torch.Tensor] | None,
        audio_column: str,
        name_column: str | None,
        on_error: str,
        skipped: list[LabelSkip],
        on_features: Callable[[list[int], torch.Tensor, list[int], list[int]], None] | None = None,
    ):
        self.extractor = extractor
        self.assign = assign
        self.audio_column = audio_column
        self.name_column = name_column
        self.on_error = on_error
        self.skipped = skipped
        self.on_features = on_features

    def _bad(self, index: int, name: str, reason: str, error: Exception | None = None) -> None:
        if self.on_error == "raise":
            _, decode_error = _audio_api()
            raise decode_error(f"item {index} ({name}): {reason}") from error
        logger.warning("skipping item %d (%s): %s", index, name, reason)
        self.skipped.append(LabelSkip(int(index), name, reason))

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        load_audio, decode_error = _audio_api()
        audios = batch[self.audio_column]
        names = [
            _item_name(batch, row, index, self.name_column, audios[row]) for row, index in enumerate(indices)
        ]
        waves: list[np.ndarray] = []
        kept: list[int] = []
        for row, (index, audio) in enumerate(zip(indices, audios)):
            try:
                wave = load_audio(
                    audio,
                    sampling_rate=self.extractor.teacher.sample_rate,
                    name=names[row],
                    min_samples=self.extractor.min_samples,
                )
            except decode_error as error:
                self._bad(index, names[row], str(error), error)
                continue
            waves.append(wave)
            kept.append(row)
        ids: list[list[int] | None] = [None] * len(indices)
        for positions, aligned, counts, finite in self.extractor.iter_features(waves):
            rows = [kept[p] for p in positions]
            if self.on_features is not None:
                good = [i for i, ok in enumerate(finite) if ok]
                self.on_features([indices[rows[i]] for i in good], aligned, counts, good)
            else:
                labels = self.assign(aligned).to("cpu", torch.int16).numpy()
                for row, part, ok in zip(rows, np.split(labels, np.cumsum(counts)[:-1]), finite):
                    if ok:
                        ids[row] = part.tolist()
            for row, ok in zip(rows, finite):
                if not ok:
                    self._bad(indices[row], names[row], "the teacher gave non-finite features")
        return {LABEL_COLUMN: ids}
