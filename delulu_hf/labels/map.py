"""Map: a dataset, a teacher and ``Centroids`` in, the dataset plus a ``cluster_ids`` column out.

``add_cluster_ids`` is one ``datasets.map(batched=True)`` over ``LabelBatch`` (decode -> teacher ->
alignment -> ``ClusterAssigner``), cached under a fingerprint of the dataset, the centroids, the
teacher weights and every setting that shapes the features, so a re-run loads the column without
running the teacher. Under ``accelerate launch`` each process labels a contiguous block of whole
chunks into that cache and every process returns the concatenation. ``skipped_items`` finds the
items a ``on_error="skip"`` run left without ids, from the column itself.
"""

from __future__ import annotations

import os
from typing import Any, Union

import numpy as np
import torch

from delulu_hf.errors import UserError
from delulu_hf.labels.assign import ClusterAssigner
from delulu_hf.labels.centroids import Centroids
from delulu_hf.labels.extract import (
    LABEL_COLUMN,
    ON_ERROR,
    AlignedFeatureExtractor,
    LabelBatch,
    LabelSkip,
    block_ranges,
    default_work_dir,
    dist_state,
    undecoded,
)
from delulu_hf.labels.features import featurizer_provenance, json_sha256
from delulu_hf.teacher.base import SpeakerTeacher

__all__ = ["add_cluster_ids", "skipped_items"]

PathLike = Union[str, os.PathLike]


