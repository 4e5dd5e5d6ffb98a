#!/usr/bin/env python
"""Frame-feature throughput of ReDimNet on CPU (audio-seconds per second), ours vs. the official code.

For each preset (B0, B2, B6) a batch of equal-length random waveforms goes through
``ReDimNet.frame_features`` under ``torch.inference_mode``. When the official implementation
(github.com/IDRnD/ReDimNet) is importable (``--official-path``, default ``$REDIMNET_OFFICIAL_PATH`` or
``/tmp/redimnet_official``), the same weights run through its frontend + backbone, alternating with
ours repetition by repetition so that load from other processes hits both alike. Throughput comes from
the fastest repetition (as ``timeit`` advises: slower ones measure interference, not the code); the
speed-up is the ratio of the two. Without the official code, that column is skipped.

    python benchmarks/bench_redimnet.py                 # <= ~2 min on 2 cores (--budget-s 90)
    python benchmarks/bench_redimnet.py --presets b0 --repeats 5 --threads 1

On a CPU shared with other jobs, oneDNN's worker threads fight over the cores and both
implementations slow down many-fold (``--threads 1`` then helps); throughputs from a loaded machine are
not comparable with quiet-machine ones, while the alternating speed-up ratio stays meaningful.

Ends with ``RESULT redimnet_b0_audio_seconds_per_second <v>`` and, with the official code,
``RESULT redimnet_b0_speedup_vs_official <ratio> x``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch

from delulu_hf.teacher.redimnet import ReDimNet


def load_official(path: str):
    """The official ``ReDimNetWrap`` class, or None when it cannot be imported."""
    if os.path.isdir(path) and path not in sys.path:
        sys.path.insert(0, path)
    try:
        from redimnet.model import ReDimNetWrap
    except ImportError:
        return None
    return ReDimNetWrap


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["b0", "b2", "b6"])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seconds", type=float, default=3.0, help="length of each waveform")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions per implementation (at most)")
    p.add_argument("--b6-batch-size", type=int, default=1, help="B6 is ~20x slower than B0: a smaller batch")
    p.add_argument("--budget-s", type=float, default=90.0, help="stop repeating once spent (>= 1 repetition)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument(
        "--official-path", default=os.environ.get("REDIMNET_OFFICIAL_PATH", "/tmp/redimnet_official")
    )
    p.add_argument("--no-official", action="store_true", help="time ours only")
    args = p.parse_args(argv)

    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    official_cls = None if args.no_official else load_official(args.official_path)
    warnings.filterwarnings("ignore", category=FutureWarning)  # the official frontend's autocast call
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; official code: "
        f"{'yes' if official_cls else 'not importable, column skipped'}"
    )
    header = (
        f"{'preset':8s}{'batch':>6s}{'ours (audio s/s)':>18s}{'official (audio s/s)':>22s}{'speed-up':>10s}"
    )
    print(header + f"{'reps':>6s}")
    results: dict[str, dict[str, float]] = {}
    for index, preset in enumerate(args.presets):
        # Presets are timed in order; this one's share of the budget ends at ``deadline``.
        deadline = started + args.budget_s * (index + 1) / len(args.presets)
        batch = args.b6_batch_size if preset == "b6" else args.batch_size
        ours = ReDimNet.from_preset(preset).eval()
        x = torch.randn(batch, int(args.seconds * ours.sample_rate))
        audio_seconds = batch * args.seconds
        runs = {"ours": lambda m=ours, x=x: m.frame_features(x)}
        if official_cls is not None:
            official = official_cls(**ours.config.official_kwargs()).eval()
            official.load_state_dict(ours.state_dict(), strict=True)
            runs["official"] = lambda m=official, x=x: m.backbone(m.spec(x).unsqueeze(1))
        times: dict[str, list[float]] = {name: [] for name in runs}
        with torch.inference_mode():
            for fn in runs.values():
                fn()  # warm-up: oneDNN primitive creation, allocator
            for rep in range(args.repeats):
                if rep > 0 and time.perf_counter() > deadline:
                    break
                for name, fn in runs.items():  # alternate, so background load hits both alike
                    times[name].append(timed(fn))
        row = {name: audio_seconds / min(ts) for name, ts in times.items()}
        results[preset] = row
        official_text = f"{row['official']:22.2f}" if "official" in row else f"{'-':>22s}"
        speedup = f"{row['ours'] / row['official']:9.2f}x" if "official" in row else f"{'-':>10s}"
        print(
            f"{preset:8s}{batch:6d}{row['ours']:18.2f}{official_text}{speedup}{len(times['ours']):6d}",
            flush=True,
        )

    # B0 last: its two lines are the headline the issue asks the output to end with.
    for preset in sorted(results, key=lambda name: name == "b0"):
        row = results[preset]
        print(f"RESULT redimnet_{preset}_audio_seconds_per_second {row['ours']:.2f}")
        if "official" in row:
            print(f"RESULT redimnet_{preset}_speedup_vs_official {row['ours'] / row['official']:.2f} x")
    return results


if __name__ == "__main__":
    main()
