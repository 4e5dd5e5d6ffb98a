"""Sharded map: a dataset, a teacher and ``Centroids`` in, one committed file of cluster ids per shard out.

fairseq's ``simple_kmeans`` writes each step's output per shard (``rank``, ``nshard``) so that a
failure costs one shard; this is that property for a ``datasets`` column. The items are split into
``ShardPlan.bounds``: contiguous ranges on ``chunk_size`` boundaries, so every chunk (and with it
every padded teacher batch) is the same whatever the number of shards or processes, and so are the
ids. Each shard is labelled on its own and committed atomically as a small safetensors file (the
ids and per-item lengths, never the audio); a rerun labels only the shards whose file is missing,
and ``assemble_column`` joins the files into the ``cluster_ids`` column. Processes started by
``accelerate launch`` take disjoint shards (every ``world``-th missing one), so a lost process
costs only the shard it was working on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from typing import Any, Union

import numpy as np
import torch

from delulu_hf.atomic import atomic_save_safetensors, atomic_write_json
from delulu_hf.labels.extract import LabelBatch, LabelSkip, block_ranges
from delulu_hf.labels.store import FitFeatureStore

logger = logging.getLogger(__name__)

__all__ = [
    "PLAN_FORMAT",
    "SHARD_FORMAT",
    "ShardLabeller",
    "ShardPlan",
    "assemble_column",
    "map_shards",
    "read_shard",
]

PathLike = Union[str, os.PathLike]
PLAN_FORMAT = "delulu-label-plan"
SHARD_FORMAT = "delulu-label-shard"
#: Audio hours per shard by default: minutes of teacher time, so a crash costs little, while 960 h
#: make ~240 files of ~2 MB (int16 ids at 62.5 frames/s). Measured: the demo teacher labels ~18
#: audio s/s on 2 CPU cores (a 4 h shard: ~13 min); a GPU at 100-1000x real time takes 15 s-2.5 min
#: (B6 on a GPU not measured here). ``--shard_hours``/``--num_shards`` change it.
DEFAULT_SHARD_HOURS = 4.0


@dataclasses.dataclass
class ShardPlan:
    """How the map is split: ``bounds[i] = (begin, end)`` item ranges, fixed by the first run.

    ``estimated_hours`` is the audio it covers (from file headers or decoded lengths).
    ``inputs`` is everything that determines the ids (dataset fingerprint, centroids, teacher
    weights, feature settings, chunking); ``fingerprint`` is its hash, stamped into every shard,
    so a shard made with other inputs is never taken for one of these.
    """

    fingerprint: str
    inputs: dict[str, Any]
    bounds: list[tuple[int, int]]
    estimated_hours: float | None = None
    requested_shards: int | None = None  # what was asked for; cuts that coincide give fewer

    @classmethod
    def make(
        cls,
        fingerprint: str,
        inputs: dict[str, Any],
        num_items: int,
        chunk_size: int,
        num_shards: int,
        seconds: Sequence[float] | None = None,
    ) -> ShardPlan:
        """Split ``num_items`` into at most ``num_shards`` non-empty ranges on ``chunk_size`` boundaries.

        With the items' durations (``seconds``) the ranges hold about equal audio (each cut at the
        chunk boundary nearest to its share), else about equal item counts."""
        num_chunks = math.ceil(num_items / chunk_size)
        requested, num_shards = int(num_shards), max(1, min(int(num_shards), num_chunks))
        if seconds is None or num_shards == 1:
            bounds = block_ranges(num_items, chunk_size, num_shards)
            hours = None if seconds is None else float(np.sum(seconds)) / 3600
        else:
            per_chunk = np.add.reduceat(
                np.asarray(seconds, dtype=np.float64), np.arange(0, num_items, chunk_size)
            )
            ends = np.concatenate([[0.0], np.cumsum(per_chunk)])  # audio before each chunk boundary
            targets = ends[-1] * np.arange(1, num_shards) / num_shards
            cuts = np.abs(ends[None, :] - targets[:, None]).argmin(axis=1)  # nearest chunk boundary
            cuts = np.unique(np.clip(cuts, 1, num_chunks - 1))
            edges = [0, *[int(c) * chunk_size for c in cuts], num_items]
            bounds = list(zip(edges[:-1], edges[1:]))
            hours = float(ends[-1]) / 3600
        bounds = [(int(b), int(e)) for b, e in bounds if e > b]
        return cls(fingerprint, inputs, bounds, None if hours is None else round(hours, 4), requested)

    @staticmethod
    def default_num_shards(hours: float, shard_hours: float, world: int) -> int:
        """Enough shards for ``shard_hours`` of audio each, and at least one per process."""
        return max(1, world, math.ceil(hours / shard_hours) if shard_hours > 0 else 1)

    def save(self, path: PathLike) -> None:
        atomic_write_json(
            path,
            {
                "format": PLAN_FORMAT,
                "fingerprint": self.fingerprint,
                "inputs": self.inputs,
                "bounds": [list(b) for b in self.bounds],
                "num_shards": len(self.bounds),
                "estimated_hours": self.estimated_hours,
                "requested_shards": self.requested_shards,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
        )

    @classmethod
    def load(cls, path: PathLike) -> ShardPlan | None:
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
        except (OSError, json.JSONDecodeError):
            return None
        if data.get("format") != PLAN_FORMAT:
            return None
        bounds = [(int(b), int(e)) for b, e in data["bounds"]]
        return cls(
            data["fingerprint"],
            data["inputs"],
            bounds,
            data.get("estimated_hours"),
            data.get("requested_shards"),
        )

    def shard_path(self, folder: PathLike, index: int) -> str:
        return os.path.join(os.fspath(folder), f"shard-{index:05d}-of-{len(self.bounds):05d}.safetensors")

    def is_done(self, folder: PathLike, index: int) -> bool:
        """Whether shard ``index`` is committed for this plan (its file exists and names this plan)."""
        meta = read_shard(self.shard_path(folder, index), metadata_only=True)
        return (
            meta is not None
            and meta.get("plan") == self.fingerprint
            and (int(meta.get("begin", -1)), int(meta.get("end", -1))) == tuple(self.bounds[index])
        )


def read_shard(path: PathLike, metadata_only: bool = False):
    """A committed shard: ``(lengths, ids, metadata)`` (``lengths[i] == -1``: item skipped), or its
    metadata alone; ``None`` if the file is missing or not a shard."""
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        return None
    try:
        with safe_open(path, framework="np") as handle:
            meta = dict(handle.metadata() or {})
            if meta.get("format") != SHARD_FORMAT:
                return None
            meta["skipped"] = json.loads(meta.get("skipped", "[]"))
            if metadata_only:
                return meta
            return handle.get_tensor("lengths"), handle.get_tensor("ids"), meta
    except (SafetensorError, OSError, ValueError) as error:
        logger.warning("ignoring unreadable shard %s (%s): it will be labelled again", path, error)
        return None


class ShardLabeller:
    """Cluster ids of one shard's items: stored fit features are assigned directly, the rest go
    through ``LabelBatch`` (decode, teacher, alignment, assignment) chunk by chunk.

    Args:
        labeller: the ``LabelBatch`` of the map (its ``skipped`` list collects the bad items).
        store: the fit's ``FitFeatureStore``, or ``None``.
    """

    def __init__(self, labeller: LabelBatch, store: FitFeatureStore | None = None):
        self.labeller = labeller
        self.store = store if store is not None and len(store) else None

    def _read(self, work, rows: list[int]) -> dict[str, list]:
        if rows == list(range(rows[0], rows[-1] + 1)):
            return work[rows[0] : rows[-1] + 1]
        return work[rows]

    def __call__(
        self, work, begin: int, end: int, chunk_size: int
    ) -> tuple[np.ndarray, np.ndarray, list[LabelSkip]]:
        """``(lengths, ids, skipped)`` of items ``[begin, end)``: ``lengths`` int64 (``-1``: skipped),
        ``ids`` the int16 ids of every labelled item, concatenated in item order."""
        skipped = self.labeller.skipped
        first_skip = len(skipped)
        per_item: list[Any] = [None] * (end - begin)
        for start in range(begin, end, chunk_size):
            stop = min(end, start + chunk_size)
            rows = list(range(start, stop))
            stored = self.store.features(rows) if self.store is not None else {}
            if stored:
                stored_rows = [r for r in rows if r in stored]
                ids = self.labeller.assign(torch.from_numpy(np.concatenate([stored[r] for r in stored_rows])))
                parts = np.split(
                    ids.to("cpu", torch.int16).numpy(), np.cumsum([len(stored[r]) for r in stored_rows])[:-1]
                )
                for r, part in zip(stored_rows, parts):
                    per_item[r - begin] = part
                rows = [r for r in rows if r not in stored]
            if rows:
                out = self.labeller(self._read(work, rows), rows)
                for r, ids in zip(rows, out["cluster_ids"]):
                    per_item[r - begin] = None if ids is None else np.asarray(ids, dtype=np.int16)
        lengths = np.array([-1 if ids is None else len(ids) for ids in per_item], dtype=np.int64)
        kept = [ids for ids in per_item if ids is not None]
        flat = np.concatenate(kept).astype(np.int16) if kept else np.zeros(0, dtype=np.int16)
        return lengths, flat, skipped[first_skip:]


def map_shards(
    plan: ShardPlan,
    folder: PathLike,
    work,
    labeller: ShardLabeller,
    chunk_size: int,
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
) -> list[int]:
    """Label and commit this process's share of the missing shards; returns the shards it labelled.

    Shards already committed (by an earlier run or another process) are not touched. Of the
    missing ones, process ``rank`` takes every ``world``-th, so processes never share a shard.
    """
    from tqdm.auto import tqdm

    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    total = len(plan.bounds)
    missing = [i for i in range(total) if not plan.is_done(folder, i)]
    mine = missing[rank::world]
    logger.info(
        "label map: %d/%d shards done, %d to label%s",
        total - len(missing),
        total,
        len(missing),
        f" ({len(mine)} on rank {rank})" if world > 1 else "",
    )
    done = total - len(missing)
    with tqdm(
        total=total, initial=done, desc=f"label shards (rank {rank})", unit="shard", disable=not progress
    ) as bar:
        for index in mine:
            begin, end = plan.bounds[index]
            started = time.perf_counter()
            lengths, ids, skipped = labeller(work, begin, end, chunk_size)
            meta = {
                "format": SHARD_FORMAT,
                "plan": plan.fingerprint,
                "index": str(index),
                "begin": str(begin),
                "end": str(end),
                "rank": str(rank),
                "seconds": f"{time.perf_counter() - started:.3f}",
                "skipped": json.dumps([dataclasses.asdict(s) for s in skipped]),
            }
            tensors = {"lengths": torch.from_numpy(lengths), "ids": torch.from_numpy(ids)}
            atomic_save_safetensors(tensors, plan.shard_path(folder, index), meta)
            bar.update(1)
            logger.info(
                "shard %d/%d committed: items %d-%d, %d frames, %d skipped",
                index + 1,
                total,
                begin,
                end,
                len(ids),
                len(skipped),
            )
    return mine


def assemble_column(plan: ShardPlan, folder: PathLike):
    """The committed shards joined into one ``cluster_ids`` column: ``(pyarrow ChunkedArray of
    list<int16> (null for skipped items), one chunk per shard; [LabelSkip, ...])``. Raises
    ``RuntimeError`` if a shard is missing."""
    import pyarrow as pa

    chunks, skipped = [], []
    for index, (begin, end) in enumerate(plan.bounds):
        shard = read_shard(plan.shard_path(folder, index))
        if shard is None or shard[2].get("plan") != plan.fingerprint:
            raise RuntimeError(f"shard {index} of {folder} is missing: label it before assembling")
        lengths, ids, meta = shard
        if len(lengths) != end - begin or int(np.maximum(lengths, 0).sum()) != len(ids):
            raise RuntimeError(f"shard {index} of {folder} is inconsistent with its plan")
        offsets = np.concatenate([[0], np.cumsum(np.maximum(lengths, 0))]).astype(np.int32)
        chunks.append(
            pa.ListArray.from_arrays(
                pa.array(offsets), pa.array(ids.astype(np.int16)), mask=pa.array(lengths < 0)
            )
        )
        skipped += [LabelSkip(**s) for s in meta["skipped"]]
    return pa.chunked_array(chunks, type=pa.list_(pa.int16())), skipped
