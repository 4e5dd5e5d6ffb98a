"""Publishing: repository folder, remote-code verification, model card, and the push CLI.

Only the network boundary (``HfApi``) is replaced; everything else runs for real, including the
fresh process that loads the folder with ``delulu_hf`` made unimportable.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import save_file

from delulu_hf import DeluluConfig, DeluluForPreTraining
from delulu_hf.hub import ResultsFileError, load_results

REPO_ROOT = Path(__file__).resolve().parents[1]


def _load_script(name: str):
    # Load by file path: putting training/ on sys.path would shadow the `evaluate` package with
    # training/evaluate.py for every later test.
    spec = importlib.util.spec_from_file_location(
        f"delulu_training_{name}", REPO_ROOT / "training" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


push_to_hub = _load_script("push_to_hub")

RESULTS = {
    "model": "runs/demo/final",
    "data": "data/demo_corpus",
    "tasks": {
        "verification": {
            "eer": 0.123457,
            "min_dcf_0.01": 0.871234,
            "min_dcf_0.05": 0.654321,
            "n_target": 91,
            "n_nontarget": 910,
            "best_layer": 3,
            "per_layer": [{"layer": 0, "eer": 0.2}, {"layer": 1, "eer": 0.15}],
        },
        "profiling": {"gender": {"linear": {"accuracy": 0.913579, "macro_f1": 0.902468, "n_test": 81}}},
    },
}


def tiny_config(**overrides) -> DeluluConfig:
    kwargs = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(16,) * 7,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        num_clusters=8,
        final_dim=16,
        label_teacher_name="redimnet-b0-demo",
        label_feature_dim=600,
    )
    kwargs.update(overrides)
    return DeluluConfig(**kwargs)


def push(checkpoint, results_file, out, *extra: str, api=None) -> int:
    """Run the push CLI in-process; ``api`` stands in for the network boundary."""
    argv = ["--checkpoint", str(checkpoint), "--repo-id", "org/delulu-test", "--output-dir", str(out)]
    if results_file is not None:
        argv += ["--results", str(results_file)]
    return push_to_hub.main([*argv, *extra], api=api if api is not None else FakeApi())


class FakeApi:
    """Records the calls the push makes across the network boundary."""

    def __init__(self):
        self.calls = []

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))
        return f"https://huggingface.co/{kwargs['repo_id']}"

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        return "commit"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("ckpt") / "final"
    model = DeluluForPreTraining(tiny_config()).eval()
    model.save_pretrained(folder)
    # Named as training/pretrain.py names them in its final folder.
    save_file({"centroids": torch.randn(8, 600)}, str(folder / "kmeans_centroids.safetensors"))
    (folder / "kmeans_centroids.json").write_text(
        json.dumps({"k": 8, "feature_dim": 600, "teacher": "redimnet-b0-demo"})
    )
    (folder / "training_config.json").write_text(
        json.dumps({"config": "training/configs/demo.yaml", "max_steps": 5})
    )
    return folder


@pytest.fixture(scope="module")
def results_file(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("eval")
    path = folder / "results.json"
    path.write_text(json.dumps(RESULTS))
    # A plot beside the results travels to the repo's plots/ folder.
    (folder / "det_curve.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 16)
    return path


@pytest.fixture(scope="module")
def built(checkpoint, results_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("repo") / "repo"
    api = FakeApi()
    code = push(checkpoint, results_file, out, "--dry-run", api=api)
    return code, out, api


def test_dry_run_builds_complete_folder_without_network(built, capsys):
    code, out, api = built
    assert code == 0
    assert api.calls == []
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    for name in (
        "model.safetensors",
        "config.json",
        "configuration_delulu.py",
        "modeling_delulu.py",
        "preprocessor_config.json",
        "README.md",
        "results.json",
        "plots/det_curve.png",
        "kmeans/kmeans_centroids.safetensors",
        "kmeans/kmeans_centroids.json",
    ):
        assert name in files, name
    auto_map = json.loads((out / "config.json").read_text())["auto_map"]
    assert {
        "AutoConfig",
        "AutoModel",
        "AutoModelForPreTraining",
        "AutoModelForAudioXVector",
        "AutoModelForAudioClassification",
    } <= set(auto_map)


def test_folder_loads_offline_without_package(built, checkpoint):
    from delulu_hf.hub import load_checkpoint_model, verify_repo_folder

    _, out, _ = built
    report = verify_repo_folder(out, load_checkpoint_model(checkpoint))
    assert report["model_module"].startswith("transformers_modules")
    assert report["model_class"] == "DeluluModel"
    assert report["feature_extractor"] == "Wav2Vec2FeatureExtractor"
    assert report["max_abs_diff"] <= 1e-5


def test_verification_catches_different_weights(built):
    from delulu_hf.hub import verify_repo_folder

    _, out, _ = built
    torch.manual_seed(1)
    other = DeluluForPreTraining(tiny_config()).eval()
    with pytest.raises(RuntimeError, match="differ"):
        verify_repo_folder(out, other)


def test_card_model_index_equals_results(built):
    _, out, _ = built
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "feature-extraction"
    assert {"custom_code", "speaker-verification"} <= set(card.data.tags)
    parsed = {(r.task_name, r.metric_type, r.metric_value) for r in card.data.eval_results}
    expected = {
        ("verification", "eer", 0.123457),
        ("verification", "min_dcf_0.01", 0.871234),
        ("verification", "min_dcf_0.05", 0.654321),
        ("profiling", "gender.linear.accuracy", 0.913579),
        ("profiling", "gender.linear.macro_f1", 0.902468),
    }
    assert parsed == expected


def test_card_numbers_come_from_results(built):
    _, out, _ = built
    text = (out / "README.md").read_text()
    evaluation = text.split("## Evaluation", 1)[1].split("## Limitations", 1)[0]
    allowed = set(re.findall(r"\d+(?:\.\d+)?", json.dumps(RESULTS)))
    shown = set(re.findall(r"(?<![\w/.])\d+(?:\.\d+)?", evaluation))
    assert shown, "the evaluation section shows no numbers"
    assert shown <= allowed, shown - allowed
    # The card's usage section names the repo and the speaker-embedding + fine-tuning snippets.
    assert 'AutoModel.from_pretrained("org/delulu-test", trust_remote_code=True)' in text
    assert "AutoModelForAudioXVector" in text and "arXiv:2510.17662" in text


def test_card_without_results_has_no_evaluation_numbers(checkpoint, tmp_path):
    from model_card.generate import build_model_card

    config = json.loads((checkpoint / "config.json").read_text())
    card = build_model_card("org/x", config)
    evaluation = str(card).split("## Evaluation", 1)[1].split("## Limitations", 1)[0]
    assert re.findall(r"\d", evaluation) == []
    assert "model-index" not in str(card)


def test_upload_calls_create_and_upload(checkpoint, results_file, tmp_path):
    api = FakeApi()
    out = tmp_path / "repo"
    code = push(checkpoint, results_file, out, "--private", api=api)
    assert code == 0
    assert [name for name, _ in api.calls] == ["create_repo", "upload_folder"]
    assert api.calls[0][1]["private"] is True
    assert api.calls[1][1]["folder_path"] == str(out)


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "does not exist"),
        ("{not json", "not valid JSON"),
        (json.dumps({"model": "m", "data": "d"}), "no 'tasks' entry"),
        (json.dumps({"model": "m", "data": "d", "tasks": {"verification": 0.1}}), "must map metric names"),
        (json.dumps({"model": "m", "data": "d", "tasks": {"verification": {"eer": float("nan")}}}), "finite"),
    ],
)
def test_bad_results_file_errors(tmp_path, content, message):
    path = tmp_path / "results.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ResultsFileError, match=message):
        load_results(path)


def test_bad_results_fail_before_building(checkpoint, tmp_path):
    bad = tmp_path / "results.json"
    bad.write_text("[]")
    out = tmp_path / "repo"
    with pytest.raises(ResultsFileError, match="top level"):
        push(checkpoint, bad, out, "--dry-run", api=FakeApi())
    assert not out.exists()
