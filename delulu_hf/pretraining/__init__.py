"""A run config in, what ``training/pretrain.py``'s loop needs out: data, optimiser, checkpoints, metrics.

``training/pretrain.py`` keeps the training loop in plain sight; everything it needs that is more
than a few lines lives in this package, one concern per file:

* ``arguments.py``: ``PretrainConfig`` (every knob; fields = ``--field value`` flags = YAML keys),
  ``parse_config`` (the shared ``delulu_hf.cli`` parser, default config ``training/configs/demo.yaml``),
  ``resolve_paths``, ``build_model_config`` (``model`` overrides -> ``DeluluConfig``).
* ``sources.py``: ``check_inputs`` (every path the run reads, before anything is built) and the
  ``LabelSource`` (a prepare_labels.py folder's ``labels.json``, ``--centroids``, labels made here, or
  ``cluster_ids`` of unknown origin); ``apply_label_fields`` (the model config's ``num_clusters`` and
  label fields follow the labels; a value the person set that disagrees stops the run).
* ``labelled.py``: ``prepare_pretraining_dataset`` (audio + ``cluster_ids``; makes and caches the
  labels with the teacher when the dataset has none), ``LabelledData``, ``label_frame_counts``.
* ``skips.py``: ``SkippedItems``, the ledger of bad items (``on_error: raise`` stops on the first with
  one line; ``skip`` names each once and counts them by stage).
* ``data.py``: ``LengthBucketBatchSampler`` (batches by total padded samples, deterministic per
  ``(seed, epoch)``, sharded by process, resumable at any batch), ``batch_seed``,
  ``PretrainingItems``, ``PretrainingBatches`` (decodes and checks a planned batch's items, refilling
  a bad one from the plan), ``make_dataloader``.
* ``collator.py``: ``DeluluPretrainingCollator`` (frame-aligned random crops, padding, attention
  masks, span masks from transformers' ``_compute_mask_indices``) and ``corrupt_item`` (the denoising
  corruption: noise or another utterance of the batch at an SNR measured on active speech, labels
  left those of the clean primary utterance; noise from ``delulu_hf.augment.NoiseSource``).
* ``loss.py``: the update-level loss (``count_update_frames``, ``micro_batch_loss``: frame losses
  summed and divided by the frames of the whole update, all micro-batches and processes, as fairseq)
  and ``layerdrop_seed`` (the same LayerDrop draw on every process).
* ``optim.py``: ``build_optimizer_and_scheduler`` (AdamW + polynomial decay with warmup) and
  ``NonFiniteGuard`` / ``NonFiniteLossError`` (skip and count non-finite updates, abort after N).
* ``checkpoints.py``: ``save_checkpoint`` (``accelerator.save_state`` into a ``.tmp-`` folder renamed
  to ``checkpoints/step_XXXXXXXX`` only when complete; keeps the last K), ``load_checkpoint``,
  ``find_latest_checkpoint``, ``resolve_resume``, ``trainer_state``, ``check_resumable``,
  ``save_final_model`` (``save_pretrained`` + feature extractor + centroids and their provenance).
* ``metrics.py``: ``pretraining_flops`` / ``peak_flops_per_second`` (MFU), ``RunningMetrics``,
  ``MetricsLog`` (JSONL + loss plot), ``flat_hparams``.

Randomness in the data path never touches global RNG streams: every batch carries a seed derived
from ``(seed, epoch, batch index)``, and the collator draws its crops, corruption and span masks
from it. That is what makes a resumed run (or a two-process run) see exactly the batches an
uninterrupted single-process run sees.
"""

from delulu_hf.atomic import TMP_PREFIX
from delulu_hf.augment import NoiseSource
from delulu_hf.pretraining.arguments import (
    DEFAULT_CONFIG,
    SAMPLE_RATE,
    PretrainConfig,
    build_model_config,
    model_architecture,
    parse_config,
    resolve_paths,
)
from delulu_hf.pretraining.checkpoints import (
    CENTROIDS_NAME,
    CHECKPOINT_PREFIX,
    CHECKPOINTS_DIR,
    SKIPPED_ITEMS_NAME,
    TRAINER_STATE_NAME,
    IncompleteCheckpointError,
    check_resumable,
    check_resume_path,
    checkpoint_path,
    find_latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    remove_incomplete_checkpoints,
    resolve_resume,
    save_checkpoint,
    save_final_model,
    trainer_state,
)
from delulu_hf.pretraining.collator import DeluluPretrainingCollator, corrupt_item
from delulu_hf.pretraining.data import (
    LengthBucketBatchSampler,
    PretrainingBatches,
    PretrainingItems,
    batch_seed,
    item_names,
    make_dataloader,
)
from delulu_hf.pretraining.labelled import LabelledData, label_frame_counts, prepare_pretraining_dataset
from delulu_hf.pretraining.loss import UpdateFrames, count_update_frames, layerdrop_seed, micro_batch_loss
from delulu_hf.pretraining.metrics import (
    METRICS_NAME,
    PEAK_BF16_FLOPS,
    MetricsLog,
    RunningMetrics,
    flat_hparams,
    peak_flops_per_second,
    pretraining_flops,
)
from delulu_hf.pretraining.optim import NonFiniteGuard, NonFiniteLossError, build_optimizer_and_scheduler
from delulu_hf.pretraining.skips import SkippedItems, bad_item_error
from delulu_hf.pretraining.sources import (
    LABEL_FIELDS,
    LabelSource,
    apply_label_fields,
    check_inputs,
    find_label_source,
)

__all__ = [
    "CENTROIDS_NAME",
    "CHECKPOINTS_DIR",
    "CHECKPOINT_PREFIX",
    "DEFAULT_CONFIG",
    "LABEL_FIELDS",
    "METRICS_NAME",
    "PEAK_BF16_FLOPS",
    "SAMPLE_RATE",
    "SKIPPED_ITEMS_NAME",
    "TMP_PREFIX",
    "TRAINER_STATE_NAME",
    "DeluluPretrainingCollator",
    "IncompleteCheckpointError",
    "LabelSource",
    "LabelledData",
    "LengthBucketBatchSampler",
    "MetricsLog",
    "NoiseSource",
    "NonFiniteGuard",
    "NonFiniteLossError",
    "PretrainConfig",
    "PretrainingBatches",
    "PretrainingItems",
    "RunningMetrics",
    "SkippedItems",
    "UpdateFrames",
    "apply_label_fields",
    "bad_item_error",
    "batch_seed",
    "build_model_config",
    "build_optimizer_and_scheduler",
    "check_inputs",
    "check_resumable",
    "check_resume_path",
    "checkpoint_path",
    "corrupt_item",
    "count_update_frames",
    "find_label_source",
    "find_latest_checkpoint",
    "flat_hparams",
    "item_names",
    "label_frame_counts",
    "layerdrop_seed",
    "list_checkpoints",
    "load_checkpoint",
    "make_dataloader",
    "micro_batch_loss",
    "model_architecture",
    "parse_config",
    "peak_flops_per_second",
    "prepare_pretraining_dataset",
    "pretraining_flops",
    "remove_incomplete_checkpoints",
    "resolve_paths",
    "resolve_resume",
    "save_checkpoint",
    "save_final_model",
    "trainer_state",
]
