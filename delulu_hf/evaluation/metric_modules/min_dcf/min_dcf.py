"""Normalised minimum detection cost (minDCF, NIST SRE) as an `evaluate` metric module.

Load it offline with ``evaluate.load("<path to this folder>")``. The numbers come from
``delulu_hf.evaluation.metrics.compute_min_dcf``.
"""

import datasets
import evaluate

from delulu_hf.evaluation.metrics import compute_min_dcf

_DESCRIPTION = """
Minimum of C_det(t) = c_miss * P_miss(t) * p_target + c_fa * P_fa(t) * (1 - p_target) over score
thresholds t, normalised by C_def = min(c_miss * p_target, c_fa * (1 - p_target)) (the NIST SRE
definition; 1.0 means no better than a trivial system). Note that some toolkits report the
un-normalised value, which is 100x smaller at p_target = 0.01.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `float`): one score per trial, higher = more likely the same speaker.
    references (`list` of `int`): 1 for target trials, 0 for non-target trials.
    p_target (`float`, default 0.01): prior probability of a target trial.
    c_miss (`float`, default 1): cost of a miss.
    c_fa (`float`, default 1): cost of a false alarm.
Returns:
    min_dcf (`float`): normalised minimum detection cost.
    threshold (`float`): score threshold where it is reached (accept when score >= threshold).
    p_target (`float`), n_target (`int`), n_nontarget (`int`).
Examples:
    >>> min_dcf = evaluate.load("delulu_hf/evaluation/metric_modules/min_dcf")
    >>> min_dcf.compute(predictions=[0.1, 0.2, 0.8, 0.9], references=[0, 0, 1, 1], p_target=0.05)["min_dcf"]
    0.0
"""

_CITATION = """
@misc{nist_sre_2019_plan,
  title = {NIST 2019 Speaker Recognition Evaluation Plan},
  author = {{National Institute of Standards and Technology}},
  year = {2019}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MinDcf(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("float64"), "references": datasets.Value("int32")}
            ),
        )

    def _compute(
        self, predictions, references, p_target: float = 0.01, c_miss: float = 1.0, c_fa: float = 1.0
    ):
        value, threshold = compute_min_dcf(
            predictions, references, p_target=p_target, c_miss=c_miss, c_fa=c_fa
        )
        n_target = int(sum(1 for r in references if r == 1))
        return {
            "min_dcf": value,
            "threshold": threshold,
            "p_target": p_target,
            "n_target": n_target,
            "n_nontarget": len(references) - n_target,
        }
