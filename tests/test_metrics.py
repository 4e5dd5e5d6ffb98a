"""Metric correctness: hand-computed cases and brute-force references (scipy only for the DER mapping)."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest

from delulu_hf.evaluation import read_rttm, write_rttm
from delulu_hf.evaluation.metrics import (
    compute_eer,
    compute_min_dcf,
    diarization_error_rate,
    plot_det_curves,
)

MODULES = Path(__file__).resolve().parents[1] / "delulu_hf" / "evaluation" / "metric_modules"


# --------------------------------------------------------------------------------------------------
# Brute-force references: every operating point "accept when score >= t", written from the definitions
# --------------------------------------------------------------------------------------------------


def _operating_points(scores, labels):
    """(P_fa, P_miss, t) for t = +inf (accept nothing) and every distinct score, high to low."""
    scores, labels = np.asarray(scores, float), np.asarray(labels)
    n_tar, n_non = int((labels == 1).sum()), int((labels == 0).sum())
    points = [(0.0, 1.0, math.inf)]
    for t in sorted(set(scores.tolist()), reverse=True):
        accept = scores >= t
        p_fa = float((accept & (labels == 0)).sum()) / n_non
        p_miss = float((~accept & (labels == 1)).sum()) / n_tar
        points.append((p_fa, p_miss, t))
    return points


def brute_force_eer(scores, labels) -> float:
    """Walk the operating points until P_miss <= P_fa, then intersect the segment with P_fa = P_miss."""
    points = _operating_points(scores, labels)
    for (fa0, miss0, _), (fa1, miss1, _) in zip(points, points[1:]):
        if miss1 - fa1 <= 0:
            d0, d1 = miss0 - fa0, miss1 - fa1
            if d1 == 0:
                return fa1
            t = d0 / (d0 - d1)
            return fa0 + t * (fa1 - fa0)
    raise AssertionError("the last operating point always has P_miss = 0 <= P_fa = 1")


def brute_force_min_dcf(scores, labels, p_target, c_miss=1.0, c_fa=1.0) -> float:
    costs = [
        c_miss * miss * p_target + c_fa * fa * (1 - p_target)
        for fa, miss, _ in _operating_points(scores, labels)
    ]
    return min(costs) / min(c_miss * p_target, c_fa * (1 - p_target))


# --------------------------------------------------------------------------------------------------
# EER
# --------------------------------------------------------------------------------------------------


def test_eer_separable_scores_is_zero_with_threshold_between_classes():
    eer, threshold = compute_eer([0.1, 0.2, 0.3, 0.7, 0.8, 0.9], [0, 0, 0, 1, 1, 1])
    assert eer == 0.0
    assert 0.3 < threshold <= 0.7


def test_eer_reversed_scores_is_one():
    eer, _ = compute_eer([0.9, 0.8, 0.1, 0.2], [0, 0, 1, 1])
    assert eer == pytest.approx(1.0)


def test_eer_identical_scores_is_half():
    eer, threshold = compute_eer([0.5] * 10, [0, 1] * 5)
    assert eer == pytest.approx(0.5)
    assert threshold == pytest.approx(0.5)


def test_eer_hand_computed_interpolation():
    # Operating points: (FA, MISS) = (0, 1) -> (0, 0.5) at t=0.8 -> (0.5, 0.5) at t=0.4 -> ...
    # FNR - FPR hits 0 exactly at t = 0.4, so EER = 0.5.
    eer, threshold = compute_eer([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    assert eer == pytest.approx(0.5)
    assert threshold == pytest.approx(0.4)
    # targets 0.9, 0.6; non-targets 0.7, 0.2, 0.1 -> (FA, MISS) = (0, 1), (0, .5), (1/3, .5), (1/3, 0), ...
    # MISS - FA = 1, .5, 1/6, -1/3: the crossing lies on the vertical segment at FA = 1/3.
    eer, _ = compute_eer([0.9, 0.6, 0.7, 0.2, 0.1], [1, 1, 0, 0, 0])
    assert eer == pytest.approx(1 / 3)


@pytest.mark.parametrize("seed", range(6))
def test_eer_matches_brute_force_on_random_scores(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 300))
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]
    # Rounded scores create ties, the hard case for threshold sweeps.
    scores = np.round(rng.normal(size=n) + labels * rng.uniform(0, 2), 1)
    assert compute_eer(scores, labels)[0] == pytest.approx(brute_force_eer(scores, labels), abs=1e-12)


def test_eer_random_scores_near_half():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 4000)
    eer, _ = compute_eer(rng.normal(size=4000), labels)
    assert abs(eer - 0.5) < 0.03


def test_eer_threshold_reproduces_error_rates():
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1], 500)
    scores = rng.normal(size=1000) + 1.5 * labels
    eer, threshold = compute_eer(scores, labels)
    p_fa = np.mean(scores[labels == 0] >= threshold)
    p_miss = np.mean(scores[labels == 1] < threshold)
    assert abs(p_fa - eer) < 0.01 and abs(p_miss - eer) < 0.01


@pytest.mark.parametrize(
    "scores,labels,match",
    [
        ([0.1, 0.2], [1, 1], "at least one target"),
        ([0.1, 0.2], [0, 2], "labels must be 0"),
        ([0.1, float("nan")], [0, 1], "not finite"),
        ([0.1, 0.2, 0.3], [0, 1], "equal length"),
    ],
)
def test_eer_rejects_bad_input(scores, labels, match):
    with pytest.raises(ValueError, match=match):
        compute_eer(scores, labels)


# --------------------------------------------------------------------------------------------------
# minDCF
# --------------------------------------------------------------------------------------------------


def test_min_dcf_is_normalised():
    # A useless system never beats the trivial one: normalised minDCF = 1 exactly (reject everything).
    assert compute_min_dcf([0.5] * 6, [0, 1] * 3, p_target=0.01)[0] == pytest.approx(1.0)
    # Perfect separation costs nothing.
    assert compute_min_dcf([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1], p_target=0.05)[0] == 0.0


def test_min_dcf_hand_computed():
    # targets 0.9, 0.6; non-targets 0.7, 0.2, 0.1. Operating points (P_fa, P_miss):
    # (0,1) (0,.5) (1/3,.5) (1/3,0) (2/3,0) (1,0). With p_target = 0.5: C_det = .5*miss + .5*fa,
    # minimum 1/6 at (1/3, 0), C_def = 0.5 -> 1/3. With p_target = 0.01: minimum .01*.5 = .005
    # at (0, .5), C_def = .01 -> 0.5, threshold 0.9.
    scores, labels = [0.9, 0.6, 0.7, 0.2, 0.1], [1, 1, 0, 0, 0]
    assert compute_min_dcf(scores, labels, p_target=0.5)[0] == pytest.approx(1 / 3)
    value, threshold = compute_min_dcf(scores, labels, p_target=0.01)
    assert value == pytest.approx(0.5)
    assert threshold == pytest.approx(0.9)


def test_min_dcf_not_the_unnormalised_value():
    scores, labels = [0.9, 0.6, 0.7, 0.2, 0.1], [1, 1, 0, 0, 0]
    normalised = compute_min_dcf(scores, labels, p_target=0.01)[0]
    unnormalised = 0.01 * 0.5  # the raw C_det minimum some toolkits print
    assert normalised == pytest.approx(unnormalised / 0.01)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("p_target,c_miss,c_fa", [(0.01, 1, 1), (0.05, 1, 1), (0.5, 10, 1), (0.2, 1, 3)])
def test_min_dcf_matches_brute_force(seed, p_target, c_miss, c_fa):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 200)
    labels[:2] = [0, 1]
    scores = np.round(rng.normal(size=200) + labels, 2)
    value, threshold = compute_min_dcf(scores, labels, p_target, c_miss, c_fa)
    assert value == pytest.approx(brute_force_min_dcf(scores, labels, p_target, c_miss, c_fa), abs=1e-12)
    assert math.isfinite(threshold)


def test_min_dcf_rejects_bad_prior():
    with pytest.raises(ValueError, match="p_target"):
        compute_min_dcf([0.1, 0.9], [0, 1], p_target=0.0)


# --------------------------------------------------------------------------------------------------
# DER
# --------------------------------------------------------------------------------------------------


def test_der_perfect_with_other_labels_is_zero():
    ref = [(0, 4, "A"), (4, 7, "B"), (7, 10, "A")]
    hyp = [(0, 4, "x"), (4, 7, "y"), (7, 10, "x")]
    out = diarization_error_rate(ref, hyp)
    assert out == {"der": 0.0, "false_alarm": 0.0, "missed": 0.0, "confusion": 0.0, "total": 10.0}


def test_der_missed_speech():
    out = diarization_error_rate([(0, 10, "A"), (12, 14, "B")], [(0, 10, "x")])
    assert out["missed"] == pytest.approx(2.0)
    assert out["total"] == pytest.approx(12.0)
    assert out["der"] == pytest.approx(2 / 12)


def test_der_false_alarm():
    out = diarization_error_rate([(0, 10, "A")], [(0, 10, "x"), (10, 12, "y")])
    assert out["false_alarm"] == pytest.approx(2.0)
    assert out["confusion"] == 0.0
    assert out["der"] == pytest.approx(0.2)


def test_der_confusion_uses_optimal_mapping():
    # x overlaps A for 6 s and B for 4 s: mapping x -> A leaves 4 s of confusion.
    out = diarization_error_rate([(0, 6, "A"), (6, 10, "B")], [(0, 10, "x")])
    assert out["confusion"] == pytest.approx(4.0)
    assert out["der"] == pytest.approx(0.4)
    # Co-occurrence A-y 4 s, A-x 1 s, B-x 5 s: the best one-to-one mapping is y->A, x->B (1 s confusion).
    ref = [(0, 5, "A"), (5, 10, "B")]
    hyp = [(0, 4, "y"), (4, 10, "x")]
    out = diarization_error_rate(ref, hyp)
    assert out["confusion"] == pytest.approx(1.0)


def test_der_overlap_scored_and_skipped():
    ref = [(0, 10, "A"), (5, 10, "B")]
    hyp = [(0, 10, "x")]
    scored = diarization_error_rate(ref, hyp)
    assert scored["total"] == pytest.approx(15.0)  # overlap counts once per speaker
    assert scored["missed"] == pytest.approx(5.0)
    assert scored["der"] == pytest.approx(1 / 3)
    skipped = diarization_error_rate(ref, hyp, skip_overlap=True)
    assert skipped["total"] == pytest.approx(5.0)
    assert skipped["der"] == 0.0
    # Overlapped hypothesis on single-speaker reference: the extra speaker is a false alarm.
    out = diarization_error_rate([(0, 10, "A")], [(0, 10, "x"), (0, 3, "y")])
    assert out["false_alarm"] == pytest.approx(3.0)


def test_der_collar_is_total_width_around_reference_boundaries():
    ref = [(0, 5, "A"), (5, 10, "B")]
    hyp = [(0, 5.2, "x"), (5.2, 10, "y")]
    strict = diarization_error_rate(ref, hyp)
    assert strict["confusion"] == pytest.approx(0.2)
    assert strict["der"] == pytest.approx(0.02)
    # collar 0.5 removes 0.25 s either side of 0, 5 and 10: the 0.2 s error is forgiven, and
    # the scored speech is 10 - 4 * 0.25 = 9 s.
    collared = diarization_error_rate(ref, hyp, collar=0.5)
    assert collared["total"] == pytest.approx(9.0)
    assert collared["der"] == 0.0
    # collar 0.3 (0.15 each side) does not cover the 0.2 s error: 0.05 s of it remains.
    partly = diarization_error_rate(ref, hyp, collar=0.3)
    assert partly["confusion"] == pytest.approx(0.05)
    assert partly["total"] == pytest.approx(10 - 4 * 0.15)


def test_der_collar_ignores_hypothesis_boundaries():
    # A hypothesis boundary inside a reference segment gets no collar.
    out = diarization_error_rate([(0, 10, "A")], [(0, 6, "x"), (6, 10, "y")], collar=1.0)
    assert out["total"] == pytest.approx(9.0)
    assert out["confusion"] == pytest.approx(3.5)


def test_der_empty_cases():
    assert diarization_error_rate([], [])["der"] == 0.0
    assert diarization_error_rate([], [(0, 1, "x")])["der"] == math.inf
    assert diarization_error_rate([(0, 1, "A")], [])["der"] == pytest.approx(1.0)


def test_der_rejects_bad_segments():
    with pytest.raises(ValueError, match="reference segment 1"):
        diarization_error_rate([(0, 1, "A"), (3, 2, "B")], [])
    with pytest.raises(ValueError, match="hypothesis segment 0"):
        diarization_error_rate([(0, 1, "A")], [(0, 1)])


def brute_force_der(ref, hyp, step=0.01):
    """Frame-level DER with the mapping found by trying every injective assignment."""
    end = max(e for _, e, _ in ref + hyp)
    times = (np.arange(int(round(end / step))) + 0.5) * step
    ref_spk, hyp_spk = sorted({s for *_, s in ref}), sorted({s for *_, s in hyp})

    def active(segs, t):
        return {s for a, b, s in segs if a <= t < b}

    frames = [(active(ref, t), active(hyp, t)) for t in times]
    best = None
    # pad with None so every hypothesis speaker may also stay unmapped
    for perm in itertools.permutations(ref_spk + [None] * len(hyp_spk), len(hyp_spk)):
        mapping = dict(zip(hyp_spk, perm))
        err = total = 0
        for r, h in frames:
            correct = sum(1 for x in h if mapping[x] in r)
            total += len(r)
            err += max(len(r), len(h)) - correct
        if best is None or err < best[0]:
            best = (err, total)
    return best[0] / best[1]


@pytest.mark.parametrize("seed", range(8))
def test_der_matches_brute_force_frame_reference(seed):
    rng = np.random.default_rng(seed)

    def segments(speakers, n):
        out = []
        for _ in range(n):
            start = round(float(rng.uniform(0, 9)), 2)
            out.append((start, round(start + float(rng.uniform(0.1, 2.0)), 2), str(rng.choice(speakers))))
        return out

    ref = segments(["A", "B", "C"], int(rng.integers(2, 7)))
    hyp = segments(["x", "y", "z", "w"][: int(rng.integers(1, 5))], int(rng.integers(1, 7)))
    assert diarization_error_rate(ref, hyp)["der"] == pytest.approx(brute_force_der(ref, hyp), abs=1e-9)


def frame_der(ref, hyp, collar=0.0, step=0.001):
    """Independent DER reference: 1 ms frames, Hungarian mapping (scipy) on frame counts.

    Frames are scored inside the extent of reference and hypothesis together, except those within
    collar / 2 of a reference boundary; a speaker listed twice at one instant counts once.
    """
    from scipy.optimize import linear_sum_assignment

    everything = ref + hyp
    start, end = min(s for s, _, _ in everything), max(e for _, e, _ in everything)
    t = start + (np.arange(int(np.ceil((end - start) / step))) + 0.5) * step
    t = t[t < end]
    scored = np.ones(len(t), bool)
    if collar > 0:
        for s, e, _ in ref:
            for b in (s, e):
                scored &= np.abs(t - b) >= collar / 2
    t = t[scored]

    def activity(segs):
        names = sorted({spk for *_, spk in segs})
        act = np.zeros((len(t), len(names)), bool)
        for s, e, spk in segs:
            act[:, names.index(spk)] |= (t >= s) & (t < e)
        return act

    R, H = activity(ref), activity(hyp)
    n_ref, n_hyp = R.sum(1), H.sum(1)
    correct = np.zeros(len(t))
    if R.shape[1] and H.shape[1]:
        cooc = R.T.astype(float) @ H.astype(float)
        for i, j in zip(*linear_sum_assignment(cooc, maximize=True)):
            correct += R[:, i] & H[:, j]
    missed = np.maximum(0, n_ref - n_hyp).sum()
    false_alarm = np.maximum(0, n_hyp - n_ref).sum()
    confusion = (np.minimum(n_ref, n_hyp) - correct).sum()
    return (missed + false_alarm + confusion) / n_ref.sum()


def _random_conversation(rng, speakers, seconds=20.0):
    """Turns of random speakers with gaps and overlaps (times not on any grid)."""
    out, t = [], float(rng.uniform(0, 1))
    while t < seconds:
        length = float(rng.uniform(0.3, 3.0))
        out.append((t, t + length, str(rng.choice(speakers))))
        t += length + float(rng.uniform(-0.8, 1.0))  # negative: the next turn overlaps this one
    return out


def _random_pairs(n=50, seed=1234):
    rng = np.random.default_rng(seed)
    pairs = []
    for k in range(n):
        ref = _random_conversation(rng, ["A", "B", "C", "D"][: int(rng.integers(2, 5))])
        if k % 2:  # an independent segmentation: large errors, many confusions
            hyp = _random_conversation(rng, ["x", "y", "z"][: int(rng.integers(1, 4))])
        else:  # a plausible system: jittered boundaries, some relabelled, dropped and extra turns
            names = {spk: f"h{i}" for i, spk in enumerate(rng.permutation(["A", "B", "C", "D"]))}
            hyp = []
            for s, e, spk in ref:
                if rng.random() < 0.1:
                    continue
                s, e = s + float(rng.normal(0, 0.2)), e + float(rng.normal(0, 0.2))
                label = names[spk] if rng.random() > 0.15 else str(rng.choice(list(names.values())))
                if e > s:
                    hyp.append((s, e, label))
            hyp.append((float(rng.uniform(0, 18)), float(rng.uniform(18, 21)), "h9"))
        pairs.append((ref, hyp))
    return pairs


@pytest.mark.parametrize("collar", [0.0, 0.5])
def test_der_matches_frame_level_hungarian_reference(collar):
    """pyannote.metrics (exact segment times) against 1 ms frames with scipy's Hungarian mapping."""
    pairs = _random_pairs()
    with_overlap = sum(
        any(a[2] != b[2] and a[1] > b[0] for a, b in itertools.combinations(sorted(ref), 2))
        for ref, _ in pairs
    )
    assert with_overlap >= 0.8 * len(pairs)  # the hard case: overlapped reference speech
    worst = 0.0
    for ref, hyp in pairs:
        ours = diarization_error_rate(ref, hyp, collar=collar)["der"]
        worst = max(worst, abs(ours - frame_der(ref, hyp, collar)))
    assert worst < 1e-2


