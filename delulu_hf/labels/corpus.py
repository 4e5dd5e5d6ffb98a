"""Label pass: a corpus, a teacher and a model config in, a resumable labelled-corpus folder out.

At the paper's scale the pass is hours of GPU time (a ReDimNet B6 over 960 h, k-means on 100 h of
2304-d frames, then the map), so every step leaves its result in the output folder the moment it
is done, and a rerun of the same command continues where the last one stopped::

    OUT/
      centroids.safetensors (+ .json)  written when the fit ends; its provenance holds the fit inputs
      model_config.json                the model config with this run's label fields
      work/fit_features/               the fit items' features (a byte budget), deleted after the map
      work/plan.json                   the shard plan and everything that determines the ids
      work/shards/shard-*.safetensors  one committed file of ids per shard
      dataset/                         assembled from the shards (input columns + cluster_ids)
      labels.json                      the manifest (delulu_hf.labels.handoff), written last

A rerun with the same inputs finds the centroids ("reusing centroids fitted ..."), labels only the
shards without a file and assembles; with other inputs it refuses to mix them and names what
differs. ``LabelPass`` is the object ``training/prepare_labels.py`` drives step by step.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from typing import Any, Union

import numpy as np
import torch

from delulu_hf.atomic import atomic_save_dataset
from delulu_hf.errors import UserError
from delulu_hf.labels.assign import ClusterAssigner
from delulu_hf.labels.centroids import Centroids
from delulu_hf.labels.extract import (
    LABEL_COLUMN,
    LABELS_VERSION,
    ON_ERROR,
    AlignedFeatureExtractor,
    LabelBatch,
    LabelSkip,
    dist_state,
    item_seconds,
    undecoded,
)
from delulu_hf.labels.features import featurizer_provenance, json_sha256
from delulu_hf.labels.handoff import (
    MANIFEST_FORMAT,
    MANIFEST_FORMAT_VERSION,
    MANIFEST_NAME,
    LabelledCorpus,
    write_manifest,
)
from delulu_hf.labels.kmeans import fit_centroids
from delulu_hf.labels.shards import (
    DEFAULT_SHARD_HOURS,
    ShardLabeller,
    ShardPlan,
    assemble_column,
    map_shards,
)
from delulu_hf.labels.store import FitFeatureStore
from delulu_hf.teacher.base import SpeakerTeacher

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_FIT_FEATURE_BUDGET_GB",
    "DEFAULT_SHARD_HOURS",
    "LabelPass",
    "corpus_manifest",
    "input_differences",
]

PathLike = Union[str, os.PathLike]
#: Disk for the fit items' features (float32): ~8 h of 2304-d B6 frames, all of a small corpus's fit.
DEFAULT_FIT_FEATURE_BUDGET_GB = 16.0
WORK_DIR = "work"
# What labelling an item whose features are in the fit's store costs, relative to running the teacher
# (reading and assigning its frames), when shards are balanced.
STORED_ITEM_COST = 0.05


def _jsonable(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, unknown objects strings)."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def input_differences(old: dict[str, Any], new: dict[str, Any], limit: int = 6) -> list[str]:
    """``["k: 256 (then) vs 128 (now)", ...]``: the leaves of two input records that differ."""
    before, after = _flatten(_jsonable(old)), _flatten(_jsonable(new))
    out = []
    for key in sorted(set(before) | set(after)):
        if before.get(key) != after.get(key):
            out.append(f"{key}: {_short(before.get(key))} (then) vs {_short(after.get(key))} (now)")
    return out[:limit] + ([f"... {len(out) - limit} more"] if len(out) > limit else [])


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:16] + "..." + text[-8:]


def corpus_manifest(
    centroids: Centroids,
    *,
    alignment: str,
    normalization: str,
    source: dict[str, Any],
    total_items: int,
    skipped: Sequence[dict[str, Any]],
    label_pass: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``labels.json`` of a labelled corpus (see ``delulu_hf.labels.handoff``)."""
    prov = centroids.provenance
    teacher = prov.get("teacher", {})
    return {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_FORMAT_VERSION,
        "dataset": "dataset",
        "centroids": "centroids.safetensors",
        "num_clusters": centroids.k,
        "label_teacher_name": teacher.get("name"),
        "label_feature_dim": centroids.dim,
        "label_frame_alignment": alignment,
        "normalization": normalization,
        "teacher": teacher,
        "fit": {
            "items_used": prov.get("items_used"),
            "frames_used": prov.get("frames_used"),
            "audio_seconds_used": prov.get("audio_seconds_used"),
            "fit_hours": prov.get("fit_hours"),
            "seed": prov.get("kmeans", {}).get("seed"),
        },
        "source": dict(source),
        "items": {"total": total_items, "labelled": total_items - len(skipped), "skipped": len(skipped)},
        "skipped": [dict(s) for s in skipped],
        "label_pass": dict(label_pass or {}, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())),
    }


