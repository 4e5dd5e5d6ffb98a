"""The frame-level speaker teacher interface.

DELULU's pseudo-labels are k-means clusters of a speaker model's *frame-level* features. The label
pipeline (``delulu_hf.labels``) only needs four facts about that model: the sample rate it expects,
its frame hop, its feature width and a batched ``frame_features`` call. ``SpeakerTeacher`` names
those facts so that any frame-level speaker model can stand in for ReDimNet (the default).

The loader (``load_teacher``) lives beside the ReDimNet port in ``delulu_hf.teacher.redimnet``:
this module imports nothing of the project, so every teacher can import it without a cycle.
"""

from __future__ import annotations

from typing import Union

import torch
from torch import nn

__all__ = ["SpeakerTeacher"]


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
