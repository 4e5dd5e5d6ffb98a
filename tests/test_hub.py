"""Publishing: repository folder, remote-code verification, model card, and the push CLI.

Only the network boundary (``HfApi``) is replaced; everything else runs for real, including the
fresh process that loads the folder with ``delulu_hf`` made unimportable.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import save_file

from delulu_hf import DeluluConfig, DeluluForPreTraining
from delulu_hf.errors import UserError
from delulu_hf.hub import ResultsFileError, load_results

REPO_ROOT = Path(__file__).resolve().parents[1]


def _load_script(name: str):
    # Load by file path: putting training/ on sys.path would shadow the `evaluate` package with
    # training/evaluate.py for every later test.
    module_name = f"delulu_training_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, REPO_ROOT / "training" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses resolve their annotations through sys.modules
        spec.loader.exec_module(module)
    return sys.modules[module_name]


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
    argv = ["--checkpoint", str(checkpoint), "--repo_id", "org/delulu-test", "--output_dir", str(out)]
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
    code = push(checkpoint, results_file, out, "--dry_run", api=api)
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
        push(checkpoint, bad, out, "--dry_run", api=FakeApi())
    assert not out.exists()


def test_push_cli_old_spellings_datasets_and_user_errors(tmp_path, capsys):
    args = push_to_hub.parse_args(["--checkpoint", "c", "--repo_id", "org/m", "--dataset", "a", "b"])
    assert (args.repo_id, args.dataset, args.dry_run, args.license) == (
        "org/m",
        ["a", "b"],
        False,
        "apache-2.0",
    )
    # The old hyphenated spellings still work (with a warning), and --dataset is still repeatable.
    old = ["--checkpoint", "c", "--repo-id", "org/m", "--dry-run", "--output-dir", "o"]
    args = push_to_hub.parse_args([*old, "--dataset", "a", "--dataset", "b"])
    assert (args.repo_id, args.dry_run, args.output_dir, args.dataset) == ("org/m", True, "o", ["a", "b"])
    assert "--repo-id is deprecated, use --repo_id" in capsys.readouterr().err
    for argv, message in (
        (["--checkpoint", "c", "--repo_id", "org/m", "--privat"], "did you mean --private?"),
        (["--checkpoint", "c", "--repo_id", "no-org"], "--repo_id must be ORG/NAME"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            push_to_hub.parse_args(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    # A missing checkpoint or results file is named before anything is built.
    out = tmp_path / "repo"
    with pytest.raises(UserError, match="--checkpoint .*no such folder"):
        push(tmp_path / "missing", None, out, "--dry_run")
    with pytest.raises(UserError, match="--results .*no such file"):
        push(tmp_path, tmp_path / "missing.json", out, "--dry_run")
    assert not out.exists()


# --------------------------------------------------------------------------------------------------
# The card states only what the label provenance records (issue 14)
# --------------------------------------------------------------------------------------------------

DEMO_TEACHER = "redimnet-b0-lite-demo"


def demo_provenance(k: int = 8, feature_dim: int = 600, skipped: list | None = None) -> dict:
    """The centroids' provenance as ``fit_centroids`` writes it for the 600-d demo teacher."""
    return {
        "format_version": 1,
        "features": "teacher",
        "teacher": {
            "name": DEMO_TEACHER,
            "class": "ReDimNet",
            "feature_dim": feature_dim,
            "sample_rate": 16000,
            "hop_length": 160,
            "checkpoint_sha256": "ab" * 32,
        },
        "alignment": "nearest",
        "normalization": "none",
        "kmeans": {"algorithm": "sklearn.cluster.MiniBatchKMeans", "seed": 0, "n_init": 3},
        "frames_used": 56148,
        "frames_seen": 56148,
        "max_frames": 60000,
        "fit_hours": 0.25,
        "items_used": 352,
        "audio_seconds_used": 899.82,
        "skipped": skipped if skipped is not None else [],
        "k": k,
        "feature_dim": feature_dim,
    }


def make_checkpoint(folder: Path, provenance: dict | None, **config) -> Path:
    """A DELULU folder as training/pretrain.py leaves it: weights, config, centroids + provenance."""
    torch.manual_seed(0)
    DeluluForPreTraining(tiny_config(**config)).eval().save_pretrained(folder)
    if provenance is not None:
        save_file({"centroids": torch.randn(provenance["k"], provenance["feature_dim"])},
                  str(folder / "kmeans_centroids.safetensors"))  # fmt: skip
        (folder / "kmeans_centroids.json").write_text(json.dumps(provenance))
    return folder


