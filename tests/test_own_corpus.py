"""Your own corpus, end to end, on the pretraining side (issue 14): ``pretrain.py --dataset OUT`` takes a
``prepare_labels.py`` folder as written, states what made its labels, checks every input before anything
is built, and never loses a run to one bad file.

The labelled folders here are built by hand to the hand-off contract (``delulu_hf.labels.handoff``), so
these tests do not depend on the label pass; ``test_rehearsal.py`` runs the real one.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml
from audio_fixtures import synthetic_voice

from delulu_hf import DeluluConfig, feat_extract_output_lengths
from delulu_hf import pretraining as P
from delulu_hf.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "training", "pretrain.py")
K, DIM, TEACHER = 8, 12, "toy-teacher"
TINY_MODEL = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    conv_dim=[32] * 7,
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=4,
    final_dim=16,
    mask_time_length=4,
    hidden_dropout=0.0,
    attention_dropout=0.0,
    feat_proj_dropout=0.0,
    layerdrop=0.0,
    denoise_corruption_prob=0.5,
)
# The shipped demo config (num_clusters: 100, a 192-wide model) cut down on the command line, label
# fields left alone: they must come from the labels.
TINY_FLAGS = [f"--model.{k}={json.dumps(v)}" for k, v in TINY_MODEL.items()] + [
    "--max_batch_samples=48000",
    "--max_sample_length=24000",
    "--min_sample_length=8000",
    "--warmup_steps=4",
    "--learning_rate=2e-3",
    "--logging_steps=1",
    "--report_to=none",
]


def env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", HF_DATASETS_OFFLINE="1")


def write_labelled_corpus(root, num_items: int = 24, k: int = K, conv_stride=None) -> str:
    """``root/OUT`` as ``prepare_labels.py --output OUT`` writes it (contract of ``labels.json``), over
    FLAC files in ``root/audio`` that the dataset names by path (so on-the-fly decoding reads them and
    a file broken later is met mid-run); ``labels.json`` lists one item the label pass skipped."""
    import datasets

    from delulu_hf.labels import Centroids
    from delulu_hf.labels.handoff import write_manifest

    config = DeluluConfig(**TINY_MODEL, num_clusters=k)
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "audio"), exist_ok=True)
    rows: dict[str, list] = {"audio": [], "cluster_ids": [], "file_name": []}
    for i in range(num_items):
        speaker = i % 4
        wave = synthetic_voice(speaker, rng.uniform(0.7, 1.6), rng, text_seed=i)
        path = os.path.join(root, "audio", f"utt{i:02d}.flac")
        sf.write(path, wave, 16000, subtype="PCM_16")
        frames = feat_extract_output_lengths(config, len(wave))
        rows["audio"].append(path)  # a path, not embedded bytes: the file is read when used
        rows["cluster_ids"].append([(2 * speaker + (t // 8) % 2) % k for t in range(frames)])
        rows["file_name"].append(f"utt{i:02d}.flac")
    out = os.path.join(root, "OUT")
    datasets.Dataset.from_dict(rows).save_to_disk(os.path.join(out, "dataset"))
    teacher = {"name": TEACHER, "feature_dim": DIM, "checkpoint_sha256": "0" * 64}
    provenance = {
        "teacher": teacher,
        "alignment": "mean",
        "normalization": "none",
        "encoder": {
            "conv_kernel": list(config.conv_kernel),
            "conv_stride": list(conv_stride or config.conv_stride),
        },
    }
    centroids = Centroids(
        torch.randn(k, DIM, dtype=torch.float64, generator=torch.manual_seed(0)), provenance
    )
    centroids.save(os.path.join(out, "centroids.safetensors"))
    manifest = {
        "format": "delulu-labelled-corpus",
        "format_version": 1,
        "dataset": "dataset",
        "centroids": "centroids.safetensors",
        "num_clusters": k,
        "label_teacher_name": TEACHER,
        "label_feature_dim": DIM,
        "label_frame_alignment": "mean",
        "normalization": "none",
        "teacher": teacher,
        "fit": {"items_used": num_items, "seed": 0},
        "source": {"data": os.path.join(root, "audio"), "split": None, "audio_column": "audio"},
        "items": {"total": num_items + 1, "labelled": num_items, "skipped": 1},
        "skipped": [{"name": "broken.wav", "reason": "cannot decode audio", "stage": "decode"}],
    }
    write_manifest(out, manifest)
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    return write_labelled_corpus(str(tmp_path_factory.mktemp("own")))


def load_pretrain_script():
    spec = importlib.util.spec_from_file_location("pretrain_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pretrain_error(*argv: str) -> str:
    """Run pretrain.py's main() in this process; return the UserError it stops with."""
    with pytest.raises(UserError) as caught:
        load_pretrain_script().main(list(argv))
    return str(caught.value)


