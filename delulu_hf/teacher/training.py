"""Training a ReDimNet teacher on a speaker-labelled corpus (the recipe of wespeaker, made small).

Used by ``training/train_teacher.py``. The pieces, each usable alone:

* ``AAMSoftmax``: additive angular margin softmax (ArcFace; margin 0.2, scale 30), the loss ReDimNet
  was trained with. The margin is ramped up from 0 so early training is not stuck on an unreachable
  target.
* ``CropCollator``: one random crop length per batch (2-3 s), a random crop of every utterance
  (short ones are tiled), optional speed perturbation in which each speed is a *new* speaker (a sped-up
  voice is a different voice, as in wespeaker), and additive noise at a random SNR (noise files,
  generated coloured noise, or babble from the rest of the batch).
* ``train_teacher``: the loop. Accelerate handles devices and checkpoints (``save_state`` /
  ``load_state``, so a killed run resumes at its last checkpoint with optimizer, scheduler and RNG
  state); at the end the model is saved in our format and the official ``.pt`` layout and scored on
  held-out speakers' verification trials.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchaudio
from torch import nn

from delulu_hf.atomic import atomic_write, atomic_write_json, fsync_tree, replace_dir
from delulu_hf.augment import coloured_noise, fit_length, mix_at_snr
from delulu_hf.teacher.redimnet import ReDimNet

logger = logging.getLogger(__name__)

__all__ = [
    "AAMSoftmax",
    "CropCollator",
    "NoiseAugmenter",
    "TeacherTrainingConfig",
    "embed_utterances",
    "equal_error_rate",
    "evaluate_trials",
    "read_trials",
    "train_teacher",
]


# --------------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------------


class AAMSoftmax(nn.Module):
    """Additive angular margin softmax: logits ``s * cos(theta_y + m)`` for the true class, ``s * cos``
    for the others, over L2-normalised embeddings and class centres."""

    def __init__(self, embed_dim: int, num_classes: int, margin: float = 0.2, scale: float = 30.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, embed_dim))
        nn.init.xavier_uniform_(self.weight)
        self.margin = margin
        self.scale = scale

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, margin: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(loss, logits)``; ``margin`` overrides the configured one (for the ramp-up)."""
        m = self.margin if margin is None else margin
        cosine = F.linear(F.normalize(embeddings), F.normalize(self.weight)).clamp(-1 + 1e-7, 1 - 1e-7)
        sine = torch.sqrt(1.0 - cosine * cosine)
        phi = cosine * math.cos(m) - sine * math.sin(m)  # cos(theta + m)
        # Past theta = pi - m, cos(theta + m) stops decreasing; continue it linearly so the target logit
        # stays monotonic in theta (the standard ArcFace fix).
        phi = torch.where(cosine > math.cos(math.pi - m), phi, cosine - math.sin(math.pi - m) * m)
        one_hot = F.one_hot(labels, cosine.shape[1]).bool()
        logits = self.scale * torch.where(one_hot, phi, cosine)
        return F.cross_entropy(logits, labels), logits


# --------------------------------------------------------------------------------------------------
# Augmentation and batching
# --------------------------------------------------------------------------------------------------


