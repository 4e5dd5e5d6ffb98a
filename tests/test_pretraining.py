"""Unit tests of the pretraining helpers (``delulu_hf.pretraining``): tiny configs, synthetic data."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import yaml
from audio_fixtures import synthetic_voice

from delulu_hf import DeluluConfig, DeluluForPreTraining, feat_extract_output_lengths
from delulu_hf import pretraining as P

HOP = 256


def tiny_config(**overrides) -> DeluluConfig:
    values = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(32,) * 7,
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
    values.update(overrides)
    return DeluluConfig(**values)


def item(wave: np.ndarray, labels: np.ndarray, seed: int = 0, name: str = "utt") -> dict:
    return {
        "input_values": wave,
        "labels": labels,
        "name": name,
        "seed": seed,
        "epoch": 0,
        "batch_index": 0,
    }


def position_coded(config, num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """A waveform whose sample n holds n, and labels whose frame i holds i: any crop reveals its offset."""
    frames = feat_extract_output_lengths(config, num_samples)
    return np.arange(num_samples, dtype=np.float32), np.arange(frames, dtype=np.int64)


# ----------------------------------------------------------------------------------------------
# Collator: crops, padding, labels, masks
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("crop_to_shortest", [False, True])
def test_crops_start_on_frame_boundaries_and_labels_match_exactly(crop_to_shortest):
    config = tiny_config(denoise_corruption_prob=0.0, mask_time_prob=0.0)
    collator = P.DeluluPretrainingCollator(
        config, max_sample_length=6000, crop_to_shortest=crop_to_shortest, normalize_audio=False
    )
    rng = np.random.default_rng(0)
    for seed in range(25):
        lengths = rng.integers(1000, 12000, size=3)
        items = [item(*position_coded(config, int(n)), seed=seed) for n in lengths]
        batch = collator(items)
        valid = batch["attention_mask"].sum(-1).tolist()
        expected = [min(int(n), 6000) for n in lengths]
        if crop_to_shortest:
            expected = [min(expected)] * 3
        assert valid == expected
        for i, n in enumerate(valid):
            wave = batch["input_values"][i, :n].numpy()
            labels = batch["labels"][i]
            start = int(wave[0])
            assert start % HOP == 0, "crops must start on an encoder-frame boundary"
            np.testing.assert_array_equal(wave, np.arange(start, start + n, dtype=np.float32))
            frames = feat_extract_output_lengths(config, n)
            # Frame i of the crop is frame start/HOP + i of the utterance: its label, exactly.
            np.testing.assert_array_equal(labels[:frames].numpy(), np.arange(frames) + start // HOP)
            assert (labels[frames:] == -100).all() and (batch["input_values"][i, n:] == 0).all()
            assert (batch["attention_mask"][i, n:] == 0).all()
        assert batch["labels"].shape[1] == feat_extract_output_lengths(config, max(valid))


def test_label_length_mismatch_names_the_item():
    config = tiny_config()
    collator = P.DeluluPretrainingCollator(config, max_sample_length=8000)
    wave, labels = position_coded(config, 5000)
    with pytest.raises(ValueError, match=r"utt-7: 18 cluster ids for 5000 samples.*19 frames"):
        collator([item(wave, labels[:-1], name="utt-7")])


def test_batches_are_reproducible_from_their_seed_and_leave_global_rngs_alone():
    config = tiny_config(denoise_corruption_prob=0.5)
    collator = P.DeluluPretrainingCollator(config, max_sample_length=8000)
    rng = np.random.default_rng(1)
    items = [item(synthetic_voice(s, 0.8, rng), np.zeros(49, np.int64), seed=11) for s in range(4)]
    for it in items:
        it["labels"] = np.zeros(feat_extract_output_lengths(config, len(it["input_values"])), np.int64)
    np_state, torch_state = np.random.get_state()[1].copy(), torch.get_rng_state().clone()
    first, second = collator(items), collator(items)
    for key in ("input_values", "labels", "mask_time_indices", "corrupted"):
        torch.testing.assert_close(first[key], second[key])
    np.testing.assert_array_equal(np.random.get_state()[1], np_state)
    torch.testing.assert_close(torch.get_rng_state(), torch_state)
    for it in items:
        it["seed"] = 12
    assert not torch.equal(collator(items)["mask_time_indices"], first["mask_time_indices"])


def test_mask_indices_follow_config_and_never_touch_padding():
    config = tiny_config(
        mask_time_prob=0.5, mask_time_length=5, mask_time_min_masks=1, denoise_corruption_prob=0.0
    )
    collator = P.DeluluPretrainingCollator(config, max_sample_length=32000, normalize_audio=False)
    rng = np.random.default_rng(2)
    fractions = []
    for seed in range(20):
        lengths = rng.integers(4000, 32000, size=4)
        items = [item(*position_coded(config, int(n)), seed=seed) for n in lengths]
        batch = collator(items)
        mask = batch["mask_time_indices"]
        frames = [feat_extract_output_lengths(config, int(n)) for n in lengths]
        for i, count in enumerate(frames):
            assert not mask[i, count:].any(), "padding frames are never masked"
            row = mask[i, :count].numpy().astype(int)
            assert row.sum() >= 5, "min_masks=1 gives at least one span"
            edges = np.flatnonzero(np.diff(np.concatenate([[0], row, [0]])))
            runs = edges[1::2] - edges[::2]
            # spans are mask_time_length long; overlapping spans merge, a span may be clipped at the end
            assert all(r >= 5 or e == count for r, e in zip(runs, edges[1::2]))
            fractions.append(row.mean())
    # HuBERT-style masking: the requested probability is an upper bound (overlaps), same order of magnitude
    assert 0.25 < np.mean(fractions) <= 0.55


# ----------------------------------------------------------------------------------------------
# Denoising corruption
# ----------------------------------------------------------------------------------------------


def speech_with_pauses(rng: np.random.Generator) -> np.ndarray:
    """1 s of voice, 1 s of silence, 1 s of voice: whole-signal power under-states the speech level."""
    silence = np.zeros(16000, dtype=np.float32)
    return np.concatenate([synthetic_voice(0, 1.0, rng), silence, synthetic_voice(0, 1.0, rng)])


@pytest.mark.parametrize("kind", ["noise", "utterance"])
def test_corruption_snr_is_drawn_from_config_range_and_measured_on_active_speech(kind):
    from delulu_hf.demo_corpus import active_rms

    config = tiny_config(
        denoise_corruption_prob=1.0, denoise_utterance_mix_prob=1.0 if kind == "utterance" else 0.0
    )
    rng = np.random.default_rng(3)
    clean = speech_with_pauses(rng)
    others = [synthetic_voice(3, 2.0, rng), synthetic_voice(4, 1.5, rng)]
    noise = P.NoiseSource()
    snrs = []
    for seed in range(12):
        out, record = P.corrupt_item(clean, others, np.random.default_rng(seed), config, noise)
        assert (
            record is not None and record["kind"] != "utterance"
            if kind == "noise"
            else record["kind"] == kind
        )
        assert 15.0 <= record["snr_db"] <= 25.0
        added = out - clean
        region = added[record["start"] : record["start"] + record["length"]]
        assert not np.any(np.delete(added, np.arange(record["start"], record["start"] + record["length"])))
        if kind == "utterance":
            assert record["length"] <= 0.5 * len(clean) + 1  # denoise_mix_max_overlap
            # An interfering voice is measured on its own active speech, before scaling (the VAD has an
            # absolute floor, so a quiet copy would lose frames).
            level = active_rms(region / record["gain"]) * record["gain"]
        else:
            level = float(np.sqrt(np.mean(region.astype(np.float64) ** 2)))
        measured = 20 * np.log10(active_rms(clean) / level)
        assert measured == pytest.approx(record["snr_db"], abs=0.05)
        snrs.append(record["snr_db"])
    whole_signal_snr = 20 * np.log10(np.sqrt(np.mean(clean.astype(np.float64) ** 2)) / level)
    assert whole_signal_snr < measured - 1.0, "the pauses must not lower the speech level"
    assert np.std(snrs) > 1.0


def test_corruption_probability_and_noise_directory(tmp_path):
    import soundfile as sf

    sf.write(tmp_path / "hum.flac", (0.1 * np.sin(np.arange(8000) / 5)).astype(np.float32), 16000)
    noise = P.NoiseSource(str(tmp_path))
    assert len(noise.recordings) == 1
    config = tiny_config(denoise_corruption_prob=0.3, denoise_utterance_mix_prob=0.0)
    clean = synthetic_voice(1, 1.0, np.random.default_rng(4))
    kinds = [P.corrupt_item(clean, [], np.random.default_rng(s), config, noise)[1] for s in range(300)]
    corrupted = [k for k in kinds if k is not None]
    assert 0.2 < len(corrupted) / len(kinds) < 0.4
    assert {k["kind"] for k in corrupted} == {"recording"}
    with pytest.raises(FileNotFoundError, match="holds no audio files"):
        P.NoiseSource(str(tmp_path / "missing"))


def test_labels_are_the_clean_primary_utterances_under_corruption():
    rng = np.random.default_rng(5)
    waves = [synthetic_voice(s, rng.uniform(0.6, 1.2), rng) for s in range(4)]
    clean_config, noisy_config = (
        tiny_config(denoise_corruption_prob=0.0),
        tiny_config(denoise_corruption_prob=1.0),
    )
    batches = []
    for config in (clean_config, noisy_config):
        items = [
            item(w, rng.integers(0, 8, feat_extract_output_lengths(config, len(w))), seed=9) for w in waves
        ]
        if batches:  # same labels for both runs
            for it, old in zip(items, batches[0][1]):
                it["labels"] = old["labels"]
        collator = P.DeluluPretrainingCollator(config, max_sample_length=12000)
        batches.append((collator(items), items))
    (clean, _), (noisy, _) = batches
    torch.testing.assert_close(noisy["labels"], clean["labels"])
    torch.testing.assert_close(noisy["attention_mask"], clean["attention_mask"])
    torch.testing.assert_close(noisy["mask_time_indices"], clean["mask_time_indices"])
    assert noisy["corrupted"].all() and not clean["corrupted"].any()
    assert not torch.allclose(noisy["input_values"], clean["input_values"])


# ----------------------------------------------------------------------------------------------
# Length-bucketed batch sampler
# ----------------------------------------------------------------------------------------------


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_bucketing_respects_the_sample_budget_and_covers_each_epoch():
    lengths = np.random.default_rng(6).integers(8000, 64000, size=200)
    sampler = P.LengthBucketBatchSampler(lengths, max_batch_samples=160000, seed=3, drop_multiple=4)
    for epoch in range(3):
        plan = sampler.epoch_batches(epoch)
        assert len(plan) % 4 == 0
        for batch in plan:
            assert len(batch) * lengths[batch].max() <= 160000
        flat = np.concatenate(plan)
        assert len(set(flat.tolist())) == len(flat), "no item twice in an epoch"
        assert len(flat) > 0.9 * len(lengths), "only a remainder of whole batches is dropped"
        spread = [lengths[b].max() / lengths[b].min() for b in plan if len(b) > 1]
        assert np.median(spread) < 1.3, "bucketing groups similar lengths"
    assert [b.tolist() for b in sampler.epoch_batches(0)] != [b.tolist() for b in sampler.epoch_batches(1)]
    again = P.LengthBucketBatchSampler(lengths, max_batch_samples=160000, seed=3, drop_multiple=4)
    assert [b.tolist() for b in again.epoch_batches(1)] == [b.tolist() for b in sampler.epoch_batches(1)]


def test_sampler_shards_by_rank_and_resumes_at_any_position():
    lengths = np.random.default_rng(7).integers(8000, 40000, size=60)
    kwargs = dict(max_batch_samples=100000, seed=5, drop_multiple=2)
    single = P.LengthBucketBatchSampler(lengths, **kwargs)
    stream = take(iter(single), 40)  # crosses epoch boundaries
    ranks = [iter(P.LengthBucketBatchSampler(lengths, num_replicas=2, rank=r, **kwargs)) for r in (0, 1)]
    interleaved = [batch for _ in range(20) for it in ranks for batch in [next(it)]]
    assert interleaved == stream, "two ranks together see the single-process stream, each batch once"
    for skip in (0, 3, 17, 31):
        position = single.advance((0, 0), skip)
        resumed = take(iter(P.LengthBucketBatchSampler(lengths, start=position, **kwargs)), 40 - skip)
        assert resumed == stream[skip:]
    seeds = {b[0][1] for b in stream}
    assert len(seeds) == len(stream), "every batch has its own seed"
    with pytest.raises(ValueError, match="more than max_batch_samples"):
        P.LengthBucketBatchSampler([200000], max_batch_samples=100000)


# ----------------------------------------------------------------------------------------------
# Config, optimiser, guard, FLOPs
# ----------------------------------------------------------------------------------------------


def test_yaml_config_and_command_line_overrides(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"max_steps": 7, "model": {"hidden_size": 64, "num_attention_heads": 4}}))
    cfg = P.parse_config(
        [
            "--config",
            str(path),
            "--max_steps",
            "20",
            "--output_dir",
            "runs/try1",
            "--adam_betas",
            "[0.8, 0.9]",
        ]
        + ["--model.num_hidden_layers", "3", "--overwrite_output_dir", "--resume_from_checkpoint", "none"]
        + ["--peak_flops=1e15"]
    )
    assert (cfg.max_steps, cfg.output_dir, cfg.adam_betas, cfg.peak_flops) == (
        20,
        "runs/try1",
        (0.8, 0.9),
        1e15,
    )
    assert cfg.model == {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 3}
    assert cfg.overwrite_output_dir is True and cfg.resume_from_checkpoint is None
    model_config = P.build_model_config(cfg)
    assert (model_config.hidden_size, model_config.num_hidden_layers) == (64, 3)
    assert P.parse_config(["--config", str(path), "--adam_betas", "0.7", "0.95"]).adam_betas == (0.7, 0.95)

    def parse_error(argv: list[str]) -> str:
        """The one line a bad command line prints (the parser exits with code 2)."""
        with pytest.raises(SystemExit) as exit_info:
            P.parse_config(argv)
        assert exit_info.value.code == 2
        return capsys.readouterr().err

    assert "unknown option --max_step " in parse_error(["--config", str(path), "--max_step", "3"])
    assert "--max_steps: invalid int value: 'many'" in parse_error(
        ["--config", str(path), "--max_steps", "many"]
    )
    path.write_text("learning_rat: 0.1\n")
    assert "unknown option 'learning_rat' (did you mean learning_rate?)" in parse_error(
        ["--config", str(path)]
    )
    with pytest.raises(
        ValueError, match=r"not DeluluConfig fields: hidden_sise \(did you mean hidden_size\?\)"
    ):
        P.build_model_config(P.PretrainConfig(model={"hidden_sise": 3}))
    with pytest.raises(ValueError, match="fp16"):
        P.PretrainConfig(mixed_precision="fp16")


def test_shipped_configs_parse():
    root = os.path.join(os.path.dirname(P.DEFAULT_CONFIG))
    demo = P.parse_config([])
    base = P.parse_config(["--config", os.path.join(root, "base_4xh100.yaml")])
    assert demo.output_dir == "runs/demo" and demo.dataset == "data/demo_corpus"
    assert (base.learning_rate, base.adam_betas, base.adam_epsilon, base.weight_decay) == (
        5e-4,
        (0.9, 0.98),
        1e-6,
        0.01,
    )
    assert (base.warmup_steps, base.max_steps, base.max_grad_norm, base.mixed_precision) == (
        32000,
        400000,
        10.0,
        "bf16",
    )
    # effective batch = HuBERT-Base's: 32 GPUs x 1.4 M samples
    assert base.max_batch_samples * base.gradient_accumulation_steps * 4 == 32 * 1_400_000
    assert P.build_model_config(base).hidden_size == 768


def test_optimizer_groups_and_polynomial_schedule():
    cfg = P.PretrainConfig(learning_rate=1e-3, warmup_steps=10, max_steps=50, lr_end=0.0, weight_decay=0.01)
    model = DeluluForPreTraining(tiny_config())
    optimizer, scheduler = P.build_optimizer_and_scheduler(model, cfg)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    assert optimizer.defaults["betas"] == (0.9, 0.98) and optimizer.defaults["eps"] == 1e-6
    lrs = []
    for _ in range(50):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(5e-4) and lrs[10] == pytest.approx(1e-3)
    assert lrs[30] == pytest.approx(1e-3 * 20 / 40) and scheduler.get_last_lr()[0] == pytest.approx(0.0)


def test_nonfinite_guard_skips_counts_and_aborts():
    guard = P.NonFiniteGuard(max_consecutive=3)
    assert guard.check(True, 1)
    assert not guard.check(False, 2) and not guard.check(False, 3)
    assert guard.check(True, 4), "a finite step resets the run of failures"
    assert (guard.total, guard.consecutive) == (2, 0)
    guard.check(False, 5), guard.check(False, 6)
    with pytest.raises(P.NonFiniteLossError, match=r"3 optimizer steps in a row \(up to step 7\).*5 skipped"):
        guard.check(False, 7)
    restored = P.NonFiniteGuard(3)
    restored.load_state_dict({"total": 4, "consecutive": 2})
    with pytest.raises(P.NonFiniteLossError):
        restored.check(False, 9)


def test_flop_estimate_matches_torch_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    config = tiny_config(hidden_size=64, num_attention_heads=4, intermediate_size=256)
    model = DeluluForPreTraining(config)
    batch = torch.randn(2, 16000)
    with FlopCounterMode(display=False) as counter:
        model(batch).logits.sum().backward()
    estimate = P.pretraining_flops(config, 16000, batch_size=2)
    assert estimate == pytest.approx(counter.get_total_flops(), rel=0.1)
    assert P.peak_flops_per_second("cpu") is None and P.peak_flops_per_second("cpu", 1e12) == 1e12


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------


def test_checkpoints_are_renamed_when_complete_pruned_and_resumed(tmp_path):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    cfg = P.PretrainConfig(warmup_steps=2, max_steps=10)
    torch.manual_seed(0)
    model = DeluluForPreTraining(tiny_config())
    optimizer, scheduler = P.build_optimizer_and_scheduler(model, cfg)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    out = str(tmp_path)
    guard = P.NonFiniteGuard()
    batch = torch.randn(2, 8000)
    for step in range(1, 4):
        model(batch).logits.square().mean().backward()
        optimizer.step(), optimizer.zero_grad(), scheduler.step()
        state = P.trainer_state(step, (0, step), guard, cfg, model.config, 1)
        P.save_checkpoint(accelerator, out, step, state, keep_last=2)
    assert [s for s, _ in P.list_checkpoints(out)] == [2, 3]
    latest = P.find_latest_checkpoint(out)
    assert latest.endswith("step_00000003") and P.resolve_resume("latest", out) == latest
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    expected_lr = scheduler.get_last_lr()

    # A crash mid-save leaves a temporary folder: never "latest", removed on the next start.
    os.makedirs(os.path.join(out, P.CHECKPOINTS_DIR, ".tmp-step_00000004"))
    assert P.find_latest_checkpoint(out) == latest
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        P.resolve_resume(os.path.join(out, P.CHECKPOINTS_DIR, ".tmp-step_00000004"), out)
    assert len(P.remove_incomplete_checkpoints(out)) == 1
    assert P.resolve_resume(None, out) is None

    model(batch).logits.square().mean().backward()  # move away from the saved state
    optimizer.step(), scheduler.step()
    state = P.load_checkpoint(accelerator, latest)
    assert (
        state["step"] == 3
        and state["position"] == [0, 3]
        and state["nonfinite"] == {"total": 0, "consecutive": 0}
    )
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0)
    assert scheduler.get_last_lr() == expected_lr
    with open(os.path.join(latest, P.TRAINER_STATE_NAME)) as handle:
        assert json.load(handle)["model_config"]["hidden_size"] == 32
    other = tiny_config(hidden_size=64, num_attention_heads=4)
    with pytest.raises(ValueError, match="another model config.*hidden_size: 32 -> 64"):
        P.check_resumable(state, cfg, other, 1)


def test_on_the_fly_decoding_gives_the_cached_items_without_a_decoded_cache(tmp_path):
    """``audio_decoding: on-the-fly`` keeps the corpus encoded (paths, no float32 arrays in the
    dataset) and still yields the same labels and waveforms as the decoded cache."""
    from audio_fixtures import write_tiny_audiofolder

    from delulu_hf.audio import AUDIO_DECODINGS

    folder = write_tiny_audiofolder(tmp_path / "corpus", num_speakers=3, utterances_per_speaker=2)
    out = {}
    for mode in AUDIO_DECODINGS:
        cfg = P.PretrainConfig(
            dataset=str(folder),
            dataset_split="train",
            teacher="mfcc",
            label_cache_dir=str(tmp_path / f"labels-{mode}"),
            label_max_frames=2000,
            label_kmeans_n_init=1,
            audio_decoding=mode,
            model={"num_clusters": 4},
        )
        data = P.prepare_pretraining_dataset(cfg, P.build_model_config(cfg))
        items = P.PretrainingItems(data.dataset)
        out[mode] = (data.dataset, [items[i] for i in range(len(items))])
    lazy, cached = out["on-the-fly"], out["cache"]
    assert set(lazy[0][0]["audio"]) == {"bytes", "path"} and "array" in cached[0][0]["audio"]
    assert len(lazy[1]) == len(cached[1]) == 2
    for a, b in zip(lazy[1], cached[1]):
        assert a["name"] == b["name"]
        np.testing.assert_array_equal(a["input_values"], b["input_values"])
        np.testing.assert_array_equal(a["labels"], b["labels"])
    with pytest.raises(ValueError, match="audio_decoding"):
        P.PretrainConfig(audio_decoding="lazy")


def test_in_process_labels_from_window_embeddings(tmp_path):
    """``label_teacher_output: window-embedding`` makes the in-process labels from the teacher's
    windowed embeddings, and the model config records which features were clustered."""
    from audio_fixtures import write_tiny_audiofolder

    from delulu_hf.teacher.redimnet import ReDimNet, ReDimNetConfig

    folder = write_tiny_audiofolder(tmp_path / "corpus", num_speakers=3, utterances_per_speaker=2)
    stages = [(1, 1, 2, [(3, 3)], 4), (2, 1, 1, [(3, 3)], None)]
    teacher = tmp_path / "teacher"
    ReDimNet(ReDimNetConfig(F=12, C=4, group_divisor=1, embed_dim=16, stages_setup=stages)).save_pretrained(
        teacher
    )
    names = {}
    for output in ("backbone", "window-embedding"):
        cfg = P.PretrainConfig(
            dataset=str(folder),
            teacher=str(teacher),
            label_cache_dir=str(tmp_path / "labels"),
            label_max_frames=2000,
            label_kmeans_n_init=1,
            label_teacher_output=output,
            label_window_seconds=0.5,
            model={"num_clusters": 3},
        )
        config = P.build_model_config(cfg)
        data = P.prepare_pretraining_dataset(cfg, config)
        names[output] = (config.label_teacher_name, config.label_feature_dim, data.centroids.dim)
        assert len(data.dataset) == 2 and all(len(ids) > 0 for ids in data.dataset["cluster_ids"])
    assert names["window-embedding"][0].endswith(":window-51") and names["window-embedding"][1:] == (16, 16)
    assert names["backbone"][1:] == (48, 48) and ":window" not in names["backbone"][0]