def run_pretrain(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, SCRIPT, *args], env=env(), capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def losses(output_dir: str) -> dict[int, float]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as handle:
        return {r["step"]: r["loss"] for r in map(json.loads, handle)}


# ----------------------------------------------------------------------------------------------
# One contract between the stages
# ----------------------------------------------------------------------------------------------


def test_prepare_labels_folder_trains_as_written_and_the_run_states_what_made_its_labels(corpus, tmp_path):
    out = str(tmp_path / "run")
    result = run_pretrain("--dataset", corpus, "--output_dir", out, "--max_steps", "2", *TINY_FLAGS)
    assert result.returncode == 0, result.stderr[-3000:]
    # The demo config's num_clusters (100) yields to the labels' k, logged; nobody had set it.
    assert f"model.num_clusters = {K} from the labels in {corpus} (the config's 100 yields)" in result.stderr
    final = os.path.join(out, "final")
    config = json.load(open(os.path.join(final, "config.json")))
    assert (config["num_clusters"], config["label_teacher_name"]) == (K, TEACHER)
    assert (config["label_feature_dim"], config["label_frame_alignment"]) == (DIM, "mean")
    # final/ carries the centroids that made the labels, with their provenance.
    from delulu_hf.labels import Centroids

    carried = Centroids.load(os.path.join(final, P.CENTROIDS_NAME))
    assert carried.sha256() == Centroids.load(os.path.join(corpus, "centroids.safetensors")).sha256()
    assert json.load(open(os.path.join(final, "kmeans_centroids.json")))["teacher"]["name"] == TEACHER
    run = json.load(open(os.path.join(final, "training_config.json")))
    source = run["label_source"]
    assert source["kind"] == "labelled-corpus" and source["corpus"] == os.path.abspath(corpus)
    assert (source["num_clusters"], source["label_teacher_name"], source["label_feature_dim"]) == (
        K,
        TEACHER,
        DIM,
    )
    assert run["skipped_items"]["total"] == run["skipped_items"]["labelling"] == 1
    assert run["skipped_items"]["items"][0]["name"] == "broken.wav"


@pytest.mark.parametrize("where", ["command line", "config file"])
def test_an_explicit_label_setting_that_disagrees_stops_before_anything_is_built(corpus, tmp_path, where):
    out = tmp_path / "run"
    if where == "command line":
        args = ["--model.num_clusters", "100", "--model.label_teacher_name", TEACHER]
        said = "(set on the command line)"
    else:
        config = tmp_path / "mine.yaml"
        config.write_text(yaml.safe_dump({"model": {"num_clusters": 100}, "report_to": "none"}))
        args = ["--config", str(config)]
        said = f"(set in {config})"
    message = pretrain_error("--dataset", corpus, "--output_dir", str(out), *args)
    assert message.startswith(f"model.num_clusters=100 {said} but the labels in {corpus} have k={K}")
    assert "drop --model.num_clusters" in message and "prepare_labels.py --k 100" in message
    assert "label_teacher_name" not in message, "a setting that agrees is no conflict"
    assert not out.exists(), "nothing is written before the inputs are checked"
    message = pretrain_error(
        "--dataset", corpus, "--output_dir", str(out), "--model.label_feature_dim", "2304"
    )
    assert (
        f"model.label_feature_dim=2304 (set on the command line) but the labels in {corpus} have feature dim={DIM}"
        in message
    )


def test_plain_labelled_dataset_takes_its_label_fields_from_the_centroids_or_leaves_them_unknown(
    corpus, tmp_path
):
    base = dict(
        dataset=os.path.join(corpus, "dataset"),
        dataset_split=None,
        max_batch_samples=48000,
        max_sample_length=24000,
        min_sample_length=8000,
    )
    # + --centroids: the fields come from the centroids' provenance (the default config's yield).
    cfg = P.PretrainConfig(
        **base, centroids=os.path.join(corpus, "centroids.safetensors"), model=dict(TINY_MODEL)
    )
    cfg.explicit_model = {}  # as parse_config leaves it when the person set no model keys
    config = P.build_model_config(cfg)
    data = P.prepare_pretraining_dataset(cfg, config)
    assert (config.num_clusters, config.label_teacher_name, config.label_feature_dim) == (K, TEACHER, DIM)
    assert data.source.kind == "centroids" and data.centroids.k == K
    # No provenance at all: teacher and dim become unknown, not the defaults ('redimnet-b6', 2304).
    cfg = P.PretrainConfig(**base, model=dict(TINY_MODEL, num_clusters=K))
    config = P.build_model_config(cfg)
    data = P.prepare_pretraining_dataset(cfg, config)
    assert data.source.kind == "dataset" and data.centroids is None
    assert (config.label_teacher_name, config.label_feature_dim, config.num_clusters) == (None, None, K)
    # ... and ids beyond num_clusters say that k and num_clusters disagree, and how to fix it.
    cfg = P.PretrainConfig(**base, model=dict(TINY_MODEL, num_clusters=4))
    with pytest.raises(
        UserError,
        match=r"go up to 7, but the model has num_clusters=4 .*k and num_clusters "
        r"disagree. Set --model.num_clusters 8",
    ):
        P.prepare_pretraining_dataset(cfg, P.build_model_config(cfg))


