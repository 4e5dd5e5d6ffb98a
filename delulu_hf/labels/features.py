"""Featurizers: waveforms in, teacher frame features (10 ms frames, centred STFT) out.

The label pipeline clusters the frame features of a ``SpeakerTeacher``: ReDimNet's backbone
frames (the paper's), ReDimNet's embedding head over a window around each frame, or HuBERT's
MFCC control labels (``MFCCFeatures``), which run through the identical pipeline.
``featurizer_provenance`` is what identifies a featurizer in centroid files and cache
fingerprints: a hash of the weights themselves, so re-saving a teacher keeps its identity.
"""

from __future__ import annotations

import hashlib
import json
import os
import typing
from typing import Any, Literal, Union

import torch
from torch import nn

from delulu_hf.errors import UserError
from delulu_hf.teacher.base import SpeakerTeacher

__all__ = [
    "TEACHER_OUTPUTS",
    "MFCCFeatures",
    "TeacherOutput",
    "featurizer_provenance",
    "hop_samples",
    "json_sha256",
    "load_featurizer",
]

PathLike = Union[str, os.PathLike]

#: Which ReDimNet features are clustered: the backbone frames, or the embedding head over a window.
TeacherOutput = Literal["backbone", "window-embedding"]
TEACHER_OUTPUTS: tuple[str, ...] = typing.get_args(TeacherOutput)


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
        raise UserError(f"output must be one of {TEACHER_OUTPUTS}, got {output!r}")
    if isinstance(spec, str) and spec.lower() == "mfcc":
        if output != "backbone":
            raise UserError(f"output={output!r} needs a ReDimNet teacher, not MFCC features")
        featurizer: SpeakerTeacher = MFCCFeatures()
        featurizer.eval()
        return featurizer.to(device) if device is not None else featurizer
    from delulu_hf.teacher import load_teacher
    from delulu_hf.teacher.redimnet import ReDimNet, ReDimNetWindowEmbeddings

    teacher = load_teacher(spec, device=device)
    if output == "window-embedding":
        if not isinstance(teacher, ReDimNet):
            raise UserError(
                f"output='window-embedding' needs a ReDimNet teacher, got {type(teacher).__name__}"
            )
        teacher = ReDimNetWindowEmbeddings(teacher, window_seconds=window_seconds)
    return teacher


def hop_samples(teacher: SpeakerTeacher) -> int:
    """Samples between consecutive teacher frames (160 = 10 ms at 16 kHz)."""
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


def json_sha256(value: Any) -> str:
    """Stable hash of a JSON-able value (keys sorted): the cache keys of fit and map."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


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
        "hop_length": hop_samples(teacher),
        "checkpoint_sha256": _state_dict_sha256(teacher),
    }
    if getattr(teacher, "output_settings", None):
        info["output"] = dict(teacher.output_settings)
    if isinstance(teacher, MFCCFeatures):
        info["settings"] = dict(teacher.settings)
    elif hasattr(config, "to_json_dict"):
        info["config"] = config.to_json_dict()
    return info