def test_rttm_roundtrip(tmp_path):
    segs = [(0.0, 1.5, "A"), (1.25, 3.0, "B")]
    write_rttm(tmp_path / "f.rttm", "f", segs)
    assert read_rttm(tmp_path / "f.rttm") == {"f": segs}


def test_det_plot_writes_png(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 50)
    path = plot_det_curves({"sys": (rng.normal(size=100) + labels, labels)}, tmp_path / "det.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------------
# evaluate modules
# --------------------------------------------------------------------------------------------------


def test_evaluate_modules_load_offline_and_agree(tmp_path, monkeypatch):
    evaluate = pytest.importorskip("evaluate")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 100).tolist()
    scores = (rng.normal(size=100) + np.array(labels)).tolist()

    eer = evaluate.load(str(MODULES / "eer"))
    out = eer.compute(predictions=scores, references=labels)
    assert out["eer"] == pytest.approx(compute_eer(scores, labels)[0])
    assert out["n_target"] + out["n_nontarget"] == 100

    min_dcf = evaluate.load(str(MODULES / "min_dcf" / "min_dcf.py"))
    out = min_dcf.compute(predictions=scores, references=labels, p_target=0.05)
    assert out["min_dcf"] == pytest.approx(compute_min_dcf(scores, labels, p_target=0.05)[0])

    der = evaluate.load(str(MODULES / "der"))
    ref = [{"start": 0.0, "end": 6.0, "speaker": "A"}, {"start": 6.0, "end": 10.0, "speaker": "B"}]
    hyp = [{"start": 0.0, "end": 10.0, "speaker": "s0"}]
    out = der.compute(predictions=[hyp, []], references=[ref, ref])
    # file 1: 4 s confusion; file 2: 10 s missed; 20 s of speech in all.
    assert out["der"] == pytest.approx(14 / 20)
    assert out["n_files"] == 2