def training_text(card_text: str) -> str:
    return card_text.split("## Training", 1)[1].split("## Evaluation", 1)[0]


def test_dry_run_card_names_the_teacher_dim_and_k_of_the_provenance(tmp_path):
    """A folder whose labels came from the 600-d demo teacher: the card says so, nowhere redimnet-b6."""
    skipped = [{"index": 7, "name": "spk3/utt9.flac", "reason": "non-finite teacher features"}]
    checkpoint = make_checkpoint(
        tmp_path / "final",
        demo_provenance(skipped=skipped),
        label_teacher_name=DEMO_TEACHER,
        label_feature_dim=600,
        num_clusters=8,
    )
    out = tmp_path / "repo"
    assert push(checkpoint, None, out, "--dry_run") == 0
    text = (out / "README.md").read_text()
    training = training_text(text)
    assert f"`{DEMO_TEACHER}` (600-dim, backbone frame features)" in training
    assert "k = 8" in training and "`nearest` alignment" in training
    assert "kmeans/kmeans_centroids.json" in training
    assert "items_used = 352" in training and "fit_hours = 0.25" in training
    assert (
        "Items skipped when fitting the centroids (1): `spk3/utt9.flac` (non-finite teacher features)"
        in training
    )
    assert "redimnet-b6" not in text and "2304" not in text
    assert f"teacher (`{DEMO_TEACHER}`)" in text  # the limitations name the same teacher
    # The objective the config switched on: masked prediction + denoising, nothing else.
    assert "Masked cluster prediction" in training and "denoising term weighted by λ = 0.1" in training
    assert "distillation" not in training and "penalty" not in training
    # The published folder still loads as remote code (push_to_hub verified it in a fresh process).
    config = json.loads((out / "config.json").read_text())
    assert (config["label_teacher_name"], config["label_feature_dim"], config["num_clusters"]) == (
        DEMO_TEACHER,
        600,
        8,
    )
    assert (
        json.loads((out / "kmeans" / "kmeans_centroids.json").read_text())["teacher"]["name"] == DEMO_TEACHER
    )


def test_card_without_provenance_says_the_label_source_is_unknown(tmp_path):
    """No centroids saved with the checkpoint: no teacher is named, the config defaults are not guessed."""
    from model_card.generate import card_for_checkpoint

    checkpoint = make_checkpoint(
        tmp_path / "final", None, label_teacher_name="redimnet-b6", label_feature_dim=2304
    )
    text = str(card_for_checkpoint(checkpoint, "org/x"))
    training = training_text(text)
    assert "The label source is unknown" in training
    assert "redimnet-b6" not in text and "2304" not in text
    assert "teacher (not recorded for this checkpoint)" in text


def test_contradicting_config_and_provenance_fail_in_one_line_before_anything_is_built(tmp_path):
    """config.json says redimnet-b6/2304/k=256 (the defaults), the provenance the demo teacher: no card."""
    checkpoint = make_checkpoint(
        tmp_path / "final", demo_provenance(k=8), label_teacher_name="redimnet-b6", label_feature_dim=2304
    )
    out = tmp_path / "repo"
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "training" / "push_to_hub.py"), "--checkpoint", str(checkpoint),
         "--repo_id", "org/x", "--output_dir", str(out), "--dry_run"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "Warning" not in line]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(
        f"push_to_hub.py: error: {checkpoint}/config.json and {checkpoint}/kmeans_centroids.json disagree"
    )
    assert "label_teacher_name='redimnet-b6'" in lines[0] and DEMO_TEACHER in lines[0]
    assert "label_feature_dim=2304" in lines[0] and "600" in lines[0]
    assert not out.exists()


def test_card_states_the_objective_from_the_config():
    from model_card.generate import build_model_card

    config = tiny_config(
        denoise_loss_weight=0.0,
        feature_grad_mult=0.1,
        feature_penalty_weight=10.0,
        distill_loss_weight=0.5,
        distill_dim=192,
        distill_teacher_name=DEMO_TEACHER,
    ).to_dict()
    training = training_text(str(build_model_card("org/x", config)))
    assert "Masked cluster prediction" in training and "no denoising term (λ = 0)" in training
    assert "distillation term weighted by 0.5" in training
    assert f"window-embedding features of `{DEMO_TEACHER}` (192-dim, 1.0 s windows" in training
    assert "penalty on the conv features' mean square weighted by 10.0" in training
    assert "gradient is scaled by 0.1" in training
    only_distill = dict(config, cluster_loss_weight=0.0)
    training = training_text(str(build_model_card("org/x", only_distill)))
    assert "masked cluster prediction" not in training.lower() and "No cluster prediction" in training
    # Configs from before the distillation term have none of its keys.
    config = {k: v for k, v in config.items() if not k.startswith("distill") and k != "cluster_loss_weight"}
    training = training_text(str(build_model_card("org/x", config)))
    assert "distillation" not in training and "Masked cluster prediction" in training


