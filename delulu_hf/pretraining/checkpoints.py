"""Training state in, crash-safe checkpoint folders and the final ``save_pretrained`` model out (and back).

A checkpoint is ``output_dir/checkpoints/step_XXXXXXXX``: ``accelerator.save_state`` (model,
optimizer, scheduler, RNG states of every process) plus ``trainer_state.json`` (what accelerate
does not know: step, data stream position, guard counters, the configs). It is written as a
``.tmp-`` folder and renamed only when complete (``delulu_hf.atomic``), so a folder named
``step_N`` is always whole: a crash mid-save leaves a ``.tmp-`` folder that resuming ignores and
the next run deletes.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
from typing import TYPE_CHECKING, Any

from delulu_hf.atomic import TMP_PREFIX, atomic_write_json, fsync_tree, replace_dir
from delulu_hf.errors import UserError
from delulu_hf.pretraining.arguments import model_architecture

if TYPE_CHECKING:
    from delulu_hf.pretraining.arguments import PretrainConfig
    from delulu_hf.pretraining.labelled import LabelledData
    from delulu_hf.pretraining.optim import NonFiniteGuard
    from delulu_hf.pretraining.skips import SkippedItems

logger = logging.getLogger(__name__)

__all__ = [
    "CENTROIDS_NAME",
    "CHECKPOINTS_DIR",
    "CHECKPOINT_PREFIX",
    "SKIPPED_ITEMS_NAME",
    "TRAINER_STATE_NAME",
    "IncompleteCheckpointError",
    "check_resumable",
    "check_resume_path",
    "checkpoint_path",
    "find_latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "remove_incomplete_checkpoints",
    "resolve_resume",
    "save_checkpoint",
    "save_final_model",
    "trainer_state",
]

CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_PREFIX = "step_"
TRAINER_STATE_NAME = "trainer_state.json"
CENTROIDS_NAME = "kmeans_centroids.safetensors"
SKIPPED_ITEMS_NAME = "skipped_items.json"
# What accelerator.save_state always writes beside trainer_state.json (model weights under one of these
# names: plain/DDP safetensors, FSDP and DeepSpeed folders; RNG states of process 0): a folder without
# them cannot be resumed from.
CHECKPOINT_FILES = (("model*.safetensors", "pytorch_model*", "model*.bin"), ("random_states_0.pkl",))


class IncompleteCheckpointError(UserError, FileNotFoundError):
    """``resume_from_checkpoint`` names a folder that is not a complete checkpoint (one line, exit 2)."""


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
    check_resume_path(spec, output_dir)
    return spec


def check_resume_path(spec: str | None, output_dir: str) -> None:
    """Raise ``IncompleteCheckpointError`` unless ``spec`` is None, ``"latest"`` or a complete checkpoint
    folder (``trainer_state.json`` and every file ``accelerator.save_state`` writes)."""
    if spec is None or spec == "latest":
        return
    missing = _missing_files(spec)
    if missing:
        complete = [p for _, p in list_checkpoints(output_dir) if not _missing_files(p)]
        hint = f"complete ones in {output_dir}: {complete}" if complete else f"{output_dir} has none"
        raise IncompleteCheckpointError(
            f"--resume_from_checkpoint {spec}: not a complete checkpoint ({missing}); {hint}. Use a "
            "checkpoints/step_N folder, 'latest' or none"
        )


def _missing_files(folder: str) -> str:
    """What a checkpoint folder lacks, in words ("" when complete)."""
    if not os.path.isdir(folder):
        return "no such folder"
    absent = [
        " or ".join(names)
        for names in ((TRAINER_STATE_NAME,), *CHECKPOINT_FILES)
        if not any(glob.glob(os.path.join(glob.escape(folder), name)) for name in names)
    ]
    return f"no {', '.join(absent)}" if absent else ""


def remove_incomplete_checkpoints(output_dir: str) -> list[str]:
    """Delete temporary checkpoint folders left by a crash mid-save (main process only)."""
    removed = sorted(glob.glob(os.path.join(output_dir, CHECKPOINTS_DIR, f"{TMP_PREFIX}*")))
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def save_checkpoint(
    accelerator, output_dir: str, step: int, trainer_state: dict[str, Any], keep_last: int
) -> str:
    """``accelerator.save_state`` into ``.tmp-step_N``, add ``trainer_state.json``, rename to ``step_N``.

    Call on every process. The rename (``replace_dir``: atomic on POSIX, replacing a folder of the
    same step after a resume) happens only after every process has written its part and the files
    are flushed to disk. Then only the newest ``keep_last`` checkpoints are kept.
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
        atomic_write_json(os.path.join(tmp, TRAINER_STATE_NAME), trainer_state)
        fsync_tree(tmp)
        replace_dir(tmp, final)
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
    skipped: SkippedItems | None = None,
) -> dict[str, Any]:
    """What ``accelerator.save_state`` does not know: progress, data position, guard counters, the
    bad items met so far in training (``skipped``, synced over processes first), configs."""
    return {
        "step": int(step),
        "position": [int(position[0]), int(position[1])],
        "nonfinite": guard.state_dict(),
        "skipped_in_training": skipped.training_items() if skipped is not None else [],
        "num_processes": int(num_processes),
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "config": cfg.to_dict(),
        "model_config": model_architecture(model_config),
    }


