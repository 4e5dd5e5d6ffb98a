"""DELULU modeling tests: transformers' common model tests plus DELULU-specific behaviour."""

from __future__ import annotations

import json
import math
import random
import unittest
from pathlib import Path

import pytest
import torch
import transformers_test_support
from transformers import (
    AutoFeatureExtractor,
    AutoModel,
    AutoModelForAudioClassification,
    AutoModelForAudioXVector,
    AutoModelForPreTraining,
    Wav2Vec2FeatureExtractor,
)

from delulu_hf import (
    DeluluConfig,
    DeluluForPreTraining,
    DeluluForSequenceClassification,
    DeluluForXVector,
    DeluluModel,
    feat_extract_output_lengths,
    receptive_field,
)
from delulu_hf.modeling_delulu import DELULU_AUTO_MAP

if transformers_test_support.install() is None:
    pytest.skip(
        "transformers' common test sources are not fetched: run `python tests/fetch_transformers_tests.py`",
        allow_module_level=True,
    )

from transformers_tests.test_modeling_common import (  # noqa: E402
    ModelTesterMixin,
    floats_tensor,
    ids_tensor,
    random_attention_mask,
)


def tiny_config(**overrides) -> DeluluConfig:
    """DELULU's real 16 ms conv stack (so frame counts are the production ones) with tiny widths."""
    kwargs = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        conv_dim=(16,) * 7,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        num_clusters=12,
        final_dim=8,
        classifier_proj_size=8,
        tdnn_dim=(16, 16, 24),
        tdnn_kernel=(3, 3, 1),
        tdnn_dilation=(1, 2, 1),
        xvector_output_dim=12,
        layerdrop=0.0,
    )
    kwargs.update(overrides)
    return DeluluConfig(**kwargs)


def no_dropout(**overrides) -> DeluluConfig:
    return tiny_config(
        hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0, **overrides
    )


# ----------------------------------------------------------------------------------------------
# transformers' common tests
# ----------------------------------------------------------------------------------------------


