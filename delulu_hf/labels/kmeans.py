"""k-means fit: a dataset and a teacher in, ``Centroids`` (HuBERT's ``MiniBatchKMeans`` settings) out.

The teacher runs over (a uniform sample of) the corpus in length-sorted batches; a
``FrameReservoir`` keeps a uniform random sample of at most ``max_frames`` encoder-rate frames in
flat memory; scikit-learn ``MiniBatchKMeans`` is fitted on it with fairseq's
``examples/hubert/simple_kmeans/learn_kmeans.py`` settings. The fit sees exactly the aligned,
normalised features that ``add_cluster_ids`` later assigns.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Union

import numpy as np
import torch

from delulu_hf.atomic import atomic_save_safetensors, atomic_write_text
from delulu_hf.errors import UserError
from delulu_hf.labels.alignment import EncoderFrames
from delulu_hf.labels.centroids import CENTROIDS_FORMAT_VERSION, Centroids, label_config_problems
from delulu_hf.labels.extract import (
    ON_ERROR,
    AlignedFeatureExtractor,
    LabelBatch,
    LabelSkip,
    block_ranges,
    default_work_dir,
    dist_state,
    item_seconds,
    undecoded,
)
from delulu_hf.labels.features import MFCCFeatures, featurizer_provenance, json_sha256
from delulu_hf.labels.store import FitFeatureStore
from delulu_hf.teacher.base import SpeakerTeacher

__all__ = ["KMEANS_DEFAULTS", "FrameReservoir", "fit_centroids"]

PathLike = Union[str, os.PathLike]

# HuBERT's k-means settings (fairseq examples/hubert/simple_kmeans/learn_kmeans.py).
KMEANS_DEFAULTS = {
    "batch_size": 10000,
    "n_init": 20,
    "max_no_improvement": 100,
    "max_iter": 100,
    "init_size": None,
    "reassignment_ratio": 0.0,
    "tol": 0.0,
}


class FrameReservoir:
    """A uniform random sample of at most ``capacity`` frames from a stream, in flat memory.

    Every frame gets an independent uniform key and the sample is the ``capacity`` frames with
    the smallest keys: reservoir sampling in its random-key form. Unlike Algorithm R it does not
    depend on arrival order, and two reservoirs merge into the reservoir of their union, which is
    how the processes of a multi-process fit combine their samples. Keys come from
    ``(seed, item index)`` so the sample does not depend on how items are split across processes.
    """

    def __init__(self, capacity: int, dim: int):
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.capacity = int(capacity)
        self.dim = int(dim)
        self.keys = np.empty(0, dtype=np.float64)
        self.features: np.ndarray | None = None  # (capacity, dim) float32, pages touched as filled
        self.seen = 0

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, keys: np.ndarray, features: Union[np.ndarray, torch.Tensor]) -> None:
        """Offer frames ``features`` ``(n, dim)`` with keys ``(n,)``."""
        keys = np.asarray(keys, dtype=np.float64)
        self.seen += len(keys)
        if self.features is None:
            self.features = np.empty((self.capacity, self.dim), dtype=np.float32)
        size = len(self.keys)
        if size < self.capacity:  # still filling: the smallest incoming keys take the free rows
            room = self.capacity - size
            order = np.argsort(keys, kind="stable")
            take, rest = order[:room], order[room:]
            self.features[size : size + len(take)] = _rows(features, take)
            self.keys = np.concatenate([self.keys, keys[take]])
            if len(rest) == 0:
                return
            keys, features = keys[rest], _rows(features, rest)
        candidates = np.flatnonzero(keys < self.keys.max())
        if len(candidates) == 0:
            return
        merged = np.concatenate([self.keys, keys[candidates]])
        keep = np.argpartition(merged, self.capacity - 1)[: self.capacity]
        evicted = np.setdiff1d(np.arange(self.capacity), keep[keep < self.capacity])
        incoming = candidates[keep[keep >= self.capacity] - self.capacity]
        self.features[evicted] = _rows(features, incoming)
        self.keys[evicted] = keys[incoming]

    def sort_by_key(self) -> None:
        """Order the sample by key, in place (cycle-following, no second copy of the features).

        k-means draws its mini-batches by row position, so a fixed row order makes the fit
        independent of how many processes collected the sample."""
        order = np.argsort(self.keys, kind="stable")
        features = self.features
        done = np.zeros(len(order), dtype=bool)
        for start in range(len(order)):
            if done[start] or order[start] == start:
                done[start] = True
                continue
            held = features[start].copy()
            position = start
            while True:
                done[position] = True
                source = order[position]
                if source == start:
                    features[position] = held
                    break
                features[position] = features[source]
                position = source
        self.keys = self.keys[order]

    def sample(self) -> np.ndarray:
        """The sampled frames ``(len(self), dim)`` float32 (a view, no copy)."""
        if self.features is None:
            return np.empty((0, self.dim), dtype=np.float32)
        return self.features[: len(self.keys)]

    def save(self, path: str) -> None:
        atomic_save_safetensors(
            {"keys": torch.from_numpy(self.keys.copy()), "features": torch.from_numpy(self.sample().copy())},
            path,
            {"seen": str(self.seen)},
        )

    def merge_file(self, path: str) -> None:
        from safetensors import safe_open

        with safe_open(path, framework="np") as handle:
            seen = int((handle.metadata() or {}).get("seen", 0))
            keys, features = handle.get_tensor("keys"), handle.get_tensor("features")
        self.add(keys, features)
        self.seen += seen - len(keys)


def _rows(features: Union[np.ndarray, torch.Tensor], index: np.ndarray) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        return (
            features[torch.from_numpy(np.asarray(index, dtype=np.int64)).to(features.device)]
            .float()
            .cpu()
            .numpy()
        )
    return np.asarray(features[index], dtype=np.float32)


def fit_centroids(
    dataset,
    teacher: SpeakerTeacher,
    config: Any,
    *,
    k: int = 256,
    max_frames: int = 250_000,
    fit_hours: float | None = None,
    alignment: str = "nearest",
    normalization: str = "none",
    seed: int = 0,
    kmeans_batch_size: int = KMEANS_DEFAULTS["batch_size"],
    n_init: int = KMEANS_DEFAULTS["n_init"],
    max_no_improvement: int = KMEANS_DEFAULTS["max_no_improvement"],
    max_iter: int = KMEANS_DEFAULTS["max_iter"],
    fit_dtype: str = "float64",
    audio_column: str = "audio",
    name_column: str | None = None,
    on_error: str = "raise",
    chunk_size: int = 64,
    max_batch_seconds: float = 64.0,
    device: Union[str, torch.device, None] = None,
    bf16: bool | None = None,
    work_dir: PathLike | None = None,
    feature_store: FitFeatureStore | None = None,
    verbose: int = 0,
) -> Centroids:
    """Fit k-means centroids on encoder-rate teacher features of ``dataset``.

    The fit sees the same aligned (and normalised) features that ``add_cluster_ids`` assigns.
    ``fit_hours`` picks a uniform random subset of items with that much audio (map-style datasets:
    by a seeded permutation over soundfile header durations; ``IterableDataset``: a seeded shuffle
    buffer), so only that audio goes through the teacher; ``max_frames`` caps the frames kept
    (``FrameReservoir``), so memory is ``max_frames * dim * 4`` bytes whatever the corpus size
    (briefly 12 bytes per value while the sample is converted for a ``fit_dtype="float64"`` fit,
    the default: scikit-learn's k-means++ is several times slower on float32 input).
    Under ``accelerate launch`` each process extracts features for a block of items and the
    reservoirs are merged on the main process (through ``work_dir``); the fitted centroids are then
    loaded by every process. ``feature_store`` (one per process) also keeps the fit items' aligned
    features, within its byte budget, so that a later map need not run the teacher on them again.

    Returns:
        ``Centroids`` with provenance (teacher, alignment, normalisation, k-means settings,
        scikit-learn version, frames/items/seconds used, skipped items).
    """
    import sklearn
    from sklearn.cluster import MiniBatchKMeans

    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    if fit_dtype not in ("float32", "float64"):
        raise ValueError(f"fit_dtype must be 'float32' or 'float64', got {fit_dtype!r}")
    frames = EncoderFrames.from_config(config)
    info = featurizer_provenance(teacher)
    problems = label_config_problems(
        config, k=k, feature_dim=int(teacher.feature_dim), teacher_name=info["name"], alignment=alignment
    )
    if problems:
        raise UserError("Cannot fit labels for this model config: " + "; ".join(problems) + ".")
    extractor = AlignedFeatureExtractor(
        teacher, frames, alignment, normalization, device, bf16, max_batch_seconds, chunk_size
    )
    state = dist_state()
    rank, world = (state.process_index, state.num_processes) if state else (0, 1)

    from datasets import IterableDataset

    dataset = undecoded(dataset, audio_column)
    streaming = isinstance(dataset, IterableDataset)
    if streaming:
        if fit_hours is not None:
            dataset = dataset.shuffle(seed=seed, buffer_size=1000)
        if world > 1:
            from datasets.distributed import split_dataset_by_node

            dataset = split_dataset_by_node(dataset, rank=rank, world_size=world)
        budget = None if fit_hours is None else fit_hours * 3600.0 / world
        selected = None
    else:
        selected = np.arange(len(dataset))
        if fit_hours is not None:
            seconds = item_seconds(dataset, audio_column, teacher.sample_rate)
            order = np.random.default_rng(seed).permutation(len(dataset))
            enough = np.searchsorted(np.cumsum(seconds[order]), fit_hours * 3600.0) + 1
            selected = np.sort(order[:enough])
        begin, end = block_ranges(len(selected), chunk_size, world)[rank]
        dataset = dataset.select(selected[begin:end].tolist())
        budget = None

    reservoir = FrameReservoir(max_frames, teacher.feature_dim)
    skipped: list[LabelSkip] = []
    totals = {"items": 0, "seconds": 0.0}

    def collect(item_indices: list[int], aligned: torch.Tensor, counts: list[int], good: list[int]) -> None:
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        for item, g in zip(item_indices, good):
            rows = np.arange(starts[g], starts[g] + counts[g])
            keys = np.random.default_rng([seed, int(item)]).random(len(rows))
            reservoir.add(keys, _rows(aligned, rows))
            totals["items"] += 1
            # Lower bound of the item's length (the column keeps frames, not samples).
            totals["seconds"] += ((counts[g] - 1) * frames.hop + frames.receptive_field) / teacher.sample_rate
        if feature_store is not None:
            feature_store.add(item_indices, aligned, counts, good)

    labeler = LabelBatch(extractor, None, audio_column, name_column, on_error, skipped, on_features=collect)
    from tqdm.auto import tqdm

    # a context manager: a bad item that stops the run leaves the bar closed, so the error reads on its own line
    with tqdm(
        desc=f"teacher features for k-means (rank {rank})", unit="item", disable=verbose < 0
    ) as progress:
        if streaming:
            batch: dict[str, list] = {}
            item_ids: list[int] = []
            for count, example in enumerate(dataset):
                for key, value in example.items():
                    batch.setdefault(key, []).append(value)
                item_ids.append(count * world + rank)
                if len(item_ids) == chunk_size:
                    labeler(batch, item_ids)
                    progress.update(len(item_ids))
                    batch, item_ids = {}, []
                    if budget is not None and totals["seconds"] >= budget:
                        break
            if item_ids:
                labeler(batch, item_ids)
                progress.update(len(item_ids))
        else:
            positions = selected[begin:end]
            for start in range(0, len(dataset), chunk_size):
                batch = dataset[start : start + chunk_size]
                labeler(batch, positions[start : start + chunk_size].tolist())
                progress.update(len(batch[audio_column]))

    work_dir = os.fspath(work_dir) if work_dir is not None else None
    if world > 1:
        if work_dir is None:
            tag = json_sha256(
                [
                    extractor.fingerprint(info),
                    seed,
                    max_frames,
                    fit_hours,
                    k,
                    getattr(dataset, "_fingerprint", None),
                ]
            )
            work_dir = default_work_dir(f"fit-{tag[:16]}")
        os.makedirs(work_dir, exist_ok=True)
        reservoir.save(os.path.join(work_dir, f"reservoir-{rank}.safetensors"))
        atomic_write_text(
            os.path.join(work_dir, f"stats-{rank}.json"),
            json.dumps({"totals": totals, "skipped": [dataclasses.asdict(s) for s in skipped]}),
        )
        state.wait_for_everyone()
        centroid_path = os.path.join(work_dir, "centroids.safetensors")
        if rank != 0:
            state.wait_for_everyone()  # the main process fits and saves
            centroids = Centroids.load(centroid_path)
            state.wait_for_everyone()  # everyone has read it; the main process cleans up
            return centroids
        merged = FrameReservoir(max_frames, teacher.feature_dim)
        totals = {"items": 0, "seconds": 0.0}
        skipped = []
        for other in range(world):
            merged.merge_file(os.path.join(work_dir, f"reservoir-{other}.safetensors"))
            with open(os.path.join(work_dir, f"stats-{other}.json")) as handle:
                stats = json.load(handle)
            totals["items"] += stats["totals"]["items"]
            totals["seconds"] += stats["totals"]["seconds"]
            skipped += [LabelSkip(**s) for s in stats["skipped"]]
        reservoir = merged

    reservoir.sort_by_key()
    sample = reservoir.sample()
    frames_used = len(sample)
    if frames_used < k:
        raise UserError(f"k-means needs at least k={k} frames; the data gave {frames_used}")
    if fit_dtype == "float64":
        # scikit-learn's k-means++ computes float32 distances by upcasting small blocks to float64,
        # which made the n_init=20 initialisation several times slower than on float64 input.
        sample = sample.astype(np.float64)
        reservoir.features = None  # free the float32 copy: peak memory is 12 bytes per value, then 8
    started = time.perf_counter()
    kmeans = MiniBatchKMeans(
        n_clusters=k,
        init="k-means++",
        max_iter=max_iter,
        batch_size=kmeans_batch_size,
        verbose=max(verbose, 0),
        compute_labels=False,
        tol=KMEANS_DEFAULTS["tol"],
        max_no_improvement=max_no_improvement,
        init_size=KMEANS_DEFAULTS["init_size"],
        n_init=n_init,
        reassignment_ratio=KMEANS_DEFAULTS["reassignment_ratio"],
        random_state=seed,
    ).fit(sample)
    inertia = float(-kmeans.score(sample)) / frames_used if frames_used <= 200_000 else None
    provenance = {
        "format_version": CENTROIDS_FORMAT_VERSION,
        "features": "mfcc" if isinstance(teacher, MFCCFeatures) else "teacher",
        "teacher": info,
        "alignment": alignment,
        "normalization": normalization,
        "encoder": {
            "conv_kernel": list(frames.conv_kernel),
            "conv_stride": list(frames.conv_stride),
            "receptive_field": frames.receptive_field,
            "hop": frames.hop,
        },
        "kmeans": {
            "algorithm": "sklearn.cluster.MiniBatchKMeans",
            "sklearn_version": sklearn.__version__,
            "init": "k-means++",
            "batch_size": kmeans_batch_size,
            "n_init": n_init,
            "max_no_improvement": max_no_improvement,
            "max_iter": max_iter,
            "reassignment_ratio": KMEANS_DEFAULTS["reassignment_ratio"],
            "tol": KMEANS_DEFAULTS["tol"],
            "seed": seed,
            "fit_dtype": fit_dtype,
            "n_steps": int(getattr(kmeans, "n_steps_", 0)),
            "mean_squared_distance": inertia,
            "fit_seconds": round(time.perf_counter() - started, 3),
        },
        "frames_used": int(frames_used),
        "frames_seen": int(reservoir.seen),
        "max_frames": int(max_frames),
        "fit_hours": fit_hours,
        "items_used": int(totals["items"]),
        "audio_seconds_used": round(float(totals["seconds"]), 3),
        "bf16": extractor.bf16,
        "processes": world,
        "skipped": [dataclasses.asdict(s) for s in skipped],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    centroids = Centroids(torch.from_numpy(np.ascontiguousarray(kmeans.cluster_centers_)), provenance)
    if world > 1:
        centroids.save(centroid_path)
        state.wait_for_everyone()
        state.wait_for_everyone()
        for other in range(world):  # the per-process samples can be large (max_frames * dim floats)
            for name in (f"reservoir-{other}.safetensors", f"stats-{other}.json"):
                os.remove(os.path.join(work_dir, name))
    return centroids
