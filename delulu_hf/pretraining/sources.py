"""A run config in, its inputs checked and its label source out: where the targets come from, and what
the model config must therefore say about them.

Everything here runs before any model is built and before the output folder is touched, so a typo or
a mismatch costs seconds and leaves nothing behind:

* ``check_inputs``: every path the run reads (dataset, teacher, centroids, noise folder, model config,
  a checkpoint to resume from) exists and is complete; one ``UserError`` line otherwise.
* ``find_label_source``: the labels' provenance, read from what describes them without touching audio:
  a ``prepare_labels.py`` output folder (``labels.json``, see ``delulu_hf.labels.handoff``), or the
  ``--centroids`` file's provenance. Labels made in this run (``in-process``) or a dataset that carries
  ``cluster_ids`` and nothing else (``dataset``) are settled by ``labelled.py`` once the data is open.
* ``apply_label_fields``: the model config's ``num_clusters``, ``label_teacher_name``,
  ``label_feature_dim`` and ``label_frame_alignment`` follow the labels. A value the person set
  (``--model.KEY`` or their own ``--config``) that disagrees stops the run with both values and the fix;
  a default config's value yields (logged). ``check_encoder_geometry`` refuses labels made for another
  conv stack (their frame counts cannot match).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import TYPE_CHECKING, Any

from delulu_hf.cli import require_path
from delulu_hf.errors import UserError

if TYPE_CHECKING:
    from delulu_hf.pretraining.arguments import PretrainConfig

logger = logging.getLogger(__name__)

__all__ = [
    "LABEL_FIELDS",
    "LabelSource",
    "apply_label_fields",
    "check_encoder_geometry",
    "centroid_fields",
    "check_inputs",
    "check_teacher",
    "find_label_source",
    "load_centroids",
]

# The model config fields that describe how the targets were made (``DeluluConfig``).
LABEL_FIELDS = ("num_clusters", "label_teacher_name", "label_feature_dim", "label_frame_alignment")
# What the labels' provenance calls them, for messages.
_LABEL_WORDS = {
    "num_clusters": "k",
    "label_teacher_name": "teacher",
    "label_feature_dim": "feature dim",
    "label_frame_alignment": "frame alignment",
}


@dataclasses.dataclass
class LabelSource:
    """Where a run's targets come from.

    ``kind``: ``"labelled-corpus"`` (a ``prepare_labels.py`` folder), ``"centroids"`` (``--centroids``:
    the dataset's ``cluster_ids`` were made with them, or are made with them here), ``"in-process"``
    (centroids fitted by this run), ``"dataset"`` (``cluster_ids`` of unknown origin) or ``None`` (not
    settled until the dataset is open). ``fields`` holds the model config's label fields as the labels
    say them; ``None`` means unknown.
    """

    kind: str | None
    dataset: str
    fields: dict[str, Any] = dataclasses.field(default_factory=dict)
    centroids_path: str | None = None
    corpus: Any = None  # delulu_hf.labels.LabelledCorpus, for kind "labelled-corpus"
    skipped: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # skipped when labelling

    @property
    def origin(self) -> str:
        """How messages name these labels."""
        if self.kind == "labelled-corpus":
            return f"the labels in {self.corpus.root}"
        if self.kind == "centroids":
            return f"the labels of --centroids {self.centroids_path}"
        if self.kind == "in-process":
            return "the labels made in this run"
        return f"the cluster_ids of {self.dataset}"

    def describe(self) -> dict[str, Any]:
        """For ``final/training_config.json``: what made the labels."""
        out: dict[str, Any] = {"kind": self.kind, "dataset": _absolute(self.dataset), **self.fields}
        if self.centroids_path:
            out["centroids"] = os.path.abspath(self.centroids_path)
        if self.corpus is not None:
            out["corpus"] = os.path.abspath(self.corpus.root)
            for key in ("source", "items", "fit"):
                if key in self.corpus.manifest:
                    out[key] = self.corpus.manifest[key]
        return out


def _absolute(path: str) -> str:
    """Local paths made absolute (a Hub id stays as it is)."""
    return os.path.abspath(path) if os.path.exists(path) else path


def _teacher_is_a_name(spec: str) -> bool:
    """'mfcc' and the ReDimNet preset names need no file."""
    from delulu_hf.teacher.redimnet import PRESETS

    return spec.lower() == "mfcc" or spec.lower() in PRESETS


def _looks_like_hub_id(spec: str) -> bool:
    """``org/name`` that is not a local path: ``datasets.load_dataset`` may find it on the Hub.

    A single name (``no_such_dir``), a path whose first folder exists locally (``data/typo``) or an
    explicit relative/absolute/home path is local, and so is anything while the Hub is offline."""
    if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    parts = spec.split("/")
    if len(parts) != 2 or not all(parts) or spec.startswith((".", "~")):
        return False
    return not os.path.isdir(parts[0])


def check_inputs(cfg: PretrainConfig) -> LabelSource:
    """Check every path ``cfg`` names and read the labels' provenance; raise ``UserError`` (one line).

    Runs before any model is built and before ``output_dir`` is created or emptied. The teacher is
    checked only where it will be used (labels are made in this run): a prepare_labels folder or a
    dataset that carries ``cluster_ids`` needs none.
    """
    from delulu_hf.pretraining.checkpoints import check_resume_path

    if not os.path.exists(cfg.dataset) and not _looks_like_hub_id(cfg.dataset):
        raise UserError(
            f"--dataset {cfg.dataset}: no such file or folder (an audiofolder, a prepare_labels.py output "
            "folder, a save_to_disk folder, a parquet/arrow file, or a Hub id ORG/NAME)"
        )
    require_path(cfg.centroids, "--centroids")
    require_path(cfg.noise_dir, "--noise_dir", "dir")
    require_path(cfg.model_config, "--model_config")
    check_resume_path(cfg.resume_from_checkpoint, cfg.output_dir)
    source = find_label_source(cfg)
    if source.kind is None and os.path.exists(cfg.dataset) and not _dataset_has_labels(cfg.dataset):
        check_teacher(cfg.teacher)  # the labels are made in this run, with it
    return source


def check_teacher(spec: str) -> None:
    """The teacher is 'mfcc', a ReDimNet preset name, or an existing folder/.pt file."""
    if not _teacher_is_a_name(spec):
        require_path(spec, "--teacher")


def _dataset_has_labels(path: str) -> bool:
    """Whether a local ``save_to_disk`` folder declares a ``cluster_ids`` column (its JSON metadata
    only); False for anything else (then the data is opened to find out)."""
    import json

    for info in (os.path.join(path, "dataset_info.json"), os.path.join(path, "train", "dataset_info.json")):
        if os.path.isfile(info):
            with open(info, encoding="utf-8") as handle:
                return "cluster_ids" in (json.load(handle).get("features") or {})
    return False


def find_label_source(cfg: PretrainConfig) -> LabelSource:
    """The labels' provenance, from a prepare_labels folder's ``labels.json`` or ``--centroids``."""
    from delulu_hf.labels import is_labelled_corpus

    if os.path.isdir(cfg.dataset) and not is_labelled_corpus(cfg.dataset):
        _check_folder(cfg.dataset)
    if os.path.isdir(cfg.dataset) and is_labelled_corpus(cfg.dataset):
        from delulu_hf.labels import LabelledCorpus

        corpus = LabelledCorpus.load(cfg.dataset)  # UserError when its dataset or centroids are missing
        if cfg.centroids and os.path.abspath(cfg.centroids) != os.path.abspath(corpus.centroids_path):
            raise UserError(
                f"--centroids {cfg.centroids}: {cfg.dataset} is a prepare_labels.py folder whose labels were "
                f"made with {corpus.centroids_path}; drop --centroids (the folder's are used)"
            )
        return LabelSource(
            "labelled-corpus",
            corpus.dataset_path,
            dict(corpus.model_config_fields()),
            corpus.centroids_path,
            corpus,
            skipped=list(corpus.manifest.get("skipped") or []),
        )
    if cfg.centroids:
        centroids = load_centroids(cfg.centroids)
        return LabelSource("centroids", cfg.dataset, centroid_fields(centroids), cfg.centroids)
    return LabelSource(None, cfg.dataset)


def _check_folder(path: str) -> None:
    """A ``--dataset`` folder without ``labels.json`` must be a corpus ``load_audio_dataset`` reads. One
    that only holds a saved dataset below it is a label output without its manifest (a pass still
    running or killed: ``LabelledCorpus.load`` says so), which ``datasets`` would misread file by file."""
    from delulu_hf.audio import is_readable_corpus, is_saved_to_disk
    from delulu_hf.labels import LabelledCorpus

    if is_saved_to_disk(path):
        return
    holds_saved = any(is_saved_to_disk(os.path.join(path, name)) for name in os.listdir(path))
    if is_readable_corpus(path) and not holds_saved:
        return
    try:
        LabelledCorpus.load(path)
    except UserError as err:
        if holds_saved:
            raise
        raise UserError(
            f"--dataset {path} holds no audio files, saved dataset or parquet/arrow files, and is no "
            f"finished label output: {err}"
        ) from None


def load_centroids(path: str):
    """``Centroids.load``, a missing file being the person's mistake (``UserError``)."""
    from delulu_hf.labels import Centroids

    try:
        return Centroids.load(path)
    except FileNotFoundError as err:
        raise UserError(f"--centroids {path}: {err}") from None


def centroid_fields(centroids) -> dict[str, Any]:
    """The model config's label fields as a ``Centroids``' provenance states them."""
    teacher = centroids.provenance.get("teacher") or {}
    return {
        "num_clusters": centroids.k,
        "label_teacher_name": teacher.get("name"),
        "label_feature_dim": centroids.dim,
        "label_frame_alignment": centroids.alignment,
    }


def _differs(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return int(a) != int(b)
    return a != b


def apply_label_fields(model_config, cfg: PretrainConfig, fields: dict[str, Any], origin: str) -> None:
    """Set the model config's label fields from the labels' provenance (``fields``; ``None`` = unknown).

    A value the person set (``cfg.set_explicitly``) that disagrees with a known one is a ``UserError``
    naming both values and the fix, raised before anything changes; a default config's value (or a
    ``model_config`` file's) yields, with an info line. An unknown field becomes ``None`` unless the
    person set it (the alignment, which a model config cannot leave unknown, keeps its value).
    ``origin`` names the labels in messages ("the labels in OUT").
    """
    conflicts = []
    for key in LABEL_FIELDS:
        value, current = fields.get(key), getattr(model_config, key, None)
        where = cfg.set_explicitly(key)
        if value is not None and where and _differs(current, value):
            conflicts.append(
                f"model.{key}={current!r} (set {where}) but {origin} have {_LABEL_WORDS[key]}={value!r}: "
                f"drop --model.{key} (the labels' value is then used) or set it to {value!r}"
                + (
                    f", or make labels with k={current} (prepare_labels.py --k {current})"
                    if key == "num_clusters"
                    else ""
                )
            )
    if conflicts:
        raise UserError("; ".join(conflicts))
    for key in LABEL_FIELDS:
        if key not in fields:
            continue
        value, current = fields[key], getattr(model_config, key, None)
        if value is None:
            if key == "label_frame_alignment" or cfg.set_explicitly(key) or current is None:
                continue
            logger.info(
                "model.%s: unknown, %s do not say (the config's %r is not kept)", key, origin, current
            )
        elif not _differs(current, value):
            continue
        else:
            logger.info("model.%s = %r from %s (the config's %r yields)", key, value, origin, current)
        setattr(model_config, key, value)


def check_encoder_geometry(model_config, provenance: dict[str, Any], origin: str) -> None:
    """Refuse labels made for another conv stack: one id per encoder frame only holds for the same one."""
    encoder = provenance.get("encoder") or {}
    for key in ("conv_kernel", "conv_stride"):
        made_for, model = encoder.get(key), list(getattr(model_config, key))
        if made_for is not None and list(made_for) != model:
            raise UserError(
                f"{origin} were made for an encoder with {key}={list(made_for)}, but the model has {key}={model}: "
                "their frame counts cannot match. Use the labels' conv stack (--model."
                + key
                + ") or relabel "
                "with prepare_labels.py --model_config for this model"
            )
