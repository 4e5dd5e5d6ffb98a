"""Helpers for DELULU pretraining: run config, data path, optimiser, checkpoints, guards, FLOPs.

``training/pretrain.py`` keeps the training loop in plain sight; everything it needs that is more
than a few lines lives here, named for what it does:

* ``PretrainConfig`` + ``parse_config``: a flat dataclass of named values with defaults, read from
  a YAML file and overridden by ``--field value`` on the command line (values are parsed as YAML,
  so ``--adam_betas "[0.9, 0.98]"``, ``--bf16 true`` and ``--model.hidden_size 256`` all work).
* The data path: ``prepare_pretraining_dataset`` (audio + ``cluster_ids``; makes and caches the
  labels with the teacher when the dataset has none), ``LengthBucketBatchSampler`` (batches by total
  padded samples, deterministic per ``(seed, epoch)``, sharded by process, resumable at any batch),
  ``PretrainingItems`` and ``DeluluPretrainingCollator`` (frame-aligned random crops, padding and
  attention masks, span masks from transformers' ``_compute_mask_indices``, and the denoising
  corruption: noise or another utterance of the batch at an SNR measured on active speech, with the
  labels left those of the clean primary utterance).
* ``build_optimizer_and_scheduler``: AdamW + ``get_polynomial_decay_schedule_with_warmup``.
* Checkpoints: ``save_checkpoint`` (``accelerator.save_state`` into a temporary folder renamed to
  ``checkpoints/step_XXXXXXXX`` only when complete; keeps the last K), ``find_latest_checkpoint``,
  ``resolve_resume``, ``load_checkpoint``.
* ``NonFiniteGuard`` (skip and count non-finite steps, abort after N in a row),
  ``pretraining_flops``/``peak_flops_per_second`` (MFU), ``MetricsLog`` (JSONL + loss plot),
  ``save_final_model`` (``save_pretrained`` + feature extractor + centroids and their provenance).

Randomness in the data path never touches global RNG streams: every batch carries a seed derived
from ``(seed, epoch, batch index)``, and the collator draws its crops, corruption and span masks
from it. That is what makes a resumed run (or a two-process run) see exactly the batches an
uninterrupted single-process run sees.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
import types
import typing
from collections.abc import Iterator, Sequence
from typing import Any, Optional, Union

import numpy as np
import torch
import yaml

from delulu_hf.augment import NoiseSource, active_rms, mix_at_snr

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINTS_DIR",
    "DeluluPretrainingCollator",
    "LabelledData",
    "LengthBucketBatchSampler",
    "MetricsLog",
    "NoiseSource",
    "NonFiniteGuard",
    "NonFiniteLossError",
    "PretrainConfig",
    "PretrainingItems",
    "RunningMetrics",
    "TRAINER_STATE_NAME",
    "batch_seed",
    "build_model_config",
    "build_optimizer_and_scheduler",
    "corrupt_item",
    "find_latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "make_dataloader",
    "parse_config",
    "peak_flops_per_second",
    "prepare_pretraining_dataset",
    "pretraining_flops",
    "resolve_paths",
    "resolve_resume",
    "save_checkpoint",
    "save_final_model",
]

SAMPLE_RATE = 16000
DEFAULT_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "training", "configs", "demo.yaml"
)
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_PREFIX = "step_"
TMP_PREFIX = ".tmp-"
TRAINER_STATE_NAME = "trainer_state.json"
METRICS_NAME = "metrics.jsonl"
CENTROIDS_NAME = "kmeans_centroids.safetensors"
# Test-only fault injection (see save_checkpoint): "kill_in_checkpoint@STEP" SIGKILLs the process
# after the state files are written but before the folder is renamed, i.e. mid-checkpoint.
FAULT_ENV = "DELULU_FAULT_INJECTION"


# =============================================================================================
# Run configuration
# =============================================================================================


@dataclasses.dataclass
class PretrainConfig:
    """Every knob of a pretraining run. YAML keys and ``--field value`` flags use these names.

    Model architecture, masking and denoising settings are ``DeluluConfig`` fields: they go in
    ``model`` (a mapping of overrides on top of ``model_config``, or the Base defaults), so the
    saved checkpoint records them.
    """

    # --- run
    output_dir: str = "runs/demo"
    seed: int = 0
    max_steps: int = 1000
    overwrite_output_dir: bool = False
    resume_from_checkpoint: Optional[str] = "latest"  # "latest" (if any), a checkpoint path, or none

    # --- data and labels
    dataset: str = "data/demo_corpus"  # audiofolder, save_to_disk folder, parquet/arrow file, Hub id
    dataset_split: Optional[str] = "train"
    max_train_items: Optional[int] = None  # a seeded random subset (smoke runs)
    teacher: str = "data/demo_teacher"  # frame-level teacher for labels: folder, official .pt, preset, "mfcc"
    centroids: Optional[str] = None  # fitted centroids; None: fit them (cached under label_cache_dir)
    label_cache_dir: Optional[str] = None  # default: <HF datasets cache>/delulu_labels
    label_max_frames: int = 250_000  # frames kept for the k-means fit
    label_fit_hours: Optional[float] = None  # audio used for the fit; None: all of it
    label_kmeans_n_init: Optional[int] = None  # k-means restarts; None: HuBERT's 20
    label_batch_seconds: float = 64.0  # padded audio per teacher call
    label_teacher_output: str = "backbone"  # "backbone" (the paper's frames) | "window-embedding"
    label_window_seconds: float = 1.0  # window of "window-embedding" labels
    noise_dir: Optional[str] = None  # folder of noise recordings; None: generated coloured noise/babble
    max_batch_samples: int = 16000 * 32  # per process and micro-batch, padded samples (32 s)
    max_sample_length: int = 16000 * 4  # longer items are randomly cropped to this many samples
    min_sample_length: int = 16000  # shorter items are dropped (counted, logged)
    crop_to_shortest: bool = False  # HuBERT-style: crop the batch to its shortest item (no padding)
    normalize_audio: bool = True  # zero-mean/unit-var per item, as the saved feature extractor does
    bucket_jitter: float = 0.1  # relative jitter of lengths before bucketing (varies batch make-up)
    num_workers: int = 0
    # "cache": decode every item once into the datasets cache (fast epochs; ~230 MB per hour of
    # audio); "on-the-fly": keep the encoded files and decode each item when it is batched.
    audio_decoding: str = "cache"

    # --- model
    model_config: Optional[str] = None  # config.json or model folder; None: DeluluConfig() (Base)
    model: dict = dataclasses.field(default_factory=dict)  # DeluluConfig field overrides
    gradient_checkpointing: bool = False

    # --- optimisation (the paper's recipe = fairseq HuBERT-Base)
    learning_rate: float = 5e-4
    adam_betas: tuple = (0.9, 0.98)
    adam_epsilon: float = 1e-6
    weight_decay: float = 0.01
    warmup_steps: int = 32_000
    lr_decay_steps: Optional[int] = None  # polynomial decay ends here; None: max_steps
    lr_end: float = 0.0
    lr_power: float = 1.0
    max_grad_norm: float = 10.0  # 0 disables clipping (the norm is still logged)
    gradient_accumulation_steps: int = 1
    mixed_precision: Optional[str] = None  # "no" | "bf16"; None: what `accelerate launch` says
    allow_tf32: bool = True
    ddp_find_unused_parameters: Optional[bool] = None  # None: True when layerdrop > 0

    # --- reliability, logging, checkpoints
    max_consecutive_nonfinite: int = 10
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: int = 3
    report_to: str = "tensorboard"  # "tensorboard" | "none"
    peak_flops: Optional[float] = None  # per-device peak FLOP/s for MFU; None: looked up by GPU name

    def __post_init__(self) -> None:
        self.adam_betas = tuple(float(b) for b in self.adam_betas)
        if len(self.adam_betas) != 2:
            raise ValueError(f"adam_betas needs two values, got {self.adam_betas}")
        if self.mixed_precision == "fp16":
            raise ValueError(
                "mixed_precision='fp16' is not supported: its loss scaler produces inf gradients by design, "
                "which the non-finite guard would treat as failures. Use 'bf16' (or 'no')."
            )
        if self.mixed_precision not in (None, "no", "bf16"):
            raise ValueError(f"mixed_precision must be 'no', 'bf16' or null, got {self.mixed_precision!r}")
        if self.max_sample_length > self.max_batch_samples:
            raise ValueError(
                f"max_sample_length ({self.max_sample_length}) must be <= max_batch_samples "
                f"({self.max_batch_samples}): a batch must hold at least one cropped item."
            )
        if self.min_sample_length > self.max_sample_length:
            raise ValueError(
                f"min_sample_length ({self.min_sample_length}) must be <= max_sample_length ({self.max_sample_length})"
            )
        for name in ("max_steps", "gradient_accumulation_steps", "logging_steps", "save_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_consecutive_nonfinite < 1:
            raise ValueError("max_consecutive_nonfinite must be >= 1")
        from delulu_hf.audio import AUDIO_DECODINGS
        from delulu_hf.labels import TEACHER_OUTPUTS

        if self.label_teacher_output not in TEACHER_OUTPUTS:
            raise ValueError(
                f"label_teacher_output must be one of {TEACHER_OUTPUTS}, got {self.label_teacher_output!r}"
            )
        if self.audio_decoding not in AUDIO_DECODINGS:
            raise ValueError(f"audio_decoding must be one of {AUDIO_DECODINGS}, got {self.audio_decoding!r}")
        if self.report_to not in ("tensorboard", "none"):
            raise ValueError(f"report_to must be 'tensorboard' or 'none', got {self.report_to!r}")
        if isinstance(self.resume_from_checkpoint, str) and self.resume_from_checkpoint.lower() in (
            "none",
            "",
        ):
            self.resume_from_checkpoint = None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["adam_betas"] = list(self.adam_betas)
        return out


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """Convert a YAML-parsed value to the field's annotated type (with a message naming the field)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin = typing.get_origin(hint)
    try:
        if hint is bool:
            if isinstance(value, str):
                lowered = value.lower()
                if lowered not in ("true", "false", "yes", "no", "1", "0"):
                    raise ValueError(value)
                return lowered in ("true", "yes", "1")
            return bool(value)
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if hint is float:
            return float(value)
        if hint is str:
            return str(value)
        if hint is tuple or origin is tuple:
            if isinstance(value, str):
                value = [v for v in value.replace("(", "").replace(")", "").split(",") if v.strip()]
                value = [yaml.safe_load(v) for v in value]
            return tuple(value)
        if hint is dict or origin is dict:
            if isinstance(value, str):
                value = yaml.safe_load(value) or {}
            if not isinstance(value, dict):
                raise ValueError(value)
            return dict(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"config field {name!r}: cannot use {value!r} as {hint}") from err
    return value


