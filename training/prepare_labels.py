"""Make DELULU's pretraining targets: audio -> teacher frame features -> k-means -> a labelled corpus folder.

A thin command line over ``delulu_hf.labels`` (``LabelPass``). Runs as a plain script or under
``accelerate launch`` (the processes share the fit, then take disjoint shards of the map).

    python training/prepare_labels.py --data data/demo_corpus --split train \\
        --teacher data/demo_teacher --model_config path/to/config.json \\
        --output runs/labels --report runs/labels/report

    # then pretrain on it, as written:
    accelerate launch training/pretrain.py --dataset runs/labels ...

    # HuBERT's control labels (39-d MFCC + deltas), same pipeline:
    python training/prepare_labels.py --data data/demo_corpus --split train --features mfcc ...

    # several processes (one per GPU; on a CPU-only machine they share the cores):
    accelerate launch --multi_gpu --num_processes 2 training/prepare_labels.py ...
    torchrun --nproc_per_node 2 training/prepare_labels.py ...

    # cluster sliding-window speaker embeddings instead of backbone frames:
    python training/prepare_labels.py ... --teacher_output window-embedding --window_seconds 1.0

    # reuse centroids fitted earlier (e.g. label a second corpus with the first one's clusters):
    python training/prepare_labels.py ... --centroids runs/labels/centroids.safetensors --output runs/labels2

Resuming: a killed or crashed run is resumed by running the same command again. The centroids are
written to ``OUTPUT/centroids.safetensors`` the moment the fit ends and are reused ("reusing
centroids fitted ..."); the map runs in shards (``--shard_hours`` of audio each, or
``--num_shards``) committed one by one under ``OUTPUT/work/shards``, and a rerun labels only the
missing ones (the log and the progress bar say how many are done). A rerun with other inputs (data,
teacher, k, seed, precision, ...) stops and names what differs: use a new ``--output`` for it.

Writes to ``OUTPUT``: ``centroids.safetensors`` (+ ``.json`` provenance), ``model_config.json`` (the
model config with its label fields set from this run), ``dataset/`` (the input columns plus
``cluster_ids``, via ``save_to_disk``), ``work/`` (the resumable state: shard plan and shards) and,
last, ``labels.json`` (the manifest: k, teacher, fit, every skipped item with its reason). With
``--report DIR`` also occupancy, speaker purity/NMI and alignment diagnostics. The last line
printed says where the labelled corpus is and how to pretrain on it. ``--help`` lists every
option; flags are ``--field_name`` (the older ``--field-name`` spellings still work, with a
deprecation warning).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import shutil
from dataclasses import field
from typing import Any, Literal, Optional

from delulu_hf import labels
from delulu_hf.audio import AUDIO_DECODINGS, AudioDecodeError
from delulu_hf.cli import ArgumentParser, main_entry, require_path
from delulu_hf.errors import UserError
from delulu_hf.labels import Alignment, Normalization, OnError, TeacherOutput

logger = logging.getLogger("prepare_labels")


@dataclasses.dataclass(kw_only=True)
class PrepareLabelsArguments:
    """Every option of ``prepare_labels.py``; each field is a ``--field_name`` flag."""

    # --- data and featurizer
    data: str = field(metadata={"help": "audiofolder, save_to_disk folder, parquet file or Hub id"})
    split: Optional[str] = field(default=None, metadata={"help": "split name (or value of a 'split' column)"})
    streaming: bool = field(
        default=False, metadata={"help": "stream the corpus (IterableDataset; such a run does not resume)"}
    )
    teacher: Optional[str] = field(
        default=None,
        metadata={
            "help": "ReDimNet folder (save_pretrained), official .pt checkpoint, preset name, or 'mfcc'"
        },
    )
    features: Literal["teacher", "mfcc"] = field(
        default="teacher", metadata={"help": "'mfcc' = HuBERT's control labels"}
    )
    teacher_output: Optional[TeacherOutput] = field(
        default=None,
        metadata={
            "help": "ReDimNet features to cluster: 'backbone' (pre-pooling frames, the paper's) or "
            "'window-embedding' (the embedding head over a window around each frame); unset: the "
            "centroids', else backbone"
        },
    )
    window_seconds: Optional[float] = field(
        default=None,
        metadata={"help": "window of --teacher_output window-embedding; unset: the centroids', else 1.0"},
    )
    model_config: Optional[str] = field(
        default=None, metadata={"help": "DeluluConfig json file or folder (frame counts, num_clusters)"}
    )
    # --- k-means
    k: Optional[int] = field(
        default=None,
        metadata={
            "help": "number of clusters; unset: the --centroids' k, else the --model_config's num_clusters, "
            "else 256 (a --k that disagrees with either is an error)"
        },
    )
    max_frames: int = field(default=250_000, metadata={"help": "frames kept for the k-means fit"})
    fit_hours: Optional[float] = field(
        default=None, metadata={"help": "audio hours read for the fit; unset: all"}
    )
    alignment: Optional[Alignment] = field(
        default=None, metadata={"help": "unset: the centroids', else nearest"}
    )
    normalization: Optional[Normalization] = field(
        default=None, metadata={"help": "unset: the centroids', else none"}
    )
    centroids: Optional[str] = field(
        default=None, metadata={"help": "reuse these centroids instead of fitting"}
    )
    seed: int = 0
    n_init: int = labels.KMEANS_DEFAULTS["n_init"]
    kmeans_batch_size: int = labels.KMEANS_DEFAULTS["batch_size"]
    max_no_improvement: int = labels.KMEANS_DEFAULTS["max_no_improvement"]
    fit_dtype: Literal["float64", "float32"] = field(
        default="float64", metadata={"help": "precision of the k-means fit"}
    )
    # --- output
    output: str = field(
        metadata={
            "help": "output folder: the labelled corpus (pretrain.py --dataset takes it) and its resume state"
        }
    )
    report: Optional[str] = field(
        default=None, metadata={"help": "write diagnostics (PNG + JSON) to this folder"}
    )
    # --- how the work runs (and resumes)
    num_shards: Optional[int] = field(
        default=None,
        metadata={
            "help": "shards of the label map, each committed on its own (a crash costs one); unset: one "
            "per --shard_hours of audio, at least one per process. The first run fixes it"
        },
    )
    shard_hours: float = field(
        default=labels.DEFAULT_SHARD_HOURS,
        metadata={"help": "audio hours per shard when --num_shards is unset"},
    )
    fit_feature_budget_gb: float = field(
        default=labels.DEFAULT_FIT_FEATURE_BUDGET_GB,
        metadata={
            "help": "disk (GB) for the fit items' features, kept until the map has used them so the teacher "
            "does not run on those items twice; 0: recompute them"
        },
    )
    audio_decoding: str = field(
        default="cache",
        metadata={
            "help": f"one of {AUDIO_DECODINGS}. 'cache': decode the corpus once into the datasets cache "
            "(~230 MB per audio hour); 'on-the-fly': decode each item when the teacher needs it "
            "(nothing decoded is stored)"
        },
    )
    on_error: OnError = field(
        default="raise", metadata={"help": "a bad item raises naming it, or is skipped and reported"}
    )
    chunk_size: int = field(default=64, metadata={"help": "items per map batch"})
    batch_seconds: float = field(default=64.0, metadata={"help": "padded audio per teacher call"})
    device: Optional[str] = field(default=None, metadata={"help": "unset: the process's accelerator device"})
    bf16: bool = field(
        default=True, metadata={"help": "autocast the teacher to bfloat16 on GPU (--no_bf16: float32)"}
    )
    audio_column: str = "audio"
    speaker_column: str = "speaker_id"
    name_column: Optional[str] = None
    cache_dir: Optional[str] = field(default=None, metadata={"help": "datasets cache folder"})

    def __post_init__(self) -> None:
        if self.features == "teacher" and self.teacher is None:
            raise ValueError("--teacher is required (or --features mfcc)")
        if self.audio_decoding not in AUDIO_DECODINGS:
            raise ValueError(
                f"--audio_decoding must be one of {AUDIO_DECODINGS}, got {self.audio_decoding!r}"
            )
        if self.num_shards is not None and self.num_shards < 1:
            raise ValueError(f"--num_shards must be >= 1, got {self.num_shards}")
        if self.shard_hours <= 0:
            raise ValueError(f"--shard_hours must be > 0, got {self.shard_hours}")


def parse_args(argv: list[str] | None = None) -> PrepareLabelsArguments:
    parser = ArgumentParser(PrepareLabelsArguments, prog="prepare_labels.py", description=__doc__)
    return parser.parse_one(argv)


def check_data_path(data: str) -> None:
    """Raise ``UserError`` for a ``--data`` that is meant as a local path but does not exist.

    Runs before any model is loaded and before ``--output`` is created. A bare name or ``org/name``
    whose first part is not a local folder may be a Hub id and is left to ``datasets``."""
    if os.path.exists(data):
        return
    parent = os.path.dirname(data.rstrip("/"))
    local = (
        os.path.isabs(data)
        or data.startswith((".", "~"))
        or data.count("/") > 1
        or (parent != "" and os.path.isdir(parent))
        or os.path.splitext(data)[1].lower() in (".parquet", ".arrow", ".csv", ".json", ".jsonl")
    )
    if local:
        raise UserError(
            f"--data {data}: no such file or folder (an audiofolder, a save_to_disk folder, a parquet/arrow "
            "file, or a Hub id ORG/NAME)"
        )


def resolve_k(args: PrepareLabelsArguments, config: Any, centroids: labels.Centroids | None) -> int:
    """k: the centroids', else the model config's ``num_clusters``, else ``--k`` or 256.

    A ``--k`` that disagrees with the centroids or with a ``--model_config`` is a one-line error naming
    both values: labels with another k than the model's ``num_clusters`` could not be trained on."""
    if centroids is not None:
        if args.k is not None and centroids.k != args.k:
            raise UserError(f"--k {args.k} but the centroids have k={centroids.k}")
        return centroids.k
    if args.model_config is not None:
        if args.k is not None and args.k != config.num_clusters:
            raise UserError(
                f"--k {args.k} disagrees with num_clusters={config.num_clusters} in --model_config "
                f"{args.model_config}: drop --k (k follows the model config) or change num_clusters there"
            )
        return int(config.num_clusters)
    return args.k or 256