class LabelPass:
    """One resumable label pass into ``output``: ``centroids()`` -> ``map()`` -> ``assemble()`` ->
    ``write_manifest()``. Run the same steps on every process of an ``accelerate launch``;
    ``assemble``/``write_manifest`` on the main process only (``is_main_process``).

    Args:
        output: the output folder (created).
        dataset: a map-style ``datasets.Dataset`` with ``audio_column`` (decoded or not).
        teacher: the featurizer (``load_featurizer``).
        config: the model config (frame geometry, label fields checked against the run).
        source: how the data was named (``{"data", "split", "audio_column", "audio_decoding"}``):
            part of the fit inputs and copied into the manifest.
        decode_skips: items dropped before labelling (``{"name", "reason"}``), e.g. when decoding.
        The rest as in ``fit_centroids`` / ``add_cluster_ids``.
    """

    def __init__(
        self,
        output: PathLike,
        dataset,
        teacher: SpeakerTeacher,
        config: Any,
        *,
        alignment: str = "nearest",
        normalization: str = "none",
        audio_column: str = "audio",
        name_column: str | None = None,
        on_error: str = "raise",
        chunk_size: int = 64,
        max_batch_seconds: float = 64.0,
        device: Union[str, torch.device, None] = None,
        bf16: bool | None = None,
        source: dict[str, Any] | None = None,
        decode_skips: Sequence[dict[str, Any]] = (),
        progress: bool = True,
    ):
        from datasets import Dataset

        if not isinstance(dataset, Dataset):
            raise TypeError(f"a label pass needs a map-style datasets.Dataset, got {type(dataset).__name__}")
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        if len(dataset) == 0:
            raise UserError("the dataset is empty: nothing to label")
        self.output = os.fspath(output)
        self.dataset = dataset
        self.work = undecoded(dataset, audio_column)
        self.teacher = teacher
        self.config = config
        self.alignment = alignment
        self.normalization = normalization
        self.audio_column = audio_column
        self.name_column = name_column
        self.on_error = on_error
        self.chunk_size = chunk_size
        self.max_batch_seconds = max_batch_seconds
        self.device = device
        self.bf16 = bf16
        self.source = dict(source or {})
        self.decode_skips = [dict(s, stage="decode") for s in decode_skips]
        self.progress = progress
        self.teacher_info = featurizer_provenance(teacher)
        self.extractor = AlignedFeatureExtractor(
            teacher, config, alignment, normalization, device, bf16, max_batch_seconds, chunk_size
        )
        self.state = dist_state()
        self.rank, self.world = (self.state.process_index, self.state.num_processes) if self.state else (0, 1)
        self.fit_key: str | None = None
        self.fit_inputs: dict[str, Any] | None = None
        self.plan: ShardPlan | None = None
        self.complete = False
        self.label_skips: list[LabelSkip] = []

    # --- where things are

    @property
    def is_main_process(self) -> bool:
        return self.rank == 0

    @property
    def centroids_path(self) -> str:
        return os.path.join(self.output, "centroids.safetensors")

    @property
    def work_dir(self) -> str:
        return os.path.join(self.output, WORK_DIR)

    @property
    def store_dir(self) -> str:
        return os.path.join(self.work_dir, "fit_features")

    @property
    def shard_dir(self) -> str:
        return os.path.join(self.work_dir, "shards")

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    # --- inputs

    def _dataset_identity(self) -> dict[str, Any]:
        return {"fingerprint": self.dataset._fingerprint, "num_items": len(self.dataset)}

    def _feature_settings(self) -> dict[str, Any]:
        """What shapes the features besides the weights: precision and device type included, since
        bf16 features on CUDA differ from float32 ones on CPU."""
        return {**self.extractor.settings(), "chunk_size": self.chunk_size, "labels_version": LABELS_VERSION}

    def make_fit_inputs(self, k: int, fit_settings: dict[str, Any]) -> dict[str, Any]:
        """Everything the fitted centroids depend on (recorded in their provenance as ``fit_inputs``)."""
        return _jsonable(
            {
                "source": self.source,
                "dataset": self._dataset_identity(),
                "teacher": self.teacher_info,
                "k": int(k),
                "fit": fit_settings,
                "features": self._feature_settings(),
            }
        )

    def make_map_inputs(self, centroids: Centroids) -> dict[str, Any]:
        """Everything the ids depend on (recorded in ``work/plan.json`` and the manifest)."""
        return _jsonable(
            {
                "dataset": self._dataset_identity(),
                "audio_column": self.audio_column,
                "centroids_sha256": centroids.sha256(),
                "teacher": self.teacher_info,
                "features": self._feature_settings(),
            }
        )

    # --- step 1: centroids (fit, or reuse)

    def centroids(
        self,
        *,
        k: int = 256,
        given: Centroids | None = None,
        fit_settings: dict[str, Any] | None = None,
        fit_feature_budget_gb: float = DEFAULT_FIT_FEATURE_BUDGET_GB,
        verbose: int = 0,
    ) -> Centroids:
        """The run's centroids: ``given``, the ones an earlier run with the same inputs fitted into
        this folder, or a new fit (written to ``OUT/centroids.safetensors`` as soon as it ends).

        ``fit_settings`` go to ``fit_centroids`` (``max_frames``, ``fit_hours``, ``seed``, ``n_init``,
        ``kmeans_batch_size``, ``max_no_improvement``, ``fit_dtype``...). Raises ``UserError`` when
        the folder holds centroids made from other inputs, naming what differs.
        """
        existing = Centroids.load(self.centroids_path) if os.path.isfile(self.centroids_path) else None
        if given is not None:
            if existing is not None and existing.sha256() != given.sha256():
                raise UserError(
                    f"{self.centroids_path} holds other centroids than --centroids gives (sha256 "
                    f"{existing.sha256()[:12]} vs {given.sha256()[:12]}); choose another output folder"
                )
            self.barrier()
            if self.is_main_process and existing is None:
                given.save(self.centroids_path)
            self.barrier()
            return given

        fit_settings = dict(fit_settings or {})
        inputs = self.make_fit_inputs(k, fit_settings)
        key = json_sha256(inputs)
        self.fit_inputs = inputs
        if existing is not None:
            stored = existing.provenance.get("fit_inputs")
            if stored is None:
                raise UserError(
                    f"{self.centroids_path} records no fit inputs (copied there, or written by an older "
                    "delulu-hf): pass it with --centroids, or choose another output folder"
                )
            if stored != inputs:
                raise UserError(
                    f"{self.centroids_path} was fitted with other inputs ("
                    + "; ".join(input_differences(stored, inputs))
                    + "): rerun with the first run's arguments to resume, or choose another output folder"
                )
            prov = existing.provenance
            logger.info(
                "reusing centroids fitted %s on %s items (%s frames, %.1f s of audio) from %s",
                prov.get("created"),
                prov.get("items_used"),
                prov.get("frames_used"),
                float(prov.get("audio_seconds_used") or 0.0),
                self.centroids_path,
            )
            self.fit_key = key
            self.barrier()
            return existing

        self.barrier()  # every process has looked at the folder before the main one clears old state
        if self.is_main_process:
            shutil.rmtree(self.store_dir, ignore_errors=True)
        self.barrier()
        budget = max(0.0, fit_feature_budget_gb) * 1e9 / self.world
        store = FitFeatureStore(self.store_dir, budget, self.rank) if budget > 0 else None
        fit_dir = os.path.join(self.output, ".fit")
        centroids = fit_centroids(
            self.dataset,
            self.teacher,
            self.config,
            k=k,
            alignment=self.alignment,
            normalization=self.normalization,
            audio_column=self.audio_column,
            name_column=self.name_column,
            on_error=self.on_error,
            chunk_size=self.chunk_size,
            max_batch_seconds=self.max_batch_seconds,
            device=self.device,
            bf16=self.bf16,
            work_dir=fit_dir if self.world > 1 else None,
            feature_store=store,
            verbose=verbose,
            **fit_settings,
        )
        fit_skips = [dict(s, stage="fit") for s in centroids.provenance.get("skipped", [])]
        centroids.provenance.update(
            fit_inputs=inputs,
            fit_key=key,
            skipped=[dict(s) for s in self.decode_skips] + fit_skips,
        )
        if self.is_main_process:
            if store is not None:
                store.finish(key)  # before the centroids: a store is complete if they exist
            centroids.save(self.centroids_path)
            shutil.rmtree(fit_dir, ignore_errors=True)
            logger.info(
                "fitted k=%d on %d frames (%d items, %.1f s of audio); centroids written to %s",
                centroids.k,
                centroids.provenance["frames_used"],
                centroids.provenance["items_used"],
                centroids.provenance["audio_seconds_used"],
                self.centroids_path,
            )
        self.fit_key = key
        self.barrier()
        return centroids

    # --- step 2: the sharded map

    def _manifest(self) -> dict[str, Any] | None:
        try:
            with open(os.path.join(self.output, MANIFEST_NAME), encoding="utf-8") as handle:
                return json.load(handle)
        except (OSError, json.JSONDecodeError):
            return None

    def map(
        self,
        centroids: Centroids,
        *,
        num_shards: int | None = None,
        shard_hours: float = DEFAULT_SHARD_HOURS,
    ) -> list[int]:
        """Label the shards that have no committed file yet (this process's share); returns their indices.

        The first run fixes the plan (``num_shards``, default: ``shard_hours`` of audio per shard and
        at least one shard per process) in ``work/plan.json``; later runs follow it. Raises
        ``UserError`` when the folder holds shards or a finished corpus made from other inputs.
        """
        centroids.check_compatible(
            config=self.config,
            teacher_info=self.teacher_info,
            alignment=self.alignment,
            normalization=self.normalization,
        )
        if centroids.k > np.iinfo(np.int16).max:
            raise UserError(f"k={centroids.k} does not fit the int16 cluster_ids column")
        inputs = self.make_map_inputs(centroids)
        fingerprint = json_sha256(inputs)[:32]
        self.map_inputs = inputs
        manifest = self._manifest()
        if manifest is not None:
            done = manifest.get("label_pass", {})
            if done.get("map_fingerprint") != fingerprint:
                raise UserError(
                    f"{self.output} already holds a labelled corpus made from other inputs ("
                    + "; ".join(input_differences(done.get("map_inputs", {}), inputs))
                    + "): choose another output folder"
                )
            try:
                LabelledCorpus.load(self.output)
            except UserError as error:
                logger.warning("%s; assembling it again", error)
            else:
                logger.info("%s already holds this labelled corpus: nothing to do", self.output)
                self.complete = True
                return []

        plan_path = os.path.join(self.work_dir, "plan.json")
        plan = ShardPlan.load(plan_path)
        if plan is not None and plan.fingerprint != fingerprint:
            raise UserError(
                f"{self.work_dir} holds shards labelled from other inputs ("
                + "; ".join(input_differences(plan.inputs, inputs))
                + "): rerun with the first run's arguments to resume, or choose another output folder"
            )
        if plan is not None and num_shards is not None and num_shards != plan.requested_shards:
            raise UserError(
                f"--num_shards {num_shards}, but {plan_path} was planned with {plan.requested_shards} "
                f"shards ({len(plan.bounds)} after cutting at chunk boundaries): drop --num_shards to resume"
            )
        store = FitFeatureStore.open(self.store_dir, self.fit_key) if self.fit_key else None
        self.barrier()  # everyone has read the old plan
        if plan is None:
            if self.is_main_process:
                # Durations from Arrow offsets (decoded audio) or file headers, once, at the first run.
                # Items in the fit's store cost no teacher time, only their assignment: shards are
                # balanced by the work left to do.
                seconds = item_seconds(self.work, self.audio_column, self.teacher.sample_rate)
                if store is not None:
                    seconds[store.items()] *= STORED_ITEM_COST
                hours = float(seconds.sum()) / 3600
                count = num_shards or ShardPlan.default_num_shards(hours, shard_hours, self.world)
                plan = ShardPlan.make(fingerprint, inputs, len(self.work), self.chunk_size, count, seconds)
                plan.save(plan_path)
            self.barrier()
            plan = ShardPlan.load(plan_path)
        self.plan = plan

        if store is not None:
            logger.info(
                "the map reuses the fit's features of %d items (no teacher pass for them)", len(store)
            )
        assigner = ClusterAssigner(centroids.centroids, device=self.extractor.device)
        labeller = LabelBatch(
            self.extractor, assigner, self.audio_column, self.name_column, self.on_error, []
        )
        computed = map_shards(
            plan,
            self.shard_dir,
            self.work,
            ShardLabeller(labeller, store),
            self.chunk_size,
            self.rank,
            self.world,
            progress=self.progress,
        )
        self.barrier()  # every shard is committed
        return computed

    # --- step 3: assemble (main process)

    def assemble(self):
        """Join the shards into ``OUT/dataset`` (the input columns + ``cluster_ids``) and return it.

        Also drops the fit-feature store (every shard that could use it is committed). A no-op that
        loads the saved dataset when the folder was already complete.
        """
        from datasets import Dataset, concatenate_datasets, load_from_disk

        dataset_path = os.path.join(self.output, "dataset")
        if self.complete:
            return load_from_disk(dataset_path)
        if self.plan is None:
            raise RuntimeError("call map() before assemble()")
        manifest = os.path.join(self.output, MANIFEST_NAME)
        if os.path.exists(manifest):
            os.remove(manifest)  # a manifest names a complete folder; this one is about to change
        column, self.label_skips = assemble_column(self.plan, self.shard_dir)
        import pyarrow as pa

        ids = Dataset(pa.table({LABEL_COLUMN: column}))
        base = self.dataset
        if LABEL_COLUMN in base.column_names:
            logger.warning("replacing the input's %s column", LABEL_COLUMN)
            base = base.remove_columns([LABEL_COLUMN])
        # Keep the input's format (load_audio_dataset gives numpy audio), with cluster_ids visible.
        form = base.format
        columns = form["columns"]
        if columns is not None and set(columns) >= set(base.column_names):
            columns = None  # every column: the default
        elif columns is not None and not form["output_all_columns"]:
            columns = [*columns, LABEL_COLUMN]
        labelled = concatenate_datasets([base.with_format(None), ids], axis=1)
        if form["type"] is not None or columns is not None:
            labelled = labelled.with_format(
                form["type"],
                columns=columns,
                output_all_columns=form["output_all_columns"],
                **form["format_kwargs"],
            )
        atomic_save_dataset(_paths_not_bytes(labelled, self.audio_column), dataset_path)
        shutil.rmtree(self.store_dir, ignore_errors=True)
        return load_from_disk(dataset_path)

    @property
    def skipped(self) -> list[dict[str, Any]]:
        """Every item without labels, decode-time first: ``{"name", "reason", "stage"[, "index"]}``."""
        if self.complete:
            manifest = self._manifest() or {}
            return list(manifest.get("skipped", []))
        label = [
            {"name": s.name, "reason": s.reason, "stage": "label", "index": int(s.index)}
            for s in self.label_skips
        ]
        return [dict(s) for s in self.decode_skips] + label

    # --- step 4: the manifest (main process), last

    def write_manifest(self, centroids: Centroids, extra: dict[str, Any] | None = None) -> LabelledCorpus:
        """Write ``OUT/labels.json`` (after ``assemble``): the folder is now a finished labelled corpus."""
        if self.complete:
            return LabelledCorpus.load(self.output)
        manifest = corpus_manifest(
            centroids,
            alignment=self.alignment,
            normalization=self.normalization,
            source=self.source,
            total_items=len(self.dataset) + len(self.decode_skips),
            skipped=self.skipped,
            label_pass={
                "map_fingerprint": self.plan.fingerprint if self.plan else None,
                "map_inputs": getattr(self, "map_inputs", None),
                "fit_inputs": self.fit_inputs,
                "num_shards": len(self.plan.bounds) if self.plan else None,
                "processes": self.world,
            },
        )
        manifest.update(extra or {})
        write_manifest(self.output, manifest)
        return LabelledCorpus.load(self.output)


