#!/usr/bin/env bash
# Step time, peak memory and MFU of DELULU Base pretraining in bf16 on one GPU (<= 5 minutes).
#
#   bash benchmarks/gpu_step.sh            # from the repository root, on a machine with a CUDA GPU
#
# For each per-GPU micro-batch size (total padded samples, as `max_batch_samples` in the run configs;
# 1.4 M = HuBERT-Base's per-GPU batch, 2.8 M = base_4xh100.yaml's), it builds one batch with the real
# collator (15.6 s crops, denoising corruption, span masks), then times forward + backward + clipping +
# fused AdamW of DeluluForPreTraining (DeluluConfig() = Base, layerdrop off so every step runs all 12
# layers) under bf16 autocast: 3 warm-up steps, then up to 10 timed steps. MFU = analytic model FLOPs
# (delulu_hf.pretraining.pretraining_flops, 3x forward) / step time / the GPU's dense bf16 peak.
# Writes gpu_step.json (into $OUT when set, else the current folder) and ends with RESULT lines.
# Exits with status 2 and a clear message when no CUDA GPU is visible.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_step.sh: no CUDA GPU visible to torch (torch.cuda.is_available() is False); nothing measured." >&2
    echo "Run it on a GPU machine; for CPU throughput use: python benchmarks/bench_pretrain_step.py" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

exec timeout 290 python - "$@" <<'PY'
import json, os, statistics, sys, time

import numpy as np
import torch

sys.path.insert(0, os.getcwd())
from delulu_hf import DeluluConfig, DeluluForPreTraining, feat_extract_output_lengths
from delulu_hf import pretraining as P

device = torch.device("cuda")
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
name = torch.cuda.get_device_name(device)
peak = P.peak_flops_per_second(device, float(os.environ["PEAK_FLOPS"]) if os.environ.get("PEAK_FLOPS") else None)
config = DeluluConfig(layerdrop=0.0)
crop = 250_000  # HuBERT's max_sample_size: 15.6 s
rng = np.random.default_rng(0)


def batch_of(total_samples: int) -> dict:
    items = []
    for i in range(max(1, total_samples // crop)):
        t = np.arange(crop) / 16000
        wave = np.sin(2 * np.pi * rng.uniform(90, 240) * t) * (np.sin(2 * np.pi * 4 * t) > -0.2)
        wave = (0.1 * wave + 0.01 * rng.standard_normal(crop)).astype(np.float32)
        labels = rng.integers(0, config.num_clusters, feat_extract_output_lengths(config, crop))
        items.append({"input_values": wave, "labels": labels, "name": f"#{i}", "seed": i, "epoch": 0, "batch_index": 0})
    batch = P.DeluluPretrainingCollator(config, crop)(items)
    batch.pop("epoch"), batch.pop("batch_index")
    return {k: v.to(device) for k, v in batch.items() if v is not None}


torch.manual_seed(0)
model = DeluluForPreTraining(config).to(device)
model.train()
optimizer, _ = P.build_optimizer_and_scheduler(model, P.PretrainConfig(), fused=True)
params = sum(p.numel() for p in model.parameters())
print(f"{name}: DELULU Base {params / 1e6:.1f} M parameters, bf16 autocast, peak {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s")

results = []
for total in (1_400_000, 2_800_000):
    try:
        batch = batch_of(total)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        times = []
        start_all = time.perf_counter()
        for step in range(13):
            torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(**batch)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            if step >= 3:
                times.append(time.perf_counter() - start)
            if time.perf_counter() - start_all > 100 and len(times) >= 3:
                break
        step_s = statistics.median(times)
        samples = int(batch["attention_mask"].sum())
        flops = P.pretraining_flops(config, batch["input_values"].shape[-1], batch["input_values"].shape[0])
        row = {
            "max_batch_samples": total,
            "batch_samples": samples,
            "batch_seconds": samples / 16000,
            "items": int(batch["input_values"].shape[0]),
            "step_s": step_s,
            "audio_seconds_per_second": samples / 16000 / step_s,
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "tflops_per_second": flops / step_s / 1e12,
            "mfu": flops / step_s / peak if peak else None,
            "loss": float(out.loss),
        }
    except torch.cuda.OutOfMemoryError:
        row = {"max_batch_samples": total, "error": "out of memory"}
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
    results.append(row)
    print(json.dumps(row))

path = os.path.join(os.environ.get("OUT", "."), "gpu_step.json")
with open(path, "w") as handle:
    json.dump({"device": name, "peak_flops": peak, "torch": torch.__version__, "runs": results}, handle, indent=2)
print(f"wrote {path}")
for row in results:
    if "error" not in row:
        tag = f"{row['max_batch_samples'] // 1000}k"  # the max_batch_samples setting it stands for
        print(f"RESULT gpu_base_bf16_step_seconds_{tag} {row['step_s']:.3f} s")
        print(f"RESULT gpu_base_bf16_audio_seconds_per_second_{tag} {row['audio_seconds_per_second']:.1f}")
        print(f"RESULT gpu_base_bf16_peak_memory_gib_{tag} {row['peak_memory_gib']:.1f} GiB")
        if row["mfu"] is not None:
            print(f"RESULT gpu_base_bf16_mfu_{tag} {row['mfu']:.3f}")
PY
