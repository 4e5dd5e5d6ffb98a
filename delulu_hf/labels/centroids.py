"""Centroid files: fitted ``(k, dim)`` centroids + provenance in, ``.safetensors`` + ``.json`` out (and back).

Centroids travel with everything that says how they were made (teacher identity and weight hash,
alignment, normalisation, encoder geometry, k-means settings), inside the safetensors header and in
a ``.json`` sidecar for people; never pickle. ``check_compatible`` and ``label_config_problems``
compare that provenance with a model config and a teacher before any audio is touched, so a wrong
file costs nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Union

import numpy as np
import torch

from delulu_hf.atomic import atomic_save_safetensors, atomic_write_text
from delulu_hf.errors import UserError
from delulu_hf.labels.features import featurizer_provenance
from delulu_hf.teacher.base import SpeakerTeacher

__all__ = ["CENTROIDS_FORMAT", "CENTROIDS_FORMAT_VERSION", "Centroids", "label_config_problems"]

CENTROIDS_FORMAT = "delulu-centroids"
CENTROIDS_FORMAT_VERSION = 1

PathLike = Union[str, os.PathLike]


def _centroid_paths(path: PathLike) -> tuple[str, str]:
    path = os.fspath(path)
    if os.path.isdir(path) or not path.endswith(".safetensors"):
        path = os.path.join(path, "centroids.safetensors")
    return path, path[: -len(".safetensors")] + ".json"


def label_config_problems(
    config: Any,
    *,
    k: int | None = None,
    feature_dim: int | None = None,
    teacher_name: str | None = None,
    alignment: str | None = None,
) -> list[str]:
    """Disagreements between a model config's label fields and a labelling run.

    ``DeluluConfig`` records how its targets were made (``num_clusters``, ``label_teacher_name``,
    ``label_feature_dim``, ``label_frame_alignment``); a field set to ``None`` is not checked.
    """
    problems = []
    if config is None:
        return problems
    checks = (
        ("num_clusters", k, "k"),
        ("label_feature_dim", feature_dim, "the feature dim"),
        ("label_teacher_name", teacher_name, "the teacher"),
        ("label_frame_alignment", alignment, "the alignment"),
    )
    for field, value, what in checks:
        expected = getattr(config, field, None)
        if expected is None or value is None:
            continue
        if (int(expected) != int(value)) if isinstance(value, int) else (str(expected) != str(value)):
            problems.append(f"the model config has {field}={expected!r} but {what} is {value!r}")
    return problems


@dataclasses.dataclass
class Centroids:
    """k-means centroids plus where they came from.

    ``centroids`` is ``(k, feature_dim)``, float64 as fitted (or float32). ``provenance`` holds the featurizer identity
    (name, preset, weight hash), feature normalisation, alignment, encoder geometry, k-means
    settings, the scikit-learn version and how many frames/items/seconds the fit used. It travels
    inside the safetensors header and in a ``.json`` sidecar for people.
    """

    centroids: torch.Tensor
    provenance: dict[str, Any]

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[1])

    @property
    def alignment(self) -> str | None:
        return self.provenance.get("alignment")

    @property
    def normalization(self) -> str:
        return self.provenance.get("normalization", "none")

    def sha256(self) -> str:
        array = np.ascontiguousarray(self.centroids.detach().cpu().numpy())
        return hashlib.sha256(array.tobytes() + str(array.shape).encode()).hexdigest()

    def save(self, path: PathLike) -> str:
        """Write ``path`` (a ``.safetensors`` file, or a folder -> ``centroids.safetensors``) and its
        ``.json`` sidecar atomically; returns the safetensors path."""
        tensor_path, json_path = _centroid_paths(path)
        provenance = dict(self.provenance, k=self.k, feature_dim=self.dim, centroids_sha256=self.sha256())
        text = json.dumps(provenance, indent=2, sort_keys=True, default=str)
        metadata = {
            "format": CENTROIDS_FORMAT,
            "format_version": str(CENTROIDS_FORMAT_VERSION),
            "provenance": text,
        }
        atomic_save_safetensors(
            {"centroids": self.centroids.detach().cpu().contiguous()}, tensor_path, metadata
        )
        atomic_write_text(json_path, text + "\n")
        return tensor_path

    @classmethod
    def load(cls, path: PathLike) -> Centroids:
        """Read centroids written by ``save`` (safetensors only; nothing is unpickled)."""
        from safetensors import safe_open

        tensor_path, _ = _centroid_paths(path)
        if not os.path.isfile(tensor_path):
            raise FileNotFoundError(f"No centroid file at {tensor_path}")
        with safe_open(tensor_path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != CENTROIDS_FORMAT or "centroids" not in handle.keys():
                raise UserError(f"{tensor_path} is not a {CENTROIDS_FORMAT} file")
            tensor = handle.get_tensor("centroids")
        if tensor.dtype not in (torch.float32, torch.float64):
            raise UserError(f"{tensor_path}: centroids must be float32 or float64, got {tensor.dtype}")
        provenance = json.loads(metadata.get("provenance", "{}"))
        if tensor.ndim != 2:
            raise UserError(f"{tensor_path}: centroids must be 2-D, got shape {tuple(tensor.shape)}")
        return cls(tensor, provenance)

    def check_compatible(
        self,
        *,
        config: Any = None,
        teacher: SpeakerTeacher | None = None,
        teacher_info: dict[str, Any] | None = None,
        alignment: str | None = None,
        normalization: str | None = None,
    ) -> None:
        """Raise ``UserError`` (a ``ValueError``) when these centroids cannot label data for ``config``/``teacher``.

        Called before any audio is touched, so a wrong file costs nothing. Checks: k against the
        config's ``num_clusters``; feature dim against the teacher and ``config.label_feature_dim``;
        teacher name and weights against the fit; alignment and normalisation against the fit and
        ``config.label_frame_alignment``.
        """
        problems = label_config_problems(
            config,
            k=self.k,
            feature_dim=self.dim,
            teacher_name=self.provenance.get("teacher", {}).get("name"),
            alignment=alignment or self.alignment,
        )
        if teacher is not None or teacher_info is not None:
            info = teacher_info if teacher_info is not None else featurizer_provenance(teacher)
            if int(info["feature_dim"]) != self.dim:
                problems.append(
                    f"the teacher {info['name']!r} gives {info['feature_dim']}-d features but the centroids "
                    f"are {self.dim}-d"
                )
            fitted = self.provenance.get("teacher", {})
            if fitted.get("name") and fitted["name"] != info["name"]:
                problems.append(
                    f"the centroids were fitted on {fitted['name']!r} features, not {info['name']!r}"
                )
            elif fitted.get("checkpoint_sha256") and fitted["checkpoint_sha256"] != info["checkpoint_sha256"]:
                problems.append(
                    f"the teacher {info['name']!r} has other weights than the one the centroids were fitted "
                    f"with (sha256 {info['checkpoint_sha256'][:12]} vs {fitted['checkpoint_sha256'][:12]})"
                )
        if alignment is not None and self.alignment is not None and alignment != self.alignment:
            problems.append(
                f"the centroids were fitted on {self.alignment!r}-aligned features, not {alignment!r}"
            )
        if normalization is not None and normalization != self.normalization:
            problems.append(
                f"the centroids were fitted with normalization={self.normalization!r}, not {normalization!r}"
            )
        if problems:
            raise UserError("Centroids do not match: " + "; ".join(problems) + ".")