def load_model_config(
    path: str | None, teacher, args: PrepareLabelsArguments, centroids: labels.Centroids | None = None
) -> Any:
    """A ``DeluluConfig`` from a json file or a folder. Without one, the default architecture with
    label fields describing this run (so only the frame geometry comes from the defaults)."""
    from delulu_hf.configuration_delulu import DeluluConfig

    if path is None:
        return DeluluConfig(
            num_clusters=centroids.k if centroids is not None else (args.k or 256),
            label_teacher_name=teacher.name,
            label_feature_dim=teacher.feature_dim,
            label_frame_alignment=args.alignment,
        )
    if os.path.isdir(path):
        return DeluluConfig.from_pretrained(path)
    return DeluluConfig.from_json_file(path)


def labelled_config(config: Any, centroids: labels.Centroids) -> Any:
    """``config`` with its label provenance fields set from ``centroids`` (for pretraining)."""
    out = copy.deepcopy(config)
    out.num_clusters = centroids.k
    out.label_feature_dim = centroids.dim
    out.label_teacher_name = centroids.provenance.get("teacher", {}).get("name")
    out.label_frame_alignment = centroids.alignment
    return out


class _DecodeSkips(logging.Handler):
    """Collects the items ``load_audio_dataset(on_error="skip")`` drops, for the report."""

    PREFIX = "skipping bad audio item: "

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith(self.PREFIX):
            self.messages.append(message[len(self.PREFIX) :])


