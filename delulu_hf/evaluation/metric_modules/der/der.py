"""Diarization error rate (DER) as an `evaluate` metric module: segments per recording in, DER out.

Load it offline with ``evaluate.load("<path to this folder>")``. Each example is one recording:
its hypothesis and reference as lists of ``{"start", "end", "speaker"}`` segments. The per-file
error durations come from ``delulu_hf.evaluation.metrics.diarization_error_rate`` (computed by
``pyannote.metrics``) and are summed over files before dividing, so long recordings weigh more
(as md-eval and pyannote do).
"""

import datasets
import evaluate

from delulu_hf.evaluation.metrics import diarization_error_rate

_DESCRIPTION = """
DER = (false alarm + missed speech + speaker confusion) / total scored reference speech, with the
optimal one-to-one mapping of hypothesis to reference speakers (Hungarian algorithm). `collar` is
the total width of the no-score zone centred on each reference boundary (pyannote's convention:
0.5 removes 0.25 s either side); overlapped speech is scored unless `skip_overlap=True`.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `dict`): per recording, hypothesis segments
        `{"start": float, "end": float, "speaker": str}` in seconds.
    references (`list` of `list` of `dict`): per recording, reference segments, same format.
    collar (`float`, default 0.0): total collar width in seconds.
    skip_overlap (`bool`, default False): do not score regions with overlapping reference speakers.
Returns:
    der (`float`), false_alarm, missed, confusion, total (`float`, seconds summed over files),
    n_files (`int`).
Examples:
    >>> der = evaluate.load("delulu_hf/evaluation/metric_modules/der")
    >>> ref = [{"start": 0.0, "end": 6.0, "speaker": "A"}, {"start": 6.0, "end": 10.0, "speaker": "B"}]
    >>> hyp = [{"start": 0.0, "end": 10.0, "speaker": "spk0"}]
    >>> der.compute(predictions=[hyp], references=[ref])["der"]
    0.4
"""

_CITATION = """
@inproceedings{pyannote.metrics,
  author = {Herv\\'e Bredin},
  title = {pyannote.metrics: a toolkit for reproducible evaluation, diagnostic, and error analysis of speaker diarization systems},
  booktitle = {Interspeech},
  year = {2017}
}
"""

_SEGMENT = {
    "start": datasets.Value("float64"),
    "end": datasets.Value("float64"),
    "speaker": datasets.Value("string"),
}


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Der(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": [_SEGMENT], "references": [_SEGMENT]}),
            reference_urls=["https://github.com/pyannote/pyannote-metrics"],
        )

    def _compute(self, predictions, references, collar: float = 0.0, skip_overlap: bool = False):
        sums = {"false_alarm": 0.0, "missed": 0.0, "confusion": 0.0, "total": 0.0}
        for hyp, ref in zip(predictions, references):
            result = diarization_error_rate(ref, hyp, collar=collar, skip_overlap=skip_overlap)
            for key in sums:
                sums[key] += result[key]
        errors = sums["false_alarm"] + sums["missed"] + sums["confusion"]
        if sums["total"] > 0:
            der = errors / sums["total"]
        else:
            der = 0.0 if errors == 0 else float("inf")
        return {"der": der, **sums, "n_files": len(predictions)}
