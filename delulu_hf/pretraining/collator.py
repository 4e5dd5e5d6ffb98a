"""Items (waveform + cluster ids + batch seed) in, a ``DeluluForPreTraining`` batch out.

The collator does what changes from one epoch to the next: a frame-aligned random crop of each
item and the matching slice of its labels, the denoising corruption (noise, or another utterance
of the batch, at an SNR measured on active speech, labels left those of the clean primary
utterance), padding with attention masks, and span masks from transformers'
``_compute_mask_indices``. Every random draw comes from the batch's seed, never from a global
RNG stream, so a batch is the same whatever process or resumed run makes it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from delulu_hf.augment import NoiseSource, active_rms, mix_at_snr
from delulu_hf.configuration_delulu import feat_extract_output_lengths
from delulu_hf.pretraining.arguments import SAMPLE_RATE

__all__ = ["DeluluPretrainingCollator", "corrupt_item"]


def corrupt_item(
    clean: np.ndarray,
    others: Sequence[np.ndarray],
    rng: np.random.Generator,
    config,
    noise: NoiseSource,
) -> tuple[np.ndarray, dict[str, Any] | None]:
    """Maybe corrupt one cropped utterance, as ``DeluluConfig``'s denoising fields say.

    With probability ``denoise_corruption_prob`` the item is corrupted: by a random crop of another
    utterance of the batch (probability ``denoise_utterance_mix_prob``, covering at most
    ``denoise_mix_max_overlap`` of the primary, at a random position) or else by noise over its
    whole length. The SNR is drawn from ``U(denoise_snr_min_db, denoise_snr_max_db)`` and measured
    on the primary's active speech against the interferer's active speech (utterances) or its full
    power (noise), so pauses do not inflate the noise. Returns the new waveform and a record
    ``{"kind", "snr_db", "start", "length"}`` (+ ``"gain"`` applied to a mixed utterance), or the
    input and ``None`` when left clean (or silent).
    """
    if rng.random() >= config.denoise_corruption_prob:
        return clean, None
    snr_db = float(rng.uniform(config.denoise_snr_min_db, config.denoise_snr_max_db))
    speech_rms = active_rms(clean)
    use_utterance = rng.random() < config.denoise_utterance_mix_prob and len(others) > 0
    if speech_rms == 0.0:
        return clean, None
    if use_utterance:
        other = others[int(rng.integers(len(others)))]
        max_len = max(1, int(config.denoise_mix_max_overlap * len(clean)))
        length = int(min(len(other), rng.integers(max(1, max_len // 4), max_len + 1)))
        src = int(rng.integers(0, len(other) - length + 1))
        piece = np.asarray(other[src : src + length], dtype=np.float32)
        piece_rms = active_rms(piece)
        if piece_rms > 0.0:
            start = int(rng.integers(0, len(clean) - length + 1))
            scale = speech_rms / piece_rms / 10.0 ** (snr_db / 20.0)
            out = clean.copy()
            out[start : start + length] += (piece * scale).astype(np.float32)
            record = {"kind": "utterance", "snr_db": snr_db, "start": start, "length": length, "gain": scale}
            return out, record
    signal_, kind = noise.sample(len(clean), rng, others)
    mixed = mix_at_snr(clean, signal_, snr_db, SAMPLE_RATE, rng=rng)
    return mixed.astype(np.float32), {"kind": kind, "snr_db": snr_db, "start": 0, "length": len(clean)}


@contextlib.contextmanager
def _numpy_global_seed(seed: int):
    """``_compute_mask_indices`` draws from numpy's global RNG; pin it to the batch seed, then restore."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


