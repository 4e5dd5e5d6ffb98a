"""Benchmark of the label pipeline (delulu_hf.labels): does everything stay out of the teacher's way?

(a) teacher frame features alone (pre-decoded audio, the same length-sorted batches the map uses);
(b) the whole label map: decode (soundfile) + resample + teacher + alignment + assignment + writing
    the ``cluster_ids`` column with ``datasets.map``; both in audio-seconds per second, ratio >= 0.8;
(c) torch assignment vs ``MiniBatchKMeans.predict`` on the same (N, 2304) float32 matrix;
(d) peak RSS of the label map on 1x and 4x the data, each in a fresh subprocess;
(e) the resumable label pass (``LabelPass``: fit on a 10 % subset, sharded map, assembly): teacher
    frames computed / frames in the corpus, with the fit-feature store (the default) and without;
(f) a pass SIGKILLed at ~60 % of its map (in a subprocess) and rerun: the share of the map's teacher
    work done twice (the shard in flight at the kill), against one shard's share.

Runs on ``data/demo_corpus`` with ``data/demo_teacher`` when they exist; otherwise on a random-init
ReDimNet preset and/or synthetic audio (printed in the header). (a) and (b) are sized from a
warm-up so that one pass takes about ``--pass-seconds``, and alternate so that load from other
processes hits both alike; the best of ``--repeats`` passes is reported.

    python benchmarks/bench_labels.py                    # <= 2 min on 2 CPU cores
    python benchmarks/bench_labels.py --only-label-pass  # (e) and (f) only
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import datasets
import numpy as np
import soundfile as sf
import torch

from delulu_hf import labels
from delulu_hf.audio import load_audio
from delulu_hf.configuration_delulu import DeluluConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CORPUS = os.path.join(REPO, "data", "demo_corpus")
DEMO_TEACHER = os.path.join(REPO, "data", "demo_teacher")
SR = 16000


def load_teacher(preset: str):
    """The demo teacher if present, else a random-init preset (same architecture and cost)."""
    if os.path.isfile(os.path.join(DEMO_TEACHER, "config.json")):
        return labels.load_featurizer(DEMO_TEACHER, device="cpu"), f"demo teacher ({DEMO_TEACHER})"
    return labels.load_featurizer(
        preset, device="cpu"
    ), f"random-init ReDimNet preset {preset!r} (no demo teacher)"


def corpus_files(work_dir: str) -> tuple[list[str], list[str], str]:
    """Paths and speakers of the demo corpus train split, or of generated FLAC files."""
    metadata = os.path.join(DEMO_CORPUS, "metadata.csv")
    if os.path.isfile(metadata):
        import csv

        with open(metadata, newline="") as handle:
            rows = [row for row in csv.DictReader(handle) if row["split"] == "train"]
        rows.sort(key=lambda row: row["file_name"])
        rng = np.random.default_rng(0)
        rows = [rows[i] for i in rng.permutation(len(rows))]
        return (
            [os.path.join(DEMO_CORPUS, r["file_name"]) for r in rows],
            [r["speaker_id"] for r in rows],
            "demo corpus",
        )
    rng = np.random.default_rng(0)
    paths, speakers = [], []
    for i in range(200):
        t = np.arange(int(rng.uniform(1.0, 4.0) * SR)) / SR
        wave = 0.1 * np.sin(2 * np.pi * (100 + 20 * (i % 10)) * t) + 0.01 * rng.standard_normal(len(t))
        paths.append(os.path.join(work_dir, f"synthetic_{i:03d}.flac"))
        sf.write(paths[-1], wave.astype(np.float32), SR)
        speakers.append(f"s{i % 10}")
    return paths, speakers, "synthetic corpus (no demo corpus)"


def raw_dataset(paths: list[str], speakers: list[str]) -> datasets.Dataset:
    data = datasets.Dataset.from_dict({"audio": paths, "speaker_id": speakers})
    return data.cast_column("audio", datasets.Audio(decode=False))


def pick_items(paths: list[str], seconds: float) -> int:
    total = 0.0
    for count, path in enumerate(paths, 1):
        total += sf.info(path).duration
        if total >= seconds:
            return count
    return len(paths)


def centroids_from(teacher, rows: torch.Tensor, k: int) -> labels.Centroids:
    """k random encoder-rate frames as centroids: assignment costs the same as with fitted ones."""
    pick = torch.from_numpy(np.random.default_rng(0).choice(len(rows), k, replace=len(rows) < k))
    provenance = {
        "teacher": labels.featurizer_provenance(teacher),
        "alignment": "nearest",
        "normalization": "none",
    }
    return labels.Centroids(rows[pick].clone(), provenance)


def teacher_only_pass(
    extractor: labels.AlignedFeatureExtractor, waves: list[np.ndarray], chunk: int
) -> float:
    start = time.perf_counter()
    for begin in range(0, len(waves), chunk):
        part = waves[begin : begin + chunk]
        for positions in extractor.plan_batches([len(w) for w in part]):
            extractor.teacher_features([part[p] for p in positions])
    return time.perf_counter() - start


def label_map_pass(
    data, teacher, centroids, config, chunk: int, cache_dir: str, batch_seconds: float = 64.0
) -> tuple[float, datasets.Dataset]:
    start = time.perf_counter()
    out = labels.add_cluster_ids(
        data,
        teacher,
        centroids,
        config,
        chunk_size=chunk,
        max_batch_seconds=batch_seconds,
        cache_dir=cache_dir,
        load_from_cache_file=False,
    )
    return time.perf_counter() - start, out


def peak_rss_mb() -> float:
    """Peak resident memory of this process. /proc's VmHWM belongs to the current program image;
    ru_maxrss on Linux also carries the parent's peak across fork + exec."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_probe(args: argparse.Namespace) -> None:
    """Child process for (d): label ``--probe-items`` items, print peak RSS (MB) as JSON.

    Small map chunks and teacher batches (``--probe-chunk`` items, 8 s of padded audio) so that
    even the 1x run holds several of each: peak memory then reflects the pipeline's working set,
    which must not grow with the number of items.
    """
    datasets.disable_progress_bars()
    teacher, _ = load_teacher(args.preset)
    with tempfile.TemporaryDirectory() as work:
        paths, speakers, _ = corpus_files(work)
        reps = -(-args.probe_items // len(paths))
        paths, speakers = (paths * reps)[: args.probe_items], (speakers * reps)[: args.probe_items]
        config = DeluluConfig(
            num_clusters=args.k, label_teacher_name=teacher.name, label_feature_dim=teacher.feature_dim
        )
        rows = torch.randn(4 * args.k, teacher.feature_dim)
        centroids = centroids_from(teacher, rows, args.k)
        before = peak_rss_mb()
        data = raw_dataset(paths, speakers)
        seconds, out = label_map_pass(
            data, teacher, centroids, config, args.probe_chunk, work, batch_seconds=8.0
        )
        frames = sum(len(ids) for ids in out["cluster_ids"])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps({"peak_rss_mb": peak, "rss_before_map_mb": before, "frames": frames, "seconds": seconds})
    )


