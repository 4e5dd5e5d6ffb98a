"""Pretraining throughput on CPU: audio-seconds per second of a full training step.

One step = what ``training/pretrain.py`` does per micro-batch: the collator (frame-aligned crops,
denoising corruption, span masks, padding), forward + backward of ``DeluluForPreTraining`` and an
AdamW update. Two sizes:

* ``demo``: the model and batch of ``training/configs/demo.yaml`` (the default run);
* ``small_base``: DELULU Base's widths (conv 7 x 512, hidden 768, 12 heads, FFN 3072) with 4 of its
  12 transformer layers, on a 2 x 4 s batch: the per-layer cost of Base, measurable on a laptop.

Inputs are synthetic voices (harmonic tones with pauses) with random cluster ids of the right length,
so nothing is read from disk. Each size is warmed up once, then timed for ``--steps`` steps (or until
its share of ``--budget-s`` runs out); the median step gives the rate. Also reports the analytic
FLOP rate (``pretraining_flops``) and the collator's share of the step.

    python benchmarks/bench_pretrain_step.py [--steps 5 --budget-s 100 --threads N]

Ends with ``RESULT pretrain_demo_audio_seconds_per_second <v>`` and
``RESULT pretrain_small_base_audio_seconds_per_second <v>``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from delulu_hf import DeluluForPreTraining, feat_extract_output_lengths  # noqa: E402
from delulu_hf import pretraining as P  # noqa: E402


def synthetic_items(config, num_items: int, seconds: tuple[float, float], seed: int) -> list[dict]:
    """``PretrainingItems``-shaped dicts: a harmonic 'voice' with syllable gating, and random labels."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(num_items):
        n = int(rng.uniform(*seconds) * P.SAMPLE_RATE)
        t = np.arange(n) / P.SAMPLE_RATE
        f0 = rng.uniform(90, 240)
        wave = sum(np.sin(2 * np.pi * k * f0 * t) / k for k in range(1, 12))
        wave = wave * (np.sin(2 * np.pi * rng.uniform(3, 5) * t) > -0.2) + 0.01 * rng.standard_normal(n)
        frames = int(feat_extract_output_lengths(config, n))
        items.append(
            {
                "input_values": (0.1 * wave).astype(np.float32),
                "labels": rng.integers(0, config.num_clusters, frames),
                "name": f"synthetic #{i}",
                "seed": int(rng.integers(2**31)),
                "epoch": 0,
                "batch_index": i,
            }
        )
    return items


def measure(name: str, cfg: P.PretrainConfig, batch_items: int, seconds: tuple[float, float], args) -> float:
    model_config = P.build_model_config(cfg)
    torch.manual_seed(0)
    model = DeluluForPreTraining(model_config)
    model.train()
    optimizer, _ = P.build_optimizer_and_scheduler(model, cfg)
    collator = P.DeluluPretrainingCollator(
        model_config, cfg.max_sample_length, noise=P.NoiseSource(), normalize_audio=cfg.normalize_audio
    )
    pool = synthetic_items(model_config, batch_items * (args.steps + 1), seconds, seed=1)
    step_times, collate_times, audio = [], [], []
    deadline = time.perf_counter() + args.budget_s / 2
    for step in range(args.steps + 1):
        start = time.perf_counter()
        batch = collator(pool[step * batch_items : (step + 1) * batch_items])
        batch.pop("epoch"), batch.pop("batch_index")
        collated = time.perf_counter()
        out = model(**batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        end = time.perf_counter()
        if step == 0:
            flops = P.pretraining_flops(model_config, batch["input_values"].shape[-1], batch_items)
            continue  # warm-up
        step_times.append(end - start)
        collate_times.append(collated - start)
        audio.append(float(batch["attention_mask"].sum()) / P.SAMPLE_RATE)
        if time.perf_counter() > deadline and len(step_times) >= 2:
            break
    median = statistics.median(step_times)
    rate = statistics.median(a / s for a, s in zip(audio, step_times))
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"{name}: {params:.1f} M params, batch {batch_items} x ~{np.mean(audio) / batch_items:.1f} s, "
        f"{len(step_times)} timed steps, median step {median:.3f} s "
        f"(collator {statistics.median(collate_times) / median:.0%}), {rate:.1f} audio-s/s, "
        f"~{flops / median / 1e9:.1f} GFLOP/s (analytic)"
    )
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per size (after one warm-up)")
    parser.add_argument("--budget-s", type=float, default=100.0, help="stop timing a size after half of this")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    demo = P.parse_config([])  # training/configs/demo.yaml
    per_batch = max(1, demo.max_batch_samples // demo.max_sample_length)
    demo_rate = measure("demo", demo, per_batch, (3.0, 5.0), args)
    small_base = P.PretrainConfig(  # Base defaults but 4 layers; layerdrop off so every step runs them all
        max_sample_length=64000, max_batch_samples=128000, model={"num_hidden_layers": 4, "layerdrop": 0.0}
    )
    base_rate = measure("small_base", small_base, 2, (4.0, 4.5), args)
    print(f"RESULT pretrain_demo_audio_seconds_per_second {demo_rate:.2f}")
    print(f"RESULT pretrain_small_base_audio_seconds_per_second {base_rate:.2f}")


if __name__ == "__main__":
    main()