def _audio_paths(dataset, column: str) -> list[str | None]:
    """The ``path`` of every item's audio, read from Arrow (no audio is decoded or copied)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    paths: list[str | None] = []
    for table in dataset.select_columns([column]).with_format("arrow").iter(batch_size=10_000):
        values = table[column]
        if pa.types.is_struct(values.type) and values.type.get_field_index("path") >= 0:
            paths += pc.struct_field(values, "path").to_pylist()
        elif pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
            paths += values.to_pylist()
        else:
            paths += [None] * len(values)
    return paths


def decode_skips(
    args: PrepareLabelsArguments, dataset, messages: list[str], min_samples: int
) -> list[dict[str, str]]:
    """The items decoding dropped (``--on_error skip``), each ``{"name", "reason"}``.

    Found by comparing the corpus listing with the decoded dataset, not from this run's log alone: a
    rerun loads the decoded corpus from the datasets cache and logs nothing, yet must report the same
    items. A reason the log does not give is found by decoding that item again."""
    from delulu_hf.audio import load_audio, load_audio_dataset

    def name_of(path: str) -> str:
        root = os.path.abspath(args.data)
        full = os.path.abspath(path)
        return os.path.relpath(full, root) if full.startswith(root + os.sep) else path

    def reason_of(path: str) -> str:
        for message in messages:
            if message.startswith(f"{path}: "):
                return message[len(path) + 2 :]
        try:
            load_audio(path, name=path, min_samples=min_samples)
        except AudioDecodeError as error:
            return str(error).removeprefix(f"{path}: ")
        return "dropped when the corpus was decoded into the datasets cache"

    if args.on_error != "skip" or args.audio_decoding != "cache" or args.streaming:
        return []
    listing = load_audio_dataset(
        args.data,
        split=args.split,
        audio_column=args.audio_column,
        decode=False,
        **({"cache_dir": args.cache_dir} if args.cache_dir else {}),
    )
    if len(listing) == len(dataset):
        return []
    kept = set(_audio_paths(dataset, args.audio_column))
    missing = [
        path for path in _audio_paths(listing, args.audio_column) if path is not None and path not in kept
    ]
    if len(missing) != len(listing) - len(dataset):  # no usable paths: fall back to this run's log
        return [{"name": m.split(": ", 1)[0], "reason": m.split(": ", 1)[-1]} for m in messages]
    return [{"name": name_of(path), "reason": reason_of(path)} for path in missing]


def _save_streamed(dataset, args: PrepareLabelsArguments, state) -> None:
    """Write a labelled IterableDataset: per-process parts, merged on the main process."""
    from datasets import Dataset, concatenate_datasets, load_from_disk

    audio = args.audio_column

    def rows():
        for row in dataset:
            yield {key: value for key, value in row.items() if key != audio}

    part_dir = os.path.join(args.output, ".parts", f"rank-{state.process_index}")
    labels.atomic_save_dataset(Dataset.from_generator(rows, cache_dir=args.cache_dir), part_dir)
    state.wait_for_everyone()
    if state.is_main_process:
        parts = [
            load_from_disk(os.path.join(args.output, ".parts", f"rank-{r}"))
            for r in range(state.num_processes)
        ]
        labels.atomic_save_dataset(concatenate_datasets(parts), os.path.join(args.output, "dataset"))
        shutil.rmtree(os.path.join(args.output, ".parts"), ignore_errors=True)


def _with_hint(error: AudioDecodeError) -> UserError:
    """A bad item under ``--on_error raise``: one line naming it, the reason and the way out."""
    text = " ".join(str(error).split())
    out = UserError(f"{text} (--on_error skip skips such items and lists them in labels.json)")
    out.rank_specific = True  # met by one process only
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_data_path(args.data)
    require_path(args.centroids, "--centroids")
    require_path(args.model_config, "--model_config")
    if args.model_config is not None and args.centroids is None:  # --k vs num_clusters, before any model load
        resolve_k(args, load_model_config(args.model_config, None, args), None)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except AudioDecodeError as error:
        raise _with_hint(error) from None


def run(args: PrepareLabelsArguments) -> int:
    import torch
    from accelerate import PartialState

    from delulu_hf.audio import load_audio_dataset

    # cpu=True lets processes started by torchrun/accelerate on a machine without GPUs form a group.
    state = PartialState(cpu=(args.device == "cpu") or not torch.cuda.is_available())
    teacher_spec = "mfcc" if args.features == "mfcc" else args.teacher
    device = args.device or state.device
    centroids = labels.Centroids.load(args.centroids) if args.centroids else None
    fitted_output = (centroids.provenance.get("teacher", {}).get("output") or {}) if centroids else {}
    if args.teacher_output is None:  # reused centroids say which features they were fitted on
        args.teacher_output = fitted_output.get("output", "backbone")
    window_seconds = args.window_seconds
    if window_seconds is None:
        window_seconds = float(fitted_output.get("window_seconds", 1.0))  # the same window as the fit
    teacher = labels.load_featurizer(
        teacher_spec, device=device, output=args.teacher_output, window_seconds=window_seconds
    )
    if args.alignment is None:  # reused centroids say how they were aligned
        args.alignment = (centroids.alignment if centroids is not None else None) or "nearest"
    if args.normalization is None:
        args.normalization = centroids.normalization if centroids is not None else "none"
    config = load_model_config(args.model_config, teacher, args, centroids)
    if centroids is not None:  # check before touching any audio
        centroids.check_compatible(
            config=config, teacher=teacher, alignment=args.alignment, normalization=args.normalization
        )
    k = resolve_k(args, config, centroids)
    bf16 = None if args.bf16 else False  # None: bf16 autocast on GPU only
    common = dict(
        audio_column=args.audio_column,
        name_column=args.name_column,
        on_error=args.on_error,
        chunk_size=args.chunk_size,
        max_batch_seconds=args.batch_seconds,
        device=device,
        bf16=bf16,
    )
    fit_settings = dict(
        max_frames=args.max_frames,
        fit_hours=args.fit_hours,
        seed=args.seed,
        kmeans_batch_size=args.kmeans_batch_size,
        n_init=args.n_init,
        max_no_improvement=args.max_no_improvement,
        fit_dtype=args.fit_dtype,
    )

    decode_log = _DecodeSkips()
    logging.getLogger("delulu_hf.audio").addHandler(decode_log)
    load_kwargs = {"cache_dir": args.cache_dir} if args.cache_dir else {}
    with state.main_process_first():  # one process decodes into the datasets cache, the others read it
        dataset = load_audio_dataset(
            args.data,
            split=args.split,
            streaming=args.streaming,
            audio_column=args.audio_column,
            min_samples=labels.EncoderFrames.from_config(config).receptive_field,
            on_error=args.on_error,
            decode=args.audio_decoding == "cache",
            **load_kwargs,
        )
    if args.streaming:
        return run_streaming(
            args, state, dataset, teacher, config, centroids, k, common, fit_settings, decode_log
        )

    source = {
        "data": args.data if not os.path.exists(args.data) else os.path.abspath(args.data),
        "split": args.split,
        "audio_column": args.audio_column,
        "audio_decoding": args.audio_decoding,
    }
    skipped_at_decode = decode_skips(
        args, dataset, decode_log.messages, labels.EncoderFrames.from_config(config).receptive_field
    )
    labelling = labels.LabelPass(
        args.output,
        dataset,
        teacher,
        config,
        alignment=args.alignment,
        normalization=args.normalization,
        source=source,
        decode_skips=skipped_at_decode,
        **common,
    )
    centroids = labelling.centroids(
        k=k, given=centroids, fit_settings=fit_settings, fit_feature_budget_gb=args.fit_feature_budget_gb
    )
    if state.is_main_process:
        labelled_config(config, centroids).to_json_file(os.path.join(args.output, "model_config.json"))
    labelling.map(centroids, num_shards=args.num_shards, shard_hours=args.shard_hours)
    if not state.is_main_process:
        return 0  # the main process assembles; nothing left to wait for here

    saved = labelling.assemble()
    skipped = labelling.skipped
    report_file = os.path.join(args.report, "report.json") if args.report else None
    if report_file and not (labelling.complete and os.path.isfile(report_file)):
        write_report(args, saved, centroids, config, teacher, labelling)
    labelling.write_manifest(centroids)
    print_summary(args, len(saved), skipped)
    return 0


def write_report(args: PrepareLabelsArguments, saved, centroids, config, teacher, labelling) -> None:
    """``--report``: occupancy, speaker purity/NMI, alignment; its skipped list is the manifest's."""
    label_skips = [
        labels.LabelSkip(s["index"], s["name"], s["reason"])
        for s in labelling.skipped
        if s["stage"] == "label"
    ]
    report = labels.write_report(
        args.report,
        saved,
        centroids,
        config,
        teacher_hop=teacher.hop_length,
        speaker_column=args.speaker_column,
        name_column=args.name_column,
        skipped=label_skips,
        skipped_before=[s for s in labelling.skipped if s["stage"] == "decode"],
        sample_rate=teacher.sample_rate,
        extra={"data": args.data, "split": args.split},
    )
    diag = report["diagnostics"]
    logger.info(
        "report: perplexity %.1f of k=%d, %d dead, %d dominant, %d skipped%s",
        diag["perplexity"],
        centroids.k,
        len(diag["dead_clusters"]),
        len(diag["dominant_clusters"]),
        report["skipped_count"],
        (
            f"; speaker purity {diag['speaker']['purity']:.3f}, NMI {diag['speaker']['nmi']:.3f}"
            if "speaker" in diag
            else ""
        ),
    )
    logger.info("report written to %s", os.path.join(args.report, "report.json"))