def run_probe(items: int, args: argparse.Namespace) -> dict:
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--probe-items",
        str(items),
        "--preset",
        args.preset,
    ]
    command += ["--probe-chunk", str(args.probe_chunk), "--k", str(args.k)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def bench_assignment(rows: int, dim: int, k: int, repeats: int) -> tuple[float, float, int, int]:
    from sklearn.cluster import MiniBatchKMeans

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((k, dim)).astype(np.float32)
    matrix = (centres[rng.integers(0, k, rows)] + 0.8 * rng.standard_normal((rows, dim))).astype(np.float32)
    kmeans = MiniBatchKMeans(k, init="random", n_init=1, max_iter=1, batch_size=4096, random_state=0)
    kmeans.fit(matrix[: min(rows, 12000)])
    assigner = labels.ClusterAssigner(torch.from_numpy(kmeans.cluster_centers_))
    tensor = torch.from_numpy(matrix)
    expected = kmeans.predict(matrix[:1000])  # warm-up both
    assigner(tensor[:1000])
    sk_times, torch_times = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        expected = kmeans.predict(matrix)
        sk_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        ours = assigner(tensor).numpy()
        torch_times.append(time.perf_counter() - start)
    mismatches = int((ours != expected).sum())
    exact = int((ours != kmeans.predict(matrix.astype(np.float64))).sum()) if mismatches else 0
    return min(sk_times), min(torch_times), mismatches, exact


class FrameCounter:
    """Counts the teacher frames computed (``1 + samples // hop`` per item, padding excluded) by
    wrapping the teacher instance's ``frame_features``; ``active`` turns counting on and off."""

    def __init__(self, teacher):
        self.frames = 0
        self.active = True
        self.on_count = None
        inner = teacher.frame_features
        hop = teacher.hop_length

        def counted(waveforms, lengths=None):
            out = inner(waveforms, lengths)
            if self.active:
                n = lengths.tolist() if lengths is not None else [waveforms.shape[1]] * waveforms.shape[0]
                self.frames += sum(1 + int(x) // hop for x in n)
                if self.on_count is not None:
                    self.on_count(self.frames)
            return out

        teacher.frame_features = counted


def pass_fit_settings(args: argparse.Namespace) -> dict:
    return dict(fit_hours=args.pass_fit_hours, max_frames=20000, n_init=1)


def label_pass(output: str, data, teacher, config, args: argparse.Namespace, budget_gb: float, counter=None):
    """Fit (10 % of the audio) -> sharded map -> assembly -> manifest, as ``prepare_labels.py`` runs it.
    Returns the teacher frames computed by the fit and by the map."""
    run = labels.LabelPass(output, data, teacher, config, chunk_size=1, device="cpu", progress=False)
    counter = counter or FrameCounter(teacher)
    counter.frames = 0
    centroids = run.centroids(
        k=args.pass_k,
        fit_settings=pass_fit_settings(args),
        fit_feature_budget_gb=budget_gb,
        verbose=-1,
    )
    fit_frames = counter.frames
    run.map(centroids, num_shards=args.pass_shards)
    run.assemble()
    run.write_manifest(centroids)
    return fit_frames, counter.frames - fit_frames


def pass_corpus(args: argparse.Namespace, work: str):
    """The (e)/(f) corpus: the first ``--pass-items`` files, undecoded (decoded where used)."""
    paths, speakers, _ = corpus_files(work)
    paths, speakers = paths[: args.pass_items], speakers[: args.pass_items]
    return raw_dataset(paths, speakers), paths


def resume_child(args: argparse.Namespace) -> None:
    """Child process for (f): the label pass, SIGKILLed once its map has computed ``--kill-frames``
    teacher frames (the count is written to ``--kill-report`` first)."""
    datasets.disable_progress_bars()
    teacher, _ = load_teacher(args.preset)
    data, _ = pass_corpus(args, args.resume_child)
    config = DeluluConfig(
        num_clusters=args.pass_k, label_teacher_name=teacher.name, label_feature_dim=teacher.feature_dim
    )
    counter = FrameCounter(teacher)
    original_map = labels.LabelPass.map

    def map_then_die(self, *a, **kw):
        counter.frames, counter.active = 0, True

        def die(frames: int) -> None:
            if frames >= args.kill_frames:
                with open(args.kill_report, "w") as handle:
                    handle.write(str(frames))
                os.kill(os.getpid(), signal.SIGKILL)

        counter.on_count = die
        return original_map(self, *a, **kw)

    labels.LabelPass.map = map_then_die
    label_pass(os.path.join(args.resume_child, "out"), data, teacher, config, args, 1.0, counter)


def bench_label_pass(args: argparse.Namespace, teacher) -> tuple[float, float, float, float]:
    """(e) and (f): teacher passes of a label pass, and the map work redone after a kill."""
    work = tempfile.mkdtemp(prefix="bench_label_pass_")
    try:
        data, paths = pass_corpus(args, work)
        waves = [load_audio(p) for p in paths]
        corpus_frames = sum(1 + len(w) // teacher.hop_length for w in waves)
        audio_hours = sum(len(w) for w in waves) / SR / 3600
        args.pass_fit_hours = args.fit_fraction * audio_hours
        config = DeluluConfig(
            num_clusters=args.pass_k, label_teacher_name=teacher.name, label_feature_dim=teacher.feature_dim
        )
        counter = FrameCounter(teacher)
        fit, mapped = label_pass(os.path.join(work, "store"), data, teacher, config, args, 1.0, counter)
        fit0, mapped0 = label_pass(os.path.join(work, "no_store"), data, teacher, config, args, 0.0, counter)
        counter.active = False
        print(
            f"(e) label pass over {len(paths)} items ({audio_hours * 3600:.0f} s of audio), fit on "
            f"{args.fit_fraction:.0%}: teacher frames fit {fit} + map {mapped} of {corpus_frames} "
            f"(without the fit-feature store: {fit0} + {mapped0})"
        )
        passes = (fit + mapped) / corpus_frames
        passes_without = (fit0 + mapped0) / corpus_frames

        # (f): kill at ~60 % of the map's teacher work, in a child process; rerun here.
        child = os.path.join(work, "child")
        os.makedirs(child)
        report = os.path.join(child, "killed_at")
        command = [
            sys.executable,
            os.path.abspath(__file__),
            "--resume-child",
            child,
            "--preset",
            args.preset,
        ]
        command += ["--pass-items", str(args.pass_items), "--pass-k", str(args.pass_k)]
        command += ["--pass-shards", str(args.pass_shards), "--pass-fit-hours", repr(args.pass_fit_hours)]
        command += ["--kill-frames", str(int(0.6 * mapped)), "--kill-report", report]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=dict(os.environ))
        if result.returncode != -signal.SIGKILL or not os.path.isfile(report):
            raise RuntimeError(f"the child was not killed as planned: {result.stderr[-3000:]}")
        with open(report) as handle:
            killed_map_frames = int(handle.read())
        out = os.path.join(child, "out")
        plan = labels.ShardPlan.load(os.path.join(out, "work", "plan.json"))
        shards = len(plan.bounds)
        done = sum(plan.is_done(os.path.join(out, "work", "shards"), i) for i in range(shards))
        counter.active = True
        counter.frames = 0
        rerun = labels.LabelPass(out, data, teacher, config, chunk_size=1, device="cpu", progress=False)
        centroids = rerun.centroids(
            k=args.pass_k,
            fit_settings=pass_fit_settings(args),
            fit_feature_budget_gb=1.0,
        )
        refit = counter.frames
        rerun.map(centroids)
        rerun.assemble()
        rerun.write_manifest(centroids)
        rerun_frames = counter.frames - refit
        counter.active = False
        redone = (killed_map_frames + rerun_frames - mapped) / mapped
        same = (
            datasets.load_from_disk(os.path.join(out, "dataset"))["cluster_ids"]
            == datasets.load_from_disk(os.path.join(work, "store", "dataset"))["cluster_ids"]
        )
        print(
            f"(f) killed at {killed_map_frames / mapped:.0%} of the map ({done}/{shards} shards committed); "
            f"the rerun refitted {refit} frames and mapped {rerun_frames}: {redone:.1%} of the map redone "
            f"(one shard is {1 / shards:.0%}); ids equal to the uninterrupted run: {same}"
        )
        return passes, passes_without, redone, 1 / shards
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="b2", help="ReDimNet preset when data/demo_teacher is absent")
    parser.add_argument(
        "--pass-seconds", type=float, default=6.0, help="target wall time of one (a)/(b) pass"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=64, help="items per map batch")
    parser.add_argument("--k", type=int, default=256)
    parser.add_argument("--assign-rows", type=int, default=30000)
    parser.add_argument("--memory-seconds", type=float, default=3.0, help="wall time of the 1x memory probe")
    parser.add_argument("--probe-chunk", type=int, default=4, help="items per map batch in the memory probes")
    parser.add_argument("--probe-items", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--pass-items", type=int, default=16, help="items of the (e)/(f) label pass")
    parser.add_argument("--pass-k", type=int, default=16, help="k of the (e)/(f) label pass")
    parser.add_argument("--pass-shards", type=int, default=8, help="shards of the (e)/(f) label map")
    parser.add_argument(
        "--fit-fraction", type=float, default=0.1, help="share of the audio the (e) fit reads"
    )
    parser.add_argument("--only-label-pass", action="store_true", help="run (e) and (f) only (~30 s)")
    parser.add_argument("--resume-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--kill-frames", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--pass-fit-hours", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--kill-report", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe_items is not None:
        memory_probe(args)
        return
    if args.resume_child is not None:
        resume_child(args)
        return
    if args.only_label_pass:
        datasets.disable_progress_bars()
        teacher, teacher_desc = load_teacher(args.preset)
        print(f"teacher: {teacher_desc}, {teacher.feature_dim}-d")
        passes, passes_without, redone, shard_share = bench_label_pass(args, teacher)
        print(f"RESULT label_build_teacher_passes {passes:.3f}")
        print(f"RESULT label_build_teacher_passes_without_fit_store {passes_without:.3f}")
        print(f"RESULT label_resume_fraction_redone {redone:.3f}")
        print(f"RESULT label_resume_shard_share {shard_share:.3f}")
        return
    datasets.disable_progress_bars()
    started = time.perf_counter()
    teacher, teacher_desc = load_teacher(args.preset)
    work = tempfile.mkdtemp(prefix="bench_labels_")
    paths, speakers, corpus_desc = corpus_files(work)
    print(
        f"teacher: {teacher_desc}, {teacher.feature_dim}-d; corpus: {corpus_desc}; torch threads {torch.get_num_threads()}"
    )
    config = DeluluConfig(
        num_clusters=args.k, label_teacher_name=teacher.name, label_feature_dim=teacher.feature_dim
    )
    extractor = labels.AlignedFeatureExtractor(teacher, config, device="cpu", max_batch_size=args.chunk)

    # Size (a)/(b) from a warm-up so that each pass takes about --pass-seconds.
    warm = [load_audio(p) for p in paths[:6]]
    warm_rows = torch.cat([aligned for _, aligned, _, _ in extractor.iter_features(warm)])  # cold start
    start = time.perf_counter()
    teacher_only_pass(extractor, warm, args.chunk)
    speed = sum(len(w) for w in warm) / SR / (time.perf_counter() - start)
    centroids = centroids_from(teacher, warm_rows, args.k)
    items = max(4, pick_items(paths, speed * args.pass_seconds))
    data = raw_dataset(paths[:items], speakers[:items])
    waves = [load_audio(p) for p in paths[:items]]
    audio_seconds = sum(len(w) for w in waves) / SR
    print(
        f"(a)/(b): {items} items, {audio_seconds:.1f} s of audio, k={args.k}, warm-up speed {speed:.2f} audio s/s"
    )

    teacher_times, map_times, teacher_cpu, map_cpu = [], [], [], []
    for _ in range(args.repeats):
        cpu = time.process_time()
        teacher_times.append(teacher_only_pass(extractor, waves, args.chunk))
        teacher_cpu.append(time.process_time() - cpu)
        cpu = time.process_time()
        seconds, out = label_map_pass(data, teacher, centroids, config, args.chunk, work)
        map_cpu.append(time.process_time() - cpu)
        map_times.append(seconds)
    frames = labels.EncoderFrames.from_config(config)
    assert [len(ids) for ids in out["cluster_ids"]] == [frames.num_frames(len(w)) for w in waves]
    teacher_speed = audio_seconds / min(teacher_times)
    map_speed = audio_seconds / min(map_times)
    print(
        f"(a) teacher only: {teacher_speed:.2f} audio s/s   passes {[round(t, 2) for t in teacher_times]} s"
    )
    print(f"(b) label map:    {map_speed:.2f} audio s/s   passes {[round(t, 2) for t in map_times]} s")
    # CPU seconds of this process are less sensitive than wall time to other jobs on a shared machine.
    cpu_efficiency = min(teacher_cpu) / min(map_cpu)
    print(f"    CPU time per pass: teacher {min(teacher_cpu):.2f} s, map {min(map_cpu):.2f} s")

    sk_time, torch_time, mismatches, exact = bench_assignment(args.assign_rows, 2304, args.k, 3)
    print(
        f"(c) assignment of ({args.assign_rows}, 2304) to {args.k} centroids: sklearn {sk_time * 1000:.0f} ms, "
        f"torch {torch_time * 1000:.0f} ms, label mismatches {mismatches}"
        + (f" (vs float64 predict: {exact})" if mismatches else "")
    )

    unit = max(2 * args.probe_chunk, pick_items(paths, speed * args.memory_seconds))
    one, four = run_probe(unit, args), run_probe(4 * unit, args)
    print(
        f"(d) peak RSS: 1x ({unit} items, {one['frames']} frames) {one['peak_rss_mb']:.0f} MB, "
        f"4x ({4 * unit} items, {four['frames']} frames) {four['peak_rss_mb']:.0f} MB "
        f"(after imports and model: {one['rss_before_map_mb']:.0f} / {four['rss_before_map_mb']:.0f} MB)"
    )
    passes, passes_without, redone, shard_share = bench_label_pass(args, teacher)
    print(f"total wall time {time.perf_counter() - started:.0f} s")
    print(f"RESULT label_map_efficiency_vs_teacher_only {map_speed / teacher_speed:.3f}")
    print(f"RESULT label_map_audio_seconds_per_second {map_speed:.2f}")
    print(f"RESULT label_map_efficiency_vs_teacher_only_cpu_time {cpu_efficiency:.3f}")
    print(f"RESULT kmeans_assign_speedup_vs_sklearn {sk_time / torch_time:.2f} x")
    print(f"RESULT kmeans_assign_label_mismatches {mismatches}")
    print(f"RESULT label_map_peak_rss_ratio_4x_vs_1x {four['peak_rss_mb'] / one['peak_rss_mb']:.3f}")
    print(f"RESULT label_build_teacher_passes {passes:.3f}")
    print(f"RESULT label_build_teacher_passes_without_fit_store {passes_without:.3f}")
    print(f"RESULT label_resume_fraction_redone {redone:.3f}")
    print(f"RESULT label_resume_shard_share {shard_share:.3f}")


if __name__ == "__main__":
    main()
