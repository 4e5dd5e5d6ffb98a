"""The frame-level speaker teacher interface.

DELULU's pseudo-labels are k-means clusters of a speaker model's *frame-level* features. The label
pipeline (``delulu_hf.labels``) only needs four facts about that model: the sample rate it expects,
its frame hop, its feature width and a batched ``frame_features`` call. ``SpeakerTeacher`` names
those facts so that any frame-level speaker model can stand in for ReDimNet (the default).

``load_teacher`` turns a user-facing spec (a folder written by ``save_pretrained``, an official
IDRnD ``.pt`` checkpoint, or a preset name for a randomly initialised model) into a teacher.
"""

from __future__ import annotations

import os
from typing import Union

import torch
from torch import nn

__all__ = ["SpeakerTeacher", "load_teacher"]


class SpeakerTeacher(nn.Module):
    """Base class of frame-level speaker models used as label teachers.

    Subclasses set ``sample_rate`` (Hz), ``hop_length`` (samples between frames), ``feature_dim``
    and ``name``, and implement ``frame_features``. Frames follow the centred-STFT convention:
    a waveform of ``N`` samples gives ``1 + N // hop_length`` frames, frame ``t`` centred on
    sample ``t * hop_length``. That convention is what the label pipeline uses to align teacher
    frames with the encoder's 16 ms frames, so subclasses with another convention must override
    ``frame_lengths``.
    """

    sample_rate: int = 16000
    hop_length: int = 160
    feature_dim: int
    name: str = "teacher"

    @property
    def frame_hop_seconds(self) -> float:
        """Seconds between consecutive frames (0.01 for ReDimNet)."""
        return self.hop_length / self.sample_rate

    def frame_lengths(self, lengths: Union[torch.Tensor, int]) -> Union[torch.Tensor, int]:
        """Number of frames for waveforms of ``lengths`` samples (int or LongTensor, same type out)."""
        if isinstance(lengths, torch.Tensor):
            return torch.div(lengths, self.hop_length, rounding_mode="floor") + 1
        return 1 + int(lengths) // self.hop_length

    def frame_features(self, waveforms: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Frame-level features.

        Args:
            waveforms: ``(batch_size, num_samples)`` float audio at ``sample_rate``, right-padded.
            lengths: ``(batch_size,)`` long, valid samples per item; ``None`` means all are valid.

        Returns:
            ``(batch_size, 1 + num_samples // hop_length, feature_dim)``. Frames beyond an item's
            ``frame_lengths(lengths[i])`` are padding and carry no meaning.
        """
        raise NotImplementedError


def load_teacher(
    spec: Union[str, os.PathLike, SpeakerTeacher],
    device: Union[str, torch.device, None] = None,
    **overrides,
) -> SpeakerTeacher:
    """Build a teacher from ``spec`` and put it in eval mode.

    ``spec`` may be an existing ``SpeakerTeacher`` (returned as is), a folder written by
    ``ReDimNet.save_pretrained`` (``config.json`` + ``model.safetensors``), an official ReDimNet
    ``.pt`` checkpoint (read with ``weights_only=True``), or a preset name such as ``"b0"``
    (random weights: only useful for tests and smoke runs, since the features carry no speaker
    information). ``overrides`` are passed to ``ReDimNet.from_preset`` for preset names.
    """
    from delulu_hf.redimnet import PRESETS, ReDimNet

    if isinstance(spec, SpeakerTeacher):
        teacher = spec
    else:
        text = os.fspath(spec)
        if os.path.isdir(text):
            teacher = ReDimNet.from_pretrained(text)
        elif os.path.isfile(text):
            teacher = ReDimNet.from_official_checkpoint(text)
        elif text.lower() in PRESETS:
            teacher = ReDimNet.from_preset(text.lower(), **overrides)
        else:
            raise ValueError(
                f"Unknown teacher {text!r}: expected a folder saved with save_pretrained, an official "
                f"ReDimNet .pt file, or one of the presets {sorted(PRESETS)}."
            )
    teacher.eval()
    if device is not None:
        teacher.to(device)
    return teacher
