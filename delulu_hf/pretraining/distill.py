"""Clean audio + a teacher in, distillation targets on the encoder's 16 ms frames (and their update loss) out.

DELULU's paper leaves open whether regressing the teacher's frame features directly (DistilHuBERT)
can replace k-means ids of them. ``DeluluForPreTraining`` has the head (``distill_head``, weighted
by ``DeluluConfig.distill_loss_weight``); this module makes what it regresses onto, inside the
training step:

* ``TeacherTargets``: runs the teacher (``delulu_hf.labels.load_featurizer``: ReDimNet backbone
  frames, or its embedding head over a window around each frame) on the *clean* crops the
  collator kept (``clean_values``), aligns its 10 ms frames to the encoder's frames with the label
  pipeline's ``alignment_index`` and standardises them per dimension with statistics measured once
  on the training audio. ``attach(batch)`` swaps ``clean_values`` for ``teacher_targets`` and
  ``distill_frames``.
* ``distill_update_frames`` / ``distill_loss_share``: the regression term of the update-level loss
  (``delulu_hf.pretraining.loss``): summed over frames, divided by the distilled frames of the
  whole update.
* ``setup_distillation``: what ``training/pretrain.py`` calls: ``None`` when the weight is 0, else
  the targets with their statistics loaded from, or measured into, ``output_dir``.

Why in the step and not a stored column of the label map: targets must follow the collator's
random crops and describe the clean primary of a corrupted mix, which the step has in hand; a
stored column costs ``distill_dim * 2 bytes * 62.5 frames/s`` (float16): 86 MB per hour of audio
for 192-d window embeddings (83 GB at 960 h), 1.04 GB per hour for ReDimNet-B6's 2304-d backbone
frames (1.0 TB at 960 h), against a teacher forward pass per batch (measured in
``results/small_scale/README.md``). Statistics are stored as ``distill_targets.safetensors``
(mean, std) + ``distill_targets.json`` (the teacher's provenance, as the centroids' is), next to
the run's checkpoints and the final model.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from delulu_hf.atomic import atomic_save_safetensors, atomic_write_json
from delulu_hf.labels import EncoderFrames, alignment_index, featurizer_provenance, load_featurizer
from delulu_hf.modeling_delulu import distill_frame_selection

logger = logging.getLogger(__name__)

__all__ = [
    "DISTILL_STATS_NAME",
    "Distillation",
    "TeacherTargets",
    "distill_loss_share",
    "distill_update_frames",
    "setup_distillation",
]

DISTILL_STATS_NAME = "distill_targets"  # + .safetensors (mean, std) and .json (provenance)
FORMAT = "delulu-distill-targets"


class TeacherTargets:
    """A frozen teacher that turns clean crops into standardised targets on the encoder's frames."""

    def __init__(self, featurizer, model_config, device: str | torch.device | None = None):
        self.featurizer = featurizer.eval()
        self.config = model_config
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.featurizer.to(self.device)
        self.frames = EncoderFrames.from_config(model_config)
        self.hop = int(getattr(featurizer, "hop_length", 160))
        self.dim = int(featurizer.feature_dim)
        self.mean: torch.Tensor | None = None
        self.std: torch.Tensor | None = None
        self.statistics: dict[str, Any] = {}
        if model_config.distill_dim is not None and int(model_config.distill_dim) != self.dim:
            raise ValueError(
                f"distill_dim is {model_config.distill_dim} but the teacher's {model_config.distill_target} "
                f"features are {self.dim}-d: set distill_dim to {self.dim}"
            )

    @classmethod
    def build(cls, teacher: Any, model_config, device: str | torch.device | None = None) -> TeacherTargets:
        """The teacher named by ``teacher`` (folder, official ``.pt``, preset, or a module) giving
        ``model_config.distill_target`` features."""
        featurizer = load_featurizer(
            teacher,
            device=device,
            output=model_config.distill_target,
            window_seconds=float(model_config.distill_window_seconds),
        )
        return cls(featurizer, model_config, device)

    @property
    def provenance(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": 1,
            "target": self.config.distill_target,
            "window_seconds": float(self.config.distill_window_seconds),
            "alignment": self.config.label_frame_alignment,
            "standardize": bool(self.config.distill_standardize),
            "dim": self.dim,
            "teacher": featurizer_provenance(self.featurizer),
            "statistics": self.statistics,
        }

    @torch.no_grad()
    def raw_features(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``(batch, samples)`` clean audio -> ``(batch, encoder frames, dim)`` float32 teacher features."""
        waveforms = waveforms.to(self.device, torch.float32)
        teacher = self.featurizer.frame_features(waveforms, lengths.to(self.device))
        index, weight = alignment_index(
            waveforms.shape[-1], self.frames, self.hop, self.config.label_frame_alignment
        )
        index = torch.as_tensor(index, device=teacher.device).clamp(max=teacher.shape[1] - 1)
        weight = torch.as_tensor(weight, device=teacher.device, dtype=teacher.dtype)
        aligned = (teacher[:, index] * weight[None, :, :, None]).sum(2)  # (B, T, width, D) -> (B, T, D)
        return aligned.float()

    def targets(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Standardised (when configured) targets ``(batch, encoder frames, dim)``."""
        features = self.raw_features(waveforms, lengths)
        if self.config.distill_standardize:
            if self.mean is None or self.std is None:
                raise RuntimeError("distillation statistics are not set: call fit_statistics or load first")
            features = (features - self.mean.to(features.device)) / self.std.to(features.device)
        return features

    def fit_statistics(
        self, waves: Sequence[np.ndarray], max_seconds: float = 600.0, batch_seconds: float = 64.0
    ) -> TeacherTargets:
        """Per-dimension mean and std of the teacher features over ``waves`` (the first items up to
        ``max_seconds`` of audio; float64 sums), on whole items so no crop edge biases them."""
        total = torch.zeros(self.dim, dtype=torch.float64)
        square = torch.zeros(self.dim, dtype=torch.float64)
        frames = seconds = items = 0
        budget = int(max_seconds * 16000)
        chosen = []
        for wave in waves:
            if seconds * 16000 >= budget:
                break
            chosen.append(np.asarray(wave, dtype=np.float32))
            seconds += len(wave) / 16000
        chosen.sort(key=len)
        start = 0
        while start < len(chosen):
            end = start + 1
            while end < len(chosen) and (end - start + 1) * len(chosen[end]) <= batch_seconds * 16000:
                end += 1
            group = chosen[start:end]
            lengths = torch.tensor([len(w) for w in group])
            padded = torch.zeros(len(group), int(lengths.max()))
            for i, w in enumerate(group):
                padded[i, : len(w)] = torch.from_numpy(np.array(w, dtype=np.float32))
            features = self.raw_features(padded, lengths).double().cpu()
            counts = torch.as_tensor([self.frames.num_frames(int(n)) for n in lengths])
            real = torch.arange(features.shape[1])[None] < counts[:, None]
            picked = features[real]
            total += picked.sum(0)
            square += picked.pow(2).sum(0)
            frames += int(picked.shape[0])
            items += len(group)
            start = end
        if frames < 2:
            raise ValueError("distillation statistics need at least 2 frames of audio")
        mean = total / frames
        std = (square / frames - mean.pow(2)).clamp(min=0).sqrt()
        # A dimension that never varies would be divided by ~0: floor the std at 1e-3 of the median one.
        std = std.clamp(min=max(float(std.median()) * 1e-3, 1e-8))
        self.mean, self.std = mean.float(), std.float()
        self.statistics = {"items": items, "frames": frames, "audio_seconds": round(seconds, 2)}
        return self

    def attach(self, batch: dict[str, Any]) -> dict[str, Any]:
        """A collated batch with ``clean_values`` -> the same batch with ``teacher_targets`` (on the
        teacher's device) and ``distill_frames`` (real frames the loss covers) instead."""
        clean = batch.pop("clean_values", None)
        if clean is None:
            raise ValueError(
                "the batch has no clean_values: build the collator with keep_clean=True for distillation"
            )
        lengths = batch["attention_mask"].sum(-1)
        batch["teacher_targets"] = self.targets(clean, lengths)
        real = batch["labels"] != -100  # the collator's padding marker: exactly the real frames
        batch["distill_frames"] = distill_frame_selection(self.config, real, batch.get("mask_time_indices"))
        return batch

    def save(self, folder: str) -> None:
        """``distill_targets.safetensors`` (mean, std) + ``.json`` (provenance) into ``folder``."""
        os.makedirs(folder, exist_ok=True)
        tensors = {}
        if self.mean is not None and self.std is not None:
            tensors = {"mean": self.mean.contiguous(), "std": self.std.contiguous()}
        else:
            tensors = {"mean": torch.zeros(self.dim), "std": torch.ones(self.dim)}
        atomic_save_safetensors(tensors, os.path.join(folder, DISTILL_STATS_NAME + ".safetensors"))
        atomic_write_json(os.path.join(folder, DISTILL_STATS_NAME + ".json"), self.provenance)

    def load(self, folder: str) -> bool:
        """Read statistics saved by ``save`` if they exist and belong to this teacher and target."""
        from safetensors.torch import load_file

        meta_path = os.path.join(folder, DISTILL_STATS_NAME + ".json")
        tensor_path = os.path.join(folder, DISTILL_STATS_NAME + ".safetensors")
        if not (os.path.isfile(meta_path) and os.path.isfile(tensor_path)):
            return False
        with open(meta_path, encoding="utf-8") as handle:
            meta = json.load(handle)
        mine = self.provenance
        same = all(
            meta.get(k) == mine[k] for k in ("format", "target", "window_seconds", "dim", "standardize")
        )
        same = (
            same and meta.get("teacher", {}).get("checkpoint_sha256") == mine["teacher"]["checkpoint_sha256"]
        )
        if not same:
            raise ValueError(
                f"{meta_path} was made for another teacher or target than this run's; delete it or use "
                "another output_dir"
            )
        tensors = load_file(tensor_path)
        self.mean, self.std = tensors["mean"].float(), tensors["std"].float()
        self.statistics = meta.get("statistics", {})
        return True


def distill_update_frames(batches: Sequence[dict], accelerator=None) -> float:
    """Distilled frames of one update's micro-batches (after ``attach``), summed over processes."""
    count = torch.zeros((), dtype=torch.float64)
    for batch in batches:
        count += batch["distill_frames"].sum().double().cpu()
    if accelerator is not None and accelerator.num_processes > 1:
        count = accelerator.reduce(count.to(accelerator.device), reduction="sum").cpu()
    return float(count)


def distill_loss_share(
    out, frames: float, config, accumulation_steps: int, num_processes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss to backpropagate, share of the update loss)`` of the regression term, normalised by the
    distilled frames of the whole update, scaled as ``delulu_hf.pretraining.micro_batch_loss`` is."""
    share = config.distill_loss_weight * out.distill_loss_sum / max(frames, 1.0)
    return share * (accumulation_steps * num_processes), share.detach()


class Distillation:
    """What ``training/pretrain.py`` holds while distilling: the targets, and sums for the log."""

    def __init__(self, targets: TeacherTargets, device: torch.device):
        self.targets = targets
        self.config = targets.config
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)

    def attach(self, batch: dict[str, Any]) -> dict[str, Any]:
        return self.targets.attach(batch)

    def add_loss(
        self, loss, share, out, frames: float, cfg, accelerator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The micro-batch's cluster loss and share plus the regression term's (and count it for the log)."""
        extra, extra_share = distill_loss_share(
            out, frames, self.config, cfg.gradient_accumulation_steps, accelerator.num_processes
        )
        self.sums += torch.stack(
            [
                out.distill_loss_sum.detach().double(),
                out.distill_cosine_sum.double(),
                out.distill_count.double(),
            ]
        ).to(self.sums.device)
        return loss + extra, share + extra_share

    def log(self, record: dict[str, Any], accelerator) -> None:
        """Add ``distill_loss`` and ``distill_cosine`` (means over the window's distilled frames) to a
        metrics record and make its ``loss`` the weighted total (a collective: call on every process)."""
        loss, cosine, count = accelerator.reduce(self.sums, reduction="sum").tolist()
        self.sums.zero_()
        record["distill_loss"] = loss / max(count, 1.0)
        record["distill_cosine"] = cosine / max(count, 1.0)
        cluster = record.get("masked_loss", 0.0) + self.config.denoise_loss_weight * record.get(
            "denoise_loss", 0.0
        )
        record["loss"] = (
            self.config.cluster_loss_weight * cluster
            + self.config.distill_loss_weight * record["distill_loss"]
            + self.config.feature_penalty_weight * record.get("feature_penalty", 0.0)
        )

    def save(self, folder: str) -> None:
        self.targets.save(folder)


def setup_distillation(cfg, model_config, data, accelerator) -> Distillation | None:
    """The run's distillation (``None`` when ``model_config.distill_loss_weight`` is 0).

    Statistics come from ``output_dir`` when a previous (resumed) run saved them; otherwise the main
    process measures them on up to 10 minutes of training items spread over the corpus and saves
    them, and every process then loads that file, so all processes standardise identically. Sets
    ``model_config.distill_teacher_name`` (and ``distill_dim`` when unset) from the teacher.
    """
    if not model_config.distill_loss_weight > 0:
        return None
    if model_config.distill_dim is None:  # sized by the teacher (validated again when the model is built)
        model_config.distill_dim = int(
            load_featurizer(cfg.teacher, output=model_config.distill_target).feature_dim
        )
    targets = TeacherTargets.build(cfg.teacher, model_config, device=accelerator.device)
    model_config.distill_teacher_name = str(targets.featurizer.name)
    os.makedirs(cfg.output_dir, exist_ok=True)
    if accelerator.is_main_process and not targets.load(cfg.output_dir):
        if model_config.distill_standardize:
            targets.fit_statistics(_training_waves(data))
        targets.save(cfg.output_dir)
    accelerator.wait_for_everyone()
    targets.load(cfg.output_dir)
    logger.info(
        "Distilling %s features of %s (statistics: %s)",
        model_config.distill_target,
        targets.featurizer.name,
        targets.statistics,
    )
    return Distillation(targets, accelerator.device)


def _training_waves(data, limit: int = 400):
    """Decoded waveforms of up to ``limit`` training items spread evenly over the corpus."""
    from delulu_hf.pretraining.data import PretrainingItems

    items = PretrainingItems(data.dataset)
    for index in np.unique(np.linspace(0, len(items) - 1, min(limit, len(items))).astype(int)):
        yield items[(int(index), 0, 0, 0)]["input_values"]
