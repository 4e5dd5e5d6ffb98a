"""Command line + YAML file in, a checked ``PretrainConfig`` and the ``DeluluConfig`` it describes out.

Every knob of a run is a field of ``PretrainConfig``; ``parse_config`` reads them with the project's
one argument system (``delulu_hf.cli.ArgumentParser``): a YAML file (``--config``, by default the
demo run's ``training/configs/demo.yaml``) sets the defaults, ``--field value`` flags override
them, ``--model.hidden_size 256`` sets one ``DeluluConfig`` field, and ``--help`` lists every flag
with the value the default config gives it. A bad flag or value is one line on stderr and exit 2.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any, Optional

from delulu_hf.cli import ArgumentParser, suggest
from delulu_hf.errors import UserError

__all__ = [
    "DEFAULT_CONFIG",
    "SAMPLE_RATE",
    "PretrainConfig",
    "build_model_config",
    "model_architecture",
    "parse_config",
    "resolve_paths",
]

SAMPLE_RATE = 16000  # every waveform of the data path is decoded (or resampled) to 16 kHz mono
DEFAULT_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "training",
    "configs",
    "demo.yaml",
)


def _field(default: Any = dataclasses.MISSING, help: str = "", **kwargs: Any) -> Any:
    """A dataclass field whose ``help`` is what ``--help`` prints for its flag."""
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


@dataclasses.dataclass
class PretrainConfig:
    """Every knob of a pretraining run. YAML keys and ``--field value`` flags use these names.

    Model architecture, masking and denoising settings are ``DeluluConfig`` fields: they go in
    ``model`` (a mapping of overrides on top of ``model_config``, or the Base defaults), so the
    saved checkpoint records them.
    """

    # --- run
    output_dir: str = _field("runs/demo", "run folder: checkpoints/, metrics.jsonl, final/")
    seed: int = _field(0, "seed of the model init, the data order, crops, corruption and masks")
    max_steps: int = _field(1000, "optimizer updates of the whole run")
    overwrite_output_dir: bool = _field(False, "delete output_dir first (no resume)")
    resume_from_checkpoint: Optional[str] = _field(
        "latest", "'latest' (the newest complete checkpoint, if any), a checkpoint path, or none"
    )

    # --- data and labels
    dataset: str = _field(
        "data/demo_corpus", "audiofolder, save_to_disk folder, parquet/arrow file or Hub id"
    )
    dataset_split: Optional[str] = _field("train", "split of dataset (none: the dataset is one split)")
    max_train_items: Optional[int] = _field(None, "a seeded random subset of this many items (smoke runs)")
    teacher: str = _field(
        "data/demo_teacher", "frame-level teacher for the labels: folder, official .pt, preset or 'mfcc'"
    )
    centroids: Optional[str] = _field(
        None, "fitted k-means centroids; none: fit them (cached under label_cache_dir)"
    )
    label_cache_dir: Optional[str] = _field(None, "label cache; none: <HF datasets cache>/delulu_labels")
    label_max_frames: int = _field(250_000, "frames kept for the k-means fit")
    label_fit_hours: Optional[float] = _field(None, "hours of audio used for the fit; none: all of it")
    label_kmeans_n_init: Optional[int] = _field(None, "k-means restarts; none: HuBERT's 20")
    label_fit_dtype: str = _field(
        "float64", "precision of the k-means fit: 'float64' (12 bytes per value at its peak) or 'float32' (4)"
    )
    label_batch_seconds: float = _field(64.0, "padded audio per teacher call, in seconds")
    label_teacher_output: str = _field(
        "backbone", "teacher features: 'backbone' (the paper's frames) or 'window-embedding'"
    )
    label_window_seconds: float = _field(1.0, "window of 'window-embedding' labels, in seconds")
    noise_dir: Optional[str] = _field(
        None, "folder of noise recordings; none: generated coloured noise and babble"
    )
    max_batch_samples: int = _field(16000 * 32, "padded samples per process and micro-batch")
    max_sample_length: int = _field(16000 * 4, "longer items are randomly cropped to this many samples")
    min_sample_length: int = _field(16000, "shorter items are dropped (counted, logged)")
    crop_to_shortest: bool = _field(False, "HuBERT-style: crop a batch to its shortest item (no padding)")
    normalize_audio: bool = _field(
        True, "zero-mean/unit-variance per item, as the saved feature extractor does"
    )
    bucket_jitter: float = _field(0.1, "relative jitter of lengths before bucketing (varies batch make-up)")
    num_workers: int = _field(0, "DataLoader worker processes")
    audio_decoding: str = _field(
        "cache",
        "'cache': decode every item once into the datasets cache (fast epochs; ~230 MB per hour of "
        "audio); 'on-the-fly': keep the encoded files and decode each item when it is batched",
    )
    on_error: str = _field(
        "raise",
        "a bad item (undecodable, empty, too short, non-finite, labels that do not fit its frames): "
        "'raise' stops the run naming it; 'skip' leaves it out, logged once and counted",
    )

    # --- model
    model_config: Optional[str] = _field(None, "config.json or model folder; none: DeluluConfig() (Base)")
    model: dict[str, Any] = _field(
        help="DeluluConfig field overrides, e.g. --model.hidden_size 256", default_factory=dict
    )
    gradient_checkpointing: bool = _field(False, "recompute activations in the backward pass")

    # --- optimisation (the paper's recipe = fairseq HuBERT-Base)
    learning_rate: float = _field(5e-4, "peak learning rate (after warmup)")
    adam_betas: tuple[float, float] = _field((0.9, 0.98), "AdamW betas, e.g. --adam_betas 0.9 0.98")
    adam_epsilon: float = _field(1e-6, "AdamW epsilon")
    weight_decay: float = _field(0.01, "AdamW (decoupled) weight decay")
    weight_decay_exclusions: str = _field(
        "biases_and_norms",
        "'biases_and_norms': no decay on biases, norms and other 1-D parameters (BERT practice); "
        "'none': decay every parameter, as fairseq's HuBERT recipe does",
    )
    warmup_steps: int = _field(32_000, "linear warmup, in optimizer updates")
    lr_decay_steps: Optional[int] = _field(None, "polynomial decay ends here; none: max_steps")
    lr_end: float = _field(0.0, "learning rate at the end of the decay")
    lr_power: float = _field(1.0, "power of the polynomial decay (1: linear)")
    max_grad_norm: float = _field(
        10.0, "gradient clipping norm; 0 disables clipping (the norm is still logged)"
    )
    gradient_accumulation_steps: int = _field(1, "micro-batches per optimizer update")
    mixed_precision: Optional[str] = _field(None, "'no' or 'bf16'; none: what `accelerate launch` says")
    allow_tf32: bool = _field(True, "TF32 matmuls and convolutions on Ampere+ GPUs")
    ddp_find_unused_parameters: Optional[bool] = _field(None, "DDP option; none: true when layerdrop > 0")

    # --- reliability, logging, checkpoints
    max_consecutive_nonfinite: int = _field(10, "abort after this many non-finite updates in a row")
    logging_steps: int = _field(10, "log metrics every N updates")
    save_steps: int = _field(500, "save a checkpoint every N updates")
    save_total_limit: int = _field(3, "keep the newest N checkpoints")
    report_to: str = _field("tensorboard", "'tensorboard' or 'none'")
    peak_flops: Optional[float] = _field(None, "per-device peak FLOP/s for MFU; none: looked up by GPU name")

    # Not a flag: the ``model`` keys the person set and where (``--model.KEY`` flags: "on the command
    # line"; the ``model`` block of their own ``--config``: "in FILE"), as opposed to the built-in default
    # config's. Label fields set here must agree with the labels' provenance; the default config's yield
    # to it. None: every key of ``model`` counts as set (a config built in code). Set by ``parse_config``.
    explicit_model: Optional[dict] = dataclasses.field(default=None, init=False, repr=False, compare=False)

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
        if self.weight_decay_exclusions not in ("biases_and_norms", "none"):
            raise ValueError(
                f"weight_decay_exclusions must be 'biases_and_norms' or 'none', got {self.weight_decay_exclusions!r}"
            )
        if self.label_fit_dtype not in ("float64", "float32"):
            raise ValueError(f"label_fit_dtype must be 'float64' or 'float32', got {self.label_fit_dtype!r}")
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
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {self.on_error!r}")
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
        out.pop("explicit_model")
        out["adam_betas"] = list(self.adam_betas)
        return out

    def set_explicitly(self, key: str) -> str | None:
        """Where the person set ``model.<key>`` ("on the command line", "in FILE" for their ``--config``), or None
        when its value comes from a default (the built-in default config, the ``model_config`` file)."""
        if self.explicit_model is None:
            return "in the run config" if key in self.model else None
        return self.explicit_model.get(key)


def parse_config(
    argv: Sequence[str] | None = None,
    default_config: str | None = DEFAULT_CONFIG,
    description: str | None = None,
) -> PretrainConfig:
    """Read ``--config FILE`` (default: ``default_config``, the demo run) and apply ``--field value``.

    Every field of ``PretrainConfig`` is a flag (``--max_steps 20``, ``--adam_betas 0.9 0.98`` or the
    older ``--adam_betas "[0.9, 0.98]"``, ``--resume_from_checkpoint none``, a bare ``--bool_field``
    means true). ``model`` takes dotted keys (``--model.hidden_size 256``) or a YAML mapping
    (``--model "{hidden_size: 256}"``), merged over the file's ``model`` block. An unknown key in the
    file or on the command line, a bad value, or a failed check prints one line and exits with 2.
    """
    parser = ArgumentParser(
        PretrainConfig,
        prog="pretrain.py",
        description=description or "Pretrain DELULU; every field of PretrainConfig is a --field value flag.",
        default_config=default_config,
    )
    cfg = parser.parse_one(argv)
    # Which model keys the person set (command line or their own --config): those must agree with the
    # labels' provenance; the default config's values yield to it.
    cfg.explicit_model = {
        key.split(".", 1)[1]: where for key, where in parser.explicit.items() if key.startswith("model.")
    }
    return cfg


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
    """``DeluluConfig`` from ``cfg.model_config`` (or the Base defaults) plus ``cfg.model`` overrides.

    A key that is not a ``DeluluConfig`` field is a ``UserError`` naming it and the closest field
    (a typo would otherwise be silently ignored, or fail deep inside the model).
    """
    from delulu_hf.configuration_delulu import DeluluConfig

    overrides = {**cfg.model, **extra}
    known = {f.name for f in dataclasses.fields(DeluluConfig)}
    config = DeluluConfig.from_pretrained(cfg.model_config) if cfg.model_config else None
    unknown = sorted(k for k in overrides if (not hasattr(config, k) if config else k not in known))
    if unknown:
        named = ", ".join(f"{k}{suggest(k, known)}" for k in unknown)
        raise UserError(f"model overrides are not DeluluConfig fields: {named}")
    try:
        if config is None:
            return DeluluConfig(**overrides)
        for key, value in overrides.items():
            setattr(config, key, value)
        config.validate_architecture()
        config.validate_training()
    except (ValueError, TypeError) as err:  # e.g. hidden_size not a multiple of the heads
        raise UserError(f"model config: {str(err).splitlines()[0]}") from None
    return config


def model_architecture(model_config) -> dict[str, Any]:
    """The model config without the fields that name the software or the file it came from, so two
    configs of the same network compare equal (checkpoint compatibility, hyper-parameter logs)."""
    skip = {"transformers_version", "auto_map", "architectures", "_name_or_path", "dtype", "torch_dtype"}
    return {k: v for k, v in model_config.to_dict().items() if k not in skip}
