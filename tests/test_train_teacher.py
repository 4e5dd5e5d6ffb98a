"""Teacher training: loss, batching and augmentation pieces, and a tiny end-to-end run of
``training/train_teacher.py`` (checkpoints, resume, both output formats, held-out EER) on synthetic
speakers generated here."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from delulu_hf.augment import coloured_noise
from delulu_hf.teacher.redimnet import ReDimNet
from delulu_hf.teacher.training import (
    AAMSoftmax,
    CropCollator,
    NoiseAugmenter,
    TeacherTrainingConfig,
    equal_error_rate,
)

ROOT = Path(__file__).resolve().parents[1]
TINY_OVERRIDES = {
    "F": 16,
    "C": 4,
    "embed_dim": 32,
    "stages_setup": [[1, 1, 1, [[3, 3]], 8], [2, 1, 1, [[3, 3]], 8]],
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on the shared test machine, oneDNN's worker threads otherwise spin against
    other jobs and run many times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _load_cli():
    spec = importlib.util.spec_from_file_location("train_teacher_cli", ROOT / "training" / "train_teacher.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _voice(f0: float, formants: tuple[float, ...], seconds: float, rng: np.random.Generator) -> np.ndarray:
    """A crude synthetic talker: a jittered harmonic source through speaker-specific resonances,
    chopped into syllables. Different (f0, formants) sound like different speakers to a small model."""
    sr = 16000
    t = np.arange(int(seconds * sr)) / sr
    pitch = f0 * (1 + 0.05 * np.sin(2 * np.pi * rng.uniform(1, 3) * t + rng.uniform(0, 6)))
    phase = 2 * np.pi * np.cumsum(pitch) / sr
    wave = np.zeros_like(t)
    for h in range(1, 25):
        freq = h * pitch
        gain = sum(np.exp(-(((freq - f) / 120.0) ** 2)) for f in formants) + 0.05
        wave += gain * np.sin(h * phase) / h
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(3, 5) * t) ** 2
    wave = wave * envelope + 0.01 * rng.standard_normal(len(t))
    return (0.3 * wave / np.abs(wave).max()).astype(np.float32)


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory) -> Path:
    """An audiofolder like data/demo_corpus: 4 train + 2 test speakers, metadata.csv and trials.csv."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    speakers = {
        "tr_a": (110, (500, 1500)),
        "tr_b": (150, (700, 1100)),
        "tr_c": (210, (400, 2200)),
        "tr_d": (260, (900, 1700)),
        "te_e": (130, (600, 1900)),
        "te_f": (230, (800, 1300)),
    }
    rows = []
    for spk, (f0, formants) in speakers.items():
        split = "train" if spk.startswith("tr") else "test"
        for k in range(5 if split == "train" else 3):
            name = f"audio/{spk}_{k}.flac"
            (root / "audio").mkdir(exist_ok=True)
            sf.write(root / name, _voice(f0, formants, rng.uniform(1.0, 1.6), rng), 16000)
            rows.append({"file_name": name, "speaker_id": spk, "split": split})
    with open(root / "metadata.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["file_name", "speaker_id", "split"])
        writer.writeheader()
        writer.writerows(rows)
    test = [r for r in rows if r["split"] == "test"]
    with open(root / "trials.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["enroll_file", "test_file", "target"])
        for i, a in enumerate(test):
            for b in test[i + 1 :]:
                writer.writerow([a["file_name"], b["file_name"], int(a["speaker_id"] == b["speaker_id"])])
    return root


def test_aam_softmax_margin_penalises_the_true_class():
    torch.manual_seed(0)
    head = AAMSoftmax(8, 5, margin=0.2, scale=30.0)
    emb, labels = torch.randn(16, 8), torch.randint(0, 5, (16,))
    loss_margin, logits = head(emb, labels)
    loss_plain, plain = head(emb, labels, margin=0.0)
    assert loss_margin > loss_plain
    true = torch.arange(16), labels
    assert (logits[true] < plain[true]).all()  # only the target logit moves
    other = ~torch.nn.functional.one_hot(labels, 5).bool()
    torch.testing.assert_close(logits[other], plain[other])


def test_crop_collator_speed_perturbation_makes_new_identities():
    rng = np.random.default_rng(0)
    items = [
        (rng.standard_normal(int(rng.uniform(8000, 60000))).astype(np.float32), spk % 3) for spk in range(12)
    ]
    collator = CropCollator(3, (2.0, 3.0), speeds=(1.0, 0.9, 1.1), seed=0)
    batch = collator(items)
    assert collator.num_classes == 9
    assert 32000 <= batch["waveforms"].shape[1] <= 48000 and batch["waveforms"].shape[0] == 12
    labels = batch["labels"].numpy()
    assert set(labels % 3) <= {0, 1, 2} and labels.max() < 9
    assert all(label % 3 == spk for label, (_, spk) in zip(labels, items))
    with pytest.raises(ValueError, match="1.0"):
        CropCollator(3, speeds=(0.9, 1.0))


def test_noise_augmenter_hits_the_requested_snr():
    rng = np.random.default_rng(0)
    clean = [np.sin(np.linspace(0, 400, 32000)).astype(np.float32) for _ in range(4)]
    noisy = NoiseAugmenter(prob=1.0, snr_db=(10.0, 10.0), babble_snr_db=(10.0, 10.0))(clean, rng)
    for c, n in zip(clean, noisy):
        snr = 10 * np.log10(np.mean(c**2) / np.mean((n - c) ** 2))
        assert snr == pytest.approx(10.0, abs=0.01)
    pink = coloured_noise(16000, 1.0, rng)
    spectrum = np.abs(np.fft.rfft(pink)) ** 2
    assert spectrum[10:100].mean() > 10 * spectrum[4000:8000].mean()


def test_equal_error_rate():
    assert equal_error_rate([0.9, 0.8, 0.2, 0.1], [1, 1, 0, 0]) == 0.0
    assert equal_error_rate([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0]) == 1.0
    assert equal_error_rate([0.9, 0.3, 0.6, 0.1], [1, 1, 0, 0]) == pytest.approx(0.5)


def test_train_teacher_lowers_loss_saves_both_formats_and_resumes(tiny_corpus, tmp_path):
    cli = _load_cli()
    out = tmp_path / "run"
    args = [
        "--data", str(tiny_corpus),
        "--trials", str(tiny_corpus / "trials.csv"),
        "--output_dir", str(out),
        "--model_overrides", json.dumps(TINY_OVERRIDES),
        "--batch_size", "8",
        "--learning_rate", "5e-3",
        "--warmup_steps", "2",
        "--margin_warmup_fraction", "0",
        "--crop_seconds", "0.6", "0.8",
        "--speeds", "1.0", "1.1",
        "--log_every", "5",
    ]  # fmt: skip
    summary = cli.main([*args, "--max_steps", "20", "--save_every", "10"])
    losses = summary["losses"]
    assert len(losses) == 20
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
    assert summary["num_classes"] == 8  # 4 speakers x 2 speeds
    assert 0.0 <= summary["heldout_eer"] <= 1.0 and summary["heldout_trials"] == 15

    for name in (
        "config.json",
        "model.safetensors",
        "redimnet-official.pt",
        "train_summary.json",
        "loss.png",
    ):
        assert (out / name).is_file(), name
    ours = ReDimNet.from_pretrained(out)
    official = ReDimNet.from_official_checkpoint(out / "redimnet-official.pt")
    x = torch.randn(1, 8000)
    with torch.inference_mode():
        torch.testing.assert_close(ours(x), official(x), rtol=0, atol=0)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000010", "step_0000020"]
    progress = json.loads((out / "checkpoints" / "step_0000020" / "progress.json").read_text())
    assert progress["step"] == 20 and progress["losses"] == pytest.approx(losses)
    assert not list((out / "checkpoints").rglob("custom_checkpoint*")), "no pickled custom state"

    # A longer run in the same folder continues from step 20 with the saved loss history.
    resumed = cli.main([*args, "--max_steps", "22", "--save_every", "10"])
    assert len(resumed["losses"]) == 22
    assert resumed["losses"][:20] == pytest.approx(losses)
    assert (out / "checkpoints" / "step_0000022").is_dir()


def test_train_teacher_cli_flags_old_spellings_and_typos(capsys):
    cli = _load_cli()
    config = cli.parse_args(
        ["--data", "d", "--output_dir", "o", "--model_overrides.C", "8", "--crop_seconds", "1", "2"]
    )
    assert isinstance(config, TeacherTrainingConfig)
    assert (config.model_overrides, config.crop_seconds, config.speeds) == ({"C": 8}, (1.0, 2.0), (1.0,))
    assert (config.max_steps, config.preset, config.resume, config.num_threads) == (300, "b0", True, None)
    # The old spellings (JSON overrides, hyphens, --threads, --no-official, --no-resume) still work.
    old = cli.parse_args(
        ["--data", "d", "--output-dir", "o", "--model-overrides", '{"C": 8}', "--max-steps", "5"]
        + ["--speeds", "1.0", "0.9", "--threads", "1", "--no-official", "--no-resume"]
    )
    assert (old.output_dir, old.model_overrides, old.max_steps, old.speeds) == ("o", {"C": 8}, 5, (1.0, 0.9))
    assert (old.num_threads, old.save_official, old.resume) == (1, False, False)
    err = capsys.readouterr().err
    assert "--threads is deprecated, use --num_threads" in err and "--max-steps is deprecated" in err
    for argv, message in (
        (["--max_step", "5"], "did you mean --max_steps?"),
        (["--crop_seconds", "1"], "crop_seconds needs two values"),
        ([], "required"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            cli.parse_args(["--data", "d", "--output_dir", "o", *argv] if argv else ["--data", "d"])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
