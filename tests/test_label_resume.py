"""A label pass that survives a crash (issue 17): centroids reused, finished shards kept, same ids.

Tiny corpus (generated FLAC files) and the MFCC featurizer, so the file runs in well under a minute
on 2 cores. The kill comes from the test side: ``tests/fault_injection/prepare_labels_killed_in_map.py``
patches ``ClusterAssigner`` in a subprocess to SIGKILL it mid-map; the library has no fault hooks.
"""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys

import datasets
import numpy as np
import pytest
import soundfile as sf

from delulu_hf import labels
from delulu_hf.errors import UserError
from delulu_hf.labels import assign, corpus, shards

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SR = 16000


def write_corpus(root: str, num_items: int = 16, seed: int = 11) -> None:
    """An audiofolder of short 'voices' (harmonics of a per-speaker pitch)."""
    rng = np.random.default_rng(seed)
    os.makedirs(root)
    rows = ["file_name,speaker_id"]
    for i in range(num_items):
        t = np.arange(int(rng.uniform(0.4, 1.0) * SR)) / SR
        pitch = [120, 210, 300, 170][i % 4]
        wave = sum(np.sin(2 * np.pi * pitch * h * t) / h for h in range(1, 4))
        wave = 0.1 * wave + 0.01 * rng.standard_normal(len(t))
        sf.write(os.path.join(root, f"u{i:02d}.flac"), wave.astype(np.float32), SR)
        rows.append(f"u{i:02d}.flac,s{i % 4}")
    with open(os.path.join(root, "metadata.csv"), "w") as handle:
        handle.write("\n".join(rows) + "\n")


def prepare_labels_module():
    sys.path.insert(0, os.path.join(REPO, "training"))
    try:
        import prepare_labels
    finally:
        sys.path.pop(0)
    return prepare_labels


def label_args(data: str, output: str, cache: str, *extra: str) -> list[str]:
    """4 shards of ~3 s of audio (whole chunks of 2 items), a fit on ~4 s of the ~11 s corpus."""
    args = ["--data", data, "--features", "mfcc", "--k", "5", "--n_init", "1", "--max_frames", "300"]
    args += [
        "--kmeans_batch_size",
        "256",
        "--chunk_size",
        "2",
        "--num_shards",
        "4",
        "--fit_hours",
        str(4 / 3600),
    ]
    args += ["--device", "cpu", "--output", output, "--cache_dir", cache]
    return args + list(extra)


def ids_of(output: str) -> list:
    data = datasets.load_from_disk(os.path.join(output, "dataset")).with_format(None)
    return list(zip(data["file_name"], data["cluster_ids"]))


