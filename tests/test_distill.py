"""Teacher distillation (issue 16): the model's regression head, its targets and its place in the loop.

* ``DeluluForPreTraining`` with ``distill_loss_weight > 0`` regresses ``teacher_targets`` through a
  ``distill_head``: the loss is ``cluster_loss_weight * (masked + lambda * denoise) + distill_loss_weight
  * distill``, works without labels, covers the frames ``distill_frames`` says, and off (the default)
  the model and its loss are exactly the paper's.
* ``delulu_hf.pretraining.distill.TeacherTargets`` aligns the teacher's 10 ms frames to the encoder's
  16 ms frames as the label pipeline does, standardises them with stored statistics, and takes the
  teacher's input from the collator's clean crops (never the corrupted mix).
* ``training/pretrain.py`` trains with it end to end and the saved model says which objective trained it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from audio_fixtures import synthetic_voice
from huggingface_hub.errors import StrictDataclassClassValidationError

from delulu_hf import DeluluConfig, DeluluForPreTraining, DeluluModel, feat_extract_output_lengths
from delulu_hf import pretraining as P
from delulu_hf.labels import EncoderFrames, alignment_index
from delulu_hf.modeling_delulu import distill_frame_selection
from delulu_hf.pretraining import distill as D
from delulu_hf.teacher.base import SpeakerTeacher

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEACHER = os.path.join(REPO, "data", "demo_teacher")
CONFIG_ERRORS = (ValueError, StrictDataclassClassValidationError)
TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    conv_dim=(16,) * 7,
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=4,
    num_clusters=8,
    final_dim=16,
    mask_time_length=4,
    hidden_dropout=0.0,
    attention_dropout=0.0,
    feat_proj_dropout=0.0,
    layerdrop=0.0,
)


def tiny(**overrides) -> DeluluConfig:
    return DeluluConfig(**{**TINY, **overrides})


def batch(config: DeluluConfig, seed: int = 0, items: int = 2, samples: int = 12000):
    g = torch.Generator().manual_seed(seed)
    frames = feat_extract_output_lengths(config, samples)
    x = torch.randn(items, samples, generator=g)
    labels = torch.randint(0, config.num_clusters, (items, frames), generator=g)
    mask = torch.zeros(items, frames, dtype=torch.bool)
    mask[:, 5:15] = True
    targets = torch.randn(items, frames, 4, generator=g)
    return x, labels, mask, targets


class _RampTeacher(SpeakerTeacher):
    """A teacher whose frame ``j`` feature is ``(j, j^2, the item's mean sample)``: alignment is visible."""

    name = "ramp"
    feature_dim = 3

    def frame_features(self, waveforms, lengths=None):
        frames = 1 + waveforms.shape[-1] // self.hop_length
        j = torch.arange(frames, dtype=torch.float32)
        n = torch.full((waveforms.shape[0],), waveforms.shape[-1]) if lengths is None else lengths
        level = (waveforms.sum(-1) / n)[:, None].expand(-1, frames)  # the item's mean, padding ignored
        return torch.stack([j.expand_as(level), j.pow(2).expand_as(level), level], dim=-1)


# ---- the model --------------------------------------------------------------------------------


def test_off_by_default_no_head_and_the_papers_loss():
    config = tiny()
    assert config.distill_loss_weight == 0 and config.cluster_loss_weight == 1
    model = DeluluForPreTraining(config).train()
    assert not hasattr(model, "distill_head")
    x, labels, mask, _ = batch(config)
    out = model(x, labels=labels, mask_time_indices=mask)
    assert out.distill_loss is None and out.distill_count is None
    expected = out.masked_loss + config.denoise_loss_weight * out.denoise_loss
    torch.testing.assert_close(out.loss, expected)
    with pytest.raises(ValueError, match="no distillation head"):
        model(x, labels=labels, mask_time_indices=mask, teacher_targets=torch.zeros(2, labels.shape[1], 4))


def test_loss_combines_weighted_terms_and_trains_the_head():
    config = tiny(distill_loss_weight=0.5, cluster_loss_weight=2.0, distill_dim=4)
    model = DeluluForPreTraining(config).train()
    x, labels, mask, targets = batch(config)
    corrupted = torch.tensor([True, False])
    out = model(x, labels=labels, mask_time_indices=mask, corrupted=corrupted, teacher_targets=targets)
    cluster = out.masked_loss + config.denoise_loss_weight * out.denoise_loss
    torch.testing.assert_close(out.loss, 2.0 * cluster + 0.5 * out.distill_loss)
    assert int(out.distill_count) == labels.numel()  # "all" frames by default
    torch.testing.assert_close(out.distill_loss, out.distill_loss_sum / labels.numel())
    out.loss.backward()
    assert model.distill_head.weight.grad.abs().sum() > 0
    assert model.label_embeddings.grad.abs().sum() > 0


def test_distillation_alone_needs_no_labels_and_weight_zero_ignores_them():
    config = tiny(distill_loss_weight=1.0, cluster_loss_weight=0.0, distill_dim=4)
    model = DeluluForPreTraining(config).train()
    x, labels, mask, targets = batch(config)
    alone = model(x, mask_time_indices=mask, teacher_targets=targets)
    torch.testing.assert_close(alone.loss, alone.distill_loss)
    assert alone.masked_loss is None
    with_labels = model(x, labels=labels, mask_time_indices=mask, teacher_targets=targets)
    torch.testing.assert_close(with_labels.loss, with_labels.distill_loss)
    assert with_labels.masked_loss is not None  # still reported


@pytest.mark.parametrize("frames, expected", [("all", 2 * 46), ("masked", 2 * 10), ("unmasked", 2 * 36)])
def test_frames_the_regression_covers(frames, expected):
    config = tiny(distill_loss_weight=1.0, distill_dim=4, distill_frames=frames)
    model = DeluluForPreTraining(config).train()
    x, labels, mask, targets = batch(config)
    assert labels.shape[1] == 46
    out = model(x, labels=labels, mask_time_indices=mask, teacher_targets=targets)
    assert int(out.distill_count) == expected
    real = torch.ones_like(mask)
    assert int(distill_frame_selection(config, real, mask).sum()) == expected
    # an explicit selection wins (the training loop passes the one it counted)
    chosen = torch.zeros_like(mask)
    chosen[0, :3] = True
    out = model(x, labels=labels, mask_time_indices=mask, teacher_targets=targets, distill_frames=chosen)
    assert int(out.distill_count) == 3


@pytest.mark.parametrize("kind", ["cosine", "l1_cosine", "l1", "mse"])
def test_each_loss_is_minimal_at_the_target(kind):
    config = tiny(distill_loss_weight=1.0, distill_dim=4, distill_loss=kind)
    model = DeluluForPreTraining(config).eval()
    x, labels, _, _ = batch(config, items=1)
    with torch.no_grad():
        hidden = model.delulu(x).last_hidden_state
        perfect = model.distill_head(hidden)
    hit = model(x, teacher_targets=perfect)
    miss = model(x, teacher_targets=-perfect)
    assert float(hit.distill_loss.detach()) < float(miss.distill_loss.detach())
    torch.testing.assert_close(hit.distill_cosine_sum / hit.distill_count, torch.tensor(1.0))
    floor = {
        "cosine": 0.0,
        "l1": 0.0,
        "mse": 0.0,
        "l1_cosine": float(-torch.nn.functional.logsigmoid(torch.tensor(1.0))),
    }
    assert float(hit.distill_loss.detach()) == pytest.approx(floor[kind], abs=1e-4)


def test_config_validates_and_records_the_objective(tmp_path):
    with pytest.raises(ValueError, match="distill_dim"):
        DeluluForPreTraining(tiny(distill_loss_weight=1.0))
    with pytest.raises(CONFIG_ERRORS, match="distill_target"):
        DeluluConfig(distill_target="logits")
    with pytest.raises(CONFIG_ERRORS, match="distill_loss"):
        DeluluConfig(distill_loss="kl")
    config = tiny(distill_loss_weight=1.0, distill_dim=4, distill_teacher_name="redimnet-demo")
    model = DeluluForPreTraining(config)
    model.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["distill_loss_weight"] == 1.0 and saved["distill_teacher_name"] == "redimnet-demo"
    assert saved["distill_target"] == "window-embedding" and saved["cluster_loss_weight"] == 1.0
    # the remote code stays self-contained: no delulu_hf or teacher import in the copied model file
    code = (tmp_path / "m" / "modeling_delulu.py").read_text()
    assert "delulu_hf" not in code.split('"""', 2)[2].split("\nclass ")[0] and "redimnet" not in code.lower()
    reloaded = DeluluForPreTraining.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(reloaded.distill_head.weight, model.distill_head.weight)
    # the bare encoder drops the head quietly, as it drops the cluster head
    encoder, info = DeluluModel.from_pretrained(tmp_path / "m", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


# ---- the targets --------------------------------------------------------------------------------


def test_targets_are_the_teacher_frames_nearest_each_encoder_frame(tmp_path):
    config = tiny(distill_loss_weight=1.0, distill_dim=3, distill_standardize=False)
    targets = D.TeacherTargets(_RampTeacher(), config)
    samples = 16000
    clean = torch.ones(2, samples)
    out = targets.targets(clean, torch.tensor([samples, samples]))
    index, _ = alignment_index(samples, EncoderFrames.from_config(config), 160, "nearest")
    frames = feat_extract_output_lengths(config, samples)
    assert out.shape == (2, frames, 3)
    torch.testing.assert_close(out[0, :, 0], torch.as_tensor(index[:, 0], dtype=torch.float32))
    with pytest.raises(ValueError, match="distill_dim is 5"):
        D.TeacherTargets(_RampTeacher(), tiny(distill_loss_weight=1.0, distill_dim=5))


def test_standardisation_statistics_fit_save_and_load(tmp_path):
    config = tiny(distill_loss_weight=1.0, distill_dim=3)
    rng = np.random.default_rng(0)
    waves = [
        rng.normal(size=int(n)).astype(np.float32) + i for i, n in enumerate(rng.integers(8000, 20000, 6))
    ]
    targets = D.TeacherTargets(_RampTeacher(), config).fit_statistics(waves)
    assert targets.statistics["items"] == 6
    # standardised over the fit data: mean 0, std 1 per dimension
    pooled = torch.cat(
        [targets.targets(torch.from_numpy(w)[None], torch.tensor([len(w)]))[0] for w in waves], dim=0
    )
    torch.testing.assert_close(pooled.mean(0), torch.zeros(3), atol=1e-3, rtol=0)
    torch.testing.assert_close(pooled.std(0, unbiased=False), torch.ones(3), atol=1e-3, rtol=0)
    targets.save(str(tmp_path))
    meta = json.loads((tmp_path / "distill_targets.json").read_text())
    assert meta["teacher"]["name"] == "ramp" and meta["target"] == "window-embedding" and meta["dim"] == 3
    again = D.TeacherTargets(_RampTeacher(), config)
    assert again.load(str(tmp_path))
    torch.testing.assert_close(again.mean, targets.mean)
    other = D.TeacherTargets(
        _RampTeacher(), tiny(distill_loss_weight=1.0, distill_dim=3, distill_target="backbone")
    )
    with pytest.raises(ValueError, match="another teacher or target"):
        other.load(str(tmp_path))


def test_collator_keeps_the_clean_crop_and_attach_swaps_it_for_targets():
    config = tiny(
        distill_loss_weight=1.0, distill_dim=3, distill_standardize=False, denoise_corruption_prob=1.0
    )
    rng = np.random.default_rng(1)
    items = []
    for i, n in enumerate((14000, 9000)):
        wave = synthetic_voice(i, n / 16000, rng, text_seed=i)
        items.append(
            {
                "input_values": wave,
                "labels": np.zeros(feat_extract_output_lengths(config, len(wave)), dtype=np.int64),
                "name": f"u{i}",
                "seed": 3,
                "epoch": 0,
                "batch_index": 0,
            }
        )
    collator = P.DeluluPretrainingCollator(config, 16000, normalize_audio=True, keep_clean=True)
    out = collator(items)
    assert out["corrupted"].all()  # every input is a mix ...
    for i, item in enumerate(items):  # ... but clean_values is the clean, unnormalised primary
        n = len(item["input_values"])
        np.testing.assert_array_equal(out["clean_values"][i, :n].numpy(), item["input_values"])
        assert float(out["clean_values"][i, n:].abs().sum()) == 0.0
    assert "clean_values" not in P.DeluluPretrainingCollator(config, 16000)(items)
    targets = D.TeacherTargets(_RampTeacher(), config)
    attached = targets.attach(dict(out))
    assert "clean_values" not in attached
    assert attached["teacher_targets"].shape == (*out["labels"].shape, 3)
    torch.testing.assert_close(attached["distill_frames"], out["labels"] != -100)
    # the teacher heard the clean audio: its third feature is the clean crop's mean
    torch.testing.assert_close(
        attached["teacher_targets"][1, 0, 2],
        torch.from_numpy(items[1]["input_values"]).mean(),
        rtol=1e-4,
        atol=1e-7,
    )
    assert D.distill_update_frames([attached, attached]) == 2 * float((out["labels"] != -100).sum())


def test_cluster_weight_zero_drops_the_cluster_terms_from_the_update_loss():
    config = tiny(distill_loss_weight=1.0, cluster_loss_weight=0.0, distill_dim=4)
    model = DeluluForPreTraining(config).train()
    x, labels, mask, targets = batch(config)
    out = model(
        x,
        labels=labels,
        mask_time_indices=mask,
        corrupted=torch.tensor([True, False]),
        teacher_targets=targets,
    )
    frames = P.UpdateFrames(masked=float(mask.sum()), denoise=10.0)
    loss, share = P.micro_batch_loss(out, frames, config, 1, 1)
    assert float(share) == 0.0
    extra, extra_share = D.distill_loss_share(out, float(out.distill_count), config, 2, 1)
    torch.testing.assert_close(extra_share, out.distill_loss.detach())
    torch.testing.assert_close(extra, 2 * out.distill_loss)


# ---- the training loop --------------------------------------------------------------------------


def test_pretrain_distills_end_to_end_and_saves_what_trained_it(tmp_path):
    """`pretrain.py` with the demo teacher's window embeddings as targets (distillation alone)."""
    import datasets

    config = tiny()
    rng = np.random.default_rng(0)
    rows: dict[str, list] = {"audio": [], "cluster_ids": [], "file_name": []}
    for i in range(12):
        wave = synthetic_voice(i % 3, rng.uniform(0.8, 1.4), rng, text_seed=i)
        rows["audio"].append({"array": wave, "sampling_rate": 16000})
        rows["cluster_ids"].append([i % 8] * feat_extract_output_lengths(config, len(wave)))
        rows["file_name"].append(f"u{i:02d}.flac")
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "data"))
    model = {**TINY, "conv_dim": [16] * 7, "distill_loss_weight": 1.0, "cluster_loss_weight": 0.0}
    run = {
        "dataset": str(tmp_path / "data"),
        "dataset_split": None,
        "teacher": TEACHER,
        "max_steps": 6,
        "max_batch_samples": 48000,
        "max_sample_length": 24000,
        "min_sample_length": 8000,
        "warmup_steps": 2,
        "learning_rate": 2.0e-3,
        "logging_steps": 2,
        "save_steps": 3,
        "report_to": "none",
        "model": model,
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    out = tmp_path / "out"
    command = [
        sys.executable,
        os.path.join(REPO, "training", "pretrain.py"),
        "--config",
        str(tmp_path / "run.yaml"),
    ]
    result = subprocess.run(
        command + ["--output_dir", str(out)],
        env=dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", HF_DATASETS_OFFLINE="1"),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["distill_loss"]) and -1 <= r["distill_cosine"] <= 1 for r in records)
    assert records[-1]["loss"] == pytest.approx(records[-1]["distill_loss"])  # cluster weight 0
    saved = json.loads((out / "final" / "config.json").read_text())
    assert saved["distill_loss_weight"] == 1.0 and saved["cluster_loss_weight"] == 0.0
    assert saved["distill_dim"] == 192 and saved["distill_teacher_name"].startswith("redimnet-b0-lite-demo")
    meta = json.loads((out / "final" / "distill_targets.json").read_text())
    assert meta["target"] == "window-embedding" and meta["statistics"]["items"] == 12
    reloaded = DeluluForPreTraining.from_pretrained(out / "final")
    assert reloaded.distill_head.out_features == 192