def print_summary(args: PrepareLabelsArguments, num_rows: int, skipped: list[dict[str, Any]]) -> None:
    """The last line: where the labelled corpus is and how to pretrain on it."""
    if skipped:
        logger.info(
            "%d item(s) skipped (listed in %s): %s",
            len(skipped),
            os.path.join(args.output, labels.MANIFEST_NAME),
            ", ".join(f"{s['name']} ({s['reason']})" for s in skipped[:5])
            + (" ..." if len(skipped) > 5 else ""),
        )
    labelled = num_rows - sum(1 for s in skipped if s.get("stage") != "decode")
    print(
        f"labelled corpus: {args.output} ({labelled} items labelled, {len(skipped)} skipped); "
        f"pretrain with: accelerate launch training/pretrain.py --dataset {args.output}",
        flush=True,
    )


def run_streaming(
    args, state, dataset, teacher, config, centroids, k, common, fit_settings, decode_log
) -> int:
    """``--streaming``: the fit and a lazy map in one go (no shards, so no resume), then the manifest."""
    from datasets import load_from_disk

    if centroids is None:
        centroids = labels.fit_centroids(
            dataset,
            teacher,
            config,
            k=k,
            alignment=args.alignment,
            normalization=args.normalization,
            work_dir=os.path.join(args.output, ".fit") if state.num_processes > 1 else None,
            **fit_settings,
            **common,
        )
    if state.is_main_process:
        shutil.rmtree(os.path.join(args.output, ".fit"), ignore_errors=True)  # every process has loaded it
        centroids.save(os.path.join(args.output, "centroids.safetensors"))
        labelled_config(config, centroids).to_json_file(os.path.join(args.output, "model_config.json"))
    skipped: list[labels.LabelSkip] = []
    labelled = labels.add_cluster_ids(
        dataset,
        teacher,
        centroids,
        config,
        alignment=args.alignment,
        normalization=args.normalization,
        cache_dir=args.cache_dir,
        skipped=skipped,
        **common,
    )
    _save_streamed(labelled, args, state)
    if not state.is_main_process:
        return 0
    saved = load_from_disk(os.path.join(args.output, "dataset"))
    found = {s.index: s for s in skipped}
    all_skipped = [
        {"name": m.split(": ", 1)[0], "reason": m.split(": ", 1)[-1], "stage": "decode"}
        for m in decode_log.messages
    ] + [
        {
            "name": item["name"],
            "reason": found[item["index"]].reason if item["index"] in found else None,
            "stage": "label",
            "index": item["index"],
        }
        for item in labels.skipped_items(saved, args.name_column)
    ]
    manifest = labels.corpus_manifest(
        centroids,
        alignment=args.alignment,
        normalization=args.normalization,
        source={"data": args.data, "split": args.split, "audio_column": args.audio_column, "streaming": True},
        total_items=len(saved) + len(decode_log.messages),
        skipped=all_skipped,
    )
    labels.write_manifest(args.output, manifest)
    print_summary(args, len(saved), all_skipped)
    return 0


if __name__ == "__main__":
    main_entry(main)
