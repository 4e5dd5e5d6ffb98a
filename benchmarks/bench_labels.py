"""Benchmark of the label pipeline (delulu_hf.labels): does everything stay out of the teacher's way?

(a) teacher frame features alone (pre-decoded audio, the same length-sorted batches the map uses);
(b) the whole label map: decode (soundfile) + resample + teacher + alignment + assignment + writing
    the ``cluster_ids`` column with ``datasets.map``; both in audio-seconds per second, ratio >= 0.8;
(c) torch assignment vs ``MiniBatchKMeans.predict`` on the same (N, 2304) float32 matrix;
(d) peak RSS of the label map on 1x and 4x the data, each in a fresh subprocess.

Runs on ``data/demo_corpus`` with ``data/demo_teacher`` when they exist; otherwise on a random-init
ReDimNet preset and/or synthetic audio (printed in the header). (a) and (b) are sized from a
warm-up so that one pass takes about ``--pass-seconds``, and alternate so that load from other
processes hits both alike; the best of ``--repeats`` passes is reported.

    python benchmarks/bench_labels.py            # <= 2 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="b2", help="ReDimNet preset when data/demo_teacher is absent")
    parser.add_argument(
        "--pass-seconds", type=float, default=9.0, help="target wall time of one (a)/(b) pass"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=64, help="items per map batch")
    parser.add_argument("--k", type=int, default=256)
    parser.add_argument("--assign-rows", type=int, default=30000)
    parser.add_argument("--memory-seconds", type=float, default=3.0, help="wall time of the 1x memory probe")
    parser.add_argument("--probe-chunk", type=int, default=4, help="items per map batch in the memory probes")
    parser.add_argument("--probe-items", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe_items is not None:
        memory_probe(args)
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
    print(f"total wall time {time.perf_counter() - started:.0f} s")
    print(f"RESULT label_map_efficiency_vs_teacher_only {map_speed / teacher_speed:.3f}")
    print(f"RESULT label_map_audio_seconds_per_second {map_speed:.2f}")
    print(f"RESULT label_map_efficiency_vs_teacher_only_cpu_time {cpu_efficiency:.3f}")
    print(f"RESULT kmeans_assign_speedup_vs_sklearn {sk_time / torch_time:.2f} x")
    print(f"RESULT kmeans_assign_label_mismatches {mismatches}")
    print(f"RESULT label_map_peak_rss_ratio_4x_vs_1x {four['peak_rss_mb'] / one['peak_rss_mb']:.3f}")


if __name__ == "__main__":
    main()
