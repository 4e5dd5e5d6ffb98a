"""Frame alignment: an item's length in samples in, the teacher frames (and weights) behind each encoder frame out.

DELULU's targets come from a teacher with 10 ms frames but are predicted by an encoder with
16 ms frames; misaligning the two is the classic failure of HuBERT-style pipelines, so the mapping
is explicit here. Encoder frame ``i`` covers samples ``[i * hop, i * hop + receptive_field)`` and
is centred on ``i * hop + receptive_field / 2``; teacher frame ``j`` (centred STFT) is centred on
``j * teacher_hop``. ``"nearest"`` (default) takes the teacher frame whose centre is nearest;
``"mean"`` averages the teacher frames centred inside the encoder frame's span. Frame counts and
the receptive field come from ``delulu_hf.configuration_delulu`` (the one frame arithmetic the
model uses), so every item gets exactly as many ids as the encoder has frames.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import numpy as np

from delulu_hf.configuration_delulu import LABEL_FRAME_ALIGNMENTS, feat_extract_output_lengths
from delulu_hf.configuration_delulu import receptive_field as conv_receptive_field

__all__ = ["ALIGNMENTS", "Alignment", "EncoderFrames", "alignment_index"]

#: How teacher frames become encoder frames (``DeluluConfig.label_frame_alignment`` records it): the
#: config's ``LABEL_FRAME_ALIGNMENTS`` is the one list, this is its name here and its ``Literal`` type.
ALIGNMENTS: tuple[str, ...] = LABEL_FRAME_ALIGNMENTS
Alignment = Literal[LABEL_FRAME_ALIGNMENTS]  # type: ignore[valid-type]  # Literal of a tuple = its members


@dataclasses.dataclass(frozen=True)
class EncoderFrames:
    """Geometry of the encoder's convolutional feature extractor (no padding, wav2vec 2.0 style).

    A config-like view (``conv_kernel``/``conv_stride``) that ``feat_extract_output_lengths`` and
    ``receptive_field`` accept in place of a ``DeluluConfig``.

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
        return conv_receptive_field(self)

    def num_frames(self, num_samples: int) -> int:
        """Encoder frames for ``num_samples`` samples (positive exactly when ``num_samples >= receptive_field``)."""
        return int(feat_extract_output_lengths(self, int(num_samples)))

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