class AssignmentLog:
    """Counts ``ClusterAssigner`` calls and records which shards a map labels (and at which count)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        self.shards: list[tuple[int, int, int, int]] = []  # (begin, end, calls before, calls after)
        assigner_call = assign.ClusterAssigner.__call__
        shard_call = shards.ShardLabeller.__call__

        def count(assigner, features):
            self.calls += 1
            return assigner_call(assigner, features)

        def record(labeller, work, begin, end, chunk_size):
            before = self.calls
            out = shard_call(labeller, work, begin, end, chunk_size)
            self.shards.append((begin, end, before, self.calls))
            return out

        monkeypatch.setattr(assign.ClusterAssigner, "__call__", count)
        monkeypatch.setattr(shards.ShardLabeller, "__call__", record)


def test_killed_label_pass_resumes_without_refit_or_redoing_shards(tmp_path, monkeypatch, caplog):
    prepare_labels = prepare_labels_module()
    data, cache = str(tmp_path / "corpus"), str(tmp_path / "cache")
    write_corpus(data)

    # The uninterrupted run, counting the map's assignments shard by shard.
    log = AssignmentLog(monkeypatch)
    assert prepare_labels.main(label_args(data, str(tmp_path / "ref"), cache)) == 0
    reference = ids_of(str(tmp_path / "ref"))
    ref_plan = labels.ShardPlan.load(tmp_path / "ref" / "work" / "plan.json")
    assert len(ref_plan.bounds) == 4 and ref_plan.bounds[0][0] == 0 and ref_plan.bounds[-1][1] == 16
    assert [(b, e) for b, e, _, _ in log.shards] == ref_plan.bounds
    assert all(ids is not None for _, ids in reference)

    # Kill at a random assignment after the first shard's: at least one shard is committed by then.
    first_shard_calls = log.shards[0][3]
    kill_at = random.Random().randint(first_shard_calls + 1, log.calls)
    out = str(tmp_path / "out")
    command = [
        sys.executable,
        os.path.join(REPO, "tests", "fault_injection", "prepare_labels_killed_in_map.py"),
    ]
    command += ["--kill_at_assignment", str(kill_at), *label_args(data, out, cache)]
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    killed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, (kill_at, killed.stderr[-3000:])
    # Between the kill and the rerun the folder is not a labelled corpus, and says why.
    assert os.path.isfile(os.path.join(out, "centroids.safetensors"))
    assert not labels.is_labelled_corpus(out)
    with pytest.raises(UserError, match="has not finished"):
        labels.LabelledCorpus.load(out)
    plan = labels.ShardPlan.load(os.path.join(out, "work", "plan.json"))
    shard_dir = os.path.join(out, "work", "shards")
    committed = [i for i in range(len(plan.bounds)) if plan.is_done(shard_dir, i)]
    expected_committed = [i for i, (_, _, _, after) in enumerate(log.shards) if after < kill_at]
    assert committed == expected_committed, kill_at
    stamps = {i: os.stat(plan.shard_path(shard_dir, i)) for i in committed}
    centroids_stamp = os.stat(os.path.join(out, "centroids.safetensors"))

    # The rerun: the same command; refitting would fail the test.
    def no_refit(*args, **kwargs):
        raise AssertionError("the rerun fitted k-means again")

    monkeypatch.setattr(corpus, "fit_centroids", no_refit)
    log = AssignmentLog(monkeypatch)
    caplog.set_level(logging.INFO)
    assert prepare_labels.main(label_args(data, out, cache)) == 0
    assert "reusing centroids fitted" in caplog.text
    assert ids_of(out) == reference, kill_at
    missing = [plan.bounds[i] for i in range(len(plan.bounds)) if i not in committed]
    assert [(b, e) for b, e, _, _ in log.shards] == missing, kill_at  # only the missing shards were labelled
    for i, before in stamps.items():  # and the committed ones were not rewritten
        after = os.stat(plan.shard_path(shard_dir, i))
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert os.stat(os.path.join(out, "centroids.safetensors")).st_mtime_ns == centroids_stamp.st_mtime_ns
    assert labels.LabelledCorpus.load(out).manifest["items"] == {"total": 16, "labelled": 16, "skipped": 0}
    assert not os.path.exists(os.path.join(out, "work", "fit_features"))  # dropped once the map is done


def test_rerun_with_other_inputs_refuses_and_names_what_differs(tmp_path):
    prepare_labels = prepare_labels_module()
    data, cache, out = str(tmp_path / "corpus"), str(tmp_path / "cache"), str(tmp_path / "out")
    write_corpus(data, num_items=8)
    args = label_args(data, out, cache)
    assert prepare_labels.main(args) == 0
    with pytest.raises(UserError, match=r"fitted with other inputs \(fit.seed: 0 \(then\) vs 3 \(now\)\)"):
        prepare_labels.main(args + ["--seed", "3"])
    with pytest.raises(UserError, match=r"k: 5 \(then\) vs 4 \(now\)"):
        prepare_labels.main(args + ["--k", "4"])
    # bf16 features (as on CUDA) are other features: centroids fitted in float32 are not reused.
    inputs = labels.Centroids.load(out).provenance["fit_inputs"]
    assert inputs["features"]["bf16"] is False and inputs["features"]["device_type"] == "cpu"
    assert inputs["teacher"]["checkpoint_sha256"] and inputs["fit"]["fit_dtype"] == "float64"
    # A finished folder reruns as a no-op; a different shard count for it is refused.
    assert prepare_labels.main(args) == 0
    os.remove(os.path.join(out, labels.MANIFEST_NAME))  # as if killed during assembly
    with pytest.raises(UserError, match="drop --num_shards to resume"):
        prepare_labels.main(args + ["--num_shards", "3"])  # the last flag wins: 3, not 4
    assert prepare_labels.main(args) == 0  # the same command assembles it again
    assert labels.LabelledCorpus.load(out).manifest["items"]["labelled"] == 8
    # Other centroids given for the same folder are refused too.
    other = labels.Centroids.load(out)
    other.centroids = other.centroids + 1.0
    path = other.save(tmp_path / "other.safetensors")
    with pytest.raises(UserError, match="holds other centroids"):
        prepare_labels.main(label_args(data, out, cache, "--centroids", path))


def test_map_reuses_the_fit_features_and_teacher_runs_once_per_item(tmp_path, monkeypatch):
    """With the fit-feature store the teacher sees every frame once (1.0 passes); without it the fit
    subset is computed twice. Both give the same ids (MFCC features do not depend on batching)."""
    prepare_labels = prepare_labels_module()
    data, cache = str(tmp_path / "corpus"), str(tmp_path / "cache")
    write_corpus(data, num_items=10)
    frames = {"n": 0}
    original = labels.MFCCFeatures.frame_features

    def counting(self, waveforms, lengths=None):
        frames["n"] += int(sum(1 + int(n) // self.hop_length for n in lengths)) if lengths is not None else 0
        return original(self, waveforms, lengths)

    monkeypatch.setattr(labels.MFCCFeatures, "frame_features", counting)
    corpus_frames = sum(
        1 + len(sf.read(os.path.join(data, f))[0]) // 160 for f in os.listdir(data) if f.endswith(".flac")
    )
    runs = {}
    for name, budget in (("store", "1"), ("no_store", "0")):
        frames["n"] = 0
        args = label_args(data, str(tmp_path / name), cache, "--fit_feature_budget_gb", budget)
        assert prepare_labels.main(args) == 0
        runs[name] = frames["n"] / corpus_frames
    fit = labels.Centroids.load(tmp_path / "store").provenance
    assert 0 < fit["items_used"] < 10
    assert runs["store"] == pytest.approx(1.0)
    assert runs["no_store"] > 1.1  # the fit subset (~40 %) went through the teacher twice
    assert ids_of(str(tmp_path / "store")) == ids_of(str(tmp_path / "no_store"))


def test_shard_plan_sizes_by_audio_hours_on_chunk_boundaries():
    assert labels.ShardPlan.default_num_shards(960.0, 4.0, 1) == 240
    assert labels.ShardPlan.default_num_shards(0.01, 4.0, 1) == 1
    assert labels.ShardPlan.default_num_shards(0.01, 4.0, 8) == 8  # at least one per process
    plan = labels.ShardPlan.make("f", {}, num_items=10, chunk_size=3, num_shards=3)
    assert plan.bounds == [(0, 3), (3, 6), (6, 10)]
    assert all(b % 3 == 0 for b, _ in plan.bounds)
    assert labels.ShardPlan.make("f", {}, 5, 4, 9).bounds == [(0, 4), (4, 5)]  # no empty shards
    # With durations, each shard holds about the same audio (cut at the nearest chunk boundary).
    seconds = [9.0, 1, 1, 1, 1, 1, 1, 1, 1, 1]
    balanced = labels.ShardPlan.make("f", {}, 10, 1, 2, seconds)
    assert balanced.bounds == [(0, 1), (1, 10)] and balanced.estimated_hours == pytest.approx(18 / 3600)
    assert labels.ShardPlan.make("f", {}, 10, 2, 2, seconds).bounds == [(0, 2), (2, 10)]


def test_input_differences_names_nested_fields():
    old = {"k": 256, "fit": {"seed": 0, "fit_hours": None}, "features": {"bf16": True}}
    new = {"k": 256, "fit": {"seed": 1, "fit_hours": None}, "features": {"bf16": False}}
    assert labels.input_differences(old, new) == [
        "features.bf16: true (then) vs false (now)",
        "fit.seed: 0 (then) vs 1 (now)",
    ]
    assert json.dumps(labels.input_differences(old, old)) == "[]"