def _paths_not_bytes(dataset, audio_column: str):
    """``dataset`` with a file-backed undecoded audio column stored as its file paths.

    ``save_to_disk`` embeds the bytes of every file an ``Audio`` column points to: for an on-the-fly
    corpus, ``OUT/dataset`` would hold a second copy of the whole corpus (~100 GB of FLAC at 960 h).
    A path column (``datasets.Value("string")``) keeps ``OUT`` to the labels and metadata;
    ``delulu_hf.audio.load_audio_dataset`` reads it back as ``Audio(decode=False)``. Decoded audio
    (``audio_decoding: cache``) and in-memory bytes are saved as they are.
    """
    import pyarrow.compute as pc
    from datasets import Audio

    feature = (dataset.features or {}).get(audio_column)
    if not isinstance(feature, Audio) or feature.decode or len(dataset) == 0:
        return dataset
    column = dataset.data.column(audio_column).combine_chunks()
    if column.null_count or not pc.all(pc.is_null(column.field("bytes"))).as_py():
        return dataset
    paths = column.field("path")
    if paths.null_count:
        return dataset
    form = dataset.format
    plain = dataset.with_format(None).remove_columns([audio_column])
    plain = plain.add_column(audio_column, paths.to_pylist())
    return plain.with_format(
        form["type"], columns=form["columns"], output_all_columns=form["output_all_columns"]
    )