def check_resumable(state: dict[str, Any], cfg: PretrainConfig, model_config, num_processes: int) -> None:
    """Refuse a checkpoint of another model; warn when the data order cannot continue exactly."""
    saved, current = state.get("model_config", {}), model_architecture(model_config)
    differ = sorted(
        k
        for k in set(saved) | set(current)
        if json.dumps(saved.get(k), default=str) != json.dumps(current.get(k), default=str)
    )
    if differ:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in differ[:8])
        raise UserError(
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


def load_checkpoint(accelerator, path: str) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and RNG states (``accelerator.load_state``) and return
    the saved ``trainer_state.json`` (step, data position, guard counters)."""
    with open(os.path.join(path, TRAINER_STATE_NAME), encoding="utf-8") as handle:
        state = json.load(handle)
    accelerator.load_state(path)
    return state


# Run-config fields that only matter when the run makes its own labels (in-process).
LABEL_MAKING_FIELDS = (
    "teacher",
    "label_cache_dir",
    "label_max_frames",
    "label_fit_hours",
    "label_kmeans_n_init",
    "label_fit_dtype",
    "label_batch_seconds",
    "label_teacher_output",
    "label_window_seconds",
)


def save_final_model(
    model,
    output_dir: str,
    cfg: PretrainConfig,
    data: LabelledData | None = None,
    state_dict: dict | None = None,
) -> str:
    """``output_dir/final``: ``save_pretrained`` weights + config (with ``auto_map``), a
    ``Wav2Vec2FeatureExtractor``, the k-means centroids that made the labels with their provenance,
    and ``training_config.json``: the run config plus ``label_source`` (what made the labels) and
    ``skipped_items`` (counts by stage, the first items named; every one in
    ``output_dir/skipped_items.json``).

    Written to a temporary folder and swapped in (``replace_dir``), so ``final`` is either the old
    or the new model.
    """
    from delulu_hf.modeling_delulu import default_feature_extractor

    final = os.path.join(output_dir, "final")
    tmp = os.path.join(output_dir, f"{TMP_PREFIX}final-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    extractor = default_feature_extractor(model.config, do_normalize=cfg.normalize_audio)
    model.save_pretrained(tmp, safe_serialization=True, feature_extractor=extractor, state_dict=state_dict)
    if data is not None and data.centroids is not None:
        data.centroids.save(os.path.join(tmp, CENTROIDS_NAME))  # + kmeans_centroids.json (provenance)
    run = cfg.to_dict()
    if data is not None and data.source is not None:
        run["label_source"] = data.source.describe()
        if data.source.kind != "in-process":
            # The label-making settings were not used (the labels came made): recording them "as used"
            # would state, e.g., the Base config's placeholder teacher path on the model card.
            for key in LABEL_MAKING_FIELDS:
                run.pop(key, None)
    if data is not None and data.skipped is not None:
        run["skipped_items"] = data.skipped.summary()
        atomic_write_json(os.path.join(output_dir, SKIPPED_ITEMS_NAME), data.skipped.as_list())
    atomic_write_json(os.path.join(tmp, "training_config.json"), run)
    fsync_tree(tmp)
    replace_dir(tmp, final)
    return final
