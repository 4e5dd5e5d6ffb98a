"""DeluluConfig: transformers' ConfigTester, DELULU Base defaults, and clear errors for bad values."""

from __future__ import annotations

import json
import unittest
from pathlib import Path

import pytest
import transformers_test_support
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig

from delulu_hf import DeluluConfig

CONFIG_ERRORS = (ValueError, StrictDataclassError)


class DeluluConfigCommonTest(unittest.TestCase):
    def test_config_common(self):
        if transformers_test_support.install() is None:
            self.skipTest(
                "transformers' common test sources are not fetched: run tests/fetch_transformers_tests.py"
            )
        from transformers_tests.test_configuration_common import ConfigTester

        tester = ConfigTester(
            self, config_class=DeluluConfig, has_text_modality=False, hidden_size=48, num_attention_heads=4
        )
        tester.run_common_tests()


def test_defaults_are_delulu_base():
    config = DeluluConfig()
    assert config.model_type == "delulu"
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (768, 12, 12)
    assert config.intermediate_size == 3072
    assert tuple(config.conv_dim) == (512,) * 7
    assert tuple(config.conv_kernel) == (10, 3, 3, 3, 3, 2, 2)
    assert tuple(config.conv_stride) == (4, 2, 2, 2, 2, 2, 2)
    assert config.inputs_to_logits_ratio == 256  # 16 ms at 16 kHz
    assert (config.num_clusters, config.final_dim, config.logit_temperature) == (256, 256, 0.1)
    assert (config.mask_time_prob, config.mask_time_length, config.layerdrop) == (0.8, 10, 0.05)
    assert config.feat_extract_norm == "layer"
    assert (config.denoise_snr_min_db, config.denoise_snr_max_db) == (15.0, 25.0)
    assert config.denoise_loss_weight == 0.1
    assert 0 < config.denoise_corruption_prob < 1 and 0 <= config.denoise_utterance_mix_prob <= 1
    assert (config.label_teacher_name, config.label_feature_dim, config.label_frame_alignment) == (
        "redimnet-b6",
        2304,
        "nearest",
    )


def test_denoising_and_provenance_survive_a_round_trip(tmp_path: Path):
    config = DeluluConfig(
        denoise_loss_weight=0.3,
        denoise_corruption_prob=0.4,
        denoise_utterance_mix_prob=1.0,
        denoise_snr_min_db=10,
        denoise_snr_max_db=20,
        label_teacher_name="demo-redimnet",
        label_feature_dim=96,
        label_frame_alignment="mean",
    )
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["label_frame_alignment"] == "mean" and saved["denoise_loss_weight"] == 0.3
    assert saved["auto_map"]["AutoConfig"] == "configuration_delulu.DeluluConfig"
    reloaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(reloaded, DeluluConfig)
    loaded, original = reloaded.to_dict(), config.to_dict()
    loaded.pop("_name_or_path"), original.pop("_name_or_path")
    assert loaded == original


def test_auto_config_knows_delulu():
    assert isinstance(AutoConfig.for_model("delulu"), DeluluConfig)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"hidden_size": 100},
            r"hidden_size \(100\) must be a positive multiple of num_attention_heads \(12\)",
        ),
        ({"conv_dim": (512, 512)}, r"equal length.*'conv_dim': 2, 'conv_stride': 7, 'conv_kernel': 7"),
        ({"conv_stride": (4, 2, 2, 0, 2, 2, 2)}, r"conv_stride entries must be >= 1"),
        ({"tdnn_kernel": (5, 3)}, r"tdnn_dim, tdnn_kernel and tdnn_dilation"),
        ({"num_clusters": 1}, r"num_clusters \(k-means k\) must be >= 2, got 1"),
        ({"feat_extract_norm": "group"}, r"feat_extract_norm must be 'layer'.*padding"),
        ({"num_conv_pos_embedding_groups": 5}, r"divisible by num_conv_pos_embedding_groups \(5\)"),
        ({"mask_time_prob": 1.5}, r"mask_time_prob must be in \[0, 1\], got 1.5"),
        ({"denoise_corruption_prob": -0.1}, r"denoise_corruption_prob must be in \[0, 1\]"),
        ({"denoise_loss_weight": -1.0}, r"denoise_loss_weight \(lambda\) must be >= 0"),
        ({"denoise_snr_min_db": 30.0}, r"denoise_snr_min_db \(30.0\) must be <= denoise_snr_max_db \(25.0\)"),
        ({"denoise_mix_max_overlap": 0.0}, r"denoise_mix_max_overlap must be in \(0, 1\]"),
        ({"label_frame_alignment": "linear"}, r"label_frame_alignment must be one of \('nearest', 'mean'\)"),
        ({"label_feature_dim": 0}, r"label_feature_dim must be >= 1 or None"),
        ({"logit_temperature": 0.0}, r"logit_temperature must be > 0"),
        ({"num_clusters": "256"}, r"num_clusters"),
    ],
)
def test_inconsistent_values_raise_clear_errors(kwargs, message):
    with pytest.raises(CONFIG_ERRORS, match=message):
        DeluluConfig(**kwargs)