def add_cluster_ids(
    dataset,
    teacher: SpeakerTeacher,
    centroids: Centroids,
    config: Any,
    *,
    alignment: str | None = None,
    normalization: str | None = None,
    audio_column: str = "audio",
    name_column: str | None = None,
    on_error: str = "raise",
    chunk_size: int = 64,
    max_batch_seconds: float = 64.0,
    device: Union[str, torch.device, None] = None,
    bf16: bool | None = None,
    cache_dir: PathLike | None = None,
    load_from_cache_file: bool = True,
    skipped: list[LabelSkip] | None = None,
):
    """Append ``cluster_ids`` (int16 list, one id per encoder frame) to every item of ``dataset``.

    ``len(item["cluster_ids"]) == feat_extract_output_lengths(config, num_samples)`` for every
    decodable item. A bad item (undecodable, shorter than the receptive field, non-finite teacher
    output) raises ``AudioDecodeError`` naming it (``on_error="raise"``) or gets ``None`` and is
    recorded in ``skipped`` (``on_error="skip"``; ``skipped_items`` finds them later, also in a
    cached result). Centroids are checked against ``config`` and ``teacher`` before any work.

    Map-style datasets are processed with ``Dataset.map(batched=True, batch_size=chunk_size)``
    under a fingerprint of (dataset, centroids, teacher weights, settings): with a disk-backed
    dataset or ``cache_dir`` a second call loads the cached column without running the teacher.
    Under ``accelerate launch`` each process labels a contiguous block of whole chunks, writes it
    to the cache, and every process returns the concatenation. ``IterableDataset`` inputs get a
    lazy ``map`` (split by ``split_dataset_by_node`` when several processes run).

    Args:
        alignment / normalization: default to the ones the centroids were fitted with.
        chunk_size: items per ``map`` batch; items are length-sorted inside a chunk.
        max_batch_seconds: padded audio per teacher call.
        cache_dir: where to cache in-memory datasets (disk-backed ones use their own cache dir).
        skipped: a list that receives a ``LabelSkip`` per bad item labelled in this call.
    """
    from datasets import Dataset, IterableDataset, List, Value, concatenate_datasets

    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    alignment = alignment or centroids.alignment or "nearest"
    normalization = normalization or centroids.normalization
    teacher_info = featurizer_provenance(teacher)
    centroids.check_compatible(
        config=config, teacher_info=teacher_info, alignment=alignment, normalization=normalization
    )
    extractor = AlignedFeatureExtractor(
        teacher, config, alignment, normalization, device, bf16, max_batch_seconds, chunk_size
    )
    if centroids.k > np.iinfo(np.int16).max:
        raise UserError(f"k={centroids.k} does not fit the int16 cluster_ids column")
    assigner = ClusterAssigner(centroids.centroids, device=extractor.device)
    skipped = skipped if skipped is not None else []
    function = LabelBatch(extractor, assigner, audio_column, name_column, on_error, skipped)
    original_features = dataset.features
    work = undecoded(dataset, audio_column)
    features = None
    if work.features is not None:
        features = work.features.copy()
        features[LABEL_COLUMN] = List(Value("int16"))
    state = dist_state()
    rank, world = (state.process_index, state.num_processes) if state else (0, 1)

    if isinstance(work, IterableDataset):
        if world > 1:
            from datasets.distributed import split_dataset_by_node

            work = split_dataset_by_node(work, rank=rank, world_size=world)
        return work.map(function, batched=True, batch_size=chunk_size, with_indices=True, features=features)
    if not isinstance(work, Dataset):
        raise TypeError(f"expected a datasets Dataset or IterableDataset, got {type(dataset).__name__}")

    fingerprint = json_sha256(
        {
            "dataset": work._fingerprint,
            "centroids": centroids.sha256(),
            "extractor": extractor.fingerprint(teacher_info),
            "chunk_size": chunk_size,
            "on_error": on_error,
            "audio_column": audio_column,
        }
    )[:32]
    if cache_dir is None and work.cache_files:
        cache_dir = os.path.dirname(work.cache_files[0]["filename"])
    if cache_dir is None and world > 1:
        cache_dir = default_work_dir("map")

    def run_block(begin: int, end: int) -> Dataset:
        block = work if (begin, end) == (0, len(work)) else work.select(range(begin, end))
        cache_file = None
        if cache_dir is not None:
            os.makedirs(cache_dir, exist_ok=True)
            cache_file = os.path.join(
                os.fspath(cache_dir), f"delulu-labels-{fingerprint}-{begin}-{end}.arrow"
            )
        # with_indices gives positions within the block; shift them to dataset positions for names.
        return block.map(
            lambda batch, indices: function(batch, [begin + i for i in indices]),
            batched=True,
            batch_size=chunk_size,
            with_indices=True,
            features=features,
            new_fingerprint=f"{fingerprint}-{begin}-{end}",
            cache_file_name=cache_file,
            load_from_cache_file=load_from_cache_file,
            desc=f"cluster ids (rank {rank})",
        )

    if len(work) == 0:
        raise UserError("the dataset is empty: nothing to label")
    blocks = block_ranges(len(work), chunk_size, world)
    if world == 1:
        labelled = run_block(0, len(work))
    else:
        if blocks[rank][1] > blocks[rank][0]:
            run_block(*blocks[rank])
        state.wait_for_everyone()  # every block is now in the cache; the calls below only load it
        labelled = concatenate_datasets([run_block(b, e) for b, e in blocks if e > b])
    if original_features is not None and original_features.get(audio_column) != labelled.features.get(
        audio_column
    ):
        labelled = labelled.cast_column(audio_column, original_features[audio_column])
    return labelled


def skipped_items(dataset, name_column: str | None = None) -> list[dict[str, Any]]:
    """Items whose ``cluster_ids`` is null (skipped), as ``{"index", "name"}`` dicts.

    Read from the column itself, so it also works on cached results and merged multi-process output.
    """
    import pyarrow.compute as pc

    table = dataset.with_format("arrow")
    found = []
    offset = 0
    for batch in table.iter(batch_size=10_000):
        nulls = np.flatnonzero(pc.is_null(batch[LABEL_COLUMN]).to_numpy(zero_copy_only=False))
        for row in nulls.tolist():
            name = None
            if name_column and name_column in batch.column_names:
                name = str(batch[name_column][row].as_py())
            elif "file_name" in batch.column_names:
                name = str(batch["file_name"][row].as_py())
            found.append({"index": offset + row, "name": name or f"#{offset + row}"})
        offset += batch.num_rows
    return found
