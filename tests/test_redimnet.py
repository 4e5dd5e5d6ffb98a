"""ReDimNet: presets, frame geometry, padding invariance, checkpoint I/O and equality with the official code.

The official implementation (github.com/IDRnD/ReDimNet, MIT) is never a dependency. Every run compares
the port with outputs the official code produced once (``fixtures/redimnet_official/``, made by
``fixtures/make_redimnet_official_fixture.py``: official-format state dicts, inputs, frame features and
embeddings) at 1e-5. Tests that compare against the live official code run only when it is importable
from ``$REDIMNET_OFFICIAL_PATH`` (default ``/tmp/redimnet_official``, a checkout of the repository root)
and are skipped otherwise; ``test_b0_state_dict_matches_official_layout`` checks the checkpoint layout
against a key list dumped from the official code.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from delulu_hf.teacher import SpeakerTeacher, load_teacher
from delulu_hf.teacher.redimnet import (
    PRESETS,
    PUBLISHED_PARAMS_M,
    CheckpointMismatchError,
    ReDimNet,
    ReDimNetConfig,
    ReDimNetWindowEmbeddings,
)

FIXTURES = Path(__file__).parent / "fixtures"
OFFICIAL_PATH = os.environ.get("REDIMNET_OFFICIAL_PATH", "/tmp/redimnet_official")

# Tiny configurations that together exercise every block type, both pooling variants and the frontend
# options, while running in milliseconds.
TINY = dict(F=12, C=4, group_divisor=1, embed_dim=16)
TINY_STAGES = [(1, 1, 2, [(3, 3)], 4), (2, 1, 1, [(3, 3)], 4), (3, 1, 1, [(3, 3)], None)]
VARIANTS = {
    "resnet+conv_att+gc": dict(
        block_2d_type="basic_resnet", block_1d_type="conv+att", global_context_att=True
    ),
    "fwse+att": dict(block_2d_type="basic_resnet_fwse", block_1d_type="att", global_context_att=False),
    "convnext+conv": dict(block_2d_type="convnext_like", block_1d_type="conv", global_context_att=True),
    "convnext_relu+fc+extras": dict(
        block_2d_type="convnext_like_relu",
        block_1d_type="fc",
        out_channels=24,
        emb_bn=True,
        pooling_func="TSTP",
        spec_params={"spec_norm": "mvn", "norm_signal": True},
    ),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on the shared test machine, oneDNN's worker threads otherwise spin against
    other jobs and run many times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny(variant: str = "resnet+conv_att+gc", **overrides) -> ReDimNet:
    config = ReDimNetConfig(**{**TINY, "stages_setup": TINY_STAGES, **VARIANTS[variant], **overrides})
    model = ReDimNet(config)
    randomise(model)
    return model.eval()


def randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights and BN statistics, so equalities are not satisfied by an identity-like init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if not value.dtype.is_floating_point or key.startswith("spec."):
                continue
            if key.endswith("running_var"):
                value.copy_(torch.rand(value.shape, generator=gen) * 1.5 + 0.5)
            else:
                value.copy_(torch.randn(value.shape, generator=gen) * (0.3 if value.dim() > 1 else 0.5))


def official_wrap():
    """The official ``ReDimNetWrap`` class, or skip."""
    if os.path.isdir(OFFICIAL_PATH) and OFFICIAL_PATH not in sys.path:
        sys.path.insert(0, OFFICIAL_PATH)
    try:
        from redimnet.model import ReDimNetWrap
    except ImportError as err:
        pytest.skip(f"official ReDimNet code not importable from {OFFICIAL_PATH} ({err})")
    return ReDimNetWrap


OFFICIAL_FIXTURES = sorted((FIXTURES / "redimnet_official").glob("*.safetensors"))


def test_official_fixtures_are_present():
    """The fixture-based equivalence below must run in every CI run, never silently collect nothing."""
    assert {p.stem for p in OFFICIAL_FIXTURES} >= {"b0_c2", "fwse_att", "convnext_relu_fc_extras"}


@pytest.mark.parametrize("path", OFFICIAL_FIXTURES, ids=lambda p: p.stem)
def test_port_equals_official_outputs_from_fixture(path):
    from safetensors import safe_open

    with safe_open(path, "pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    prefix = "state_dict."
    state = {
        key[len(prefix) :]: value.float() if value.is_floating_point() else value
        for key, value in tensors.items()
        if key.startswith(prefix)
    }
    checkpoint = {"model_config": json.loads(metadata["model_config"]), "state_dict": state}
    model = ReDimNet.from_official_checkpoint(checkpoint).eval()  # strict: every official key must load
    waveforms = tensors["waveforms"].float()
    with torch.inference_mode():
        features = model.frame_features(waveforms).transpose(1, 2)
        embeddings = model(waveforms)
    torch.testing.assert_close(features, tensors["frame_features"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(embeddings, tensors["embeddings"], atol=1e-5, rtol=1e-5)


def test_is_a_speaker_teacher():
    model = tiny()
    assert isinstance(model, SpeakerTeacher)
    assert model.sample_rate == 16000
    assert model.frame_hop_seconds == pytest.approx(0.01)
    assert model.feature_dim == TINY["C"] * TINY["F"]
    assert model.frame_lengths(16000) == 101
    assert model.frame_lengths(torch.tensor([159, 160, 16000])).tolist() == [1, 2, 101]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameter_counts_match_paper(name):
    model = ReDimNet.from_preset(name)
    count = sum(p.numel() for p in model.parameters())
    published = PUBLISHED_PARAMS_M[name] * 1e6
    assert abs(count - published) / published <= 0.03, f"{name}: {count / 1e6:.3f} M vs {published / 1e6} M"
    assert model.feature_dim == {"b0": 600, "b1": 864, "b2": 1152, "b3": 1152}.get(name, 2304)


@pytest.mark.parametrize("num_samples", [257, 1601, 4799, 16079])
def test_frame_features_shape_and_10ms_frames(num_samples):
    model = tiny()
    with torch.inference_mode():
        feats = model.frame_features(torch.randn(2, num_samples))
        emb = model(torch.randn(2, num_samples))
    assert feats.shape == (2, 1 + num_samples // 160, model.feature_dim)
    assert emb.shape == (2, TINY["embed_dim"])
    assert torch.isfinite(feats).all() and torch.isfinite(emb).all()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_padded_batch_equals_single_runs(variant):
    model = tiny(variant)
    lengths = [8000, 6371, 2333]
    gen = torch.Generator().manual_seed(1)
    batch = torch.zeros(len(lengths), max(lengths))
    for i, n in enumerate(lengths):
        batch[i, :n] = torch.randn(n, generator=gen)
    batch[1, lengths[1] :] = 5.0  # padding content must not leak into the valid frames
    with torch.inference_mode():
        feats = model.frame_features(batch, torch.tensor(lengths))
        embs = model(batch, torch.tensor(lengths))
        for i, n in enumerate(lengths):
            single = model.frame_features(batch[i : i + 1, :n])[0]
            assert single.shape[0] == model.frame_lengths(n)
            torch.testing.assert_close(feats[i, : single.shape[0]], single, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(embs[i], model(batch[i : i + 1, :n])[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", ["resnet+conv_att+gc", "convnext_relu+fc+extras"])
def test_window_embeddings_padded_batch_equals_single_runs(variant):
    teacher = ReDimNetWindowEmbeddings(tiny(variant), window_seconds=0.2)
    assert teacher.window_frames == 21 and teacher.feature_dim == TINY["embed_dim"]
    assert teacher.name.endswith(":window-21") and teacher.hop_length == 160
    lengths = [8000, 6371, 2333]
    gen = torch.Generator().manual_seed(2)
    batch = torch.zeros(len(lengths), max(lengths))
    for i, n in enumerate(lengths):
        batch[i, :n] = torch.randn(n, generator=gen)
    batch[1, lengths[1] :] = 5.0  # padding must not leak into any window
    with torch.inference_mode():
        feats = teacher.frame_features(batch, torch.tensor(lengths))
        assert feats.shape == (3, 1 + max(lengths) // 160, TINY["embed_dim"])
        for i, n in enumerate(lengths):
            single = teacher.frame_features(batch[i : i + 1, :n])[0]
            assert single.shape[0] == teacher.frame_lengths(n)
            torch.testing.assert_close(feats[i, : single.shape[0]], single, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("num_samples", [3200, 8000])
def test_window_covering_the_item_gives_the_utterance_embedding(num_samples):
    """With mean pooling ("TAP") the head is linear in the frame mean, so a window wider than the
    item must give the utterance embedding at every frame; a 1-frame window differs across frames."""
    model = tiny("fwse+att", pooling_func="TAP")
    wave = torch.randn(1, num_samples, generator=torch.Generator().manual_seed(3))
    frames = model.frame_lengths(num_samples)
    with torch.inference_mode():
        wide = model.window_embeddings(wave, window_frames=2 * frames + 1)[0]
        utterance = model(wave)[0]
        narrow = model.window_embeddings(wave, window_frames=1)[0]
    torch.testing.assert_close(wide, utterance.expand_as(wide), atol=1e-4, rtol=1e-4)
    assert (narrow - narrow.mean(0)).abs().max() > 1e-2


def test_window_embeddings_refuse_training_mode_and_even_windows():
    model = tiny()
    with pytest.raises(ValueError, match="odd"):
        model.window_embeddings(torch.randn(1, 4000), window_frames=10)
    model.train()
    with pytest.raises(RuntimeError, match="eval mode"):
        model.window_embeddings(torch.randn(1, 4000))


def test_spec_augment_only_in_training():
    model = tiny(spec_params={"do_spec_aug": True, "freq_mask_width": (3, 4), "time_mask_width": (5, 6)})
    x = torch.randn(2, 8000)
    with torch.no_grad():
        clean = model.spec(x, None, None)
        model.train()
        masked = model.spec(x, None, None)
    zero_bins = (masked == 0).all(dim=2)  # (B, F): a masked frequency band is zero at every frame
    zero_frames = (masked == 0).all(dim=1)  # (B, T)
    assert (zero_bins.sum(dim=1) == 3).all() and (zero_frames.sum(dim=1) == 5).all()
    kept = ~zero_bins[:, :, None] & ~zero_frames[:, None, :]
    torch.testing.assert_close(masked[kept], clean[kept])


def test_bad_lengths_name_the_item():
    model = tiny()
    with pytest.raises(ValueError, match="item 1"):
        model.frame_features(torch.randn(2, 4000), torch.tensor([4000, 100]))
    with pytest.raises(ValueError, match="at least"):
        model.frame_features(torch.randn(1, 100))


def test_official_checkpoint_round_trip_is_strict_and_weights_only(tmp_path):
    model = tiny("fwse+att")
    path = tmp_path / "model.pt"
    model.save_official_checkpoint(path)
    raw = torch.load(path, map_location="cpu", weights_only=True)  # plain containers and tensors only
    assert set(raw) == {"model_config", "state_dict"}
    assert raw["model_config"]["block_2d_type"] == "basic_resnet_fwse"
    loaded = ReDimNet.from_official_checkpoint(path)
    assert loaded.config.official_kwargs() == model.config.official_kwargs()
    x = torch.randn(2, 5000)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.frame_features(x), model.frame_features(x), rtol=0, atol=0)
    assert not list(tmp_path.glob(".tmp-*")), "atomic write left a temporary file"


def test_save_pretrained_round_trip(tmp_path):
    model = tiny("convnext_relu+fc+extras")
    model.save_pretrained(tmp_path / "teacher")
    assert {p.name for p in (tmp_path / "teacher").iterdir()} == {"config.json", "model.safetensors"}
    assert json.loads((tmp_path / "teacher" / "config.json").read_text())["model_type"] == "redimnet"
    loaded = ReDimNet.from_pretrained(tmp_path / "teacher")
    x = torch.randn(1, 3000)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert isinstance(load_teacher(tmp_path / "teacher"), ReDimNet)


def test_mismatched_checkpoint_names_missing_unexpected_and_misshaped_keys(tmp_path):
    ckpt = tiny().official_checkpoint()
    state = ckpt["state_dict"]
    state.pop("pool.linear2.bias")
    state["backbone.stage9.0.w"] = torch.zeros(1)
    state["linear.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointMismatchError) as info:
        ReDimNet.from_official_checkpoint(ckpt)
    message = str(info.value)
    assert "missing keys: pool.linear2.bias" in message
    assert "unexpected keys: backbone.stage9.0.w" in message
    assert "linear.weight" in message and "shape" in message

    other = tiny().official_checkpoint()
    other["model_config"]["C"] = 8  # config and weights of different models
    with pytest.raises(CheckpointMismatchError, match="shape mismatches"):
        ReDimNet.from_official_checkpoint(other)

    bad_config = tiny().official_checkpoint()
    bad_config["model_config"]["tf_optimized_arch"] = True
    bad_config["model_config"]["mystery"] = 1
    with pytest.raises(ValueError, match="tf_optimized_arch.*mystery"):
        ReDimNet.from_official_checkpoint(bad_config)


def test_corrupted_or_unsafe_checkpoint_files_are_refused(tmp_path):
    corrupted = tmp_path / "corrupted.pt"
    corrupted.write_bytes(b"\x80\x02 definitely not a checkpoint")
    with pytest.raises(ValueError, match="corrupted.pt"):
        ReDimNet.from_official_checkpoint(corrupted)
    # A pickle that would build an arbitrary object: weights_only=True refuses to run it.
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"model_config": {}, "state_dict": {}, "extra": copy.copy}, unsafe)
    with pytest.raises(ValueError, match="weights_only"):
        ReDimNet.from_official_checkpoint(unsafe)
    wrong_layout = tmp_path / "bare.pt"
    torch.save(tiny().state_dict(), wrong_layout)
    with pytest.raises(ValueError, match="model_config"):
        ReDimNet.from_official_checkpoint(wrong_layout)


def test_b0_state_dict_matches_official_layout():
    reference = json.loads((FIXTURES / "redimnet_b0_official_keys.json").read_text())
    model = ReDimNet.from_preset("b0")
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == reference["shapes"]
    assert sum(p.numel() for p in model.parameters()) == reference["num_parameters"]


def test_load_teacher_specs(tmp_path):
    assert load_teacher("b0").feature_dim == 600
    model = tiny()
    model.save_official_checkpoint(tmp_path / "t.pt")
    assert not load_teacher(tmp_path / "t.pt").training
    with pytest.raises(ValueError, match="Unknown teacher"):
        load_teacher(tmp_path / "nothing-here")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_equals_official_implementation(variant):
    wrap = official_wrap()
    ours = tiny(variant)
    official = wrap(**ours.config.official_kwargs()).eval()
    official.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 12345, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ref_feats = official.backbone(official.spec(x).unsqueeze(1))
        ref_emb = official(x)
        feats = ours.frame_features(x).transpose(1, 2)
        emb = ours(x)
    torch.testing.assert_close(feats, ref_feats, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(emb, ref_emb, atol=1e-4, rtol=1e-4)


def test_b0_preset_equals_official_implementation():
    wrap = official_wrap()
    ours = ReDimNet.from_preset("b0").eval()
    randomise(ours)
    official = wrap(**ours.config.official_kwargs()).eval()
    official.load_state_dict(ours.official_checkpoint()["state_dict"], strict=True)
    x = torch.randn(2, 16000, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        diff = (
            (ours.frame_features(x).transpose(1, 2) - official.backbone(official.spec(x).unsqueeze(1)))
            .abs()
            .max()
        )
        emb_diff = (ours(x) - official(x)).abs().max()
    assert diff < 1e-4 and emb_diff < 1e-3, (float(diff), float(emb_diff))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_sdpa_attention_equals_eager_with_padding(variant):
    model = tiny(variant)
    lengths = torch.tensor([12345, 7000, 3001])
    x = torch.randn(3, 12345, generator=torch.Generator().manual_seed(5))
    x[torch.arange(12345)[None] >= lengths[:, None]] = 0.0
    outputs = {}
    for implementation in ("eager", "sdpa"):
        model.set_attention_implementation(implementation)
        with torch.inference_mode():
            outputs[implementation] = (model.frame_features(x, lengths), model(x, lengths))
    torch.testing.assert_close(outputs["sdpa"][0], outputs["eager"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outputs["sdpa"][1], outputs["eager"][1], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="sdpa"):
        model.set_attention_implementation("flash")


def test_front_end_stays_float32_under_bf16_autocast():
    """The official front end forces float32; under autocast ours must too (pre-emphasis, STFT, log)."""
    model = tiny("convnext_relu+fc+extras")  # also covers norm_signal and mvn
    x = torch.randn(2, 8000, generator=torch.Generator().manual_seed(6))
    lengths = torch.tensor([8000, 5000])
    frame_mask = torch.arange(model.frame_lengths(8000))[None] < model.frame_lengths(lengths)[:, None]
    with torch.inference_mode():
        reference = model.spec(x, lengths, frame_mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under_autocast = model.spec(x, lengths, frame_mask)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, reference, atol=0, rtol=0)
