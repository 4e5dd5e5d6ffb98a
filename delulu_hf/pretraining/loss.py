"""Update-level loss: micro-batches of one optimizer update (all processes) -> the loss each backpropagates.

fairseq normalises HuBERT's loss by the masked frames of the *whole update* (every micro-batch of
every GPU): each frame weighs the same, whatever micro-batch it fell into. Averaging per-micro-batch
means instead (what ``loss.mean()`` per batch, then accumulation and DDP averaging give) weighs a
frame of a short, frame-poor batch more than one of a long batch; with length-bucketed batches the
counts differ a lot. So the loop counts the frames of the update first (the collator has already drawn
the masks, so no forward pass is needed), all-reduces the counts, and each micro-batch then
backpropagates its *summed* frame losses divided by those totals:

    update loss = sum(masked CE) / N_masked + lambda * sum(denoise CE) / N_denoise
                  + w * sum_b(feature_penalty_b * masked_frames_b) / N_masked

(the feature penalty weighted by masked frames, as fairseq's criterion does). Because accelerate
divides each backward loss by the accumulation steps and DDP/FSDP average gradients over processes,
``micro_batch_loss`` returns the micro-batch's share times ``accumulation_steps * num_processes``:
the accumulated, averaged gradient is then exactly the gradient of the update loss, and
1 process x 4 accumulation steps equals 4 processes x 1 on the same items (tested).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["UpdateFrames", "count_update_frames", "layerdrop_seed", "micro_batch_loss"]


@dataclass
class UpdateFrames:
    """Frames of one whole update (all micro-batches, all processes) that each loss term averages over."""

    masked: float
    denoise: float


def _frames(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked, denoise) labelled-frame counts of one collated micro-batch, as the model counts them."""
    labelled = batch["labels"] != -100  # the collator already sets padded frames to -100
    mask = batch.get("mask_time_indices")
    masked = labelled & mask.bool() if mask is not None else torch.zeros_like(labelled)
    corrupted = batch.get("corrupted")
    if corrupted is None:
        denoise = torch.zeros_like(labelled)
    else:
        denoise = labelled & ~masked & corrupted.bool()[:, None]
    return masked.sum(), denoise.sum()


def count_update_frames(batches: Sequence[dict], accelerator=None) -> UpdateFrames:
    """Masked and denoising frames of the update's micro-batches, summed over processes.

    A collective when ``accelerator`` is given: call it on every process, with every process's
    micro-batches of the same update.
    """
    counts = torch.zeros(2, dtype=torch.float64)
    for batch in batches:
        masked, denoise = _frames(batch)
        counts += torch.stack([masked, denoise]).double().cpu()
    if accelerator is not None and accelerator.num_processes > 1:
        counts = accelerator.reduce(counts.to(accelerator.device), reduction="sum").cpu()
    return UpdateFrames(masked=float(counts[0]), denoise=float(counts[1]))


def micro_batch_loss(
    out, frames: UpdateFrames, config, accumulation_steps: int, num_processes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss to backpropagate, this micro-batch's share of the update loss)``.

    ``out`` is a ``DeluluForPreTrainingOutput`` computed with labels; ``config`` its ``DeluluConfig``
    (``denoise_loss_weight``, ``feature_penalty_weight``). The share (detached) summed over the
    micro-batches and processes of the update is the update loss, for logging and the non-finite
    guard.
    """
    masked_frames = max(frames.masked, 1.0)
    share = out.masked_loss_sum / masked_frames
    if config.denoise_loss_weight > 0:
        share = share + config.denoise_loss_weight * out.denoise_loss_sum / max(frames.denoise, 1.0)
    share = config.cluster_loss_weight * share  # 0: distillation alone (delulu_hf.pretraining.distill)
    if config.feature_penalty_weight > 0:
        weight = out.masked_count.to(out.feature_penalty.dtype) / masked_frames
        share = share + config.feature_penalty_weight * out.feature_penalty * weight
    return share * (accumulation_steps * num_processes), share.detach()


def layerdrop_seed(seed: int, step: int, micro_step: int) -> int:
    """The LayerDrop seed of one forward pass: the same on every process (rank-independent), different
    for every update and micro-batch, and reproducible on resume (a function of the step only)."""
    digest = hashlib.sha256(f"layerdrop:{seed}:{step}:{micro_step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)
