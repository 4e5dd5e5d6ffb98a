"""Make DELULU's pretraining targets: teacher frame features -> k-means -> a ``cluster_ids`` column.

A thin command line over ``delulu_hf.labels``. Runs as a plain script or under
``accelerate launch`` (each process labels a block of the corpus; the blocks are merged).

    python training/prepare_labels.py --data data/demo_corpus --split train \\
        --teacher data/demo_teacher --model-config path/to/config.json \\
        --output runs/labels --report runs/labels/report

    # HuBERT's control labels (39-d MFCC + deltas), same pipeline:
    python training/prepare_labels.py --data data/demo_corpus --split train --teacher mfcc ...

    # several processes (one per GPU; on a CPU-only machine they share the cores):
    accelerate launch --multi_gpu --num_processes 2 training/prepare_labels.py ...
    torchrun --nproc_per_node 2 training/prepare_labels.py ...

    # cluster sliding-window speaker embeddings instead of backbone frames:
    python training/prepare_labels.py ... --teacher-output window-embedding --window-seconds 1.0

    # reuse centroids fitted earlier:
    python training/prepare_labels.py ... --centroids runs/labels/centroids.safetensors

Writes ``OUTPUT/centroids.safetensors`` (+ ``.json`` provenance), ``OUTPUT/dataset`` (the input
dataset plus ``cluster_ids``, via ``save_to_disk``) and ``OUTPUT/model_config.json`` (the model
config with its label fields set from this run); with ``--report DIR`` also occupancy, speaker
purity/NMI and alignment diagnostics.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shutil
import sys
from typing import Any

from delulu_hf import labels
from delulu_hf.audio import AUDIO_DECODINGS

logger = logging.getLogger("prepare_labels")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--data", required=True, help="audiofolder, save_to_disk folder, parquet file or Hub id"
    )
    parser.add_argument("--split", default=None, help="split name (or value of a 'split' column)")
    parser.add_argument("--streaming", action="store_true", help="stream the corpus (IterableDataset)")
    parser.add_argument(
        "--teacher",
        default=None,
        help="ReDimNet folder (save_pretrained), official .pt checkpoint, preset name, or 'mfcc'",
    )
    parser.add_argument(
        "--features", choices=("teacher", "mfcc"), default="teacher", help="'mfcc' = HuBERT's control labels"
    )
    parser.add_argument(
        "--teacher-output",
        choices=labels.TEACHER_OUTPUTS,
        default=None,
        help="ReDimNet features to cluster: 'backbone' (pre-pooling frames, the paper's; default) or\n"
        "'window-embedding' (the embedding head over a window around each frame)",
    )
    parser.add_argument(
        "--window-seconds",
        type=float,
        default=None,
        help="window of --teacher-output window-embedding (default 1.0, or the centroids')",
    )
    parser.add_argument(
        "--model-config", default=None, help="DeluluConfig json file or folder (frame counts)"
    )
    parser.add_argument("--k", type=int, default=None, help="number of clusters (default 256)")
    parser.add_argument("--max-frames", type=int, default=250_000, help="frames kept for the k-means fit")
    parser.add_argument(
        "--fit-hours", type=float, default=None, help="audio hours read for the fit (default all)"
    )
    parser.add_argument(
        "--alignment", choices=labels.ALIGNMENTS, default=None, help="default: nearest (or the centroids')"
    )
    parser.add_argument(
        "--normalization",
        choices=labels.NORMALIZATIONS,
        default=None,
        help="default: none (or the centroids')",
    )
    parser.add_argument("--centroids", default=None, help="reuse these centroids instead of fitting")
    parser.add_argument("--output", required=True, help="output folder (centroids + labelled dataset)")
    parser.add_argument("--report", default=None, help="write diagnostics (PNG + JSON) to this folder")
    parser.add_argument(
        "--audio-decoding",
        choices=AUDIO_DECODINGS,
        default="cache",
        help="'cache': decode the corpus once into the datasets cache (~230 MB per audio hour);\n"
        "'on-the-fly': decode each item when the teacher needs it (nothing decoded is stored)",
    )
    parser.add_argument("--on-error", choices=labels.ON_ERROR, default="raise")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-init", type=int, default=labels.KMEANS_DEFAULTS["n_init"])
    parser.add_argument("--kmeans-batch-size", type=int, default=labels.KMEANS_DEFAULTS["batch_size"])
    parser.add_argument(
        "--max-no-improvement", type=int, default=labels.KMEANS_DEFAULTS["max_no_improvement"]
    )
    parser.add_argument(
        "--fit-dtype", choices=("float64", "float32"), default="float64", help="precision of the k-means fit"
    )
    parser.add_argument("--chunk-size", type=int, default=64, help="items per datasets.map batch")
    parser.add_argument("--batch-seconds", type=float, default=64.0, help="padded audio per teacher call")
    parser.add_argument("--device", default=None, help="default: the process's accelerator device")
    parser.add_argument("--no-bf16", action="store_true", help="run the teacher in float32 on GPU")
    parser.add_argument("--audio-column", default="audio")
    parser.add_argument("--speaker-column", default="speaker_id")
    parser.add_argument("--name-column", default=None)
    parser.add_argument("--cache-dir", default=None, help="datasets cache folder")
    args = parser.parse_args(argv)
    if args.features == "teacher" and args.teacher is None:
        parser.error("--teacher is required (or --features mfcc)")
    return args


def load_model_config(path: str | None, teacher, args: argparse.Namespace, centroids=None) -> Any:
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


def check_frame_arithmetic(config: Any) -> None:
    """Fail fast if the label module's frame count ever disagrees with the model's."""
    from delulu_hf.modeling_delulu import feat_extract_output_lengths

    frames = labels.EncoderFrames.from_config(config)
    field, hop = frames.receptive_field, frames.hop
    for n in list(range(field, field + 4 * hop + 2)) + [16000, 160_000, 16000 * 30 + 17]:
        if frames.num_frames(n) != int(feat_extract_output_lengths(config, n)):
            raise RuntimeError(f"frame count mismatch at {n} samples: labels vs model")


class _DecodeSkips(logging.Handler):
    """Collects the items ``load_audio_dataset(on_error="skip")`` drops, for the report."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "skipping" in record.getMessage():
            self.messages.append(record.getMessage())


