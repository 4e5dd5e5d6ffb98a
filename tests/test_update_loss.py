"""The update-level loss (delulu_hf.pretraining.loss): frames of the whole update weigh alike, on any layout.

The gradient of one update must not depend on how its micro-batches are spread over processes and
accumulation steps: 1 process x 4 accumulation steps, 2 x 2 and 4 x 1 give the same gradient, equal to
the gradient of the update loss computed directly (summed frame losses / frames of the update). The
layouts run ``tests/distributed/update_gradient.py``, which performs the update as ``pretrain.py`` does.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from delulu_hf import DeluluForPreTraining
from delulu_hf import pretraining as P

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "distributed"))
import update_gradient  # noqa: E402

REPO = HERE.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_layout(out: Path, processes: int, accumulation: int) -> dict[str, torch.Tensor]:
    script = str(HERE / "distributed" / "update_gradient.py")
    if processes == 1:
        command = [sys.executable, script]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
        command += ["--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no"]
        command += ["--dynamo_backend", "no", "--main_process_port", str(free_port()), script]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO))
    result = subprocess.run(
        command + [str(out), str(accumulation)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return load_file(out / "grads.safetensors")


def reference() -> tuple[dict[str, torch.Tensor], float, float]:
    """Gradient of the update loss computed directly over all four micro-batches, and the loss that
    per-batch means (the old normalisation) would have given."""
    config = update_gradient.tiny_config()
    torch.manual_seed(0)
    model = DeluluForPreTraining(config).train()
    batches = update_gradient.micro_batches(config)
    outs = [model(**batch) for batch in batches]
    masked = sum(o.masked_count for o in outs).double()
    denoise = sum(o.denoise_count for o in outs).double()
    loss = sum(o.masked_loss_sum for o in outs) / masked
    loss = loss + config.denoise_loss_weight * sum(o.denoise_loss_sum for o in outs) / denoise
    loss = (
        loss + config.feature_penalty_weight * sum(o.feature_penalty * o.masked_count for o in outs) / masked
    )
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    mean_of_means = float(sum(o.loss.detach() for o in outs) / len(outs))
    return grads, float(loss), mean_of_means


def test_frame_counts_match_the_models_counts():
    config = update_gradient.tiny_config()
    model = DeluluForPreTraining(config).train()
    batches = update_gradient.micro_batches(config)
    frames = P.count_update_frames(batches)
    outs = [model(**batch) for batch in batches]
    assert frames.masked == float(sum(o.masked_count for o in outs)) > 0
    assert frames.denoise == float(sum(o.denoise_count for o in outs)) > 0
    counts = [int(o.masked_count) for o in outs]
    assert max(counts) > 2 * min(counts)  # unequal micro-batches: the normalisation matters


def test_layouts_give_the_gradient_of_the_update_loss(tmp_path: Path):
    expected, loss, mean_of_means = reference()
    assert abs(loss - mean_of_means) > 1e-3  # the old per-batch averaging is a different objective
    layouts = {(1, 4): None, (2, 2): None, (4, 1): None}
    for processes, accumulation in layouts:
        layouts[(processes, accumulation)] = run_layout(
            tmp_path / f"{processes}x{accumulation}", processes, accumulation
        )
    for layout, grads in layouts.items():
        assert float(grads["update_loss"]) == pytest.approx(loss, rel=1e-5), layout
        for name, value in expected.items():
            torch.testing.assert_close(grads[name], value, atol=1e-6, rtol=1e-4, msg=f"{layout} {name}")

    # LayerDrop: every process skipped the same layers in every micro-step, different ones across steps.
    patterns = json.loads((tmp_path / "4x1" / "layerdrop.json").read_text())
    assert len(patterns) == 4 and all(p == patterns[0] for p in patterns)
    assert len({tuple(step) for step in patterns[0]}) > 1
