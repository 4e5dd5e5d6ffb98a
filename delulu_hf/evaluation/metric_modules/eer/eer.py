"""Equal error rate (EER) as an `evaluate` metric module.

Load it offline with ``evaluate.load("<path to this folder>")``. The numbers come from
``delulu_hf.evaluation.metrics.compute_eer`` so the module and the library never disagree.
"""

import datasets
import evaluate

from delulu_hf.evaluation.metrics import compute_eer

_DESCRIPTION = """
Equal error rate of speaker-verification trials: the operating point where the false-acceptance
rate equals the false-rejection rate, linearly interpolated on the ROC curve (scikit-learn
roc_curve, then FPR = 1 - TPR). Returned as a fraction in [0, 1] with the score threshold where it
is reached (accept when score >= threshold).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `float`): one score per trial, higher = more likely the same speaker.
    references (`list` of `int`): 1 for target (same speaker) trials, 0 for non-target trials.
Returns:
    eer (`float`): equal error rate, 0..1.
    threshold (`float`): score threshold at the EER.
    n_target (`int`), n_nontarget (`int`): trial counts.
Examples:
    >>> eer = evaluate.load("delulu_hf/evaluation/metric_modules/eer")
    >>> eer.compute(predictions=[0.1, 0.4, 0.35, 0.8], references=[0, 0, 1, 1])["eer"]
    0.5
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Eer(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("float64"), "references": datasets.Value("int32")}
            ),
            reference_urls=[
                "https://scikit-learn.org/stable/modules/generated/sklearn.metrics.roc_curve.html"
            ],
        )

    def _compute(self, predictions, references):
        eer, threshold = compute_eer(predictions, references)
        n_target = int(sum(1 for r in references if r == 1))
        return {
            "eer": eer,
            "threshold": threshold,
            "n_target": n_target,
            "n_nontarget": len(references) - n_target,
        }