@dataclass
class NoiseAugmenter:
    """Adds noise at a random SNR to a fraction of the crops.

    Sources, chosen uniformly among those available: the given noise recordings, generated coloured
    noise, and babble (a sum of 3-5 other crops of the batch, as MUSAN's babble does with speech).
    """

    noises: list[np.ndarray] = field(default_factory=list)
    prob: float = 0.6
    snr_db: tuple[float, float] = (0.0, 15.0)
    babble_snr_db: tuple[float, float] = (13.0, 20.0)

    def __call__(self, crops: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
        out = []
        kinds = ["coloured", "babble"] + (["file"] if self.noises else [])
        for i, crop in enumerate(crops):
            if rng.random() >= self.prob:
                out.append(crop)
                continue
            kind = kinds[int(rng.integers(len(kinds)))]
            snr = self.snr_db
            if kind == "file":
                noise = self.noises[int(rng.integers(len(self.noises)))]
            elif kind == "babble" and len(crops) > 2:
                others = [j for j in range(len(crops)) if j != i]
                picks = rng.choice(others, size=min(len(others), int(rng.integers(3, 6))), replace=False)
                noise = np.sum([crops[j] for j in picks], axis=0)
                snr = self.babble_snr_db
            else:
                noise = coloured_noise(len(crop), float(rng.choice([0.0, 1.0, 2.0])), rng)
            # Crops are (nearly) all speech: whole-signal power is the speech level, no VAD needed.
            out.append(mix_at_snr(crop, noise, float(rng.uniform(*snr)), rng=rng, level="power"))
        return out


class CropCollator:
    """Turns ``(waveform, speaker_index)`` items into a batch of equal-length random crops.

    With ``speeds`` (e.g. ``(1.0, 0.9, 1.1)``) each item is played at a random speed and its label
    becomes ``speaker + k * num_speakers`` for the k-th speed, so the classifier has
    ``num_speakers * len(speeds)`` classes.
    """

    def __init__(
        self,
        num_speakers: int,
        crop_seconds: tuple[float, float] = (2.0, 3.0),
        sample_rate: int = 16000,
        speeds: Sequence[float] = (1.0,),
        augmenter: NoiseAugmenter | None = None,
        seed: int = 0,
    ) -> None:
        if not speeds or speeds[0] != 1.0:
            raise ValueError(f"speeds must start with 1.0 (the original identities), got {speeds}")
        self.num_speakers = num_speakers
        self.crop_seconds = crop_seconds
        self.sample_rate = sample_rate
        self.speeds = tuple(speeds)
        self.augmenter = augmenter
        self.rng = np.random.default_rng(seed)

    @property
    def num_classes(self) -> int:
        return self.num_speakers * len(self.speeds)

    def _speed(self, wave: np.ndarray, speed: float, length: int) -> np.ndarray:
        """Crop ``speed * length`` samples and resample them to ``length``: tempo and pitch change."""
        source = fit_length(wave, int(round(length * speed)) + 1, self.rng)
        orig = int(round(self.sample_rate * speed))
        out = torchaudio.functional.resample(torch.tensor(source), orig, self.sample_rate)
        out = out.numpy()
        return np.pad(out, (0, max(0, length - len(out))))[:length].astype(np.float32)

    def __call__(self, items: list[tuple[np.ndarray, int]]) -> dict[str, torch.Tensor]:
        length = int(self.rng.uniform(*self.crop_seconds) * self.sample_rate)
        crops, labels = [], []
        for wave, speaker in items:
            k = int(self.rng.integers(len(self.speeds)))
            if k == 0:
                crops.append(fit_length(wave, length, self.rng).astype(np.float32))
            else:
                crops.append(self._speed(wave, self.speeds[k], length))
            labels.append(speaker + k * self.num_speakers)
        if self.augmenter is not None:
            crops = self.augmenter(crops, self.rng)
        return {
            "waveforms": torch.from_numpy(np.stack(crops)),
            "labels": torch.tensor(labels, dtype=torch.long),
        }


class _UtteranceDataset(torch.utils.data.Dataset):
    def __init__(self, waves: list[np.ndarray], speakers: list[int]) -> None:
        self.waves, self.speakers = waves, speakers

    def __len__(self) -> int:
        return len(self.waves)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.waves[i], self.speakers[i]


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


def equal_error_rate(scores: Sequence[float], labels: Sequence[int]) -> float:
    """EER from sklearn's ROC, linearly interpolated where FNR and FPR cross.

    A local copy rather than ``delulu_hf.evaluation.metrics.compute_eer`` because the teacher sits
    before evaluation in the package's data flow; both rest on ``sklearn.metrics.roc_curve``.
    """
    from sklearn.metrics import roc_curve

    labels = np.asarray(labels, dtype=int)
    if labels.min() == labels.max():
        raise ValueError("EER needs both target (1) and non-target (0) trials")
    fpr, tpr, _ = roc_curve(labels, np.asarray(scores, dtype=np.float64))
    fnr = 1.0 - tpr
    i = int(np.flatnonzero(fnr - fpr <= 0)[0])
    if i == 0 or fnr[i] == fpr[i]:
        return float(fpr[i])
    d0, d1 = fnr[i - 1] - fpr[i - 1], fnr[i] - fpr[i]
    t = d0 / (d0 - d1)
    return float(fpr[i - 1] + t * (fpr[i] - fpr[i - 1]))


@torch.inference_mode()
def embed_utterances(
    model: ReDimNet, waves: Sequence[np.ndarray], batch_size: int = 16, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """L2-normalised embeddings of whole utterances; batches of similar length to waste little padding."""
    was_training = model.training
    model.eval()
    order = np.argsort([len(w) for w in waves])
    out = torch.empty(len(waves), model.config.embed_dim)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        lengths = torch.tensor([len(waves[i]) for i in idx])
        batch = torch.zeros(len(idx), int(lengths.max()))
        for row, i in enumerate(idx):
            batch[row, : len(waves[i])] = torch.tensor(waves[i], dtype=torch.float32)
        emb = model(batch.to(device), lengths.to(device))
        out[torch.as_tensor(idx)] = F.normalize(emb.float(), dim=-1).cpu()
    model.train(was_training)
    return out


def read_trials(path: str) -> list[tuple[str, str, int]]:
    """``enroll_file,test_file,target`` rows of a trials CSV."""
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        needed = {"enroll_file", "test_file", "target"}
        if not needed <= set(reader.fieldnames or []):
            raise ValueError(f"{path}: trials need columns {sorted(needed)}, found {reader.fieldnames}")
        return [(r["enroll_file"], r["test_file"], int(r["target"])) for r in reader]


def evaluate_trials(
    model: ReDimNet,
    waves_by_file: dict[str, np.ndarray],
    trials: list[tuple[str, str, int]],
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Cosine-scored verification EER over ``trials`` (file names index ``waves_by_file``)."""
    missing = sorted({f for e, t, _ in trials for f in (e, t)} - set(waves_by_file))
    if missing:
        raise ValueError(f"{len(missing)} trial files have no audio, e.g. {missing[:3]}")
    names = sorted(waves_by_file)
    emb = embed_utterances(model, [waves_by_file[n] for n in names], device=device)
    index = {n: i for i, n in enumerate(names)}
    scores = [float(emb[index[e]] @ emb[index[t]]) for e, t, _ in trials]
    labels = [target for _, _, target in trials]
    return {"eer": equal_error_rate(scores, labels), "num_trials": len(trials)}


# --------------------------------------------------------------------------------------------------
# Training loop
# --------------------------------------------------------------------------------------------------


@dataclass
class TeacherTrainingConfig:
    """Everything a run needs; ``training/train_teacher.py`` exposes each field as a flag (the help
    texts below are what ``--help`` shows)."""

    data: str = field(metadata={"help": "dataset path or Hub id with audio + speaker columns"})
    output_dir: str = field(metadata={"help": "final model, official .pt, summary and loss plot"})
    preset: str = field(default="b0", metadata={"help": "ReDimNet size: b0 ... b6"})
    model_overrides: dict[str, Any] = field(default_factory=dict)  # ReDimNetConfig fields, e.g. C: 8
    train_split: str = field(default="train", metadata={"help": "split holding the training speakers"})
    speaker_column: str = field(default="speaker_id", metadata={"help": "column naming each item's speaker"})
    eval_split: str | None = field(default="test", metadata={"help": "split holding the trial files"})
    trials: str | None = field(
        default=None, metadata={"help": "CSV enroll_file,test_file,target for the held-out EER"}
    )
    noise_dir: str | None = field(
        default=None, metadata={"help": "folder of noise recordings for augmentation"}
    )
    checkpoint_dir: str | None = field(default=None, metadata={"help": "none: <output_dir>/checkpoints"})
    max_steps: int = field(default=300, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=32, metadata={"help": "crops per step"})
    learning_rate: float = field(default=2e-3, metadata={"help": "peak learning rate"})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay"})
    warmup_steps: int = field(default=30, metadata={"help": "linear learning-rate warmup steps"})
    margin: float = field(default=0.2, metadata={"help": "AAM-softmax margin"})
    scale: float = field(default=30.0, metadata={"help": "AAM-softmax scale"})
    margin_warmup_fraction: float = field(
        default=0.3, metadata={"help": "fraction of the run over which the margin ramps up from 0"}
    )
    crop_seconds: tuple[float, float] = field(
        default=(2.0, 3.0), metadata={"help": "MIN MAX crop length in seconds (one per batch)"}
    )
    speeds: tuple[float, ...] = field(
        default=(1.0,), metadata={"help": "e.g. 1.0 0.9 1.1: speed perturbation (1.0 first)"}
    )
    noise_prob: float = field(default=0.6, metadata={"help": "share of crops that get noise"})
    grad_clip: float = field(default=5.0, metadata={"help": "gradient norm clip"})
    save_every: int = field(default=100, metadata={"help": "checkpoint every N steps"})
    keep_checkpoints: int = field(default=2, metadata={"help": "newest checkpoints kept"})
    log_every: int = field(default=10, metadata={"help": "log the loss every N steps"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    # torch intra-op threads (None: torch's default). On a CPU shared with other jobs, 1 is often several
    # times faster than the default, whose oneDNN worker threads spin against the other jobs.
    num_threads: int | None = field(
        default=None, metadata={"help": "torch intra-op threads; 1 is often fastest on a shared CPU"}
    )
    save_official: bool = field(
        default=True, metadata={"help": "also save the official-layout .pt (--no_save_official: skip it)"}
    )
    resume: bool = field(
        default=True, metadata={"help": "continue from the newest checkpoint (--no_resume: start afresh)"}
    )

    def __post_init__(self) -> None:
        # Command lines give lists; the run and its summary use tuples.
        self.crop_seconds = tuple(float(v) for v in self.crop_seconds)
        self.speeds = tuple(float(v) for v in self.speeds)
        if len(self.crop_seconds) != 2:
            raise ValueError(f"crop_seconds needs two values (MIN MAX), got {list(self.crop_seconds)}")


class _Progress:
    """Step counter and loss history, kept as ``progress.json`` inside each checkpoint folder (JSON rather
    than ``register_for_checkpointing``, whose pickle accelerate reloads with ``weights_only=False``)."""

    def __init__(self) -> None:
        self.step = 0
        self.losses: list[float] = []

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "losses": list(self.losses)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.losses = [float(v) for v in state["losses"]]


def _load_split(
    data: str, split: str, speaker_column: str | None
) -> tuple[list[np.ndarray], list[Any], list[str]]:
    from delulu_hf.audio import load_audio_dataset

    ds = load_audio_dataset(data, split=split)
    waves, speakers, names = [], [], []
    for row in ds:
        waves.append(np.asarray(row["audio"]["array"], dtype=np.float32))
        speakers.append(row[speaker_column] if speaker_column else None)
        names.append(row.get("file_name") or row["audio"].get("path") or str(len(names)))
    if not waves:
        raise ValueError(f"{data}: split {split!r} is empty")
    return waves, speakers, names


def _load_noises(noise_dir: str | None, split: str = "train") -> list[np.ndarray]:
    """Noise recordings of ``noise_dir``; with a ``metadata.csv`` that has a ``split`` column (as in
    ``data/demo_noise``), only the ``split`` rows, so test-side noise never reaches training."""
    if not noise_dir:
        return []
    from delulu_hf.audio import load_audio

    metadata = os.path.join(noise_dir, "metadata.csv")
    files: list[str] = []
    if os.path.isfile(metadata):
        with open(metadata, newline="") as fh:
            rows = list(csv.DictReader(fh))
        if rows and "file_name" in rows[0]:
            files = [
                os.path.join(noise_dir, r["file_name"])
                for r in rows
                if r.get("split", split) in (split, None)
            ]
    if not files:
        files = sorted(
            os.path.join(root, f)
            for root, _dirs, names in os.walk(noise_dir)
            for f in names
            if f.lower().endswith((".flac", ".wav", ".ogg"))
        )
    if not files:
        raise ValueError(f"noise_dir {noise_dir!r} holds no .flac/.wav/.ogg files")
    return [load_audio(f) for f in files]


def _latest_checkpoint(checkpoint_dir: str) -> str | None:
    if not os.path.isdir(checkpoint_dir):
        return None
    steps = sorted(
        (int(m.group(1)), d) for d in os.listdir(checkpoint_dir) if (m := re.fullmatch(r"step_(\d+)", d))
    )
    return os.path.join(checkpoint_dir, steps[-1][1]) if steps else None


def _save_checkpoint(accelerator: Any, checkpoint_dir: str, progress: _Progress, keep: int) -> None:
    """``save_state`` (model, optimizer, scheduler, RNG) plus ``progress.json`` into a temporary folder
    renamed into place, so a crash never leaves half a checkpoint."""
    final = os.path.join(checkpoint_dir, f"step_{progress.step:07d}")
    tmp = os.path.join(checkpoint_dir, f".tmp_step_{progress.step:07d}")
    shutil.rmtree(tmp, ignore_errors=True)
    accelerator.save_state(tmp)
    if accelerator.is_main_process:
        atomic_write_json(os.path.join(tmp, "progress.json"), progress.state_dict(), sort_keys=False)
        fsync_tree(tmp)
        replace_dir(tmp, final)
        old = sorted(d for d in os.listdir(checkpoint_dir) if re.fullmatch(r"step_\d+", d))
        for d in old[:-keep] if keep > 0 else []:
            shutil.rmtree(os.path.join(checkpoint_dir, d), ignore_errors=True)


def _plot_losses(losses: list[float], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(np.arange(1, len(losses) + 1), losses, lw=0.8, alpha=0.5, label="step")
    if len(losses) >= 10:
        k = max(5, len(losses) // 30)
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax.plot(np.arange(k, len(losses) + 1), smooth, lw=1.5, label=f"mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("AAM-softmax loss")
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def train_teacher(config: TeacherTrainingConfig) -> dict[str, Any]:
    """Train a ReDimNet on ``config.train_split`` and return a summary (losses, held-out EER, paths).

    Writes to ``output_dir``: ``config.json`` + ``model.safetensors`` (``ReDimNet.from_pretrained``),
    ``redimnet-official.pt`` (official layout, unless ``save_official=False``), ``train_summary.json``
    and ``loss.png``. Checkpoints go to ``checkpoint_dir``; a rerun with ``resume=True`` continues from
    the newest one.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_polynomial_decay_schedule_with_warmup

    started = time.time()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    accelerator = Accelerator()
    set_seed(config.seed)
    checkpoint_dir = config.checkpoint_dir or os.path.join(config.output_dir, "checkpoints")
    os.makedirs(config.output_dir, exist_ok=True)

    waves, speaker_names, _ = _load_split(config.data, config.train_split, config.speaker_column)
    speaker_ids = sorted(set(map(str, speaker_names)))
    index = {s: i for i, s in enumerate(speaker_ids)}
    speakers = [index[str(s)] for s in speaker_names]
    if len(speaker_ids) < 2:
        raise ValueError(f"{config.data}: need at least 2 training speakers, found {len(speaker_ids)}")
    logger.info("training on %d utterances of %d speakers", len(waves), len(speaker_ids))

    augmenter = (
        NoiseAugmenter(_load_noises(config.noise_dir), prob=config.noise_prob)
        if config.noise_prob > 0
        else None
    )
    collator = CropCollator(
        len(speaker_ids), tuple(config.crop_seconds), 16000, tuple(config.speeds), augmenter, config.seed
    )
    loader = torch.utils.data.DataLoader(
        _UtteranceDataset(waves, speakers),
        batch_size=min(config.batch_size, len(waves)),
        shuffle=True,
        drop_last=True,
        collate_fn=collator,
    )

    model = ReDimNet.from_preset(config.preset, **config.model_overrides)
    head = AAMSoftmax(model.config.embed_dim, collator.num_classes, config.margin, config.scale)
    params = [p for p in list(model.parameters()) + list(head.parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = get_polynomial_decay_schedule_with_warmup(
        optimizer, config.warmup_steps, config.max_steps, lr_end=config.learning_rate * 0.01
    )
    model, head, optimizer, loader, scheduler = accelerator.prepare(model, head, optimizer, loader, scheduler)
    progress = _Progress()
    latest = _latest_checkpoint(checkpoint_dir) if config.resume else None
    if latest:
        accelerator.load_state(latest)
        with open(os.path.join(latest, "progress.json")) as fh:
            progress.load_state_dict(json.load(fh))
        logger.info("resumed from %s at step %d", latest, progress.step)
        # A new data order after resuming: the loader is an endless random stream, so this only changes
        # which crops come next, not what the run learns from.
        collator.rng = np.random.default_rng(config.seed + progress.step)

    model.train()
    head.train()
    margin_steps = max(1, int(config.margin_warmup_fraction * config.max_steps))
    bar = tqdm(
        total=config.max_steps,
        initial=progress.step,
        desc="train teacher",
        disable=not accelerator.is_main_process,
    )
    while progress.step < config.max_steps:
        for batch in loader:
            if progress.step >= config.max_steps:
                break
            margin = config.margin * min(1.0, progress.step / margin_steps)
            embeddings = model(batch["waveforms"])
            loss, _ = head(embeddings, batch["labels"], margin=margin)
            accelerator.backward(loss)
            if config.grad_clip:
                accelerator.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            progress.step += 1
            progress.losses.append(float(loss.detach()))
            bar.update(1)
            if progress.step % config.log_every == 0:
                recent = float(np.mean(progress.losses[-config.log_every :]))
                bar.set_postfix(loss=f"{recent:.3f}", margin=f"{margin:.2f}")
                logger.info("step %d loss %.4f margin %.3f", progress.step, recent, margin)
            if (
                config.save_every
                and progress.step % config.save_every == 0
                and progress.step < config.max_steps
            ):
                _save_checkpoint(accelerator, checkpoint_dir, progress, config.keep_checkpoints)
    bar.close()
    if config.save_every and progress.step > 0:
        _save_checkpoint(accelerator, checkpoint_dir, progress, config.keep_checkpoints)

    summary: dict[str, Any] = {
        "preset": config.preset,
        "model_overrides": config.model_overrides,
        "num_parameters": sum(p.numel() for p in accelerator.unwrap_model(model).parameters()),
        "train_utterances": len(waves),
        "train_speakers": len(speaker_ids),
        "num_classes": collator.num_classes,
        "steps": progress.step,
        "first_losses_mean": float(np.mean(progress.losses[:10])) if progress.losses else None,
        "last_losses_mean": float(np.mean(progress.losses[-10:])) if progress.losses else None,
        "config": dataclasses.asdict(config),
    }
    if accelerator.is_main_process:
        teacher: ReDimNet = accelerator.unwrap_model(model)
        teacher.eval()
        teacher.save_pretrained(config.output_dir)
        if config.save_official:
            teacher.save_official_checkpoint(os.path.join(config.output_dir, "redimnet-official.pt"))
        if config.eval_split and config.trials:
            test_waves, _, test_names = _load_split(config.data, config.eval_split, None)
            result = evaluate_trials(
                teacher, dict(zip(test_names, test_waves)), read_trials(config.trials), accelerator.device
            )
            summary.update({"heldout_eer": result["eer"], "heldout_trials": result["num_trials"]})
            logger.info("held-out EER %.2f%% on %d trials", 100 * result["eer"], result["num_trials"])
        summary["wall_seconds"] = round(time.time() - started, 1)
        if progress.losses:
            _plot_losses(progress.losses, os.path.join(config.output_dir, "loss.png"))
        atomic_write_json(os.path.join(config.output_dir, "train_summary.json"), summary, sort_keys=False)
    summary["losses"] = progress.losses
    return summary