class DeluluModelTester:
    """HuBERT-sized tiny tester (3 conv layers, 2 transformer layers) for the common test mixin."""

    def __init__(self, parent, batch_size: int = 13, seq_length: int = 1024, is_training: bool = True):
        self.parent = parent
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.is_training = is_training
        self.hidden_size = 16
        self.num_hidden_layers = 2
        self.num_attention_heads = 2
        self.conv_dim = (32, 32, 32)
        self.conv_stride = (4, 4, 4)
        self.conv_kernel = (8, 8, 8)
        self.num_clusters = 10
        self.output_seq_length = (((seq_length - 8) // 4 + 1 - 8) // 4 + 1 - 8) // 4 + 1
        self.encoder_seq_length = self.output_seq_length

    def get_config(self) -> DeluluConfig:
        return DeluluConfig(
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=20,
            conv_dim=self.conv_dim,
            conv_stride=self.conv_stride,
            conv_kernel=self.conv_kernel,
            num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=2,
            num_clusters=self.num_clusters,
            final_dim=8,
            mask_time_length=4,
            layerdrop=0.0,
        )

    def prepare_config_and_inputs(self):
        input_values = floats_tensor([self.batch_size, self.seq_length], scale=1.0)
        attention_mask = random_attention_mask([self.batch_size, self.seq_length])
        return self.get_config(), input_values, attention_mask

    def prepare_config_and_inputs_for_common(self):
        config, input_values, attention_mask = self.prepare_config_and_inputs()
        return config, {"input_values": input_values, "attention_mask": attention_mask}


class DeluluModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (DeluluModel, DeluluForPreTraining)
    test_resize_embeddings = False
    test_torch_exportable = False
    # Our `_init_weights` covers every parameter, so run the check (it is skipped by default for files
    # without a 2023+ copyright line).
    test_can_init_all_missing_weights_before_2023 = True

    def setUp(self):
        self.model_tester = DeluluModelTester(self)

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        if return_labels and model_class is DeluluForPreTraining:
            # The mixin only builds labels for built-in mappings: cluster ids per encoder frame.
            shape = (self.model_tester.batch_size, self.model_tester.output_seq_length)
            inputs_dict["labels"] = ids_tensor(shape, self.model_tester.num_clusters, rng=random.Random(0))
        return inputs_dict

    def test_model_output_shape(self):
        config, input_values, attention_mask = self.model_tester.prepare_config_and_inputs()
        model = DeluluModel(config).eval()
        with torch.no_grad():
            result = model(input_values, attention_mask=attention_mask)
        expected = (
            self.model_tester.batch_size,
            self.model_tester.output_seq_length,
            self.model_tester.hidden_size,
        )
        self.assertEqual(tuple(result.last_hidden_state.shape), expected)

    def _with_training_classes(self, test) -> None:
        """Training tests need a loss: only `DeluluForPreTraining` has one without task labels."""
        self.all_model_classes = (DeluluForPreTraining,)
        try:
            test()
        finally:
            del self.all_model_classes

    def test_training(self):
        self._with_training_classes(super().test_training)

    def test_training_gradient_checkpointing(self):
        self._with_training_classes(super().test_training_gradient_checkpointing)

    def test_training_gradient_checkpointing_use_reentrant_false(self):
        self._with_training_classes(super().test_training_gradient_checkpointing_use_reentrant_false)

    def test_training_gradient_checkpointing_use_reentrant_true(self):
        self._with_training_classes(super().test_training_gradient_checkpointing_use_reentrant_true)

    # Speech models have no token embeddings to get, set, resize or feed as inputs_embeds (as in HuBERT's suite).
    @unittest.skip(reason="DELULU has no inputs_embeds")
    def test_inputs_embeds(self):
        pass

    @unittest.skip(reason="DELULU has no inputs_embeds")
    def test_inputs_embeds_matches_input_ids(self):
        pass

    @unittest.skip(reason="DELULU has no token embeddings")
    def test_model_get_set_embeddings(self):
        pass

    @unittest.skip(reason="DELULU has no token embeddings")
    def test_resize_tokens_embeddings(self):
        pass

    @unittest.skip(reason="DELULU has no token embeddings")
    def test_resize_embeddings_untied(self):
        pass

    @unittest.skip(reason="Input embeddings are token embeddings; DELULU takes waveforms")
    def test_enable_input_require_grads(self):
        pass

    @unittest.skip(reason="Input embeddings are token embeddings; DELULU takes waveforms")
    def test_enable_input_require_grads_with_gradient_checkpointing(self):
        pass


# ----------------------------------------------------------------------------------------------
# Frame arithmetic
# ----------------------------------------------------------------------------------------------


def test_one_second_gives_62_frames():
    config = tiny_config()
    model = DeluluModel(config).eval()
    with torch.no_grad():
        frames = model(torch.randn(1, 16000)).last_hidden_state.shape[1]
    assert frames == 62
    assert model._get_feat_extract_output_lengths(16000) == 62
    assert feat_extract_output_lengths(config, 16000) == 62
    lengths = torch.tensor([16000, 322, 321, 48000])
    assert feat_extract_output_lengths(config, lengths).tolist() == [62, 1, 0, 187]
    assert config.inputs_to_logits_ratio == 256


def test_receptive_field_matches_the_conv_stack():
    """Frame i covers samples [256 i, 256 i + 322): a change just outside that span leaves frame i alone."""
    config = tiny_config()
    assert receptive_field(config) == 322
    encoder = DeluluModel(config).eval().feature_extractor
    waveform = torch.randn(1, 8000)
    frame = 5
    start, end = frame * 256, frame * 256 + receptive_field(config)
    with torch.no_grad():
        base = encoder(waveform)[0, frame]
        for position, changes in ((start - 1, False), (start, True), (end - 1, True), (end, False)):
            poked = waveform.clone()
            poked[0, position] += 1.0
            changed = not torch.equal(encoder(poked)[0, frame], base)
            assert changed == changes, f"sample {position}: frame {frame} changed={changed}"


# ----------------------------------------------------------------------------------------------
# Behaviour
# ----------------------------------------------------------------------------------------------


def padded_batch(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    items = [torch.randn(n, generator=generator) for n in lengths]
    values = torch.zeros(len(items), max(lengths))
    mask = torch.zeros(len(items), max(lengths), dtype=torch.long)
    for i, item in enumerate(items):
        values[i, : len(item)] = item
        mask[i, : len(item)] = 1
    return values, mask, items


def test_padding_invariance():
    config = tiny_config()
    torch.manual_seed(0)
    model = DeluluForPreTraining(config).eval()
    values, mask, items = padded_batch([16000, 9000, 4000])
    with torch.no_grad():
        batch = model(values, attention_mask=mask, output_hidden_states=True)
        for i, item in enumerate(items):
            single = model(item[None], output_hidden_states=True)
            frames = single.logits.shape[1]
            torch.testing.assert_close(batch.logits[i, :frames], single.logits[0], atol=1e-4, rtol=1e-4)
            for layer_batch, layer_single in zip(batch.hidden_states, single.hidden_states):
                torch.testing.assert_close(layer_batch[i, :frames], layer_single[0], atol=1e-4, rtol=1e-4)


def test_eager_matches_sdpa_with_padding():
    torch.manual_seed(0)
    sdpa = DeluluModel(tiny_config()).eval()
    assert sdpa.config._attn_implementation == "sdpa"
    eager = DeluluModel(tiny_config(attn_implementation="eager")).eval()
    eager.load_state_dict(sdpa.state_dict())
    values, mask, _ = padded_batch([12000, 7000])
    with torch.no_grad():
        out_sdpa = sdpa(values, attention_mask=mask).last_hidden_state
        out_eager = eager(values, attention_mask=mask, output_attentions=True)
    torch.testing.assert_close(out_eager.last_hidden_state, out_sdpa, atol=1e-5, rtol=1e-5)
    assert len(out_eager.attentions) == 2
    # Padded keys get no attention.
    frames = feat_extract_output_lengths(sdpa.config, 7000)
    assert float(out_eager.attentions[0][1, :, :, frames:].abs().max()) == 0.0


def test_gradient_checkpointing_parity():
    config = no_dropout()
    torch.manual_seed(0)
    model = DeluluForPreTraining(config).train()
    values, mask, _ = padded_batch([16000, 11000])
    frames = feat_extract_output_lengths(config, 16000)
    labels = torch.randint(0, config.num_clusters, (2, frames), generator=torch.Generator().manual_seed(1))
    mask_time = model.delulu.compute_mask_time_indices(2, frames)
    corrupted = torch.tensor([True, False])

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        out = model(
            values, attention_mask=mask, labels=labels, mask_time_indices=mask_time, corrupted=corrupted
        )
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss, grads = loss_and_grads()
    model.activation_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in model.delulu.encoder.layers)
    loss_gc, grads_gc = loss_and_grads()
    torch.testing.assert_close(loss_gc, loss)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_gc[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_bf16_forward():
    torch.manual_seed(0)
    model = DeluluForPreTraining(tiny_config()).eval()
    values, mask, _ = padded_batch([16000, 8000])
    with torch.no_grad():
        reference = model(values, attention_mask=mask).logits
        bf16 = model.to(torch.bfloat16)(values.to(torch.bfloat16), attention_mask=mask).logits
    assert bf16.dtype == torch.float32  # the cosine logits are computed in float32
    assert torch.isfinite(bf16).all()
    # Cosine logits are bounded by 1 / temperature = 10; bf16 keeps them well within a few tenths.
    assert float((bf16 - reference).abs().mean()) < 0.3


def test_pretraining_losses():
    config = no_dropout(denoise_loss_weight=0.5)
    torch.manual_seed(0)
    model = DeluluForPreTraining(config).train()
    values, mask, _ = padded_batch([16000, 16000, 9000])
    frames = feat_extract_output_lengths(config, 16000)
    labels = torch.randint(0, config.num_clusters, (3, frames), generator=torch.Generator().manual_seed(2))
    labels[0, :5] = -100
    mask_time = model.delulu.compute_mask_time_indices(3, frames)
    corrupted = torch.tensor([True, False, True])
    out = model(values, attention_mask=mask, labels=labels, mask_time_indices=mask_time, corrupted=corrupted)

    valid = (labels != -100) & model._frame_attention_mask(frames, mask)
    assert int(out.masked_count) == int((valid & mask_time).sum())
    assert int(out.denoise_count) == int((valid & ~mask_time & corrupted[:, None]).sum())
    torch.testing.assert_close(out.loss, out.masked_loss + 0.5 * out.denoise_loss)
    # The masked loss is plain cross-entropy over the masked, labelled frames.
    picked = valid & mask_time
    expected = torch.nn.functional.cross_entropy(out.logits[picked], labels[picked])
    torch.testing.assert_close(out.masked_loss, expected)
    assert int(out.masked_correct) == int((out.logits[picked].argmax(-1) == labels[picked]).sum())
    assert out.logits.shape == (3, frames, config.num_clusters)

    # lambda = 0: loss is exactly the masked loss.
    model.config.denoise_loss_weight = 0.0
    out0 = model(values, attention_mask=mask, labels=labels, mask_time_indices=mask_time, corrupted=corrupted)
    assert out0.denoise_loss.item() > 0
    assert torch.equal(out0.loss, out0.masked_loss)

    # No corrupted items: the denoise term is an exact zero over zero frames.
    out_clean = model(values, attention_mask=mask, labels=labels, mask_time_indices=mask_time)
    assert int(out_clean.denoise_count) == 0 and out_clean.denoise_loss.item() == 0.0
    out_clean.loss.backward()
    assert model.label_embeddings.grad is not None


def test_cluster_logits_are_cosine_over_temperature():
    """Replacing the cosine by a plain dot product (or dropping the temperature) must fail here."""
    config = no_dropout(logit_temperature=0.25)
    torch.manual_seed(0)
    model = DeluluForPreTraining(config).eval()
    with torch.no_grad():
        model.label_embeddings.mul_(7.0)  # norms far from 1: a dot product would differ from the cosine
        hidden = 5.0 * torch.randn(2, 9, config.hidden_size)
        logits = model.cluster_logits(hidden)
        projected = model.final_proj(hidden)
        expected = (
            torch.nn.functional.cosine_similarity(
                projected[:, :, None, :], model.label_embeddings[None, None, :, :], dim=-1
            )
            / config.logit_temperature
        )
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    assert float(logits.abs().max()) <= 1.0 / config.logit_temperature + 1e-5
    # The bound is reached: a frame whose projection points at a cluster embedding scores exactly 1/tau.
    with torch.no_grad():
        aligned = torch.nn.functional.normalize(model.label_embeddings.float(), dim=-1)
        direct = aligned @ aligned.t() / config.logit_temperature
    torch.testing.assert_close(direct.diagonal(), torch.full((config.num_clusters,), 4.0))


def test_feature_grad_mult_scales_only_the_front_end_gradient():
    values, mask, _ = padded_batch([16000, 9000])
    grads = {}
    for mult in (1.0, 0.1):
        torch.manual_seed(0)
        model = DeluluModel(no_dropout(feature_grad_mult=mult, apply_spec_augment=False)).train()
        out = model(values, attention_mask=mask)
        out.last_hidden_state.float().pow(2).mean().backward()
        grads[mult] = (
            out.last_hidden_state.detach(),
            model.feature_extractor.conv_layers[0].conv.weight.grad.clone(),
            model.feature_projection.projection.weight.grad.clone(),
        )
    torch.testing.assert_close(grads[0.1][0], grads[1.0][0])  # the forward pass is unchanged
    torch.testing.assert_close(grads[0.1][1], 0.1 * grads[1.0][1])  # conv front end: a tenth
    torch.testing.assert_close(grads[0.1][2], grads[1.0][2])  # everything after it: untouched


def test_feature_penalty_is_mean_square_of_real_frames_and_weighted_in_the_loss():
    config = no_dropout(feature_penalty_weight=10.0, denoise_loss_weight=0.0)
    torch.manual_seed(0)
    model = DeluluForPreTraining(config).train()
    values, mask, singles = padded_batch([16000, 9000])
    frames = feat_extract_output_lengths(config, 16000)
    labels = torch.randint(0, config.num_clusters, (2, frames), generator=torch.Generator().manual_seed(1))
    mask_time = model.delulu.compute_mask_time_indices(2, frames)
    out = model(values, attention_mask=mask, labels=labels, mask_time_indices=mask_time)
    features = model.delulu.feature_extractor(values)
    real = model._frame_attention_mask(frames, mask)
    expected = features.pow(2).mean(-1)[real].mean()
    torch.testing.assert_close(out.feature_penalty, expected)
    torch.testing.assert_close(out.loss, out.masked_loss + 10.0 * out.feature_penalty)
    # Padding-invariant: the padded item's frames weigh exactly as in its unpadded run.
    alone = [model.delulu.feature_extractor(x[None]).pow(2).mean(-1).flatten() for x in singles]
    torch.testing.assert_close(out.feature_penalty, torch.cat(alone).mean())
    # The summed cross-entropy is what the update-level normalisation divides.
    torch.testing.assert_close(out.masked_loss_sum / out.masked_count, out.masked_loss)


def test_layerdrop_seed_fixes_which_layers_are_skipped():
    model = DeluluModel(tiny_config(num_hidden_layers=8, layerdrop=0.5)).train()
    encoder = model.encoder
    model.set_layerdrop_seed(123)
    first = encoder.layerdrop_skips()
    assert encoder.layerdrop_skips() == first  # the same seed: the same layers (on every process)
    assert any(first) and not all(first)
    patterns = set()
    for seed in range(20):
        model.set_layerdrop_seed(seed)
        patterns.add(tuple(encoder.layerdrop_skips()))
    assert len(patterns) > 10  # different seeds (steps) skip different layers
    model.eval()
    assert not any(encoder.layerdrop_skips())  # never in eval mode
    model.train()
    model.set_layerdrop_seed(None)  # back to the global RNG
    torch.manual_seed(5)
    a = encoder.layerdrop_skips()
    torch.manual_seed(5)
    assert encoder.layerdrop_skips() == a


def test_pretraining_draws_masks_in_training_only():
    config = tiny_config()
    model = DeluluForPreTraining(config)
    values, mask, _ = padded_batch([16000, 6000])
    labels = torch.zeros(2, 62, dtype=torch.long)
    model.train()
    out = model(values, attention_mask=mask, labels=labels)
    short = feat_extract_output_lengths(config, 6000)
    assert out.mask_time_indices.shape == (2, 62)
    assert out.mask_time_indices[0].float().mean() > 0.3  # mask_time_prob 0.8 with span 10 covers ~half
    assert not out.mask_time_indices[1, short:].any()  # never inside padding
    model.eval()
    assert model(values, attention_mask=mask, labels=labels).mask_time_indices is None


def test_label_length_mismatch_names_both_lengths():
    model = DeluluForPreTraining(tiny_config()).eval()
    with pytest.raises(ValueError, match=r"63 frames.*62 frames"):
        model(torch.randn(2, 16000), labels=torch.zeros(2, 63, dtype=torch.long))
    with pytest.raises(ValueError, match=r"cluster ids in \[0, 12\)"):
        model(torch.randn(1, 16000), labels=torch.full((1, 62), 12))


def test_bad_inputs_raise_clear_errors():
    model = DeluluModel(tiny_config()).eval()
    with pytest.raises(ValueError, match="receptive field of 322"):
        model(torch.randn(1, 300))
    values, mask, _ = padded_batch([16000, 200])
    with pytest.raises(ValueError, match=r"batch items \[1\] have \[200\] unpadded samples"):
        model(values, attention_mask=mask)
    with pytest.raises(ValueError, match=r"mask_time_indices has shape \(1, 61\)"):
        model(torch.randn(1, 16000), mask_time_indices=torch.zeros(1, 61, dtype=torch.bool))


@pytest.mark.parametrize("model_class", [DeluluForSequenceClassification, DeluluForXVector])
@pytest.mark.parametrize("weighted", [False, True])
def test_heads(model_class, weighted):
    config = no_dropout(use_weighted_layer_sum=weighted, num_labels=3)
    torch.manual_seed(0)
    model = model_class(config).eval()
    values, mask, items = padded_batch([16000, 9000])
    labels = torch.tensor([0, 2])
    with torch.no_grad():
        out = model(values, attention_mask=mask, labels=labels)
        single = model(items[1][None])
    assert torch.isfinite(out.loss)
    # Pooling honours the attention mask: the padded item matches its unpadded run.
    torch.testing.assert_close(out.logits[1], single.logits[0], atol=1e-4, rtol=1e-4)
    if model_class is DeluluForXVector:
        assert out.embeddings.shape == (2, config.xvector_output_dim)
    else:
        assert out.logits.shape == (2, 3)
    model.freeze_feature_encoder()
    assert not any(p.requires_grad for p in model.delulu.feature_extractor.parameters())
    model.freeze_base_model()
    assert not any(p.requires_grad for p in model.delulu.parameters())


# ----------------------------------------------------------------------------------------------
# Saving and loading
# ----------------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path: Path):
    torch.manual_seed(0)
    model = DeluluForPreTraining(tiny_config(label_teacher_name="demo-redimnet", label_feature_dim=64)).eval()
    model.save_pretrained(tmp_path)

    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["auto_map"] == DELULU_AUTO_MAP
    assert saved["label_teacher_name"] == "demo-redimnet" and saved["label_feature_dim"] == 64
    for name in (
        "configuration_delulu.py",
        "modeling_delulu.py",
        "model.safetensors",
        "preprocessor_config.json",
    ):
        assert (tmp_path / name).exists(), name

    values, mask, _ = padded_batch([16000, 10000])
    reloaded = AutoModelForPreTraining.from_pretrained(tmp_path).eval()
    assert type(reloaded) is DeluluForPreTraining
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(values, attention_mask=mask).logits, model(values, attention_mask=mask).logits
        )
        base = AutoModel.from_pretrained(tmp_path).eval()
        torch.testing.assert_close(
            base(values, attention_mask=mask).last_hidden_state,
            model.delulu(values, attention_mask=mask).last_hidden_state,
        )
    assert type(AutoModelForAudioXVector.from_pretrained(tmp_path)) is DeluluForXVector
    assert type(AutoModelForAudioClassification.from_pretrained(tmp_path)) is DeluluForSequenceClassification

    extractor = AutoFeatureExtractor.from_pretrained(tmp_path)
    assert isinstance(extractor, Wav2Vec2FeatureExtractor)
    assert extractor.sampling_rate == 16000 and extractor.return_attention_mask


def test_save_keeps_a_given_feature_extractor(tmp_path: Path):
    model = DeluluModel(tiny_config())
    custom = Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=False, return_attention_mask=True)
    model.save_pretrained(tmp_path, feature_extractor=custom)
    model.save_pretrained(tmp_path)  # an existing preprocessor config is kept, not reset to the default
    assert AutoFeatureExtractor.from_pretrained(tmp_path).do_normalize is False
    assert math.isclose(json.loads((tmp_path / "preprocessor_config.json").read_text())["padding_value"], 0.0)
