"""Fit-feature store: the fit items' encoder-rate features in (within a byte budget), the same features out for the map.

The k-means fit runs the teacher over its items (all of them, or a ``fit_hours`` subset) before any
centroid exists, so their ids cannot be assigned then. Without a store the map runs the teacher over
those items a second time: a 10 % fit subset costs 1.1 teacher passes over the corpus. The store
keeps their aligned, normalised float32 features (exactly what the fit saw) in safetensors files,
one per teacher batch, until the map has assigned them; then the label pass deletes it.

The budget bounds the disk it takes: 2304-d ReDimNet B6 frames at 62.5 frames/s are ~2 GB per
audio hour, so a 16 GB budget keeps ~7.7 h of a 100 h fit and the map recomputes the rest (1.096
teacher passes at 960 h instead of 1.104). Items beyond the budget are simply recomputed; a corpus
whose whole fit fits (the demo corpus: 600-d, a few MB) costs 1.0 passes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any, Union

import numpy as np
import torch

from delulu_hf.atomic import atomic_save_safetensors, atomic_write_json

__all__ = ["FitFeatureStore"]

PathLike = Union[str, os.PathLike]
INDEX_NAME = "index.json"


class FitFeatureStore:
    """Aligned features of fit items on disk, item by item, for the map to assign without the teacher.

    Writing (during the fit, one store per process): ``add`` writes one file per call with the
    items that still fit in ``budget_bytes``; ``finish`` (main process, after every process has
    written) records the files in ``index.json`` under a ``key`` naming the fit. Reading (the map):
    ``FitFeatureStore.open(folder, key)`` returns a store whose ``features(items)`` gives each
    stored item's ``(frames, dim)`` rows; ``None`` when there is no complete store for ``key``.
    """

    def __init__(self, folder: PathLike, budget_bytes: float = 0, rank: int = 0):
        self.folder = os.fspath(folder)
        self.budget_bytes = float(budget_bytes)
        self.rank = int(rank)
        self.used_bytes = 0
        self.files = 0
        self.full = budget_bytes <= 0
        self._index: dict[int, tuple[str, int, int]] = {}

    # --- writing (fit)

    def add(
        self, items: Sequence[int], aligned: torch.Tensor, counts: Sequence[int], good: Sequence[int]
    ) -> None:
        """Store the rows of ``items`` (``good[j]``-th entry of ``counts`` in ``aligned``) within the budget.

        Same arguments as ``LabelBatch``'s ``on_features`` callback; ``aligned`` is ``(M, dim)``.
        """
        if self.full or not items:
            return
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        row_bytes = aligned.shape[1] * 4
        keep_items, keep_counts, rows = [], [], []
        for item, g in zip(items, good):
            size = int(counts[g]) * row_bytes
            if self.used_bytes + size > self.budget_bytes:
                self.full = True  # stop at the first item that does not fit: the rest is recomputed
                break
            self.used_bytes += size
            keep_items.append(int(item))
            keep_counts.append(int(counts[g]))
            rows.append(np.arange(starts[g], starts[g] + counts[g]))
        if not keep_items:
            return
        index = torch.from_numpy(np.concatenate(rows)).to(aligned.device)
        features = aligned[index].detach().to("cpu", torch.float32).contiguous()
        os.makedirs(self.folder, exist_ok=True)
        name = f"features-r{self.rank:03d}-{self.files:06d}.safetensors"
        atomic_save_safetensors(
            {
                "items": torch.tensor(keep_items, dtype=torch.int64),
                "counts": torch.tensor(keep_counts, dtype=torch.int64),
                "features": features,
            },
            os.path.join(self.folder, name),
        )
        self.files += 1

    def finish(self, key: str) -> dict[str, Any]:
        """Record every process's files under ``key`` (main process, after all processes wrote)."""
        files = (
            sorted(f for f in os.listdir(self.folder) if f.startswith("features-"))
            if os.path.isdir(self.folder)
            else []
        )
        info = {"key": key, "files": files}
        os.makedirs(self.folder, exist_ok=True)
        atomic_write_json(os.path.join(self.folder, INDEX_NAME), info)
        return info

    # --- reading (map)

    @classmethod
    def open(cls, folder: PathLike, key: str) -> FitFeatureStore | None:
        """The complete store fitted under ``key`` in ``folder``, or ``None``."""
        from safetensors import safe_open

        folder = os.fspath(folder)
        try:
            with open(os.path.join(folder, INDEX_NAME), encoding="utf-8") as handle:
                info = json.load(handle)
        except (OSError, json.JSONDecodeError):
            return None
        if info.get("key") != key:
            return None
        store = cls(folder)
        for name in info.get("files", []):
            path = os.path.join(folder, name)
            if not os.path.isfile(path):
                return None  # a file was removed by hand: recompute rather than guess
            with safe_open(path, framework="np") as handle:
                items, counts = handle.get_tensor("items"), handle.get_tensor("counts")
            start = 0
            for item, count in zip(items.tolist(), counts.tolist()):
                store._index[int(item)] = (path, start, int(count))
                start += int(count)
        return store

    def __len__(self) -> int:
        return len(self._index)

    def items(self) -> np.ndarray:
        """The stored items' indices (int64)."""
        return np.fromiter(self._index, dtype=np.int64, count=len(self._index))

    def __contains__(self, item: int) -> bool:
        return int(item) in self._index

    def features(self, items: Sequence[int]) -> dict[int, np.ndarray]:
        """``{item: (frames, dim) float32}`` for the stored ones among ``items``."""
        from safetensors import safe_open

        by_file: dict[str, list[int]] = {}
        for item in items:
            if int(item) in self._index:
                by_file.setdefault(self._index[int(item)][0], []).append(int(item))
        out: dict[int, np.ndarray] = {}
        for path, wanted in by_file.items():
            with safe_open(path, framework="np") as handle:
                rows = handle.get_slice("features")
                for item in wanted:
                    _, start, count = self._index[item]
                    out[item] = rows[start : start + count]
        return out
