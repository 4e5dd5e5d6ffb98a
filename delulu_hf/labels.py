"""Cluster ids for DELULU pretraining: teacher frame features -> k-means -> a ``cluster_ids`` column.

DELULU's targets are k-means clusters of a speaker model's frame-level features (ReDimNet,
10 ms frames), predicted by an encoder with 16 ms frames. This module is the bridge:

1. **Fit** (``fit_centroids``): run the teacher over (a uniform sample of) the corpus in
   length-sorted batches, keep a uniform random sample of at most ``max_frames`` encoder-rate
   frames in flat memory, fit scikit-learn ``MiniBatchKMeans`` with HuBERT's settings, and return
   ``Centroids`` (saved as safetensors with JSON provenance; never pickle).
2. **Map** (``add_cluster_ids``): ``dataset.map(..., batched=True)`` appends ``cluster_ids`` with
   exactly ``feat_extract_output_lengths(config, num_samples)`` ids per item. Assignment is a
   chunked torch distance argmin equal to ``MiniBatchKMeans.predict``. Results are cached under a
   fingerprint of the dataset, centroids, teacher weights and settings, so a re-run is free;
   under ``accelerate launch`` each process labels a contiguous block of batches and the blocks
   are merged through the cache.
3. **Diagnostics** (``cluster_diagnostics``, ``write_report``): occupancy, entropy/perplexity,
   dead and dominant clusters, speaker purity/NMI, and a plot of the frame alignment.

Frame alignment (the classic failure of HuBERT-style pipelines) is explicit: encoder frame ``i``
covers samples ``[i * hop, i * hop + receptive_field)`` and is centred on
``i * hop + receptive_field / 2``; teacher frame ``j`` (centred STFT) is centred on
``j * teacher_hop``. ``alignment="nearest"`` (default) takes the teacher frame whose centre is
nearest; ``"mean"`` averages the teacher frames centred inside the encoder frame's span. The
encoder geometry is read from the config's ``conv_kernel``/``conv_stride`` here rather than
imported from the model module, because data flows one way (labels come before the model); the
tests check it against ``modeling_delulu.feat_extract_output_lengths`` for thousands of lengths.

The control labels of HuBERT (``MFCCFeatures``: 39-d MFCC + deltas at the teacher's 10 ms rate)
run through the identical pipeline.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Union

import numpy as np
import torch
from torch import nn

from delulu_hf.teacher.base import SpeakerTeacher

logger = logging.getLogger(__name__)

__all__ = [
    "ALIGNMENTS",
    "KMEANS_DEFAULTS",
    "LABEL_COLUMN",
    "NORMALIZATIONS",
    "ON_ERROR",
    "AlignedFeatureExtractor",
    "Centroids",
    "ClusterAssigner",
    "EncoderFrames",
    "FrameReservoir",
    "LabelSkip",
    "MFCCFeatures",
    "add_cluster_ids",
    "alignment_index",
    "atomic_save_dataset",
    "cluster_diagnostics",
    "compare_label_features",
    "featurizer_provenance",
    "fit_centroids",
    "label_config_problems",
    "load_featurizer",
    "plot_alignment",
    "plot_occupancy",
    "skipped_items",
    "write_report",
]

LABEL_COLUMN = "cluster_ids"
ALIGNMENTS = ("nearest", "mean")
NORMALIZATIONS = ("none", "l2")
TEACHER_OUTPUTS = ("backbone", "window-embedding")
ON_ERROR = ("raise", "skip")
CENTROIDS_FORMAT = "delulu-centroids"
CENTROIDS_FORMAT_VERSION = 1
# Bumped whenever the labelling arithmetic changes, so stale caches are never reused.
LABELS_VERSION = "1"

# HuBERT's k-means settings (fairseq examples/hubert/simple_kmeans/learn_kmeans.py).
KMEANS_DEFAULTS = {
    "batch_size": 10000,
    "n_init": 20,
    "max_no_improvement": 100,
    "max_iter": 100,
    "init_size": None,
    "reassignment_ratio": 0.0,
    "tol": 0.0,
}

PathLike = Union[str, os.PathLike]


# ---------------------------------------------------------------------------------------------
# Encoder frame geometry and alignment
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EncoderFrames:
    """Geometry of the encoder's convolutional feature extractor (no padding, wav2vec 2.0 style).

    Args:
        conv_kernel: kernel size of each conv layer, e.g. ``(10, 3, 3, 3, 3, 2, 2)``.
        conv_stride: stride of each conv layer, e.g. ``(4, 2, 2, 2, 2, 2, 2)`` (16 ms frames).
    """

    conv_kernel: tuple[int, ...]
    conv_stride: tuple[int, ...]

    def __post_init__(self):
        if len(self.conv_kernel) != len(self.conv_stride) or not self.conv_kernel:
            raise ValueError(f"conv_kernel {self.conv_kernel} and conv_stride {self.conv_stride} must match")

    @classmethod
    def from_config(cls, config: Any) -> EncoderFrames:
        """Read ``conv_kernel``/``conv_stride`` from a ``DeluluConfig`` (or anything that has them)."""
        if isinstance(config, EncoderFrames):
            return config
        return cls(tuple(int(k) for k in config.conv_kernel), tuple(int(s) for s in config.conv_stride))

    @property
    def hop(self) -> int:
        """Samples between consecutive encoder frames (256 = 16 ms at 16 kHz by default)."""
        return math.prod(self.conv_stride)

    @property
    def receptive_field(self) -> int:
        """Samples one encoder frame sees (322 for the default stack)."""
        field, jump = 1, 1
        for kernel, stride in zip(self.conv_kernel, self.conv_stride):
            field += (kernel - 1) * jump
            jump *= stride
        return field

    def num_frames(self, num_samples: int) -> int:
        """Encoder frames for ``num_samples`` samples: the same arithmetic as the model's
        ``_get_feat_extract_output_lengths`` (positive exactly when ``num_samples >= receptive_field``)."""
        n = int(num_samples)
        for kernel, stride in zip(self.conv_kernel, self.conv_stride):
            n = (n - kernel) // stride + 1
        return n

    def centres(self, num_frames: int) -> np.ndarray:
        """Centre of each encoder frame in samples, ``(num_frames,)`` float64."""
        return np.arange(num_frames, dtype=np.float64) * self.hop + self.receptive_field / 2


def alignment_index(
    num_samples: int, frames: EncoderFrames, teacher_hop: int, mode: str = "nearest"
) -> tuple[np.ndarray, np.ndarray]:
    """Which teacher frames feed each encoder frame, and with which weights.

    Teacher frame ``j`` is centred on sample ``j * teacher_hop`` and an item has
    ``1 + num_samples // teacher_hop`` of them (centred STFT).

    Args:
        num_samples: item length in samples.
        frames: encoder geometry.
        teacher_hop: teacher hop in samples (160 = 10 ms).
        mode: ``"nearest"`` (teacher frame with the nearest centre) or ``"mean"`` (uniform average
            of the teacher frames centred inside ``[i * hop, i * hop + receptive_field)``).

    Returns:
        ``index`` ``(num_encoder_frames, width)`` int64 teacher frame indices and ``weight``
        ``(num_encoder_frames, width)`` float32 with rows summing to 1 (padding has weight 0).
    """
    if mode not in ALIGNMENTS:
        raise ValueError(f"alignment must be one of {ALIGNMENTS}, got {mode!r}")
    num_encoder = frames.num_frames(num_samples)
    if num_encoder <= 0:
        raise ValueError(
            f"{num_samples} samples give no encoder frame (the receptive field is {frames.receptive_field})"
        )
    last_teacher = num_samples // teacher_hop
    nearest = np.floor(frames.centres(num_encoder) / teacher_hop + 0.5).astype(np.int64)
    nearest = np.clip(nearest, 0, last_teacher)
    if mode == "nearest":
        return nearest[:, None], np.ones((num_encoder, 1), dtype=np.float32)
    starts = np.arange(num_encoder, dtype=np.int64) * frames.hop
    first = -(-starts // teacher_hop)  # ceil: first teacher centre at or after the span start
    last = np.minimum((starts + frames.receptive_field - 1) // teacher_hop, last_teacher)
    count = last - first + 1
    # A span narrower than a teacher hop may hold no teacher centre: fall back to the nearest one.
    empty = count <= 0
    first = np.where(empty, nearest, first)
    count = np.where(empty, 1, count)
    width = int(count.max())
    offsets = np.arange(width, dtype=np.int64)[None, :]
    valid = offsets < count[:, None]
    index = np.where(valid, first[:, None] + offsets, first[:, None])
    weight = (valid / count[:, None]).astype(np.float32)
    return index, weight


# ---------------------------------------------------------------------------------------------
# Featurizers: the teacher protocol, plus HuBERT's MFCC control
# ---------------------------------------------------------------------------------------------


class MFCCFeatures(SpeakerTeacher):
    """HuBERT's first-iteration targets as a teacher: 13 MFCCs + deltas + delta-deltas (39-d).

    Frames follow the teacher convention (centred STFT, ``1 + N // hop_length`` frames at 10 ms),
    so a control model gets content-style labels through exactly the same alignment, k-means and
    assignment code as the speaker labels. Each item is processed on its own because the reflect
    padding of the STFT and the delta window must see the item's true end, not batch padding:
    that keeps labels independent of how items are batched. Uses ``torchaudio.transforms`` only
    (no FFmpeg).
    """

    name = "mfcc"
    feature_dim = 39

    def __init__(
        self,
        sample_rate: int = 16000,
        hop_length: int = 160,
        win_length: int = 400,
        n_fft: int = 512,
        n_mels: int = 23,
        n_mfcc: int = 13,
    ):
        super().__init__()
        import torchaudio

        self.sample_rate = sample_rate
        self.hop_length = hop_length
        self.settings = {"win_length": win_length, "n_fft": n_fft, "n_mels": n_mels, "n_mfcc": n_mfcc}
        self.feature_dim = 3 * n_mfcc
        # Kaldi-like choices (HuBERT used torchaudio.compliance.kaldi.mfcc): 25 ms window, 23 mel
        # bins, log mel energies before the DCT.
        self.mfcc = torchaudio.transforms.MFCC(
            sample_rate=sample_rate,
            n_mfcc=n_mfcc,
            log_mels=True,
            melkwargs={
                "n_fft": n_fft,
                "win_length": win_length,
                "hop_length": hop_length,
                "n_mels": n_mels,
                "center": True,
                "f_min": 20.0,
            },
        )
        self.deltas = torchaudio.transforms.ComputeDeltas(win_length=5)

    def frame_features(self, waveforms: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """``(batch_size, num_samples)`` float -> ``(batch_size, 1 + num_samples // hop_length, 39)``."""
        batch_size, num_samples = waveforms.shape
        out = waveforms.new_zeros(batch_size, 1 + num_samples // self.hop_length, self.feature_dim)
        for b in range(batch_size):
            n = num_samples if lengths is None else int(lengths[b])
            mfcc = self.mfcc(waveforms[b, :n].float())  # (n_mfcc, frames)
            delta = self.deltas(mfcc)
            feats = torch.cat([mfcc, delta, self.deltas(delta)], dim=0).T
            out[b, : feats.shape[0]] = feats
        return out


def load_featurizer(
    spec: Union[str, PathLike, SpeakerTeacher],
    device: Union[str, torch.device, None] = None,
    output: str = "backbone",
    window_seconds: float = 1.0,
):
    """``"mfcc"`` -> ``MFCCFeatures``; anything else goes to ``delulu_hf.teacher.load_teacher``
    (a ``save_pretrained`` folder, an official ReDimNet ``.pt`` file or a preset name).

    ``output`` picks which ReDimNet features are clustered: ``"backbone"`` (the paper's
    pre-pooling frame features) or ``"window-embedding"`` (the embedding head over a
    ``window_seconds`` window around each frame, ``ReDimNetWindowEmbeddings``).
    """
    if output not in TEACHER_OUTPUTS:
        raise ValueError(f"output must be one of {TEACHER_OUTPUTS}, got {output!r}")
    if isinstance(spec, str) and spec.lower() == "mfcc":
        if output != "backbone":
            raise ValueError(f"output={output!r} needs a ReDimNet teacher, not MFCC features")
        featurizer: SpeakerTeacher = MFCCFeatures()
        featurizer.eval()
        return featurizer.to(device) if device is not None else featurizer
    from delulu_hf.teacher import load_teacher
    from delulu_hf.teacher.redimnet import ReDimNet, ReDimNetWindowEmbeddings

    teacher = load_teacher(spec, device=device)
    if output == "window-embedding":
        if not isinstance(teacher, ReDimNet):
            raise ValueError(
                f"output='window-embedding' needs a ReDimNet teacher, got {type(teacher).__name__}"
            )
        teacher = ReDimNetWindowEmbeddings(teacher, window_seconds=window_seconds)
    return teacher


def _hop_samples(teacher: SpeakerTeacher) -> int:
    hop = getattr(teacher, "hop_length", None)
    if hop is None:
        hop = round(teacher.frame_hop_seconds * teacher.sample_rate)
    return int(hop)


def _state_dict_sha256(module: nn.Module) -> str:
    """Hash of the weights themselves (not of a file), so re-saving a teacher keeps its identity."""
    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{key}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def featurizer_provenance(teacher: SpeakerTeacher) -> dict[str, Any]:
    """What identifies a featurizer in centroid provenance and cache fingerprints."""
    preset = getattr(teacher, "preset", None)
    config = getattr(teacher, "config", None)
    if preset is None and config is not None:
        preset = config.get("preset") if isinstance(config, dict) else getattr(config, "preset", None)
    info = {
        "name": str(teacher.name),
        "class": type(teacher).__name__,
        "preset": preset,
        "feature_dim": int(teacher.feature_dim),
        "sample_rate": int(teacher.sample_rate),
        "hop_length": _hop_samples(teacher),
        "checkpoint_sha256": _state_dict_sha256(teacher),
    }
    if getattr(teacher, "output_settings", None):
        info["output"] = dict(teacher.output_settings)
    if isinstance(teacher, MFCCFeatures):
        info["settings"] = dict(teacher.settings)
    elif hasattr(config, "to_json_dict"):
        info["config"] = config.to_json_dict()
    return info


# ---------------------------------------------------------------------------------------------
# Centroids: safetensors + JSON provenance
# ---------------------------------------------------------------------------------------------


def _centroid_paths(path: PathLike) -> tuple[str, str]:
    path = os.fspath(path)
    if os.path.isdir(path) or not path.endswith(".safetensors"):
        path = os.path.join(path, "centroids.safetensors")
    return path, path[: -len(".safetensors")] + ".json"


def _atomic_write_text(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".safetensors")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def label_config_problems(
    config: Any,
    *,
    k: int | None = None,
    feature_dim: int | None = None,
    teacher_name: str | None = None,
    alignment: str | None = None,
) -> list[str]:
    """Disagreements between a model config's label fields and a labelling run.

    ``DeluluConfig`` records how its targets were made (``num_clusters``, ``label_teacher_name``,
    ``label_feature_dim``, ``label_frame_alignment``); a field set to ``None`` is not checked.
    """
    problems = []
    if config is None:
        return problems
    checks = (
        ("num_clusters", k, "k"),
        ("label_feature_dim", feature_dim, "the feature dim"),
        ("label_teacher_name", teacher_name, "the teacher"),
        ("label_frame_alignment", alignment, "the alignment"),
    )
    for field, value, what in checks:
        expected = getattr(config, field, None)
        if expected is None or value is None:
            continue
        if (int(expected) != int(value)) if isinstance(value, int) else (str(expected) != str(value)):
            problems.append(f"the model config has {field}={expected!r} but {what} is {value!r}")
    return problems


@dataclasses.dataclass
class Centroids:
    """k-means centroids plus where they came from.

    ``centroids`` is ``(k, feature_dim)``, float64 as fitted (or float32). ``provenance`` holds the featurizer identity
    (name, preset, weight hash), feature normalisation, alignment, encoder geometry, k-means
    settings, the scikit-learn version and how many frames/items/seconds the fit used. It travels
    inside the safetensors header and in a ``.json`` sidecar for people.
    """

    centroids: torch.Tensor
    provenance: dict[str, Any]

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[1])

    @property
    def alignment(self) -> str | None:
        return self.provenance.get("alignment")

    @property
    def normalization(self) -> str:
        return self.provenance.get("normalization", "none")

    def sha256(self) -> str:
        array = np.ascontiguousarray(self.centroids.detach().cpu().numpy())
        return hashlib.sha256(array.tobytes() + str(array.shape).encode()).hexdigest()

    def save(self, path: PathLike) -> str:
        """Write ``path`` (a ``.safetensors`` file, or a folder -> ``centroids.safetensors``) and its
        ``.json`` sidecar atomically; returns the safetensors path."""
        tensor_path, json_path = _centroid_paths(path)
        provenance = dict(self.provenance, k=self.k, feature_dim=self.dim, centroids_sha256=self.sha256())
        text = json.dumps(provenance, indent=2, sort_keys=True, default=str)
        metadata = {
            "format": CENTROIDS_FORMAT,
            "format_version": str(CENTROIDS_FORMAT_VERSION),
            "provenance": text,
        }
        _atomic_save_safetensors(
            {"centroids": self.centroids.detach().cpu().contiguous()}, tensor_path, metadata
        )
        _atomic_write_text(json_path, text + "\n")
        return tensor_path

    @classmethod
    def load(cls, path: PathLike) -> Centroids:
        """Read centroids written by ``save`` (safetensors only; nothing is unpickled)."""
        from safetensors import safe_open

        tensor_path, _ = _centroid_paths(path)
        if not os.path.isfile(tensor_path):
            raise FileNotFoundError(f"No centroid file at {tensor_path}")
        with safe_open(tensor_path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != CENTROIDS_FORMAT or "centroids" not in handle.keys():
                raise ValueError(f"{tensor_path} is not a {CENTROIDS_FORMAT} file")
            tensor = handle.get_tensor("centroids")
        if tensor.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"{tensor_path}: centroids must be float32 or float64, got {tensor.dtype}")
        provenance = json.loads(metadata.get("provenance", "{}"))
        if tensor.ndim != 2:
            raise ValueError(f"{tensor_path}: centroids must be 2-D, got shape {tuple(tensor.shape)}")
        return cls(tensor, provenance)

    def check_compatible(
        self,
        *,
        config: Any = None,
        teacher: SpeakerTeacher | None = None,
        teacher_info: dict[str, Any] | None = None,
        alignment: str | None = None,
        normalization: str | None = None,
    ) -> None:
        """Raise ``ValueError`` when these centroids cannot label data for ``config``/``teacher``.

        Called before any audio is touched, so a wrong file costs nothing. Checks: k against the
        config's ``num_clusters``; feature dim against the teacher and ``config.label_feature_dim``;
        teacher name and weights against the fit; alignment and normalisation against the fit and
        ``config.label_frame_alignment``.
        """
        problems = label_config_problems(
            config,
            k=self.k,
            feature_dim=self.dim,
            teacher_name=self.provenance.get("teacher", {}).get("name"),
            alignment=alignment or self.alignment,
        )
        if teacher is not None or teacher_info is not None:
            info = teacher_info if teacher_info is not None else featurizer_provenance(teacher)
            if int(info["feature_dim"]) != self.dim:
                problems.append(
                    f"the teacher {info['name']!r} gives {info['feature_dim']}-d features but the centroids "
                    f"are {self.dim}-d"
                )
            fitted = self.provenance.get("teacher", {})
            if fitted.get("name") and fitted["name"] != info["name"]:
                problems.append(
                    f"the centroids were fitted on {fitted['name']!r} features, not {info['name']!r}"
                )
            elif fitted.get("checkpoint_sha256") and fitted["checkpoint_sha256"] != info["checkpoint_sha256"]:
                problems.append(
                    f"the teacher {info['name']!r} has other weights than the one the centroids were fitted "
                    f"with (sha256 {info['checkpoint_sha256'][:12]} vs {fitted['checkpoint_sha256'][:12]})"
                )
        if alignment is not None and self.alignment is not None and alignment != self.alignment:
            problems.append(
                f"the centroids were fitted on {self.alignment!r}-aligned features, not {alignment!r}"
            )
        if normalization is not None and normalization != self.normalization:
            problems.append(
                f"the centroids were fitted with normalization={self.normalization!r}, not {normalization!r}"
            )
        if problems:
            raise ValueError("Centroids do not match: " + "; ".join(problems) + ".")


# ---------------------------------------------------------------------------------------------
# Assignment: chunked torch argmin, equal to MiniBatchKMeans.predict
# ---------------------------------------------------------------------------------------------


class ClusterAssigner:
    """Nearest-centroid assignment on any device, with ``MiniBatchKMeans.predict``'s arithmetic.

    Like scikit-learn, it ranks ``||c||^2 - 2 x.c`` (``||x||^2`` is constant per row) and takes
    the first minimum. Different BLAS libraries round differently, so rows whose best and second
    best float32 distances lie within ``tie_tolerance`` of each other (relative to
    ``||x||^2 + max ||c||^2``) are re-ranked in float64; the result is the exact nearest centroid,
    which is what ``predict`` returns whenever its own rounding does not flip a near-tie. Exact
    ties (equal centroids) go to the lowest index.

    On GPU the distances are one large GEMM per ``chunk_size`` rows. On CPU, like scikit-learn,
    small chunks (``cpu_chunk_size``) are spread over a thread pool with one GEMM each, which avoids
    the synchronisation of one multi-threaded GEMM; the GEMM goes through oneDNN when torch has it
    (it uses the CPU's widest vector units whatever the vendor), else ``torch.addmm``.

    Args:
        centroids: ``(k, dim)`` tensor.
        device: where the distances run (the features' device by default).
        chunk_size: rows per distance matrix on GPU, bounding memory at ``chunk_size * k`` floats.
        cpu_chunk_size: rows per task on CPU.
        tie_tolerance: relative gap below which a row is re-ranked in float64.
    """

    def __init__(
        self,
        centroids: torch.Tensor,
        device: Union[str, torch.device, None] = None,
        chunk_size: int = 16384,
        cpu_chunk_size: int = 2048,
        tie_tolerance: float = 1e-5,
    ):
        # float32 for the GEMM, the given precision (float64 as fitted) for deciding near-ties.
        self.centroids64 = centroids.detach().double()
        self.centroids = centroids.detach().float()
        if device is not None:
            self.centroids = self.centroids.to(device)
        self.chunk_size = chunk_size
        self.cpu_chunk_size = cpu_chunk_size
        self.tie_tolerance = tie_tolerance
        self._cache: dict[torch.device, dict[str, Any]] = {}

    def _on(self, device: torch.device) -> dict[str, Any]:
        if device not in self._cache:
            c = self.centroids.to(device).contiguous()
            c64 = self.centroids64.to(device).contiguous()
            cache = {"c": c, "c_sq": (c * c).sum(1), "c64": c64, "c64_sq": (c64 * c64).sum(1), "dnn": None}
            cache["c_sq_max"] = cache["c_sq"].max()
            if device.type == "cpu" and torch.backends.mkldnn.is_available():
                try:
                    weight = (-2.0 * c).to_mkldnn()
                    probe = torch.randn(3, c.shape[1])
                    got = torch._C._nn.mkldnn_linear(probe.to_mkldnn(), weight, cache["c_sq"]).to_dense()
                    want = torch.addmm(cache["c_sq"], probe, c.T, beta=1.0, alpha=-2.0)
                    if torch.allclose(got, want, rtol=1e-4, atol=1e-3 * float(want.abs().max())):
                        cache["dnn"] = weight
                except (RuntimeError, AttributeError):  # a torch build without oneDNN linear
                    cache["dnn"] = None
            self._cache[device] = cache
        return self._cache[device]

    def _assign(self, x: torch.Tensor, cache: dict[str, Any]) -> torch.Tensor:
        """Labels of one chunk ``(m, dim)`` float32."""
        if cache["dnn"] is not None:
            dist = torch._C._nn.mkldnn_linear(x.to_mkldnn(), cache["dnn"], cache["c_sq"]).to_dense()
        else:
            dist = torch.addmm(cache["c_sq"], x, cache["c"].T, beta=1.0, alpha=-2.0)
        if dist.shape[1] == 1:
            return torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        # The two smallest distances: the first is the label unless the gap is within rounding, and
        # then the float64 pass below decides (so topk's order among near-equal values never matters).
        best2 = dist.topk(2, dim=1, largest=False)
        labels = best2.indices[:, 0]
        scale = torch.linalg.vector_norm(x, dim=1).square() + cache["c_sq_max"]
        ambiguous = (best2.values[:, 1] - best2.values[:, 0]) <= self.tie_tolerance * scale
        if bool(ambiguous.any()):
            x64 = x[ambiguous].double()
            exact = torch.addmm(cache["c64_sq"], x64, cache["c64"].T, beta=1.0, alpha=-2.0)
            # Equal centroids can still differ in the last bit of a GEMM: distances within float64
            # rounding are a tie, and a tie goes to the lowest index, deterministically.
            slack = 1e-12 * ((x64 * x64).sum(1, keepdim=True) + cache["c64_sq"].max())
            labels[ambiguous] = (exact <= exact.min(1, keepdim=True).values + slack).int().argmax(1)
        return labels

    @torch.inference_mode()
    def __call__(self, features: Union[torch.Tensor, np.ndarray]) -> torch.Tensor:
        """``(num_frames, dim)`` -> ``(num_frames,)`` int64 cluster ids on the features' device."""
        if isinstance(features, np.ndarray):
            features = torch.from_numpy(features)
        if features.ndim != 2 or features.shape[1] != self.centroids.shape[1]:
            raise ValueError(
                f"expected (frames, {self.centroids.shape[1]}) features, got {tuple(features.shape)}"
            )
        device = features.device if self.centroids.device.type == "cpu" else self.centroids.device
        cache = self._on(device)
        chunk = self.cpu_chunk_size if device.type == "cpu" else self.chunk_size
        starts = range(0, features.shape[0], chunk)

        def run(start: int) -> torch.Tensor:
            x = features[start : start + chunk].to(device=device, dtype=torch.float32).contiguous()
            return self._assign(x, cache)

        workers = torch.get_num_threads() if device.type == "cpu" else 1
        if workers > 1 and len(starts) > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=min(workers, len(starts))) as pool:
                parts = list(pool.map(run, starts))
        else:
            parts = [run(start) for start in starts]
        if not parts:
            return torch.empty(0, dtype=torch.long, device=device)
        return torch.cat(parts)


# ---------------------------------------------------------------------------------------------
# Waveforms -> encoder-rate features (the shared front half of fit and map)
# ---------------------------------------------------------------------------------------------


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
        self.teacher_hop = _hop_samples(teacher)
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
        return _json_sha256({"teacher": info, "settings": self.settings(), "version": LABELS_VERSION})


def _json_sha256(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Dataset helpers (decoding, naming, sharding by process)
# ---------------------------------------------------------------------------------------------


def _audio_api():
    from delulu_hf.audio import AudioDecodeError, load_audio

    return load_audio, AudioDecodeError


def _undecoded(dataset, audio_column: str):
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


def _dist_state():
    """accelerate's process state when several processes are running, else ``None``."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    # Without cpu=True, accelerate treats processes started on a machine without GPUs as unrelated.
    state = PartialState(cpu=not torch.cuda.is_available())
    return state if state.num_processes > 1 else None


def _block_ranges(num_items: int, chunk_size: int, num_blocks: int) -> list[tuple[int, int]]:
    """Split ``range(num_items)`` into ``num_blocks`` contiguous ranges on chunk boundaries, so every
    process sees exactly the batches a single process would (identical padding, identical labels)."""
    num_chunks = math.ceil(num_items / chunk_size)
    bounds = [min(num_items, (num_chunks * b // num_blocks) * chunk_size) for b in range(num_blocks + 1)]
    return [(bounds[b], bounds[b + 1]) for b in range(num_blocks)]


def _default_work_dir(tag: str) -> str:
    import datasets

    return os.path.join(str(datasets.config.HF_DATASETS_CACHE), "delulu_labels", tag)


class _LabelBatch:
    """The function given to ``datasets.map``: decode a batch, label it, report bad items."""

    def __init__(
        self,
        extractor: AlignedFeatureExtractor,
        assigner: ClusterAssigner | None,
        audio_column: str,
        name_column: str | None,
        on_error: str,
        skipped: list[LabelSkip],
        on_features=None,
    ):
        self.extractor = extractor
        self.assigner = assigner
        self.audio_column = audio_column
        self.name_column = name_column
        self.on_error = on_error
        self.skipped = skipped
        self.on_features = on_features  # fit: callback(indices, aligned, counts) instead of assignment

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
                labels = self.assigner(aligned).to("cpu", torch.int16).numpy()
                for row, part, ok in zip(rows, np.split(labels, np.cumsum(counts)[:-1]), finite):
                    if ok:
                        ids[row] = part.tolist()
            for row, ok in zip(rows, finite):
                if not ok:
                    self._bad(indices[row], names[row], "the teacher gave non-finite features")
        return {LABEL_COLUMN: ids}


# ---------------------------------------------------------------------------------------------
# Fit
# ---------------------------------------------------------------------------------------------


class FrameReservoir:
    """A uniform random sample of at most ``capacity`` frames from a stream, in flat memory.

    Every frame gets an independent uniform key and the sample is the ``capacity`` frames with
    the smallest keys: reservoir sampling in its random-key form. Unlike Algorithm R it does not
    depend on arrival order, and two reservoirs merge into the reservoir of their union, which is
    how the processes of a multi-process fit combine their samples. Keys come from
    ``(seed, item index)`` so the sample does not depend on how items are split across processes.
    """

    def __init__(self, capacity: int, dim: int):
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.capacity = int(capacity)
        self.dim = int(dim)
        self.keys = np.empty(0, dtype=np.float64)
        self.features: np.ndarray | None = None  # (capacity, dim) float32, pages touched as filled
        self.seen = 0

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, keys: np.ndarray, features: Union[np.ndarray, torch.Tensor]) -> None:
        """Offer frames ``features`` ``(n, dim)`` with keys ``(n,)``."""
        keys = np.asarray(keys, dtype=np.float64)
        self.seen += len(keys)
        if self.features is None:
            self.features = np.empty((self.capacity, self.dim), dtype=np.float32)
        size = len(self.keys)
        if size < self.capacity:  # still filling: the smallest incoming keys take the free rows
            room = self.capacity - size
            order = np.argsort(keys, kind="stable")
            take, rest = order[:room], order[room:]
            self.features[size : size + len(take)] = _rows(features, take)
            self.keys = np.concatenate([self.keys, keys[take]])
            if len(rest) == 0:
                return
            keys, features = keys[rest], _rows(features, rest)
        candidates = np.flatnonzero(keys < self.keys.max())
        if len(candidates) == 0:
            return
        merged = np.concatenate([self.keys, keys[candidates]])
        keep = np.argpartition(merged, self.capacity - 1)[: self.capacity]
        evicted = np.setdiff1d(np.arange(self.capacity), keep[keep < self.capacity])
        incoming = candidates[keep[keep >= self.capacity] - self.capacity]
        self.features[evicted] = _rows(features, incoming)
        self.keys[evicted] = keys[incoming]

    def sort_by_key(self) -> None:
        """Order the sample by key, in place (cycle-following, no second copy of the features).

        k-means draws its mini-batches by row position, so a fixed row order makes the fit
        independent of how many processes collected the sample."""
        order = np.argsort(self.keys, kind="stable")
        features = self.features
        done = np.zeros(len(order), dtype=bool)
        for start in range(len(order)):
            if done[start] or order[start] == start:
                done[start] = True
                continue
            held = features[start].copy()
            position = start
            while True:
                done[position] = True
                source = order[position]
                if source == start:
                    features[position] = held
                    break
                features[position] = features[source]
                position = source
        self.keys = self.keys[order]

    def sample(self) -> np.ndarray:
        """The sampled frames ``(len(self), dim)`` float32 (a view, no copy)."""
        if self.features is None:
            return np.empty((0, self.dim), dtype=np.float32)
        return self.features[: len(self.keys)]

    def save(self, path: str) -> None:
        _atomic_save_safetensors(
            {"keys": torch.from_numpy(self.keys.copy()), "features": torch.from_numpy(self.sample().copy())},
            path,
            {"seen": str(self.seen)},
        )

    def merge_file(self, path: str) -> None:
        from safetensors import safe_open

        with safe_open(path, framework="np") as handle:
            seen = int((handle.metadata() or {}).get("seen", 0))
            keys, features = handle.get_tensor("keys"), handle.get_tensor("features")
        self.add(keys, features)
        self.seen += seen - len(keys)


def _rows(features: Union[np.ndarray, torch.Tensor], index: np.ndarray) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        return (
            features[torch.from_numpy(np.asarray(index, dtype=np.int64)).to(features.device)]
            .float()
            .cpu()
            .numpy()
        )
    return np.asarray(features[index], dtype=np.float32)


def _item_seconds(dataset, audio_column: str, sample_rate: int) -> np.ndarray:
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


def fit_centroids(
    dataset,
    teacher: SpeakerTeacher,
    config: Any,
    *,
    k: int = 256,
    max_frames: int = 250_000,
    fit_hours: float | None = None,
    alignment: str = "nearest",
    normalization: str = "none",
    seed: int = 0,
    kmeans_batch_size: int = KMEANS_DEFAULTS["batch_size"],
    n_init: int = KMEANS_DEFAULTS["n_init"],
    max_no_improvement: int = KMEANS_DEFAULTS["max_no_improvement"],
    max_iter: int = KMEANS_DEFAULTS["max_iter"],
    fit_dtype: str = "float64",
    audio_column: str = "audio",
    name_column: str | None = None,
    on_error: str = "raise",
    chunk_size: int = 64,
    max_batch_seconds: float = 64.0,
    device: Union[str, torch.device, None] = None,
    bf16: bool | None = None,
    work_dir: PathLike | None = None,
    verbose: int = 0,
) -> Centroids:
    """Fit k-means centroids on encoder-rate teacher features of ``dataset``.

    The fit sees the same aligned (and normalised) features that ``add_cluster_ids`` assigns.
    ``fit_hours`` picks a uniform random subset of items with that much audio (map-style datasets:
    by a seeded permutation over soundfile header durations; ``IterableDataset``: a seeded shuffle
    buffer), so only that audio goes through the teacher; ``max_frames`` caps the frames kept
    (``FrameReservoir``), so memory is ``max_frames * dim * 4`` bytes whatever the corpus size
    (briefly 12 bytes per value while the sample is converted for a ``fit_dtype="float64"`` fit,
    the default: scikit-learn's k-means++ is several times slower on float32 input).
    Under ``accelerate launch`` each process extracts features for a block of items and the
    reservoirs are merged on the main process (through ``work_dir``); the fitted centroids are then
    loaded by every process.

    Returns:
        ``Centroids`` with provenance (teacher, alignment, normalisation, k-means settings,
        scikit-learn version, frames/items/seconds used, skipped items).
    """
    import sklearn
    from sklearn.cluster import MiniBatchKMeans

    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    if fit_dtype not in ("float32", "float64"):
        raise ValueError(f"fit_dtype must be 'float32' or 'float64', got {fit_dtype!r}")
    frames = EncoderFrames.from_config(config)
    info = featurizer_provenance(teacher)
    problems = label_config_problems(
        config, k=k, feature_dim=int(teacher.feature_dim), teacher_name=info["name"], alignment=alignment
    )
    if problems:
        raise ValueError("Cannot fit labels for this model config: " + "; ".join(problems) + ".")
    extractor = AlignedFeatureExtractor(
        teacher, frames, alignment, normalization, device, bf16, max_batch_seconds, chunk_size
    )
    state = _dist_state()
    rank, world = (state.process_index, state.num_processes) if state else (0, 1)

    from datasets import IterableDataset

    dataset = _undecoded(dataset, audio_column)
    streaming = isinstance(dataset, IterableDataset)
    if streaming:
        if fit_hours is not None:
            dataset = dataset.shuffle(seed=seed, buffer_size=1000)
        if world > 1:
            from datasets.distributed import split_dataset_by_node

            dataset = split_dataset_by_node(dataset, rank=rank, world_size=world)
        budget = None if fit_hours is None else fit_hours * 3600.0 / world
        selected = None
    else:
        selected = np.arange(len(dataset))
        if fit_hours is not None:
            seconds = _item_seconds(dataset, audio_column, teacher.sample_rate)
            order = np.random.default_rng(seed).permutation(len(dataset))
            enough = np.searchsorted(np.cumsum(seconds[order]), fit_hours * 3600.0) + 1
            selected = np.sort(order[:enough])
        begin, end = _block_ranges(len(selected), chunk_size, world)[rank]
        dataset = dataset.select(selected[begin:end].tolist())
        budget = None

    reservoir = FrameReservoir(max_frames, teacher.feature_dim)
    skipped: list[LabelSkip] = []
    totals = {"items": 0, "seconds": 0.0}

    def collect(item_indices: list[int], aligned: torch.Tensor, counts: list[int], good: list[int]) -> None:
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        for item, g in zip(item_indices, good):
            rows = np.arange(starts[g], starts[g] + counts[g])
            keys = np.random.default_rng([seed, int(item)]).random(len(rows))
            reservoir.add(keys, _rows(aligned, rows))
            totals["items"] += 1
            # Lower bound of the item's length (the column keeps frames, not samples).
            totals["seconds"] += ((counts[g] - 1) * frames.hop + frames.receptive_field) / teacher.sample_rate

    labeler = _LabelBatch(extractor, None, audio_column, name_column, on_error, skipped, on_features=collect)
    from tqdm.auto import tqdm

    progress = tqdm(desc=f"teacher features for k-means (rank {rank})", unit="item", disable=verbose < 0)
    if streaming:
        batch: dict[str, list] = {}
        item_ids: list[int] = []
        for count, example in enumerate(dataset):
            for key, value in example.items():
                batch.setdefault(key, []).append(value)
            item_ids.append(count * world + rank)
            if len(item_ids) == chunk_size:
                labeler(batch, item_ids)
                progress.update(len(item_ids))
                batch, item_ids = {}, []
                if budget is not None and totals["seconds"] >= budget:
                    break
        if item_ids:
            labeler(batch, item_ids)
            progress.update(len(item_ids))
    else:
        positions = selected[begin:end]
        for start in range(0, len(dataset), chunk_size):
            batch = dataset[start : start + chunk_size]
            labeler(batch, positions[start : start + chunk_size].tolist())
            progress.update(len(batch[audio_column]))
    progress.close()

    work_dir = os.fspath(work_dir) if work_dir is not None else None
    if world > 1:
        if work_dir is None:
            tag = _json_sha256(
                [
                    extractor.fingerprint(info),
                    seed,
                    max_frames,
                    fit_hours,
                    k,
                    getattr(dataset, "_fingerprint", None),
                ]
            )
            work_dir = _default_work_dir(f"fit-{tag[:16]}")
        os.makedirs(work_dir, exist_ok=True)
        reservoir.save(os.path.join(work_dir, f"reservoir-{rank}.safetensors"))
        _atomic_write_text(
            os.path.join(work_dir, f"stats-{rank}.json"),
            json.dumps({"totals": totals, "skipped": [dataclasses.asdict(s) for s in skipped]}),
        )
        state.wait_for_everyone()
        centroid_path = os.path.join(work_dir, "centroids.safetensors")
        if rank != 0:
            state.wait_for_everyone()  # the main process fits and saves
            centroids = Centroids.load(centroid_path)
            state.wait_for_everyone()  # everyone has read it; the main process cleans up
            return centroids
        merged = FrameReservoir(max_frames, teacher.feature_dim)
        totals = {"items": 0, "seconds": 0.0}
        skipped = []
        for other in range(world):
            merged.merge_file(os.path.join(work_dir, f"reservoir-{other}.safetensors"))
            with open(os.path.join(work_dir, f"stats-{other}.json")) as handle:
                stats = json.load(handle)
            totals["items"] += stats["totals"]["items"]
            totals["seconds"] += stats["totals"]["seconds"]
            skipped += [LabelSkip(**s) for s in stats["skipped"]]
        reservoir = merged

    reservoir.sort_by_key()
    sample = reservoir.sample()
    frames_used = len(sample)
    if frames_used < k:
        raise ValueError(f"k-means needs at least k={k} frames; the data gave {frames_used}")
    if fit_dtype == "float64":
        # scikit-learn's k-means++ computes float32 distances by upcasting small blocks to float64,
        # which made the n_init=20 initialisation several times slower than on float64 input.
        sample = sample.astype(np.float64)
        reservoir.features = None  # free the float32 copy: peak memory is 12 bytes per value, then 8
    started = time.perf_counter()
    kmeans = MiniBatchKMeans(
        n_clusters=k,
        init="k-means++",
        max_iter=max_iter,
        batch_size=kmeans_batch_size,
        verbose=max(verbose, 0),
        compute_labels=False,
        tol=KMEANS_DEFAULTS["tol"],
        max_no_improvement=max_no_improvement,
        init_size=KMEANS_DEFAULTS["init_size"],
        n_init=n_init,
        reassignment_ratio=KMEANS_DEFAULTS["reassignment_ratio"],
        random_state=seed,
    ).fit(sample)
    inertia = float(-kmeans.score(sample)) / frames_used if frames_used <= 200_000 else None
    provenance = {
        "format_version": CENTROIDS_FORMAT_VERSION,
        "features": "mfcc" if isinstance(teacher, MFCCFeatures) else "teacher",
        "teacher": info,
        "alignment": alignment,
        "normalization": normalization,
        "encoder": {
            "conv_kernel": list(frames.conv_kernel),
            "conv_stride": list(frames.conv_stride),
            "receptive_field": frames.receptive_field,
            "hop": frames.hop,
        },
        "kmeans": {
            "algorithm": "sklearn.cluster.MiniBatchKMeans",
            "sklearn_version": sklearn.__version__,
            "init": "k-means++",
            "batch_size": kmeans_batch_size,
            "n_init": n_init,
            "max_no_improvement": max_no_improvement,
            "max_iter": max_iter,
            "reassignment_ratio": KMEANS_DEFAULTS["reassignment_ratio"],
            "tol": KMEANS_DEFAULTS["tol"],
            "seed": seed,
            "fit_dtype": fit_dtype,
            "n_steps": int(getattr(kmeans, "n_steps_", 0)),
            "mean_squared_distance": inertia,
            "fit_seconds": round(time.perf_counter() - started, 3),
        },
        "frames_used": int(frames_used),
        "frames_seen": int(reservoir.seen),
        "max_frames": int(max_frames),
        "fit_hours": fit_hours,
        "items_used": int(totals["items"]),
        "audio_seconds_used": round(float(totals["seconds"]), 3),
        "bf16": extractor.bf16,
        "processes": world,
        "skipped": [dataclasses.asdict(s) for s in skipped],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    centroids = Centroids(torch.from_numpy(np.ascontiguousarray(kmeans.cluster_centers_)), provenance)
    if world > 1:
        centroids.save(centroid_path)
        state.wait_for_everyone()
        state.wait_for_everyone()
        for other in range(world):  # the per-process samples can be large (max_frames * dim floats)
            for name in (f"reservoir-{other}.safetensors", f"stats-{other}.json"):
                os.remove(os.path.join(work_dir, name))
    return centroids


# ---------------------------------------------------------------------------------------------
# Map
# ---------------------------------------------------------------------------------------------


def add_cluster_ids(
    dataset,
    teacher: SpeakerTeacher,
    centroids: Centroids,
    config: Any,
    *,
    alignment: str | None = None,
    normalization: str | None = None,
    audio_column: str = "audio",
    name_column: str | None = None,
    on_error: str = "raise",
    chunk_size: int = 64,
    max_batch_seconds: float = 64.0,
    device: Union[str, torch.device, None] = None,
    bf16: bool | None = None,
    cache_dir: PathLike | None = None,
    load_from_cache_file: bool = True,
    skipped: list[LabelSkip] | None = None,
):
    """Append ``cluster_ids`` (int16 list, one id per encoder frame) to every item of ``dataset``.

    ``len(item["cluster_ids"]) == feat_extract_output_lengths(config, num_samples)`` for every
    decodable item. A bad item (undecodable, shorter than the receptive field, non-finite teacher
    output) raises ``AudioDecodeError`` naming it (``on_error="raise"``) or gets ``None`` and is
    recorded in ``skipped`` (``on_error="skip"``; ``skipped_items`` finds them later, also in a
    cached result). Centroids are checked against ``config`` and ``teacher`` before any work.

    Map-style datasets are processed with ``Dataset.map(batched=True, batch_size=chunk_size)``
    under a fingerprint of (dataset, centroids, teacher weights, settings): with a disk-backed
    dataset or ``cache_dir`` a second call loads the cached column without running the teacher.
    Under ``accelerate launch`` each process labels a contiguous block of whole chunks, writes it
    to the cache, and every process returns the concatenation. ``IterableDataset`` inputs get a
    lazy ``map`` (split by ``split_dataset_by_node`` when several processes run).

    Args:
        alignment / normalization: default to the ones the centroids were fitted with.
        chunk_size: items per ``map`` batch; items are length-sorted inside a chunk.
        max_batch_seconds: padded audio per teacher call.
        cache_dir: where to cache in-memory datasets (disk-backed ones use their own cache dir).
        skipped: a list that receives a ``LabelSkip`` per bad item labelled in this call.
    """
    from datasets import Dataset, IterableDataset, List, Value, concatenate_datasets

    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    alignment = alignment or centroids.alignment or "nearest"
    normalization = normalization or centroids.normalization
    teacher_info = featurizer_provenance(teacher)
    centroids.check_compatible(
        config=config, teacher_info=teacher_info, alignment=alignment, normalization=normalization
    )
    extractor = AlignedFeatureExtractor(
        teacher, config, alignment, normalization, device, bf16, max_batch_seconds, chunk_size
    )
    if centroids.k > np.iinfo(np.int16).max:
        raise ValueError(f"k={centroids.k} does not fit the int16 cluster_ids column")
    assigner = ClusterAssigner(centroids.centroids, device=extractor.device)
    skipped = skipped if skipped is not None else []
    function = _LabelBatch(extractor, assigner, audio_column, name_column, on_error, skipped)
    original_features = dataset.features
    work = _undecoded(dataset, audio_column)
    features = None
    if work.features is not None:
        features = work.features.copy()
        features[LABEL_COLUMN] = List(Value("int16"))
    state = _dist_state()
    rank, world = (state.process_index, state.num_processes) if state else (0, 1)

    if isinstance(work, IterableDataset):
        if world > 1:
            from datasets.distributed import split_dataset_by_node

            work = split_dataset_by_node(work, rank=rank, world_size=world)
        return work.map(function, batched=True, batch_size=chunk_size, with_indices=True, features=features)
    if not isinstance(work, Dataset):
        raise TypeError(f"expected a datasets Dataset or IterableDataset, got {type(dataset).__name__}")

    fingerprint = _json_sha256(
        {
            "dataset": work._fingerprint,
            "centroids": centroids.sha256(),
            "extractor": extractor.fingerprint(teacher_info),
            "chunk_size": chunk_size,
            "on_error": on_error,
            "audio_column": audio_column,
        }
    )[:32]
    if cache_dir is None and work.cache_files:
        cache_dir = os.path.dirname(work.cache_files[0]["filename"])
    if cache_dir is None and world > 1:
        cache_dir = _default_work_dir("map")

    def run_block(begin: int, end: int) -> Dataset:
        block = work if (begin, end) == (0, len(work)) else work.select(range(begin, end))
        cache_file = None
        if cache_dir is not None:
            os.makedirs(cache_dir, exist_ok=True)
            cache_file = os.path.join(
                os.fspath(cache_dir), f"delulu-labels-{fingerprint}-{begin}-{end}.arrow"
            )
        # with_indices gives positions within the block; shift them to dataset positions for names.
        return block.map(
            lambda batch, indices: function(batch, [begin + i for i in indices]),
            batched=True,
            batch_size=chunk_size,
            with_indices=True,
            features=features,
            new_fingerprint=f"{fingerprint}-{begin}-{end}",
            cache_file_name=cache_file,
            load_from_cache_file=load_from_cache_file,
            desc=f"cluster ids (rank {rank})",
        )

    if len(work) == 0:
        raise ValueError("the dataset is empty: nothing to label")
    blocks = _block_ranges(len(work), chunk_size, world)
    if world == 1:
        labelled = run_block(0, len(work))
    else:
        if blocks[rank][1] > blocks[rank][0]:
            run_block(*blocks[rank])
        state.wait_for_everyone()  # every block is now in the cache; the calls below only load it
        labelled = concatenate_datasets([run_block(b, e) for b, e in blocks if e > b])
    if original_features is not None and original_features.get(audio_column) != labelled.features.get(
        audio_column
    ):
        labelled = labelled.cast_column(audio_column, original_features[audio_column])
    return labelled


def skipped_items(dataset, name_column: str | None = None) -> list[dict[str, Any]]:
    """Items whose ``cluster_ids`` is null (skipped), as ``{"index", "name"}`` dicts.

    Read from the column itself, so it also works on cached results and merged multi-process output.
    """
    import pyarrow.compute as pc

    table = dataset.with_format("arrow")
    found = []
    offset = 0
    for batch in table.iter(batch_size=10_000):
        nulls = np.flatnonzero(pc.is_null(batch[LABEL_COLUMN]).to_numpy(zero_copy_only=False))
        for row in nulls.tolist():
            name = None
            if name_column and name_column in batch.column_names:
                name = str(batch[name_column][row].as_py())
            elif "file_name" in batch.column_names:
                name = str(batch["file_name"][row].as_py())
            found.append({"index": offset + row, "name": name or f"#{offset + row}"})
        offset += batch.num_rows
    return found


# ---------------------------------------------------------------------------------------------
# Diagnostics
# ---------------------------------------------------------------------------------------------


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
    sample_rate: int = 16000,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``occupancy.json``/``.png``, ``alignment.json``/``.png`` and ``report.json`` for a
    labelled map-style dataset; returns the report dict."""
    report_dir = os.fspath(report_dir)
    os.makedirs(report_dir, exist_ok=True)
    frames = EncoderFrames.from_config(config)
    speakers = None
    if speaker_column and speaker_column in dataset.column_names:
        speakers = _iter_column(dataset, speaker_column)
    diagnostics = cluster_diagnostics(_iter_column(dataset, LABEL_COLUMN), centroids.k, speakers)
    _atomic_write_text(os.path.join(report_dir, "occupancy.json"), json.dumps(diagnostics, indent=2) + "\n")
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
        _atomic_write_text(
            os.path.join(report_dir, "alignment.json"), json.dumps(alignment_info, indent=2) + "\n"
        )
    known = {s.index: s for s in skipped}
    skipped_list = [
        dict(item, reason=known[item["index"]].reason if item["index"] in known else None)
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
    _atomic_write_text(
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
        raise ValueError(f"the dataset has no {speaker_column!r} column to score clusters against")
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


def atomic_save_dataset(dataset, path: PathLike) -> None:
    """``dataset.save_to_disk`` into a temporary folder, then swap it into place."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-" + os.path.basename(path))
    dataset.save_to_disk(tmp)
    old = None
    if os.path.exists(path):
        old = tempfile.mkdtemp(dir=parent, prefix=".old-" + os.path.basename(path))
        os.replace(path, os.path.join(old, "data"))
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
