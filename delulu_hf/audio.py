"""The one place where delulu-hf reads audio.

Every stage (teacher, labels, pretraining, evaluation) gets its waveforms from here, so
that decoding, downmixing, resampling and input validation behave the same everywhere.
Decoding uses `soundfile` (libsndfile: WAV, FLAC, OGG/Vorbis, MP3, ...) and never
torchaudio.load or the `datasets` torchcodec decoder, because both need FFmpeg, which a
fresh machine may not have. Datasets are therefore read with `Audio(decode=False)` and the
raw bytes/paths are decoded here.

Output convention: ``float32`` mono numpy arrays at 16 kHz (the DELULU input rate).
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import numpy as np
import soundfile as sf
import torch
import torchaudio

from delulu_hf.configuration_delulu import DeluluConfig, receptive_field
from delulu_hf.errors import UserError

logger = logging.getLogger(__name__)

TARGET_SAMPLING_RATE = 16000
# Receptive field of DELULU's default conv feature encoder at 16 kHz (322 samples; total stride
# 256, 16 ms frames): shorter inputs give the encoder no frame at all. Callers with another
# config pass `min_samples=receptive_field(config)`.
MIN_SAMPLES = receptive_field(DeluluConfig())
# Rates outside this range are almost certainly a corrupt header or a non-audio signal.
MIN_SOURCE_SAMPLING_RATE = 4000
MAX_SOURCE_SAMPLING_RATE = 384000


class AudioDecodeError(UserError):
    """Raised for audio that cannot be used; the message always names the item."""


def _describe(source: Any, name: str | None) -> str:
    """A human-readable name for error messages (the path when there is one)."""
    if name:
        return str(name)
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, Mapping) and source.get("path"):
        return str(source["path"])
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    if isinstance(source, (np.ndarray, torch.Tensor)):
        return f"<array of shape {tuple(source.shape)}>"
    return f"<{type(source).__name__}>"


@lru_cache(maxsize=32)
def _resampler(orig: int, new: int) -> torchaudio.transforms.Resample:
    # The Resample transform precomputes its sinc kernel; caching one per rate pair makes
    # decoding a dataset of same-rate files cost one kernel build instead of one per file.
    return torchaudio.transforms.Resample(orig, new)


def resample(waveform: np.ndarray, orig_sr: int, new_sr: int = TARGET_SAMPLING_RATE) -> np.ndarray:
    """Band-limited resampling of a 1-D float32 array (torchaudio's windowed sinc)."""
    if orig_sr == new_sr:
        return waveform
    with torch.no_grad():
        out = _resampler(int(orig_sr), int(new_sr))(torch.from_numpy(np.ascontiguousarray(waveform)))
    return out.numpy().astype(np.float32, copy=False)


def _to_float(array: np.ndarray, label: str) -> np.ndarray:
    """Integer PCM -> float in [-1, 1); floats are passed through as float32."""
    if array.dtype.kind == "f":
        return array.astype(np.float32, copy=False)
    if array.dtype.kind == "i":
        return (array.astype(np.float32) / float(-np.iinfo(array.dtype).min)).astype(np.float32)
    if array.dtype.kind == "u":
        half = float(np.iinfo(array.dtype).max + 1) / 2
        return ((array.astype(np.float32) - half) / half).astype(np.float32)
    raise AudioDecodeError(f"{label}: unsupported array dtype {array.dtype} (expected float or integer PCM)")


def _downmix(array: np.ndarray, label: str) -> np.ndarray:
    """Average channels. 2-D input may be (channels, samples) or (samples, channels): the
    shorter axis is taken as channels, since real audio has far more samples than channels."""
    if array.ndim == 1:
        return array
    if array.ndim != 2:
        raise AudioDecodeError(f"{label}: expected a 1-D or 2-D audio array, got shape {array.shape}")
    channel_axis = 0 if array.shape[0] < array.shape[1] else 1
    if array.shape[0] == array.shape[1] and array.shape[0] > 1:
        raise AudioDecodeError(f"{label}: ambiguous square audio array of shape {array.shape}")
    return array.mean(axis=channel_axis, dtype=np.float32)


def _decode_file(data: str | os.PathLike | bytes, label: str) -> tuple[np.ndarray, int]:
    """Decode a path or encoded bytes with libsndfile into (float32 (frames, channels), rate)."""
    if isinstance(data, (str, os.PathLike)):
        path = os.fspath(data)
        if not os.path.exists(path):
            raise AudioDecodeError(f"{label}: file not found")
        if os.path.getsize(path) == 0:
            raise AudioDecodeError(f"{label}: empty file (0 bytes)")
        handle: Any = path
    else:
        if len(data) == 0:
            raise AudioDecodeError(f"{label}: empty audio bytes (0 bytes)")
        handle = io.BytesIO(bytes(data))
    try:
        array, sr = sf.read(handle, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as err:
        raise AudioDecodeError(f"{label}: cannot decode audio with soundfile ({err})") from err
    return array, int(sr)


def load_audio(
    source: Any,
    sampling_rate: int = TARGET_SAMPLING_RATE,
    name: str | None = None,
    min_samples: int | None = None,
    *,
    source_sampling_rate: int | None = None,
    max_seconds: float | None = None,
) -> np.ndarray:
    """Read one item of audio as a float32 mono array at `sampling_rate`.

    Args:
        source: a path; encoded bytes (WAV/FLAC/OGG/MP3...); a numpy array or torch tensor
            (then `source_sampling_rate` is required, 2-D arrays are downmixed); or a
            `datasets` Audio dict, either undecoded ``{"path", "bytes"}`` (from
            ``Audio(decode=False)``; bytes win over path) or decoded
            ``{"array", "sampling_rate"}``.
        sampling_rate: output rate; 16 kHz for DELULU.
        name: how to name the item in errors (defaults to the path or a description).
        min_samples: reject outputs shorter than this; ``None`` means `MIN_SAMPLES` (the
            encoder's receptive field, so the encoder yields at least one frame), ``0``
            disables the check.
        source_sampling_rate: the rate of an array `source`.
        max_seconds: optionally reject items longer than this (protects batch memory).

    Raises:
        AudioDecodeError: undecodable/missing/empty input, no samples, too few samples,
            NaN/Inf values, an unsupported sample rate, or a too-long item. The message
            starts with the item's name.
    """
    label = _describe(source, name)
    if isinstance(source, Mapping):
        if source.get("array") is not None:
            source_sampling_rate = source.get("sampling_rate", source_sampling_rate)
            source = source["array"]
        elif source.get("bytes") is not None:
            source = source["bytes"]
        elif source.get("path") is not None:
            source = source["path"]
        else:
            raise AudioDecodeError(f"{label}: audio dict has neither 'array', 'bytes' nor 'path'")

    if isinstance(source, (np.ndarray, torch.Tensor, list)):
        if source_sampling_rate is None:
            raise AudioDecodeError(f"{label}: source_sampling_rate is required for array input")
        array = source.detach().cpu().numpy() if isinstance(source, torch.Tensor) else np.asarray(source)
        if array.size == 0:
            raise AudioDecodeError(f"{label}: empty audio (0 samples)")
        mono = _downmix(_to_float(array, label), label)
        sr = source_sampling_rate
    elif isinstance(source, (str, os.PathLike, bytes, bytearray, memoryview)):
        decoded, sr = _decode_file(source, label)
        if decoded.shape[0] == 0:
            raise AudioDecodeError(f"{label}: empty audio (header is valid but holds 0 samples)")
        mono = decoded[:, 0] if decoded.shape[1] == 1 else decoded.mean(axis=1, dtype=np.float32)
    else:
        raise AudioDecodeError(f"{label}: unsupported audio source type {type(source).__name__}")

    if float(sr) != int(sr) or not MIN_SOURCE_SAMPLING_RATE <= int(sr) <= MAX_SOURCE_SAMPLING_RATE:
        raise AudioDecodeError(
            f"{label}: unsupported sample rate {sr} Hz (supported: integer rates "
            f"{MIN_SOURCE_SAMPLING_RATE}-{MAX_SOURCE_SAMPLING_RATE} Hz)"
        )
    sr = int(sr)
    if not np.isfinite(mono).all():
        bad = int((~np.isfinite(mono)).sum())
        raise AudioDecodeError(f"{label}: contains {bad} NaN/Inf sample(s)")
    if max_seconds is not None and mono.shape[0] > max_seconds * sr:
        raise AudioDecodeError(
            f"{label}: too long ({mono.shape[0] / sr:.1f} s > max_seconds={max_seconds:g} s)"
        )

    out = resample(np.ascontiguousarray(mono, dtype=np.float32), sr, sampling_rate)
    limit = MIN_SAMPLES if min_samples is None else int(min_samples)
    if out.shape[0] < limit:
        raise AudioDecodeError(
            f"{label}: too short: {out.shape[0]} samples at {sampling_rate} Hz, fewer than "
            f"min_samples={limit} (the encoder's receptive field)"
        )
    return out


# --------------------------------------------------------------------------------------
# datasets
# --------------------------------------------------------------------------------------


AUDIO_EXTENSIONS = (".flac", ".wav", ".ogg", ".oga", ".mp3", ".aiff", ".aif", ".au", ".w64", ".caf")
_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow"}
_METADATA_FILES = ("metadata.csv", "metadata.jsonl")


def is_saved_to_disk(path: str) -> bool:
    """A folder written by ``datasets``' ``save_to_disk`` (a ``Dataset`` or a ``DatasetDict``)."""
    return os.path.isdir(path) and (
        os.path.exists(os.path.join(path, "dataset_dict.json"))
        or os.path.exists(os.path.join(path, "state.json"))
    )


def _metadata_file(folder: str) -> str | None:
    for name in _METADATA_FILES:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def _is_local_audiofolder(path: str) -> bool:
    """A folder with metadata.csv/jsonl (at the top or in split subfolders) or audio files,
    and no parquet/arrow files (those go through `datasets.load_dataset`)."""
    if not os.path.isdir(path) or is_saved_to_disk(path):
        return False
    has_audio = False
    for _, _, files in os.walk(path):
        if any(f.endswith((".parquet", ".arrow")) for f in files):
            return False
        has_audio = has_audio or any(
            f in _METADATA_FILES or f.lower().endswith(AUDIO_EXTENSIONS) for f in files
        )
    return has_audio


def has_data_files(path: str) -> bool:
    """A local folder holding parquet/arrow files anywhere below it (``datasets.load_dataset`` reads them)."""
    return os.path.isdir(path) and any(
        f.endswith((".parquet", ".arrow")) for _, _, files in os.walk(path) for f in files
    )


def is_readable_corpus(path: str) -> bool:
    """Whether ``load_audio_dataset`` can read the local folder ``path``: a ``save_to_disk`` folder, an
    audiofolder (audio files or audiofolder metadata), or a folder of parquet/arrow files."""
    return is_saved_to_disk(path) or _is_local_audiofolder(path) or has_data_files(path)


def _load_local_audiofolder(
    root: str, split: str | None, streaming: bool, load_kwargs: dict
) -> tuple[Any, str]:
    """Read an audiofolder's metadata without the `datasets` audiofolder builder, which
    imports torchcodec (FFmpeg) even to store file paths. Returns (dataset, folder that
    ``file_name`` is relative to). A ``<root>/<split>/metadata.csv`` wins over a top-level one."""
    import datasets

    base = root
    meta = None
    if split is not None and os.path.isdir(os.path.join(root, split)):
        base = os.path.join(root, split)
        meta = _metadata_file(base)
    meta = meta or _metadata_file(root)
    if meta is not None:
        builder = "csv" if meta.endswith(".csv") else "json"
        # keep_default_na=False: pandas would otherwise turn texts like "NA" or "None" into NaN.
        extra = {"keep_default_na": False} if builder == "csv" else {}
        ds = datasets.load_dataset(
            builder, data_files=meta, split="train", streaming=streaming, **extra, **load_kwargs
        )
        if "file_name" not in (ds.column_names or []):
            raise UserError(f"{meta}: audiofolder metadata needs a 'file_name' column")
        return ds, os.path.dirname(meta)
    files = sorted(
        os.path.relpath(os.path.join(d, f), base).replace(os.sep, "/")
        for d, _, fs in os.walk(base)
        for f in fs
        if f.lower().endswith(AUDIO_EXTENSIONS)
    )
    ds = datasets.Dataset.from_dict({"file_name": files})
    return (ds.to_iterable_dataset() if streaming else ds), base


def _load_raw(path_or_id: str, streaming: bool, name: str | None, data_files: Any, load_kwargs: dict) -> Any:
    """Open a non-audiofolder source without decoding audio: a (Iterable)Dataset or a dict."""
    import datasets

    if is_saved_to_disk(path_or_id):
        loaded = datasets.load_from_disk(path_or_id)
        if streaming:
            if isinstance(loaded, datasets.DatasetDict):
                return datasets.IterableDatasetDict({k: v.to_iterable_dataset() for k, v in loaded.items()})
            return loaded.to_iterable_dataset()
        return loaded
    if data_files is None and os.path.isfile(path_or_id):
        ext = os.path.splitext(path_or_id)[1].lower()
        if ext not in _FILE_BUILDERS:
            raise UserError(f"{path_or_id}: unsupported dataset file type {ext!r} (use parquet or arrow)")
        return datasets.load_dataset(
            _FILE_BUILDERS[ext], data_files=path_or_id, streaming=streaming, **load_kwargs
        )
    # Folders of parquet/arrow files and Hub ids take the same route as on the Hub; with
    # HF_DATASETS_OFFLINE=1 it works from local data and the cache.
    try:
        return datasets.load_dataset(
            path_or_id, name=name, data_files=data_files, streaming=streaming, **load_kwargs
        )
    except ImportError as err:
        if "torchcodec" not in str(err):
            raise
        raise UserError(
            f"{path_or_id}: datasets needs torchcodec (FFmpeg) to prepare this dataset (an audiofolder "
            "layout); download it and pass the local folder, or use a parquet-based dataset"
        ) from err


def _select_split(loaded: Any, split: str | None, source: str) -> Any:
    """Pick `split`: a real split name, or, for single-split sets that carry a ``split``
    column (like data/demo_corpus), the rows whose column equals it."""
    import datasets

    if not isinstance(loaded, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        ds = loaded
        available: list[str] = []
    elif split is not None and split in loaded:
        return loaded[split]
    elif len(loaded) == 1:
        ds = next(iter(loaded.values()))
        available = list(loaded)
    else:
        raise UserError(f"{source}: choose a split with split=...; available: {sorted(loaded)}")
    if split is None:
        return ds
    if "split" in (ds.column_names or []):
        if isinstance(ds, datasets.Dataset) and split not in (values := ds.unique("split")):
            raise UserError(f"{source}: no split {split!r} (values of the 'split' column: {sorted(values)})")
        return ds.filter(lambda value: value == split, input_columns="split")
    raise UserError(f"{source}: no split {split!r} (available: {available}; no 'split' column either)")


def _find_audio_column(ds: Any, audio_column: str, source: str) -> str:
    import datasets

    features = ds.features or {}
    if audio_column in features or audio_column in (ds.column_names or []):
        return audio_column
    candidates = [k for k, v in features.items() if isinstance(v, datasets.Audio)]
    if len(candidates) == 1:
        return candidates[0]
    raise UserError(f"{source}: no audio column {audio_column!r} (columns: {ds.column_names})")


# How a corpus is read: decoded once into the datasets cache, or decoded item by item where used.
AUDIO_DECODINGS = ("cache", "on-the-fly")


def _with_file_paths(ds: Any, base: str, column: str, streaming: bool) -> Any:
    """An audiofolder's metadata plus `column` = undecoded ``{"bytes", "path"}`` items, the
    absolute path of each ``file_name``: the same shape as any other undecoded source."""
    import datasets

    def add_paths(batch: dict[str, list]) -> dict[str, list]:
        return {column: [{"bytes": None, "path": os.path.join(base, f)} for f in batch["file_name"]]}

    if streaming:
        return ds.map(add_paths, batched=True, batch_size=1000)
    ds = ds.map(add_paths, batched=True, batch_size=1000, desc="Listing audio files")
    return ds.cast_column(column, datasets.Audio(decode=False))


def load_audio_dataset(
    path_or_id: str | os.PathLike,
    split: str | None = None,
    streaming: bool = False,
    *,
    name: str | None = None,
    data_files: Any = None,
    audio_column: str = "audio",
    sampling_rate: int = TARGET_SAMPLING_RATE,
    min_samples: int | None = None,
    max_seconds: float | None = None,
    on_error: str = "raise",
    batch_size: int = 16,
    num_proc: int | None = None,
    decode: bool = True,
    **load_kwargs: Any,
):
    """Load a speech dataset with an `audio_column` holding ``{"array", "sampling_rate", "path"}``.

    Sources:

    * a local **audiofolder**: audio files plus ``metadata.csv``/``metadata.jsonl`` with a
      ``file_name`` column (relative paths), at the top or in per-split subfolders; read with
      the csv/json builders, because the `datasets` audiofolder builder needs torchcodec.
      ``file_name`` is kept, so rows can be matched to trial lists;
    * a folder written by ``save_to_disk`` (its audio column may be ``Audio`` or file paths);
    * a ``.parquet``/``.arrow`` file;
    * anything else ``datasets.load_dataset`` accepts: a local folder of parquet files or a
      Hub dataset id (parquet-based; offline from local data with ``HF_DATASETS_OFFLINE=1``).

    An ``Audio`` column is cast to ``Audio(decode=False)`` and decoded by `load_audio`
    (soundfile, no FFmpeg), downmixed and resampled to `sampling_rate`; all other columns
    are kept. Map-style datasets are decoded once with ``Dataset.map`` (cached and
    fingerprinted like any map, so a second call is free) and formatted so that
    ``audio["array"]`` is a float32 numpy array; streaming datasets decode lazily.

    Args:
        split: a split name, or, for a single-split set with a ``split`` column (like
            ``data/demo_corpus``), the value to keep. ``None``: the only split / all rows.
        on_error: ``"raise"`` stops at the first bad item with an `AudioDecodeError`
            naming it; ``"skip"`` drops bad items with a logged warning each.
        min_samples, max_seconds: passed to `load_audio`.
        decode: ``False`` skips the decoding ``map`` of a map-style dataset: the audio column
            keeps undecoded ``{"bytes", "path"}`` items (an audiofolder gets its file paths),
            and `load_audio` decodes each item where it is used (label map, pretraining
            batches). Nothing decoded is cached, which matters at scale: decoded float32 costs
            ~230 MB per hour of audio. Bad items then surface (named) when first read, and
            `min_samples`/`max_seconds`/`on_error` do not apply here.
        batch_size, num_proc: for the decoding ``map``.
        load_kwargs: passed to ``datasets.load_dataset`` (e.g. ``revision``, ``cache_dir``).
    """
    import datasets

    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    source = os.fspath(path_or_id)
    if data_files is None and _is_local_audiofolder(source):
        ds, folder_base = _load_local_audiofolder(os.path.abspath(source), split, streaming, load_kwargs)
        column = audio_column
        if split is not None and os.path.abspath(folder_base) == os.path.abspath(source):
            ds = _select_split(ds, split, source)
        ds = _with_file_paths(ds, folder_base, column, streaming)
    else:
        ds = _select_split(_load_raw(source, streaming, name, data_files, load_kwargs), split, source)
        column = _find_audio_column(ds, audio_column, source)
        feature = (ds.features or {}).get(column)
        # A string column holds file paths (prepare_labels.py stores on-the-fly corpora that way, so
        # its output does not copy the audio): read it as undecoded audio, like an Audio column.
        if isinstance(feature, datasets.Audio) or (
            isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")
        ):
            ds = ds.cast_column(column, datasets.Audio(decode=False))

    if not decode and not streaming:
        return ds

    def decode_batch(batch: dict[str, list]) -> dict[str, list]:
        items = batch[column]
        keep, audios = [], []
        for i, item in enumerate(items):
            path = item.get("path") if isinstance(item, Mapping) else None
            try:
                array = load_audio(
                    item, sampling_rate, name=path, min_samples=min_samples, max_seconds=max_seconds
                )
            except AudioDecodeError as err:
                if on_error == "raise":
                    raise
                logger.warning("skipping bad audio item: %s", err)
                continue
            keep.append(i)
            audios.append({"array": array, "sampling_rate": sampling_rate, "path": path})
        out = {key: [values[i] for i in keep] for key, values in batch.items() if key != column}
        out[column] = audios
        return out

    features = None
    if ds.features is not None:
        features = datasets.Features({k: v for k, v in ds.features.items() if k != column})
        features[column] = {
            "array": datasets.List(datasets.Value("float32")),
            "sampling_rate": datasets.Value("int64"),
            "path": datasets.Value("string"),
        }
    # Returning every column ourselves lets a batch shrink when on_error="skip".
    map_kwargs: dict[str, Any] = dict(
        batched=True, batch_size=batch_size, remove_columns=ds.column_names, features=features
    )
    if streaming:
        return ds.map(decode_batch, **map_kwargs)
    ds = ds.map(decode_batch, num_proc=num_proc, desc="Decoding audio", **map_kwargs)
    return ds.with_format("numpy", columns=[column], output_all_columns=True)
