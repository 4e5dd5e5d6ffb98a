"""The hand-off: a labelled-corpus folder in (``prepare_labels.py --output OUT``), what pretraining needs out.

``OUT`` holds ``dataset/`` (the input columns + ``cluster_ids``, ``save_to_disk``), the centroids
(``centroids.safetensors`` + ``centroids.json``), ``model_config.json`` and, written atomically and
last, the manifest ``labels.json``. The manifest's presence is what marks a finished folder: a pass
that is still running or was killed before the dataset was assembled has none, so
``pretrain.py --dataset OUT`` can never read half a corpus. ``LabelledCorpus`` is the reader
pretraining uses; ``write_manifest`` is the writer's last step. Only JSON and safetensors are read.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import TYPE_CHECKING, Any, Union

from delulu_hf.atomic import atomic_write_json
from delulu_hf.errors import UserError

if TYPE_CHECKING:
    from delulu_hf.labels.centroids import Centroids

__all__ = [
    "MANIFEST_FORMAT",
    "MANIFEST_FORMAT_VERSION",
    "MANIFEST_NAME",
    "LabelledCorpus",
    "is_labelled_corpus",
    "write_manifest",
]

PathLike = Union[str, os.PathLike]

MANIFEST_NAME = "labels.json"
MANIFEST_FORMAT = "delulu-labelled-corpus"
MANIFEST_FORMAT_VERSION = 1
# Folders the label pass keeps while it runs (see delulu_hf.labels.corpus): they tell a folder whose
# pass has not finished from a folder that was never a label output.
_PASS_MARKERS = ("work", "centroids.safetensors")
_REQUIRED_FIELDS = ("dataset", "centroids", "num_clusters", "items", "skipped")


def is_labelled_corpus(path: PathLike) -> bool:
    """True when ``path`` is a folder with a ``labels.json`` manifest (a finished label pass)."""
    return os.path.isfile(os.path.join(os.fspath(path), MANIFEST_NAME))


def write_manifest(root: PathLike, manifest: dict[str, Any]) -> None:
    """Write ``root/labels.json`` atomically (the label pass calls this last, once ``dataset/`` is complete)."""
    atomic_write_json(os.path.join(os.fspath(root), MANIFEST_NAME), manifest)


@dataclasses.dataclass
class LabelledCorpus:
    """A finished label-pass folder: where its dataset and centroids are and which model labels they fit.

    Use ``LabelledCorpus.load(OUT)``; ``manifest`` is ``labels.json`` as written.
    """

    root: str
    manifest: dict[str, Any]

    @property
    def dataset_path(self) -> str:
        """``OUT/dataset``: load it with ``datasets.load_from_disk``."""
        return os.path.join(self.root, self.manifest.get("dataset", "dataset"))

    @property
    def centroids_path(self) -> str:
        """``OUT/centroids.safetensors``."""
        return os.path.join(self.root, self.manifest.get("centroids", "centroids.safetensors"))

    @property
    def skipped(self) -> list[dict[str, Any]]:
        """Every item without labels (``{"name", "reason", "stage"}``), at decode or at labelling."""
        return list(self.manifest.get("skipped", []))

    def load_centroids(self) -> Centroids:
        from delulu_hf.labels.centroids import Centroids

        return Centroids.load(self.centroids_path)

    def load_dataset(self):
        """The labelled dataset (``datasets.load_from_disk(self.dataset_path)``)."""
        import datasets

        return datasets.load_from_disk(self.dataset_path)

    def model_config_fields(self) -> dict[str, Any]:
        """{"num_clusters", "label_teacher_name", "label_feature_dim", "label_frame_alignment"}: the
        ``DeluluConfig`` fields a model trained on these labels must have."""
        m = self.manifest
        return {
            "num_clusters": int(m["num_clusters"]),
            "label_teacher_name": m.get("label_teacher_name"),
            "label_feature_dim": None if m.get("label_feature_dim") is None else int(m["label_feature_dim"]),
            "label_frame_alignment": m.get("label_frame_alignment"),
        }

    @classmethod
    def load(cls, path: PathLike) -> LabelledCorpus:
        """Read ``path/labels.json`` and check that the folder is complete.

        Raises ``UserError`` (one line naming the path and what is missing or corrupt) when there is
        no manifest (e.g. a pass still running or killed before its dataset was assembled: rerun
        the same ``prepare_labels.py`` command to finish it), when the manifest is not valid JSON of
        this format, or when the dataset or the centroids it names are missing.
        """
        root = os.fspath(path)
        manifest_path = os.path.join(root, MANIFEST_NAME)
        if not os.path.isfile(manifest_path):
            if os.path.isdir(root) and any(os.path.exists(os.path.join(root, m)) for m in _PASS_MARKERS):
                raise UserError(
                    f"{root}: no {MANIFEST_NAME}: its label pass has not finished (still running, or "
                    "killed before the dataset was assembled); rerun the same prepare_labels.py "
                    "command to resume it"
                )
            raise UserError(
                f"{root}: not a labelled corpus (no {MANIFEST_NAME}); make one with prepare_labels.py"
            )
        try:
            with open(manifest_path, encoding="utf-8") as handle:
                manifest = json.load(handle)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise UserError(f"{manifest_path}: corrupt manifest ({error})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
            raise UserError(f"{manifest_path}: not a {MANIFEST_FORMAT} manifest")
        version = manifest.get("format_version")
        if not isinstance(version, int) or version > MANIFEST_FORMAT_VERSION:
            raise UserError(
                f"{manifest_path}: format_version {version!r} is newer than this delulu-hf reads "
                f"({MANIFEST_FORMAT_VERSION}); upgrade delulu-hf"
            )
        missing = [name for name in _REQUIRED_FIELDS if name not in manifest]
        if missing:
            raise UserError(f"{manifest_path}: corrupt manifest (no {', '.join(missing)})")
        corpus = cls(root, manifest)
        dataset = corpus.dataset_path
        if not (
            os.path.isfile(os.path.join(dataset, "state.json"))
            and os.path.isfile(os.path.join(dataset, "dataset_info.json"))
        ):
            raise UserError(
                f"{root}: incomplete labelled corpus: {dataset} is missing or not a saved dataset"
            )
        if not os.path.isfile(corpus.centroids_path):
            raise UserError(f"{root}: incomplete labelled corpus: {corpus.centroids_path} is missing")
        return corpus