def test_labels_made_for_another_conv_stack_are_refused_before_training(tmp_path):
    corpus = write_labelled_corpus(str(tmp_path), num_items=4, conv_stride=[5, 2, 2, 2, 2, 2, 2])
    message = pretrain_error("--dataset", corpus, "--output_dir", str(tmp_path / "run"), *TINY_FLAGS)
    assert "were made for an encoder with conv_stride=[5, 2, 2, 2, 2, 2, 2], but the model has" in message
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------
# Paths and corpora are checked first
# ----------------------------------------------------------------------------------------------


def test_every_input_is_checked_before_any_model_or_output_folder(corpus, tmp_path):
    out = str(tmp_path / "run")
    cases = {
        ("--dataset", "no_such_dir"): "--dataset no_such_dir: no such file or folder",
        ("--teacher", "no_teacher.pt", "--dataset", os.path.join(corpus, "..", "audio")): (
            "--teacher no_teacher.pt: no such file or folder"
        ),
        ("--centroids", "no_centroids.safetensors", "--dataset", corpus): (
            "--centroids no_centroids.safetensors: no such file or folder"
        ),
        ("--noise_dir", "no_noise", "--dataset", corpus): "--noise_dir no_noise: no such folder",
        ("--model_config", "no_config.json", "--dataset", corpus): "--model_config no_config.json: no such",
    }
    for args, expected in cases.items():
        assert expected in pretrain_error("--output_dir", out, *args)
    incomplete = tmp_path / "elsewhere" / "checkpoints" / "step_00000004"
    incomplete.mkdir(parents=True)
    (incomplete / P.TRAINER_STATE_NAME).write_text("{}")
    message = pretrain_error(
        "--output_dir", out, "--dataset", corpus, "--resume_from_checkpoint", str(incomplete)
    )
    assert f"--resume_from_checkpoint {incomplete}: not a complete checkpoint (no model" in message
    # A label pass that was killed before its manifest: said so, not a pyarrow parse error.
    killed = tmp_path / "killed"
    (killed / "work").mkdir(parents=True)
    assert "its label pass has not finished" in pretrain_error("--output_dir", out, "--dataset", str(killed))
    assert not os.path.exists(out)


def test_a_user_mistake_is_one_line_and_exit_2():
    result = run_pretrain("--dataset", "no_such_dir", "--output_dir", "runs/never")
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "pretrain.py: error: --dataset no_such_dir: no such file or folder (an audiofolder, a prepare_labels.py "
        "output folder, a save_to_disk folder, a parquet/arrow file, or a Hub id ORG/NAME)"
    ]
    assert not os.path.exists(os.path.join(REPO, "runs", "never"))


# ----------------------------------------------------------------------------------------------
# Bad items never cost a run
# ----------------------------------------------------------------------------------------------


def break_files(corpus: str, *indices: int) -> list[str]:
    names = []
    for i in indices:
        path = os.path.join(corpus, "..", "audio", f"utt{i:02d}.flac")
        if i % 2:
            open(path, "wb").close()  # empty
        else:
            with open(path, "wb") as handle:
                handle.write(b"fLaC\x00\x00\x00\x22" + bytes(range(256)) * 4)  # corrupt
        names.append(f"utt{i:02d}.flac")
    return names


def test_cache_decoding_stops_on_a_bad_file_with_one_line_or_skips_and_counts_it(tmp_path):
    corpus = write_labelled_corpus(str(tmp_path), num_items=8)
    broken = break_files(corpus, 2, 5)
    cfg = P.PretrainConfig(
        dataset=corpus, max_sample_length=24000, min_sample_length=8000, model=dict(TINY_MODEL)
    )
    with pytest.raises(UserError, match=r"utt02\.flac: cannot decode audio .*Pass --on_error skip"):
        P.prepare_pretraining_dataset(cfg, P.build_model_config(cfg))
    cfg.on_error = "skip"
    data = P.prepare_pretraining_dataset(cfg, P.build_model_config(cfg))
    assert len(data.dataset) == 6
    counts = data.skipped.counts()
    assert counts["decoding"] == 2 and counts["labelling"] == 1 and counts["total"] == 3
    reasons = {item["name"]: item["reason"] for item in data.skipped.as_list()}
    assert reasons[broken[1]] == "empty file (0 bytes)" and "cannot decode" in reasons[broken[0]]


