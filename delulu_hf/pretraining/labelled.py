"""A run config in, the training audio with its ``cluster_ids`` out (made and cached when missing).

The pretraining targets come from ``delulu_hf.labels``: teacher frame features -> k-means centroids
-> one cluster id per encoder frame. Where they come from is the run's ``LabelSource``
(``sources.py``): a ``prepare_labels.py`` output folder (its ``labels.json`` manifest, dataset and
centroids, as written), a dataset that already carries a ``cluster_ids`` column (with ``--centroids``
saying how they were made, or of unknown origin), or labels made here, on every process of the run,
and cached so the next run skips the work. In every case the model config's label fields end up
stating what made the labels, the centroids that made them travel with the data to ``final/``, and
every item left out on the way is in the run's ``SkippedItems`` ledger.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from delulu_hf.errors import UserError
from delulu_hf.pretraining.skips import SkippedItems
from delulu_hf.pretraining.sources import (
    LabelSource,
    apply_label_fields,
    centroid_fields,
    check_encoder_geometry,
    check_teacher,
    find_label_source,
    load_centroids,
)

if TYPE_CHECKING:
    from delulu_hf.pretraining.arguments import PretrainConfig

logger = logging.getLogger(__name__)

__all__ = ["LabelledData", "label_frame_counts", "prepare_pretraining_dataset"]

# Labels of unknown origin: what the model config cannot claim about them.
UNKNOWN_LABEL_FIELDS = {"label_teacher_name": None, "label_feature_dim": None, "label_frame_alignment": None}


@dataclasses.dataclass
class LabelledData:
    """A map-style dataset with ``audio`` + ``cluster_ids``, where its labels came from, and what was
    left out on the way."""

    dataset: Any
    centroids: Any = None  # delulu_hf.labels.Centroids, when known
    label_provenance: dict = dataclasses.field(default_factory=dict)
    dropped: int = 0  # items without labels (skipped by the label pipeline)
    source: LabelSource | None = None
    skipped: SkippedItems | None = None


def prepare_pretraining_dataset(
    cfg: PretrainConfig, model_config, source: LabelSource | None = None
) -> LabelledData:
    """Load the labelled corpus ``source`` names (default: ``find_label_source(cfg)``); call on every process.

    A prepare_labels folder or a dataset with a ``cluster_ids`` column is used as it is (its ids are
    checked against ``num_clusters``, its labels' conv stack against the model's, and, with ``cache``
    decoding, every item's id count against its frame count). Otherwise the labels are made here
    with ``delulu_hf.labels``: load the teacher, load ``cfg.centroids`` or fit k-means centroids
    (cached by dataset fingerprint, teacher weights and fit settings, so the second run skips the
    fit), then ``add_cluster_ids`` (cached by ``datasets`` fingerprint); both split their work across
    processes under ``accelerate launch``. ``model_config``'s label fields are set from what made the
    labels (``apply_label_fields``: a value the person set that disagrees is a ``UserError``).
    Bad items stop the run (``cfg.on_error == "raise"``, one line naming the item) or are skipped and
    recorded in ``LabelledData.skipped``.
    """
    from accelerate import PartialState

    from delulu_hf.labels import LABEL_COLUMN

    state = PartialState()
    source = source if source is not None else find_label_source(cfg)
    skipped = SkippedItems(cfg.on_error, log=state.is_main_process)
    for entry in source.skipped:  # left out by prepare_labels.py
        reason = str(entry.get("reason", "")) + (f" (at {entry['stage']})" if entry.get("stage") else "")
        skipped.add(str(entry.get("name")), reason, "labelling", quiet=True)
    if source.skipped and state.is_main_process:
        logger.info("%d item(s) were left out when the labels were made (labels.json)", len(source.skipped))
    if source.fields:
        apply_label_fields(model_config, cfg, source.fields, source.origin)
    with state.main_process_first():  # decode once into the datasets cache, then everyone loads it
        dataset = _load_audio(cfg, source.dataset, model_config, skipped)
    if cfg.max_train_items is not None and cfg.max_train_items < len(dataset):
        order = np.random.default_rng(cfg.seed).permutation(len(dataset))[: cfg.max_train_items]
        dataset = dataset.select(sorted(order.tolist()))

    if LABEL_COLUMN in dataset.column_names:
        centroids = None
        if source.kind == "labelled-corpus":
            centroids = source.corpus.load_centroids()
        elif source.kind == "centroids":
            centroids = load_centroids(cfg.centroids)
        else:
            source.kind = "dataset"
            if state.is_main_process:
                logger.info(
                    "%s carries cluster_ids but nothing says how they were made (no labels.json, no "
                    "--centroids): the model config's label teacher and feature dim are left unknown",
                    cfg.dataset,
                )
            source.fields = dict(UNKNOWN_LABEL_FIELDS)
            apply_label_fields(model_config, cfg, source.fields, source.origin)
        if centroids is not None:
            check_encoder_geometry(model_config, centroids.provenance, source.origin)
        _check_label_ids(dataset, model_config, cfg, source.origin)
        if cfg.audio_decoding == "cache":
            dataset = _drop_misfits(dataset, model_config, skipped, source.origin)
        provenance = dict(centroids.provenance) if centroids is not None else {}
        data = LabelledData(dataset, centroids, provenance, source=source, skipped=skipped)
        return _drop_unlabelled(data)
    if source.kind == "labelled-corpus":
        raise UserError(
            f"{source.corpus.dataset_path} has no {LABEL_COLUMN} column: the folder is not a complete prepare_labels.py output"
        )
    return _label_here(cfg, model_config, source, dataset, skipped, state)


def _label_here(
    cfg: PretrainConfig, model_config, source: LabelSource, dataset, skipped, state
) -> LabelledData:
    """Make the labels in this run: teacher -> (given, cached or fitted) centroids -> ``cluster_ids``."""
    from delulu_hf.labels import add_cluster_ids, featurizer_provenance, fit_centroids, load_featurizer

    check_teacher(cfg.teacher)
    teacher = load_featurizer(
        cfg.teacher,
        device=state.device,
        output=cfg.label_teacher_output,
        window_seconds=cfg.label_window_seconds,
    )
    info = featurizer_provenance(teacher)
    if source.kind is None:
        source.kind = "in-process"
        # Before the fit: a teacher name or dim the person set that is not this teacher's stops here.
        fields = {"label_teacher_name": info["name"], "label_feature_dim": int(info["feature_dim"])}
        apply_label_fields(model_config, cfg, fields, source.origin)
    alignment = model_config.label_frame_alignment
    cache_root = cfg.label_cache_dir or _default_label_cache()
    fit_settings = {
        "dataset": dataset._fingerprint,
        "teacher_sha256": info["checkpoint_sha256"],
        "teacher_name": info["name"],  # carries the window of window-embedding labels
        "k": model_config.num_clusters,
        "max_frames": cfg.label_max_frames,
        "fit_hours": cfg.label_fit_hours,
        "n_init": cfg.label_kmeans_n_init,
        "alignment": alignment,
        "conv": [list(model_config.conv_kernel), list(model_config.conv_stride)],
        "seed": cfg.seed,
        "fit_dtype": cfg.label_fit_dtype,
        # Teacher features differ with the device and precision (bf16 autocast on CUDA), so centroids
        # fitted on CPU float32 features are never reused for GPU bf16 ones, or the other way round.
        "device": torch.device(state.device).type,
        "teacher_bf16": torch.device(state.device).type == "cuda",
    }
    key = _sha256(fit_settings)[:16]
    if cfg.centroids:
        centroids = load_centroids(cfg.centroids)
        centroids.check_compatible(teacher_info=info)  # fitted on this teacher's features?
    else:
        cached = os.path.join(cache_root, f"centroids-{key}.safetensors")
        state.wait_for_everyone()
        if os.path.isfile(cached):
            logger.info("Using cached k-means centroids %s", cached)
            centroids = load_centroids(cached)
        else:
            logger.info(
                "Fitting k-means centroids (k=%d) on %s features", model_config.num_clusters, info["name"]
            )
            with _bad_items_stop_the_run():
                centroids = fit_centroids(
                    dataset,
                    teacher,
                    model_config,
                    k=model_config.num_clusters,
                    max_frames=cfg.label_max_frames,
                    fit_hours=cfg.label_fit_hours,
                    alignment=alignment,
                    seed=cfg.seed,
                    max_batch_seconds=cfg.label_batch_seconds,
                    **({"n_init": cfg.label_kmeans_n_init} if cfg.label_kmeans_n_init else {}),
                    fit_dtype=cfg.label_fit_dtype,
                    on_error=cfg.on_error,
                    work_dir=os.path.join(cache_root, f"work-{key}"),
                )
            if state.is_main_process:
                os.makedirs(cache_root, exist_ok=True)
                centroids.save(cached)
            state.wait_for_everyone()
        source.centroids_path = cached
    # The saved config states the centroids that made the labels: teacher, dim, k and alignment.
    source.fields = centroid_fields(centroids)
    apply_label_fields(model_config, cfg, source.fields, source.origin)
    check_encoder_geometry(model_config, centroids.provenance, source.origin)
    met = []
    with _bad_items_stop_the_run():
        labelled = add_cluster_ids(
            dataset,
            teacher,
            centroids,
            model_config,
            alignment=centroids.alignment or alignment,
            max_batch_seconds=cfg.label_batch_seconds,
            on_error=cfg.on_error,
            skipped=met,
            cache_dir=os.path.join(cache_root, "maps"),
        )
    del teacher
    reasons = {s.name: s.reason for s in met}
    data = LabelledData(labelled, centroids, dict(centroids.provenance), source=source, skipped=skipped)
    return _drop_unlabelled(data, reasons)


@contextlib.contextmanager
def _bad_items_stop_the_run():
    """A bad item met by the label pass under ``on_error: raise``: the one line that says what to do."""
    from delulu_hf.audio import AudioDecodeError
    from delulu_hf.pretraining.skips import bad_item_error

    try:
        yield
    except AudioDecodeError as err:
        raise bad_item_error(str(err)) from None


@contextlib.contextmanager
def _quiet_audio_skips():
    """``load_audio_dataset`` logs each item it drops; the run's ledger names them instead (once)."""
    audio_logger = logging.getLogger("delulu_hf.audio")

    def drop(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("skipping bad audio item")

    audio_logger.addFilter(drop)
    try:
        yield
    finally:
        audio_logger.removeFilter(drop)


def _load_audio(cfg: PretrainConfig, path: str, model_config, skipped: SkippedItems):
    """The corpus, audio decoded into the datasets cache (``cache``) or left encoded (``on-the-fly``).

    With ``cache``, items that cannot be decoded (or are shorter than the encoder's receptive field)
    stop the run or are dropped and recorded (stage ``decoding``, with their reason: re-read for a
    decode that came from the cache)."""
    import datasets

    from delulu_hf.audio import AudioDecodeError, load_audio, load_audio_dataset
    from delulu_hf.configuration_delulu import receptive_field
    from delulu_hf.pretraining.data import item_names
    from delulu_hf.pretraining.skips import bad_item_error

    split = _split_for(cfg, path)
    try:
        raw = load_audio_dataset(path, split=split, audio_column="audio", decode=False)
        if cfg.audio_decoding == "on-the-fly":  # bad items surface (named) when a batch is made
            return raw.with_format(None)  # every column, whatever format the folder was saved with
        field = receptive_field(model_config)
        with _quiet_audio_skips():
            decoded = load_audio_dataset(
                path, split=split, audio_column="audio", on_error=cfg.on_error, min_samples=field
            )
    except AudioDecodeError as err:
        raise bad_item_error(str(err)) from None
    except (FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as err:
        raise UserError(f"--dataset {cfg.dataset}: {str(err).splitlines()[0]}") from None
    if len(decoded) < len(raw):
        kept = Counter(item_names(decoded))
        for index, name in enumerate(item_names(raw)):
            if kept[name] > 0:
                kept[name] -= 1
                continue
            try:
                load_audio(raw[index]["audio"], name=name, min_samples=field)
                reason = "dropped when decoding"
            except AudioDecodeError as err:
                reason = str(err)
            skipped.add(name, reason, "decoding")
    return decoded


def _split_for(cfg: PretrainConfig, path: str) -> str | None:
    """``dataset_split``, unless ``path`` is a single saved split without a ``split`` column (a
    prepare_labels.py dataset: it holds the split that was labelled), which is then used whole."""
    import datasets

    from delulu_hf.audio import is_saved_to_disk

    if cfg.dataset_split is None or not is_saved_to_disk(path):
        return cfg.dataset_split
    if os.path.isfile(os.path.join(path, "dataset_dict.json")):
        return cfg.dataset_split
    features = datasets.load_from_disk(path).column_names
    if "split" in features:
        return cfg.dataset_split
    logger.info(
        "%s is one saved split (no 'split' column): dataset_split=%r does not apply", path, cfg.dataset_split
    )
    return None


def _check_label_ids(dataset, model_config, cfg: PretrainConfig, origin: str) -> None:
    """Every id is -100 or in ``[0, num_clusters)``; else a ``UserError`` saying what to change."""
    import pyarrow.compute as pc

    flat = pc.list_flatten(dataset.with_format("arrow")["cluster_ids"])
    if len(flat) == 0:
        return
    extremes = pc.min_max(flat)
    low, high = extremes["min"].as_py(), extremes["max"].as_py()
    bad_negative = (
        low is not None and low < 0 and pc.sum(pc.and_(pc.less(flat, 0), pc.not_equal(flat, -100))).as_py()
    )
    k = model_config.num_clusters
    if high is not None and high >= k:
        where = cfg.set_explicitly("num_clusters")
        said = f"set {where}" if where else "a default, not set by you"
        raise UserError(
            f"{origin} go up to {high}, but the model has num_clusters={k} ({said}): k and num_clusters "
            f"disagree. Set --model.num_clusters {high + 1} (or the labels' k), or make the labels with "
            f"k={k} (prepare_labels.py --k {k})"
        )
    if bad_negative:
        raise UserError(f"{origin} hold negative ids other than -100 (min {low}): they are not cluster ids")


def _drop_misfits(dataset, model_config, skipped: SkippedItems, origin: str):
    """Decoded items whose id count is not their frame count: stop (``raise``) or drop (``skip``).

    Most items misfitting means the labels were made for another conv stack or other audio: that is
    a ``UserError`` whatever ``on_error`` says."""
    import pyarrow.compute as pc

    from delulu_hf.configuration_delulu import feat_extract_output_lengths
    from delulu_hf.pretraining.data import item_names

    table = dataset.with_format("arrow")
    audio = table["audio"]
    samples = np.concatenate(
        [
            pc.list_value_length(pc.struct_field(chunk, "array")).to_numpy(zero_copy_only=False)
            for chunk in audio.chunks
        ]
    ).astype(np.int64)
    ids = label_frame_counts(dataset)
    frames = feat_extract_output_lengths(model_config, torch.from_numpy(samples)).numpy()
    labelled = pc.is_valid(table["cluster_ids"]).to_numpy(zero_copy_only=False)
    misfit = np.flatnonzero((ids != frames) & labelled)
    if len(misfit) == 0:
        return dataset
    names = item_names(dataset.select(misfit.tolist()))
    first = misfit[0]
    example = f"{names[0]}: {ids[first]} cluster ids for {samples[first]} samples, but the encoder makes {frames[first]} frames"
    if len(misfit) > labelled.sum() // 2:
        raise UserError(
            f"{origin} do not fit this model's frame counts for {len(misfit)} of {int(labelled.sum())} items "
            f"(e.g. {example}): they were made for other audio or another conv stack; relabel with "
            "prepare_labels.py --model_config for this model"
        )
    for index, name in zip(misfit.tolist(), names):
        reason = f"{ids[index]} cluster ids for {samples[index]} samples, but the encoder makes {frames[index]} frames"
        skipped.add(name, reason, "checking")
    return dataset.select(np.setdiff1d(np.arange(len(dataset)), misfit).tolist())


def _drop_unlabelled(data: LabelledData, reasons: dict[str, str] | None = None) -> LabelledData:
    """Remove items the label pipeline skipped (null ``cluster_ids``), recording them (the ledger
    keeps one entry per name: items labels.json already listed are not counted twice)."""
    import pyarrow.compute as pc

    from delulu_hf.pretraining.data import item_names

    column = data.dataset.with_format("arrow")["cluster_ids"]
    valid = np.asarray(pc.is_valid(column).to_numpy(zero_copy_only=False), dtype=bool)
    if not valid.all():
        data.dropped = int((~valid).sum())
        missing = item_names(data.dataset.select(np.flatnonzero(~valid).tolist()))
        if data.skipped is not None:
            for name in missing:
                reason = (reasons or {}).get(name, "no cluster_ids (left out by the label pass)")
                data.skipped.add(name, reason, "labelling")
        if data.skipped is None or data.skipped.log:  # once, not once per process
            logger.warning(
                "Dropping %d item(s) without cluster_ids (skipped by the label pipeline)", data.dropped
            )
        data.dataset = data.dataset.select(np.flatnonzero(valid).tolist())
    return data


def _default_label_cache() -> str:
    import datasets

    return os.path.join(str(datasets.config.HF_DATASETS_CACHE), "delulu_labels")


def _sha256(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def label_frame_counts(dataset, column: str = "cluster_ids") -> np.ndarray:
    """Frames per item, read from the Arrow list lengths (no audio is touched)."""
    import pyarrow.compute as pc

    lengths = pc.list_value_length(dataset.with_format("arrow")[column])
    return np.asarray(lengths.to_numpy(zero_copy_only=False), dtype=np.int64)