# --------------------------------------------------------------------------------------------------
# model-index: the numbers a reader compares; everything else stays in results.json (issue 14)
# --------------------------------------------------------------------------------------------------

#: results.json of `training/evaluate.py --tasks all` on the demo model (data/demo_corpus +
#: data/demo_mixtures), as written by the evaluation suite.
DEMO_RESULTS = REPO_ROOT / "tests" / "fixtures" / "demo_eval_results.json"


def test_model_index_holds_the_headline_metrics_only():
    from model_card.generate import build_model_card, eval_results_from, flatten_metrics

    results = load_results(DEMO_RESULTS)
    tasks = results["tasks"]
    entries = {(r.task_name, r.metric_type): r for r in eval_results_from(results)}
    verification = tasks["verification"]
    best = verification["per_layer"][verification["best_layer"]]
    diarization = tasks["diarization"]
    best_der = diarization["per_layer"][diarization["best_layer"]]
    expected = {
        ("verification", "eer"): verification["eer"],
        ("verification", "min_dcf_0.01"): verification["min_dcf_0.01"],
        ("verification", "min_dcf_0.05"): verification["min_dcf_0.05"],
        ("verification", "best_layer_eer"): best["eer"],
        ("verification", "best_layer_min_dcf_0.01"): best["min_dcf_0.01"],
        ("verification", "best_layer_min_dcf_0.05"): best["min_dcf_0.05"],
        ("verification_downstream", "eer"): tasks["verification_downstream"]["eer"],
        ("verification_downstream", "min_dcf_0.01"): tasks["verification_downstream"]["min_dcf_0.01"],
        ("verification_downstream", "min_dcf_0.05"): tasks["verification_downstream"]["min_dcf_0.05"],
        ("diarization", "best_layer_der_known_collar_0"): best_der["der_known_collar_0"],
        ("diarization", "best_layer_der_known_collar_0.5"): best_der["der_known_collar_0.5"],
    }
    for mode in ("known", "estimated"):
        for collar in ("0", "0.5"):
            key = f"der_{mode}_collar_{collar}"
            expected[("diarization", key)] = diarization[key]
    probes = {"identification": tasks["identification"], "counting": tasks["counting"]}
    probes.update({f"profiling.{a}": tasks["profiling"][a] for a in ("gender", "language")})
    for where, entry in probes.items():
        task, _, attribute = where.partition(".")
        prefix = f"{attribute}." if attribute else ""
        for key in ("accuracy", "macro_f1", "best_layer_accuracy"):
            expected[(task, prefix + key)] = entry[key]
    assert {key: r.metric_value for key, r in entries.items()} == expected
    assert len(entries) == 27  # was 102 before issue 14 (every numeric leaf)
    # The best-layer entries say which layer; none of the bookkeeping made it in.
    assert entries[("verification", "best_layer_min_dcf_0.01")].metric_name == (
        f"verification/best_layer_min_dcf_0.01 ({verification['best_layer_name']})"
    )
    everything = {name for metrics in tasks.values() for name, _ in flatten_metrics(metrics)}
    for left_out in ("eer_threshold", "knn_k", "chance", "majority_baseline", "n_test", "classes_test"):
        assert any(left_out in name for name in everything), left_out  # in results.json ...
        assert not any(left_out in metric for _, metric in entries), left_out  # ... not in the index
    # The card links results.json (the repository ships it beside README.md).
    card = str(build_model_card("org/x", tiny_config().to_dict(), results=results))
    assert "[`results.json`](results.json)" in card.split("## Evaluation", 1)[1]


def test_unreadable_provenance_is_one_line(tmp_path):
    from model_card.generate import card_for_checkpoint

    checkpoint = make_checkpoint(tmp_path / "final", demo_provenance(), label_teacher_name=DEMO_TEACHER)
    (checkpoint / "kmeans_centroids.json").write_text("{truncated")
    with pytest.raises(UserError, match=r"label provenance .*kmeans_centroids.json' is not valid JSON"):
        card_for_checkpoint(checkpoint, "org/x")