def _type_name(hint: Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (Union, types.UnionType) and len(args) == 1:
        return f"{_type_name(args[0])} or null"
    return getattr(hint, "__name__", str(hint))


def parse_config(
    argv: Sequence[str] | None = None, cls: type = PretrainConfig, default_config: str | None = DEFAULT_CONFIG
) -> PretrainConfig:
    """Read ``--config FILE`` (default: ``default_config``, the demo run) and apply ``--field value``.

    Every field of ``cls`` is a flag; values are parsed as YAML (``--max_steps 20``,
    ``--adam_betas "[0.9, 0.98]"``, ``--resume_from_checkpoint none``). A bare boolean flag means
    true. Mapping fields take dotted keys (``--model.hidden_size 256``) or a YAML mapping
    (``--model "{hidden_size: 256}"``). Unknown keys in the file or on the command line are errors.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if any(a in ("-h", "--help") for a in argv):
        lines = [
            f"usage: pretrain.py [--config FILE] [--FIELD VALUE ...]\n\nfields (built-in defaults; the config file, default {default_config}, overrides them):"
        ]
        defaults = cls()
        lines += [f"  --{n} ({_type_name(hints[n])}; default {getattr(defaults, n)!r})" for n in fields]
        print("\n".join(lines))
        raise SystemExit(0)

    config_path = default_config
    overrides: list[tuple[str, Any]] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--"):
            raise ValueError(f"unexpected argument {token!r}: use --field value")
        key, has_inline, inline = token[2:].partition("=")
        key = key.replace("-", "_")
        if has_inline:
            raw: str | None = inline
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            raw = argv[i + 1]
            i += 2
        else:
            raw = None
            i += 1
        if key == "config":
            if not raw:
                raise ValueError("--config needs a file path")
            config_path = raw
            continue
        base = key.split(".", 1)[0]
        if base not in fields:
            raise ValueError(
                f"unknown option --{key}; known: --config, " + ", ".join(f"--{n}" for n in fields)
            )
        if raw is None:
            if hints[base] not in (bool, Optional[bool]):
                raise ValueError(f"--{key} needs a value")
            value: Any = True
        else:
            value = yaml.safe_load(raw)
            if value is not None and hints[base] in (str, Optional[str]):
                value = raw  # keep strings verbatim ("007" stays "007")
        overrides.append((key, value))

    values: dict[str, Any] = {}
    if config_path:
        with open(config_path, encoding="utf-8") as handle:
            loaded = yaml.safe_load(handle) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{config_path}: expected a mapping of config fields")
        unknown = sorted(set(loaded) - set(fields))
        if unknown:
            raise ValueError(f"{config_path}: unknown config field(s) {unknown}")
        values.update(loaded)
    for key, value in overrides:
        if "." in key:
            base, sub = key.split(".", 1)
            if hints[base] is not dict and typing.get_origin(hints[base]) is not dict:
                raise ValueError(f"--{key}: {base!r} is not a mapping field")
            values[base] = dict(_coerce(values.get(base) or {}, dict, base))
            values[base][sub] = value
        else:
            values[key] = value
    kwargs = {name: _coerce(value, hints[name], name) for name, value in values.items()}
    return cls(**kwargs)


def resolve_paths(cfg: PretrainConfig, root: str) -> PretrainConfig:
    """Relative data/teacher paths that do not exist from the working directory but do from ``root``
    (the repository) are taken from there, so the demo run works from any directory."""
    for name in ("dataset", "teacher", "noise_dir", "centroids", "model_config"):
        value = getattr(cfg, name)
        if value and not os.path.isabs(value) and not os.path.exists(value):
            candidate = os.path.join(root, value)
            if os.path.exists(candidate):
                setattr(cfg, name, candidate)
    return cfg


def build_model_config(cfg: PretrainConfig, **extra: Any):
    """``DeluluConfig`` from ``cfg.model_config`` (or the Base defaults) plus ``cfg.model`` overrides."""
    from delulu_hf.configuration_delulu import DeluluConfig

    overrides = {**cfg.model, **extra}
    if cfg.model_config:
        config = DeluluConfig.from_pretrained(cfg.model_config)
        unknown = sorted(k for k in overrides if not hasattr(config, k))
        if unknown:
            raise ValueError(f"model overrides {unknown} are not DeluluConfig fields")
        for key, value in overrides.items():
            setattr(config, key, value)
        config.validate_architecture()
        config.validate_training()
        return config
    known = {f.name for f in dataclasses.fields(DeluluConfig)}
    unknown = sorted(k for k in overrides if k not in known)
    if unknown:
        raise ValueError(f"model overrides {unknown} are not DeluluConfig fields")
    return DeluluConfig(**overrides)


# =============================================================================================
# Encoder frame geometry
# =============================================================================================


def _num_frames(config, num_samples: int) -> int:
    from delulu_hf.modeling_delulu import feat_extract_output_lengths

    return int(feat_extract_output_lengths(config, int(num_samples)))


def _hop(config) -> int:
    return int(math.prod(config.conv_stride))


# =============================================================================================
# Labelled data
# =============================================================================================


@dataclasses.dataclass
class LabelledData:
    """A map-style dataset with ``audio`` + ``cluster_ids``, and where its labels came from."""

    dataset: Any
    centroids: Any = None  # delulu_hf.labels.Centroids, when known
    label_provenance: dict = dataclasses.field(default_factory=dict)
    dropped: int = 0  # items without labels (skipped by the label pipeline)


def _state():
    from accelerate import PartialState

    return PartialState()


def prepare_pretraining_dataset(cfg: PretrainConfig, model_config) -> LabelledData:
    """Load ``cfg.dataset`` and make sure it has ``cluster_ids``; call on every process.

    A dataset that already has a ``cluster_ids`` column is used as it is. Otherwise the labels
    are made here with ``delulu_hf.labels``: load the teacher, load ``cfg.centroids`` or fit
    k-means centroids (cached by dataset fingerprint, teacher weights and fit settings, so the
    second run skips the fit), then ``add_cluster_ids`` (cached by ``datasets`` fingerprint).
    Both steps split their work across processes under ``accelerate launch``. The label
    provenance fields of ``model_config`` (teacher name, feature dim, alignment) are set from the
    teacher when the run config does not set them.
    """
    from delulu_hf.audio import load_audio_dataset
    from delulu_hf.labels import (
        LABEL_COLUMN,
        Centroids,
        add_cluster_ids,
        featurizer_provenance,
        fit_centroids,
        load_featurizer,
    )

    state = _state()
    with state.main_process_first():  # decode once into the datasets cache, then everyone loads it
        dataset = load_audio_dataset(
            cfg.dataset,
            split=cfg.dataset_split,
            audio_column="audio",
            decode=cfg.audio_decoding == "cache",  # "on-the-fly": items stay encoded
        )
    if cfg.max_train_items is not None and cfg.max_train_items < len(dataset):
        order = np.random.default_rng(cfg.seed).permutation(len(dataset))[: cfg.max_train_items]
        dataset = dataset.select(sorted(order.tolist()))
    if LABEL_COLUMN in dataset.column_names:
        centroids = Centroids.load(cfg.centroids) if cfg.centroids else None
        if centroids is not None:
            centroids.check_compatible(config=model_config)  # k vs num_clusters, dims, teacher name
        provenance = centroids.provenance if centroids is not None else {}
        return _drop_unlabelled(LabelledData(dataset, centroids, provenance))

    teacher = load_featurizer(
        cfg.teacher,
        device=state.device,
        output=cfg.label_teacher_output,
        window_seconds=cfg.label_window_seconds,
    )
    info = featurizer_provenance(teacher)
    if "label_teacher_name" not in cfg.model:
        model_config.label_teacher_name = info["name"]
    if "label_feature_dim" not in cfg.model:
        model_config.label_feature_dim = int(info["feature_dim"])
    alignment = model_config.label_frame_alignment
    cache_root = cfg.label_cache_dir or _default_label_cache()
    fit_settings = {
        "dataset": dataset._fingerprint,
        "teacher_sha256": info["checkpoint_sha256"],
        "teacher_name": info["name"],  # carries the window of window-embedding labels
        "k": model_config.num_clusters,
        "max_frames": cfg.label_max_frames,
        "fit_hours": cfg.label_fit_hours,
        "n_init": cfg.label_kmeans_n_init,
        "alignment": alignment,
        "conv": [list(model_config.conv_kernel), list(model_config.conv_stride)],
        "seed": cfg.seed,
    }
    key = _sha256(fit_settings)[:16]
    if cfg.centroids:
        centroids = Centroids.load(cfg.centroids)
    else:
        cached = os.path.join(cache_root, f"centroids-{key}.safetensors")
        state.wait_for_everyone()
        if os.path.isfile(cached):
            logger.info("Using cached k-means centroids %s", cached)
            centroids = Centroids.load(cached)
        else:
            logger.info(
                "Fitting k-means centroids (k=%d) on %s features", model_config.num_clusters, info["name"]
            )
            centroids = fit_centroids(
                dataset,
                teacher,
                model_config,
                k=model_config.num_clusters,
                max_frames=cfg.label_max_frames,
                fit_hours=cfg.label_fit_hours,
                alignment=alignment,
                seed=cfg.seed,
                max_batch_seconds=cfg.label_batch_seconds,
                **({"n_init": cfg.label_kmeans_n_init} if cfg.label_kmeans_n_init else {}),
                work_dir=os.path.join(cache_root, f"work-{key}"),
            )
            if state.is_main_process:
                os.makedirs(cache_root, exist_ok=True)
                centroids.save(cached)
            state.wait_for_everyone()
    labelled = add_cluster_ids(
        dataset,
        teacher,
        centroids,
        model_config,
        alignment=alignment,
        max_batch_seconds=cfg.label_batch_seconds,
        cache_dir=os.path.join(cache_root, "maps"),
    )
    del teacher
    return _drop_unlabelled(LabelledData(labelled, centroids, dict(centroids.provenance)))


def _drop_unlabelled(data: LabelledData) -> LabelledData:
    """Remove items the label pipeline skipped (null ``cluster_ids``), counting them."""
    import pyarrow.compute as pc

    column = data.dataset.with_format("arrow")["cluster_ids"]
    valid = np.asarray(pc.is_valid(column).to_numpy(zero_copy_only=False), dtype=bool)
    if not valid.all():
        data.dropped = int((~valid).sum())
        logger.warning(
            "Dropping %d item(s) without cluster_ids (skipped by the label pipeline)", data.dropped
        )
        data.dataset = data.dataset.select(np.flatnonzero(valid).tolist())
    return data


def _default_label_cache() -> str:
    import datasets

    return os.path.join(str(datasets.config.HF_DATASETS_CACHE), "delulu_labels")


def _sha256(value: Any) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def label_frame_counts(dataset, column: str = "cluster_ids") -> np.ndarray:
    """Frames per item, read from the Arrow list lengths (no audio is touched)."""
    import pyarrow.compute as pc

    lengths = pc.list_value_length(dataset.with_format("arrow")[column])
    return np.asarray(lengths.to_numpy(zero_copy_only=False), dtype=np.int64)


# =============================================================================================
# Batching: length buckets by total samples, deterministic and resumable
# =============================================================================================


def batch_seed(seed: int, epoch: int, batch_index: int) -> int:
    """The seed of one batch's crops, corruption and masks (independent of process count)."""
    return int(np.random.SeedSequence([seed, epoch, batch_index]).generate_state(1)[0])


class LengthBucketBatchSampler:
    """An endless stream of batches whose padded size stays under ``max_batch_samples``.

    Each epoch: lengths (capped at the crop length) are jittered by ``exp(U(-jitter, jitter))``,
    sorted, and packed greedily so that ``len(batch) * max(length) <= max_batch_samples``; the
    batch order is then shuffled. The plan depends only on ``(seed, epoch)``. It is cut to a
    multiple of ``drop_multiple`` (``num_processes * gradient_accumulation_steps``), so all processes
    stay in lockstep and an optimizer step never spans two epochs; process ``rank`` takes global
    batches ``rank, rank + num_replicas, ...``. Each yielded batch is a list of
    ``(item_index, batch_seed, epoch, global_batch_index)`` tuples (see ``PretrainingItems``).
    ``start=(epoch, global_batch_index)`` resumes the stream exactly where a checkpoint left it.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        max_batch_samples: int,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        drop_multiple: int = 1,
        start: tuple[int, int] = (0, 0),
        jitter: float = 0.1,
        shuffle: bool = True,
    ):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if self.lengths.size == 0:
            raise ValueError("no items to batch (the dataset is empty after filtering)")
        if self.lengths.max() > max_batch_samples:
            raise ValueError(
                f"an item has {self.lengths.max()} samples, more than max_batch_samples={max_batch_samples}"
            )
        self.max_batch_samples = int(max_batch_samples)
        self.seed, self.num_replicas, self.rank = int(seed), int(num_replicas), int(rank)
        self.drop_multiple = max(int(drop_multiple), self.num_replicas)
        if self.drop_multiple % self.num_replicas:
            raise ValueError("drop_multiple must be a multiple of num_replicas")
        self.start = (int(start[0]), int(start[1]))
        self.jitter, self.shuffle = float(jitter), shuffle
        self._cache: tuple[int, list[np.ndarray]] | None = None
        if not self.epoch_batches(0):
            raise ValueError(
                f"{len(self.lengths)} items make fewer than {self.drop_multiple} batches (processes x gradient "
                "accumulation): add data or lower max_batch_samples"
            )

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """The global plan of ``epoch`` (cut to a multiple of ``drop_multiple``)."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, epoch, 7])
        if self.shuffle and self.jitter > 0:
            keys = self.lengths * np.exp(rng.uniform(-self.jitter, self.jitter, size=self.lengths.size))
        else:
            keys = self.lengths.astype(np.float64)
        tiebreak = rng.permutation(self.lengths.size) if self.shuffle else np.arange(self.lengths.size)
        order = tiebreak[np.argsort(keys[tiebreak], kind="stable")]
        batches: list[np.ndarray] = []
        current: list[int] = []
        longest = 0
        for index in order:
            length = int(self.lengths[index])
            if current and (len(current) + 1) * max(longest, length) > self.max_batch_samples:
                batches.append(np.asarray(current))
                current, longest = [], 0
            current.append(int(index))
            longest = max(longest, length)
        if current:
            batches.append(np.asarray(current))
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        batches = batches[: len(batches) - len(batches) % self.drop_multiple]
        self._cache = (epoch, batches)
        return batches

    def advance(self, position: tuple[int, int], num_global_batches: int) -> tuple[int, int]:
        """The stream position ``num_global_batches`` after ``position``."""
        epoch, index = position
        index += num_global_batches
        while index >= len(self.epoch_batches(epoch)):
            index -= len(self.epoch_batches(epoch))
            epoch += 1
        return epoch, index

    def __iter__(self) -> Iterator[list[tuple[int, int, int, int]]]:
        epoch, index = self.advance(self.start, 0)
        while True:
            batches = self.epoch_batches(epoch)
            first = index + (self.rank - index) % self.num_replicas
            for b in range(first, len(batches), self.num_replicas):
                seed = batch_seed(self.seed, epoch, b)
                yield [(int(i), seed, epoch, b) for i in batches[b]]
            epoch, index = epoch + 1, 0


class PretrainingItems(torch.utils.data.Dataset):
    """Decoded waveform + cluster ids per item; keys are the tuples ``LengthBucketBatchSampler`` yields."""

    def __init__(self, dataset, audio_column: str = "audio", label_column: str = "cluster_ids"):
        self.dataset = dataset
        self.audio_column, self.label_column = audio_column, label_column
        self.name_column = next((c for c in ("file_name", "path", "id") if c in dataset.column_names), None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key) -> dict[str, Any]:
        from delulu_hf.audio import load_audio

        index, seed, epoch, batch_index = key if isinstance(key, tuple) else (key, 0, 0, 0)
        row = self.dataset[int(index)]
        name = str(row[self.name_column]) if self.name_column else f"item #{index}"
        return {
            "input_values": load_audio(row[self.audio_column], SAMPLE_RATE, name=name, min_samples=0),
            "labels": np.asarray(row[self.label_column], dtype=np.int64),
            "name": name,
            "seed": seed,
            "epoch": epoch,
            "batch_index": batch_index,
        }


# =============================================================================================
# Denoising corruption
# =============================================================================================


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
    ``{"kind", "snr_db", "start", "length"}`` (+ ``"gain"`` applied to a mixed utterance), or the input and ``None`` when left clean (or silent).
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


# =============================================================================================
# Collator
# =============================================================================================


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
    ):
        self.config = config
        self.hop = _hop(config)
        self.max_sample_length = int(max_sample_length)
        self.crop_to_shortest = crop_to_shortest
        self.noise = noise if noise is not None else NoiseSource()
        self.normalize_audio = normalize_audio
        self.corrupt = corrupt and config.denoise_corruption_prob > 0

    def crop(self, wave: np.ndarray, labels: np.ndarray, length: int, rng: np.random.Generator, name: str):
        """Frame-aligned random crop of ``length`` samples and the matching label slice."""
        frames = _num_frames(self.config, len(wave))
        if len(labels) != frames:
            raise ValueError(
                f"{name}: {len(labels)} cluster ids for {len(wave)} samples, but the encoder makes {frames} "
                "frames: the labels were made for other audio or another conv stack"
            )
        first = int(rng.integers(0, (len(wave) - length) // self.hop + 1))
        crop_frames = _num_frames(self.config, length)
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
        num_frames = _num_frames(self.config, longest)
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
        return {
            "input_values": torch.from_numpy(input_values),
            "attention_mask": torch.from_numpy(attention_mask),
            "labels": torch.from_numpy(labels),
            "mask_time_indices": mask_time_indices,
            "corrupted": torch.from_numpy(corrupted),
            "epoch": int(items[0]["epoch"]),
            "batch_index": int(items[0]["batch_index"]),
        }


def make_dataloader(
    data: LabelledData,
    model_config,
    cfg: PretrainConfig,
    num_replicas: int = 1,
    rank: int = 0,
    start: tuple[int, int] = (0, 0),
) -> tuple[torch.utils.data.DataLoader, LengthBucketBatchSampler]:
    """The endless, sharded, resumable loader of pretraining batches (no global RNG is used)."""
    frames = label_frame_counts(data.dataset)
    hop, field = _hop(model_config), _receptive_field(model_config)
    samples = np.minimum((frames - 1) * hop + field, cfg.max_sample_length)  # lower bound of the true length
    min_frames = max(_num_frames(model_config, cfg.min_sample_length), model_config.mask_time_length)
    keep = np.flatnonzero(frames >= min_frames)
    if len(keep) < len(frames):
        logger.info("Dropping %d item(s) shorter than min_sample_length", len(frames) - len(keep))
    sampler = LengthBucketBatchSampler(
        samples[keep],
        cfg.max_batch_samples,
        seed=cfg.seed,
        num_replicas=num_replicas,
        rank=rank,
        drop_multiple=num_replicas * cfg.gradient_accumulation_steps,
        start=start,
        jitter=cfg.bucket_jitter,
    )
    items = PretrainingItems(data.dataset.select(keep.tolist()) if len(keep) < len(frames) else data.dataset)
    collator = DeluluPretrainingCollator(
        model_config,
        cfg.max_sample_length,
        crop_to_shortest=cfg.crop_to_shortest,
        noise=NoiseSource(cfg.noise_dir),
        normalize_audio=cfg.normalize_audio,
    )
    loader = torch.utils.data.DataLoader(
        items,
        batch_sampler=sampler,
        collate_fn=collator,
        num_workers=cfg.num_workers,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(cfg.seed),  # keeps the global torch RNG untouched
    )
    return loader, sampler


def _receptive_field(config) -> int:
    from delulu_hf.modeling_delulu import receptive_field

    return int(receptive_field(config))


# =============================================================================================
# Optimiser and schedule
# =============================================================================================


def build_optimizer_and_scheduler(model: torch.nn.Module, cfg: PretrainConfig, fused: bool | None = None):
    """AdamW (no weight decay on biases, norms and other 1-D parameters) + polynomial decay with warmup.

    The schedule counts optimizer updates: linear warmup over ``warmup_steps`` to ``learning_rate``,
    then ``(1 - progress) ** lr_power`` decay to ``lr_end`` at ``lr_decay_steps`` (or ``max_steps``).
    """
    from transformers import get_polynomial_decay_schedule_with_warmup

    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(
        groups, lr=cfg.learning_rate, betas=cfg.adam_betas, eps=cfg.adam_epsilon, fused=fused or None
    )
    total = cfg.lr_decay_steps or cfg.max_steps
    scheduler = get_polynomial_decay_schedule_with_warmup(
        optimizer,
        num_warmup_steps=min(cfg.warmup_steps, total - 1),  # transformers divides by total - warmup
        num_training_steps=total,
        lr_end=cfg.lr_end,
        power=cfg.lr_power,
    )
    return optimizer, scheduler


# =============================================================================================
# Checkpoints
# =============================================================================================


def checkpoint_path(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, CHECKPOINTS_DIR, f"{CHECKPOINT_PREFIX}{step:08d}")


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints as ``(step, path)``, oldest first. Temporary folders never count."""
    root = os.path.join(output_dir, CHECKPOINTS_DIR)
    found = []
    for path in glob.glob(os.path.join(root, f"{CHECKPOINT_PREFIX}*")):
        suffix = os.path.basename(path)[len(CHECKPOINT_PREFIX) :]
        if suffix.isdigit() and os.path.isfile(os.path.join(path, TRAINER_STATE_NAME)):
            found.append((int(suffix), path))
    return sorted(found)


def find_latest_checkpoint(output_dir: str) -> str | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def resolve_resume(spec: str | None, output_dir: str) -> str | None:
    """``"latest"`` -> the newest complete checkpoint (or ``None``); a path must be a complete checkpoint."""
    if spec is None:
        return None
    if spec == "latest":
        return find_latest_checkpoint(output_dir)
    if not os.path.isfile(os.path.join(spec, TRAINER_STATE_NAME)):
        raise FileNotFoundError(
            f"resume_from_checkpoint={spec!r} is not a complete checkpoint (no {TRAINER_STATE_NAME}); "
            f"complete ones: {[p for _, p in list_checkpoints(output_dir)]}"
        )
    return spec


def remove_incomplete_checkpoints(output_dir: str) -> list[str]:
    """Delete temporary checkpoint folders left by a crash mid-save (main process only)."""
    removed = sorted(glob.glob(os.path.join(output_dir, CHECKPOINTS_DIR, f"{TMP_PREFIX}*")))
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def _write_json_atomic(path: str, value: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=2, sort_keys=True, default=str)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())


def save_checkpoint(
    accelerator, output_dir: str, step: int, trainer_state: dict[str, Any], keep_last: int
) -> str:
    """``accelerator.save_state`` into ``.tmp-step_N``, add ``trainer_state.json``, rename to ``step_N``.

    Call on every process. The rename (atomic on POSIX) happens only after every process has
    written its part, so a folder named ``step_N`` is always complete; a crash mid-save leaves a
    ``.tmp-`` folder that resuming ignores and the next run deletes. Then only the newest
    ``keep_last`` checkpoints are kept.
    """
    final = checkpoint_path(output_dir, step)
    tmp = os.path.join(os.path.dirname(final), TMP_PREFIX + os.path.basename(final))
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp, safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _maybe_inject_fault("kill_in_checkpoint", step)
        _write_json_atomic(os.path.join(tmp, TRAINER_STATE_NAME), trainer_state)
        _fsync_tree(tmp)
        if os.path.exists(final):  # re-saving a step (e.g. after a resume) replaces the old folder
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in list_checkpoints(output_dir)[: -max(keep_last, 1)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def trainer_state(
    step: int,
    position: tuple[int, int],
    guard: NonFiniteGuard,
    cfg: PretrainConfig,
    model_config,
    num_processes: int,
) -> dict[str, Any]:
    """What ``accelerator.save_state`` does not know: progress, data position, guard counters, configs."""
    return {
        "step": int(step),
        "position": [int(position[0]), int(position[1])],
        "nonfinite": guard.state_dict(),
        "num_processes": int(num_processes),
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "config": cfg.to_dict(),
        "model_config": _architecture(model_config),
    }


def _architecture(model_config) -> dict[str, Any]:
    skip = {"transformers_version", "auto_map", "architectures", "_name_or_path", "dtype", "torch_dtype"}
    return {k: v for k, v in model_config.to_dict().items() if k not in skip}


def check_resumable(state: dict[str, Any], cfg: PretrainConfig, model_config, num_processes: int) -> None:
    """Refuse a checkpoint of another model; warn when the data order cannot continue exactly."""
    saved, current = state.get("model_config", {}), _architecture(model_config)
    differ = sorted(
        k
        for k in set(saved) | set(current)
        if json.dumps(saved.get(k), default=str) != json.dumps(current.get(k), default=str)
    )
    if differ:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in differ[:8])
        raise ValueError(
            f"the checkpoint in {cfg.output_dir} was made with another model config ({detail}). Use another "
            "output_dir, --overwrite_output_dir true, or --resume_from_checkpoint none."
        )
    saved_batches = state["num_processes"] * state["gradient_accumulation_steps"]
    if saved_batches != num_processes * cfg.gradient_accumulation_steps:
        logger.warning(
            "Resuming with %d processes x %d accumulation steps instead of %d x %d: training continues, but "
            "the batch plan differs from the uninterrupted run's.",
            num_processes,
            cfg.gradient_accumulation_steps,
            state["num_processes"],
            state["gradient_accumulation_steps"],
        )


def flat_hparams(cfg: PretrainConfig, model_config) -> dict[str, Any]:
    """Scalar-only hyper-parameters for TensorBoard (lists become strings)."""
    out: dict[str, Any] = {}
    values = {**cfg.to_dict(), **{f"model.{k}": v for k, v in _architecture(model_config).items()}}
    for key, value in values.items():
        if key == "model":
            continue
        out[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


def load_checkpoint(accelerator, path: str) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and RNG states (``accelerator.load_state``) and return
    the saved ``trainer_state.json`` (step, data position, guard counters)."""
    with open(os.path.join(path, TRAINER_STATE_NAME), encoding="utf-8") as handle:
        state = json.load(handle)
    accelerator.load_state(path)
    return state


def _maybe_inject_fault(point: str, step: int) -> None:
    """Test hook: ``DELULU_FAULT_INJECTION=point@step`` SIGKILLs this process at that point."""
    spec = os.environ.get(FAULT_ENV, "")
    if spec == f"{point}@{step}":
        os.kill(os.getpid(), signal.SIGKILL)


# =============================================================================================
# Non-finite guard
# =============================================================================================


class NonFiniteLossError(RuntimeError):
    """Too many consecutive optimizer steps with a non-finite loss or gradient norm."""


class NonFiniteGuard:
    """Skips updates whose loss or gradient norm is NaN/Inf, counts them, aborts after N in a row.

    A single bad batch (a numerically nasty crop, a bf16 overflow) costs one skipped update; a
    run that keeps producing them has diverged, and continuing would only burn compute, so the
    guard raises ``NonFiniteLossError`` with what to try.
    """

    def __init__(self, max_consecutive: int = 10):
        self.max_consecutive = int(max_consecutive)
        self.total = 0
        self.consecutive = 0

    def check(self, finite: bool, step: int) -> bool:
        """Record one optimizer step; ``True`` means apply the update, ``False`` means skip it."""
        if finite:
            self.consecutive = 0
            return True
        self.total += 1
        self.consecutive += 1
        logger.warning(
            "Step %d: non-finite loss or gradient norm; update skipped (%d in a row, %d in total)",
            step,
            self.consecutive,
            self.total,
        )
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteLossError(
                f"{self.consecutive} optimizer steps in a row (up to step {step}) had a non-finite loss or "
                f"gradient norm ({self.total} skipped in total), so training stopped. Resume from the last "
                "checkpoint with a lower learning_rate or longer warmup_steps, check the data for broken "
                "audio, or raise max_consecutive_nonfinite."
            )
        return False

    def state_dict(self) -> dict[str, int]:
        return {"total": self.total, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.total, self.consecutive = int(state["total"]), int(state["consecutive"])


# =============================================================================================
# FLOPs, MFU and metrics
# =============================================================================================


def pretraining_flops(config, num_samples: int, batch_size: int = 1, backward: bool = True) -> float:
    """Matmul/conv FLOPs of ``DeluluForPreTraining`` on ``batch_size`` items of ``num_samples``.

    Counts 2 FLOPs per multiply-add in the conv front end, feature projection, positional conv,
    attention (projections and the two ``T x T`` products), feed-forward layers and the cluster head;
    elementwise work is ignored (a few percent). Training (``backward``) = 3x forward.
    """
    flops, length, channels = 0.0, int(num_samples), 1
    for dim, kernel, stride in zip(config.conv_dim, config.conv_kernel, config.conv_stride):
        length = (length - kernel) // stride + 1
        flops += 2.0 * channels * dim * kernel * length
        channels = dim
    frames, hidden = length, config.hidden_size
    flops += 2.0 * channels * hidden * frames  # feature projection
    flops += (
        2.0
        * hidden
        * (hidden // config.num_conv_pos_embedding_groups)
        * config.num_conv_pos_embeddings
        * frames
    )
    per_layer = 2.0 * 4 * hidden * hidden * frames + 2.0 * 2 * frames * frames * hidden
    per_layer += 2.0 * 2 * hidden * config.intermediate_size * frames
    flops += config.num_hidden_layers * per_layer
    flops += 2.0 * hidden * config.final_dim * frames + 2.0 * config.final_dim * config.num_clusters * frames
    return flops * batch_size * (3.0 if backward else 1.0)


class RunningMetrics:
    """Sums over micro-batches (and, at ``summary``, over processes) between two log lines.

    Loss terms average over the micro-batches whose loss was finite (a skipped step does not drag
    the curve to NaN or 0); accuracy sums argmax hits over masked frames exactly; throughput counts
    unpadded audio; MFU (GPU only) divides the analytic FLOPs of the padded batches by the peak.
    """

    KEYS = ("loss", "masked_loss", "denoise_loss", "finite", "correct", "count", "samples", "flops")

    def __init__(self, model_config, device: torch.device, peak_flops: float | None = None):
        self.config, self.peak = model_config, peak_flops
        self.sums = torch.zeros(len(self.KEYS), dtype=torch.float64, device=device)
        self.start = time.perf_counter()

    def add(self, out, batch: dict[str, torch.Tensor]) -> None:
        losses = torch.stack(
            [out.loss.detach(), out.masked_loss.detach(), out.denoise_loss.detach()]
        ).double()
        finite = torch.isfinite(losses).all()
        values = batch["input_values"]
        flops = pretraining_flops(self.config, values.shape[-1], values.shape[0])
        extra = torch.stack([out.masked_correct, out.masked_count, batch["attention_mask"].sum()]).to(
            self.sums
        )
        self.sums += torch.cat(
            [torch.where(finite, losses, 0.0), finite.double()[None], extra, self.sums.new_tensor([flops])]
        )

    def summary(self, accelerator) -> dict[str, float]:
        """Reduce over processes (a collective: call on every process), return the record, reset."""
        sums = dict(zip(self.KEYS, accelerator.reduce(self.sums, reduction="sum").tolist()))
        elapsed = time.perf_counter() - self.start
        finite = sums["finite"] or float("nan")
        record = {
            "loss": sums["loss"] / finite,
            "masked_loss": sums["masked_loss"] / finite,
            "denoise_loss": sums["denoise_loss"] / finite,
            "masked_accuracy": sums["correct"] / max(sums["count"], 1.0),
            "audio_seconds_per_second": sums["samples"] / SAMPLE_RATE / elapsed,
        }
        if self.peak:
            record["mfu"] = sums["flops"] / elapsed / (self.peak * accelerator.num_processes)
        self.sums.zero_()
        self.start = time.perf_counter()
        return record


# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets; MFU uses these unless
# `peak_flops` is set. Order matters: the first substring found in the device name wins.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10G", 70e12),
    ("L4", 121e12),
    ("4090", 165e12),
)


def peak_flops_per_second(device: torch.device | str, override: float | None = None) -> float | None:
    """Peak FLOP/s of one device for MFU; ``None`` off GPU or for an unknown GPU (set ``peak_flops``)."""
    if override:
        return float(override)
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


class MetricsLog:
    """Metrics as JSON lines in ``output_dir/metrics.jsonl`` (main process) and a loss plot at the end.

    On resume the file is cut back to the checkpoint's step, so it always holds one trajectory.
    """

    def __init__(self, output_dir: str, resume_step: int | None = None, enabled: bool = True):
        self.path = os.path.join(output_dir, METRICS_NAME)
        self.enabled = enabled
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        kept = [r for r in self.read(self.path) if resume_step is not None and r["step"] <= resume_step]
        tmp = f"{self.path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(tmp, self.path)

    @staticmethod
    def read(path: str) -> list[dict[str, Any]]:
        if not os.path.isfile(path):
            return []
        with open(path, encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")

    def plot(self) -> str | None:
        """``loss_curves.png``: total/masked/denoise loss and masked accuracy against step."""
        records = self.read(self.path) if self.enabled else []
        if not records:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [r["step"] for r in records]
        fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.5))
        for key in ("loss", "masked_loss", "denoise_loss"):
            ax_loss.plot(steps, [r.get(key, float("nan")) for r in records], label=key)
        ax_loss.set_xlabel("step"), ax_loss.set_ylabel("cross-entropy"), ax_loss.legend()
        ax_acc.plot(steps, [r.get("masked_accuracy", float("nan")) for r in records], color="C3")
        ax_acc.set_xlabel("step"), ax_acc.set_ylabel("masked-frame accuracy")
        fig.tight_layout()
        path = os.path.join(os.path.dirname(self.path), "loss_curves.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


# =============================================================================================
# Final model
# =============================================================================================


def save_final_model(
    model,
    output_dir: str,
    cfg: PretrainConfig,
    data: LabelledData | None = None,
    state_dict: dict | None = None,
) -> str:
    """``output_dir/final``: ``save_pretrained`` weights + config (with ``auto_map``), a
    ``Wav2Vec2FeatureExtractor``, the k-means centroids with their provenance, and the run config.

    Written to a temporary folder and renamed, so ``final`` is either the old or the new model.
    """
    from delulu_hf.modeling_delulu import default_feature_extractor

    final = os.path.join(output_dir, "final")
    tmp = os.path.join(output_dir, f"{TMP_PREFIX}final-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    extractor = default_feature_extractor(model.config, do_normalize=cfg.normalize_audio)
    model.save_pretrained(tmp, safe_serialization=True, feature_extractor=extractor, state_dict=state_dict)
    if data is not None and data.centroids is not None:
        data.centroids.save(os.path.join(tmp, CENTROIDS_NAME))  # + kmeans_centroids.json (provenance)
    _write_json_atomic(os.path.join(tmp, "training_config.json"), cfg.to_dict())
    old = None
    if os.path.exists(final):
        old = os.path.join(output_dir, f"{TMP_PREFIX}old-final-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old:
        shutil.rmtree(old, ignore_errors=True)
    return final