def _save_streamed(dataset, args: argparse.Namespace, state) -> None:
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch
    from accelerate import PartialState
    from datasets import load_from_disk

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
    check_frame_arithmetic(config)
    bf16 = False if args.no_bf16 else None
    common = dict(
        audio_column=args.audio_column,
        name_column=args.name_column,
        on_error=args.on_error,
        chunk_size=args.chunk_size,
        max_batch_seconds=args.batch_seconds,
        device=device,
        bf16=bf16,
    )

    if centroids is not None:  # check before touching any audio
        centroids.check_compatible(
            config=config, teacher=teacher, alignment=args.alignment, normalization=args.normalization
        )
        if args.k is not None and centroids.k != args.k:
            raise ValueError(f"--k {args.k} but the centroids have k={centroids.k}")

    decode_skips = _DecodeSkips()
    logging.getLogger("delulu_hf.audio").addHandler(decode_skips)
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

    if centroids is None:
        centroids = labels.fit_centroids(
            dataset,
            teacher,
            config,
            k=args.k or 256,
            max_frames=args.max_frames,
            fit_hours=args.fit_hours,
            alignment=args.alignment,
            normalization=args.normalization,
            seed=args.seed,
            kmeans_batch_size=args.kmeans_batch_size,
            n_init=args.n_init,
            max_no_improvement=args.max_no_improvement,
            fit_dtype=args.fit_dtype,
            work_dir=os.path.join(args.output, ".fit") if state.num_processes > 1 else None,
            **common,
        )
        logger.info(
            "fitted k=%d on %d frames (%d items, %.1f s of audio)",
            centroids.k,
            centroids.provenance["frames_used"],
            centroids.provenance["items_used"],
            centroids.provenance["audio_seconds_used"],
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
    if args.streaming:
        _save_streamed(labelled, args, state)
    elif state.is_main_process:
        labels.atomic_save_dataset(labelled, os.path.join(args.output, "dataset"))
    state.wait_for_everyone()

    if args.report and state.is_main_process:
        saved = load_from_disk(os.path.join(args.output, "dataset"))
        report = labels.write_report(
            args.report,
            saved,
            centroids,
            config,
            teacher_hop=teacher.hop_length,
            speaker_column=args.speaker_column,
            name_column=args.name_column,
            skipped=skipped,
            sample_rate=teacher.sample_rate,
            extra={"skipped_at_decode": decode_skips.messages, "data": args.data, "split": args.split},
        )
        diag = report["diagnostics"]
        logger.info(
            "report: perplexity %.1f of k=%d, %d dead, %d dominant, %d skipped%s",
            diag["perplexity"],
            centroids.k,
            len(diag["dead_clusters"]),
            len(diag["dominant_clusters"]),
            report["skipped_count"] + len(decode_skips.messages),
            (
                f"; speaker purity {diag['speaker']['purity']:.3f}, NMI {diag['speaker']['nmi']:.3f}"
                if "speaker" in diag
                else ""
            ),
        )
        print(json.dumps({"report": os.path.join(args.report, "report.json")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