def test_a_bad_item_in_a_batch_is_replaced_from_the_plan_deterministically(tmp_path):
    corpus = write_labelled_corpus(str(tmp_path), num_items=12)
    cfg = P.PretrainConfig(
        dataset=corpus,
        audio_decoding="on-the-fly",
        on_error="skip",
        max_batch_samples=48000,
        max_sample_length=24000,
        min_sample_length=8000,
        model=dict(TINY_MODEL),
    )
    config = P.build_model_config(cfg)
    data = P.prepare_pretraining_dataset(cfg, config)
    _, sampler = P.make_dataloader(data, config, cfg)
    # The batch with the longest item: any item of the plan can stand in for one of its items.
    plan = sampler.epoch_batches(0)
    b = max(range(len(plan)), key=lambda i: sampler.lengths[plan[i]].max())
    planned = [(int(i), P.batch_seed(cfg.seed, 0, b), 0, b) for i in plan[b]]
    items = P.PretrainingItems(data.dataset, config=config)
    batches = P.PretrainingBatches(items, sampler, lambda good: {"names": [it["name"] for it in good]})
    clean = batches[planned]["names"]
    assert batches[planned]["skipped"] == []
    (victim,) = break_files(corpus, int(clean[0][3:5]))
    first, second = batches[planned], batches[planned]
    assert first == second, "the stand-in depends only on the plan and the files"
    assert [name for name, _ in first["skipped"]] == [victim]
    assert len(first["names"]) == len(clean) and victim not in first["names"]
    assert set(clean) - {victim} < set(first["names"])


def test_on_the_fly_bad_file_mid_corpus_is_skipped_counted_and_a_resumed_run_sees_the_same_batches(tmp_path):
    """A file broken after labelling, met mid-run with on-the-fly decoding and --on_error skip: the
    run goes on, names and counts it, and a run SIGKILLed mid-training resumes to the uninterrupted
    run's exact trajectory (the refill never shifts the data position)."""
    corpus = write_labelled_corpus(str(tmp_path), num_items=24)
    (victim,) = break_files(corpus, 9)
    common = ["--dataset", corpus, "--audio_decoding", "on-the-fly", "--on_error", "skip", *TINY_FLAGS]
    common += ["--max_steps", "16", "--save_steps", "4", "--gradient_accumulation_steps", "2"]
    reference = str(tmp_path / "reference")
    result = run_pretrain(*common, "--output_dir", reference)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count(f"Skipping {victim} (training): empty file (0 bytes)") == 1, "named once"
    records = [json.loads(line) for line in open(os.path.join(reference, "metrics.jsonl"))]
    assert records[-1]["items_skipped"] == 2  # the label pass's one + this one
    run = json.load(open(os.path.join(reference, "final", "training_config.json")))
    assert run["skipped_items"]["training"] == 1 and run["skipped_items"]["total"] == 2
    assert json.load(open(os.path.join(reference, P.SKIPPED_ITEMS_NAME)))[-1]["name"] == victim

    killed = str(tmp_path / "killed")
    command = [sys.executable, SCRIPT, *common, "--output_dir", killed]
    process = subprocess.Popen(
        command, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO
    )
    deadline, metrics = time.monotonic() + 240, os.path.join(killed, "metrics.jsonl")
    while time.monotonic() < deadline and process.poll() is None:
        if os.path.isfile(metrics) and len(open(metrics).read().splitlines()) >= 10:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the run should still have been going at step 10"
    resumed = run_pretrain(*common, "--output_dir", killed)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resumed from" in resumed.stderr
    assert losses(killed) == losses(reference)
    run = json.load(open(os.path.join(killed, "final", "training_config.json")))
    assert run["skipped_items"]["training"] == 1, "the items met before the checkpoint travel with it"


def test_a_bad_file_mid_run_under_raise_stops_with_one_line(tmp_path):
    corpus = write_labelled_corpus(str(tmp_path), num_items=12)
    (victim,) = break_files(corpus, 4)
    result = run_pretrain(
        "--dataset",
        corpus,
        "--audio_decoding",
        "on-the-fly",
        *TINY_FLAGS,
        "--max_steps",
        "8",
        "--output_dir",
        str(tmp_path / "run"),
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    line = result.stderr.split("pretrain.py: error: ", 1)[1].strip()
    assert line.startswith(f"{victim}: cannot decode audio with soundfile") and "\n" not in line
    assert line.endswith("Pass --on_error skip to leave such items out (logged and counted)")