class DeluluPretrainingCollator:
    """Turns ``PretrainingItems`` outputs into a ``DeluluForPreTraining`` batch.

    Per item: a random crop of ``min(length, max_sample_length)`` samples (or the batch's shortest
    length with ``crop_to_shortest``) starting at a multiple of the encoder hop (256 samples), so
    the crop's encoder frames are exactly the original frames ``k .. k + frames(crop) - 1`` and the
    label crop is ``cluster_ids[k : k + frames(crop)]``; then the denoising corruption
    (``corrupt_item``), optional normalisation, right padding with an ``attention_mask``, labels
    padded with -100, and span masks from ``_compute_mask_indices`` over each item's valid frames.
    All randomness comes from the batch seed.

    Returns a dict with ``input_values`` (B, N) float32, ``attention_mask`` (B, N) long, ``labels``
    (B, T) long, ``mask_time_indices`` (B, T) bool, ``corrupted`` (B,) bool, and the stream position
    ``epoch``/``batch_index`` (python ints, not model inputs).
    """

    def __init__(
        self,
        config,
        max_sample_length: int,
        crop_to_shortest: bool = False,
        noise: NoiseSource | None = None,
        normalize_audio: bool = False,
        corrupt: bool = True,
        keep_clean: bool = False,
    ):
        self.config = config
        self.hop = int(config.inputs_to_logits_ratio)  # samples per encoder frame
        self.max_sample_length = int(max_sample_length)
        self.crop_to_shortest = crop_to_shortest
        self.noise = noise if noise is not None else NoiseSource()
        self.normalize_audio = normalize_audio
        self.corrupt = corrupt and config.denoise_corruption_prob > 0
        self.keep_clean = keep_clean  # distillation: the teacher hears the clean, unnormalised crops

    def crop(self, wave: np.ndarray, labels: np.ndarray, length: int, rng: np.random.Generator, name: str):
        """Frame-aligned random crop of ``length`` samples and the matching label slice."""
        frames = feat_extract_output_lengths(self.config, len(wave))
        if len(labels) != frames:
            raise ValueError(
                f"{name}: {len(labels)} cluster ids for {len(wave)} samples, but the encoder makes {frames} "
                "frames: the labels were made for other audio or another conv stack"
            )
        first = int(rng.integers(0, (len(wave) - length) // self.hop + 1))
        crop_frames = feat_extract_output_lengths(self.config, length)
        return wave[first * self.hop : first * self.hop + length], labels[first : first + crop_frames]

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        # Independent streams, so crops and masks do not depend on the corruption settings.
        streams = np.random.SeedSequence(items[0]["seed"]).spawn(3)
        crop_rng, corrupt_rng, mask_rng = (np.random.default_rng(s) for s in streams)
        lengths = [min(len(it["input_values"]), self.max_sample_length) for it in items]
        if self.crop_to_shortest:
            lengths = [min(lengths)] * len(items)
        crops = [
            self.crop(it["input_values"], it["labels"], n, crop_rng, it["name"])
            for it, n in zip(items, lengths)
        ]
        waves = [w for w, _ in crops]
        corrupted = np.zeros(len(items), dtype=bool)
        if self.corrupt:
            clean = list(waves)
            for i in range(len(waves)):
                others = clean[:i] + clean[i + 1 :]
                waves[i], record = corrupt_item(clean[i], others, corrupt_rng, self.config, self.noise)
                corrupted[i] = record is not None
        if self.normalize_audio:
            waves = [(w - w.mean()) / np.sqrt(w.var() + 1e-7) for w in waves]

        batch_size, longest = len(items), max(lengths)
        num_frames = feat_extract_output_lengths(self.config, longest)
        input_values = np.zeros((batch_size, longest), dtype=np.float32)
        attention_mask = np.zeros((batch_size, longest), dtype=np.int64)
        labels = np.full((batch_size, num_frames), -100, dtype=np.int64)
        frame_mask = np.zeros((batch_size, num_frames), dtype=np.int64)
        for i, (wave, (_, label)) in enumerate(zip(waves, crops)):
            input_values[i, : len(wave)] = wave
            attention_mask[i, : len(wave)] = 1
            labels[i, : len(label)] = label
            frame_mask[i, : len(label)] = 1

        mask_time_indices = None
        cfg = self.config
        if cfg.apply_spec_augment and cfg.mask_time_prob > 0:
            from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices

            with _numpy_global_seed(int(mask_rng.integers(2**32))):
                mask = _compute_mask_indices(
                    (batch_size, num_frames),
                    mask_prob=cfg.mask_time_prob,
                    mask_length=cfg.mask_time_length,
                    attention_mask=torch.from_numpy(frame_mask),
                    min_masks=cfg.mask_time_min_masks,
                )
            mask_time_indices = torch.from_numpy(mask & frame_mask.astype(bool))
        if self.keep_clean:  # as `clean_values` (batch, samples), for delulu_hf.pretraining.distill
            clean_values = np.zeros_like(input_values)
            for i, (wave, _) in enumerate(crops):
                clean_values[i, : len(wave)] = wave
        return {
            **({"clean_values": torch.from_numpy(clean_values)} if self.keep_clean else {}),
            "input_values": torch.from_numpy(input_values),
            "attention_mask": torch.from_numpy(attention_mask),
            "labels": torch.from_numpy(labels),
            "mask_time_indices": mask_time_indices,
            "corrupted": torch.from_numpy(corrupted),
            "epoch": int(items[0]["epoch"]),
            "batch_index": int(items[0]["batch_index"]),
        }
