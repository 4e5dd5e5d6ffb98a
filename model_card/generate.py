"""A checkpoint's config, label provenance and ``results.json`` in, its Hub model card out.

Every evaluation number in the card comes from ``results.json`` (written by
``training/evaluate.py``), rendered exactly as stored; the card's ``model-index`` holds the
headline numbers a reader compares (EER, minDCF, accuracy, DER: last and best layer) and links
``results.json`` for the rest. The training section states only what the checkpoint records:
the label source (teacher, its feature dimension and output, k, alignment, fit subset, skipped
items) comes from the centroids' provenance JSON saved with the checkpoint and is cross-checked
against ``config.json``; without provenance the card says the label source is unknown, and when
the two disagree building the card fails (``UserError``, one line naming both). The objective
comes from ``config.json``. Nothing here measures or invents a number.

Usage (the push script calls :func:`build_model_card`; this CLI only writes the card)::

    python model_card/generate.py --checkpoint runs/demo/final --repo_id org/delulu \
        --results runs/eval/results.json --output README.md
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

TEMPLATE_PATH = Path(__file__).with_name("template.md")

#: Model-index task types for the evaluation suite's task names.
TASK_TYPES = {
    "verification": "speaker-verification",
    "verification_downstream": "speaker-verification",
    "identification": "speaker-identification",
    "profiling": "audio-classification",
    "counting": "speaker-counting",
    "diarization": "speaker-diarization",
}
#: The metrics a reader compares across models: they alone make the model-index. Everything else
#: (counts, classes, thresholds, kNN settings, chance levels, per-layer curves) is in results.json.
HEADLINE_METRICS = re.compile(
    r"(best_layer_)?(eer|min_dcf_0\.01|min_dcf_0\.05|accuracy|macro_f1|der_(known|estimated)_collar_[0-9.]+)"
)
#: Last-layer numbers that are also given at the best layer (the best layer is picked by the task's
#: main metric, which the results store as ``best_layer_<metric>``; these come from ``per_layer``).
BEST_LAYER_EXTRAS = ("min_dcf_0.01", "min_dcf_0.05", "der_known_collar_0.5")
#: Provenance fields that describe the subset the centroids were fitted on.
FIT_KEYS = ("items_used", "audio_seconds_used", "frames_used", "frames_seen", "max_frames", "fit_hours")
#: Where the published repository keeps the evaluation's full output.
RESULTS_FILE = "results.json"


# --------------------------------------------------------------------------------------------------
# Evaluation: the tables and the model-index
# --------------------------------------------------------------------------------------------------


def flatten_metrics(metrics: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted_name, value)`` for every scalar leaf (lists are per-layer curves: left to plots)."""
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from flatten_metrics(value, f"{name}.")
        elif isinstance(value, (int, float, str)) and not isinstance(value, bool) or value is None:
            yield name, value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def headline_metrics(metrics: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any, str]]:
    """``(dotted_name, value, label)`` of the numbers a reader compares, from one task's results.

    Last-layer numbers are the top-level ones; best-layer numbers are ``best_layer_<metric>`` and
    the ``BEST_LAYER_EXTRAS`` of the ``per_layer`` entry that ``best_layer`` indexes. The label
    names the best layer when the results do.
    """
    layer = metrics.get("best_layer_name")
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from headline_metrics(value, f"{name}.")
        elif _is_number(value) and HEADLINE_METRICS.fullmatch(key):
            best = key.startswith("best_layer_") and layer is not None
            yield name, value, f"{name} ({layer})" if best else name
    best = metrics.get("best_layer")
    entry = next(
        (e for e in metrics.get("per_layer") or [] if isinstance(e, dict) and e.get("index") == best), None
    )
    if entry is not None:
        for key in BEST_LAYER_EXTRAS:
            if _is_number(entry.get(key)) and f"best_layer_{key}" not in metrics:
                name = f"{prefix}best_layer_{key}"
                yield name, entry[key], f"{name} ({entry.get('layer', best)})"


def eval_results_from(results: dict[str, Any]) -> list[EvalResult]:
    """One ``EvalResult`` per headline metric of every task, on the results' dataset."""
    data = str(results["data"])
    dataset = Path(data.rstrip("/")).name or data
    out = []
    for task, metrics in results["tasks"].items():
        if not isinstance(metrics, dict) or "error" in metrics:
            continue
        for name, value, label in headline_metrics(metrics):
            out.append(
                EvalResult(
                    task_type=TASK_TYPES.get(task, task),
                    task_name=task,
                    dataset_type=dataset,
                    dataset_name=dataset,
                    metric_type=name,
                    metric_name=f"{task}/{label}",
                    metric_value=value,
                )
            )
    return out


def evaluation_section(results: dict[str, Any] | None, plots: list[str]) -> str:
    if results is None:
        return "No evaluation results were supplied with this checkpoint; it has not been evaluated."
    lines = [
        f"Evaluated with `training/evaluate.py` on `{results['data']}` (held-out speakers). "
        f"The model-index above holds the headline numbers; every number, with its per-layer values, "
        f"counts, seeds and trial lists, is in [`{RESULTS_FILE}`]({RESULTS_FILE}) in this repository.",
        "",
    ]
    for task, metrics in results["tasks"].items():
        rows = list(flatten_metrics(metrics))
        if not rows:
            continue
        lines += [f"### {task}", "", "| metric | value |", "| --- | --- |"]
        lines += [
            f"| {name} | {json.dumps(value) if not isinstance(value, str) else value} |"
            for name, value in rows
        ]
        lines.append("")
    if plots:
        lines += ["### Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots] + [""]
    return "\n".join(lines).rstrip()


# --------------------------------------------------------------------------------------------------
# Training: the label source (from the provenance) and the objective (from config.json)
# --------------------------------------------------------------------------------------------------


@dataclass
class LabelSource:
    """How the training targets were made, as the centroids' provenance records it (None: not recorded)."""

    file: str
    teacher: str | None
    feature_dim: int | None
    output: str | None
    k: int | None
    alignment: str | None
    normalization: str | None
    fit: dict[str, Any] = field(default_factory=dict)
    skipped: list[dict[str, Any]] | None = None


def _teacher_output(provenance: dict[str, Any], teacher: dict[str, Any]) -> str | None:
    """What of the teacher was clustered. ``featurizer_provenance`` records an ``output`` block only
    for non-default outputs (window embeddings); a teacher without one gave its backbone frames."""
    output = teacher.get("output")
    if isinstance(output, dict) and output.get("output"):
        kind = str(output["output"])
        if output.get("window_seconds") is not None:
            kind += f" ({output['window_seconds']} s windows)"
        return kind
    features = provenance.get("features")
    if features == "mfcc":
        return "MFCC frames (a content-label control, not a speaker teacher)"
    if features == "teacher":
        return "backbone frame features"
    return None


def label_source(
    config: dict[str, Any],
    provenance: dict[str, Any] | None,
    file: str = "the label provenance",
    config_file: str = "config.json",
) -> LabelSource | None:
    """Read the label source from ``provenance``; ``None`` without one (the card then says unknown).

    Raises ``UserError`` when ``config.json``'s label fields (``num_clusters``,
    ``label_teacher_name``, ``label_feature_dim``, ``label_frame_alignment``; None = not checked)
    contradict the provenance: a card built from either would state something false.
    """
    from delulu_hf.errors import UserError
    from delulu_hf.labels.centroids import label_config_problems

    if provenance is None:
        return None
    teacher = provenance.get("teacher")
    info = teacher if isinstance(teacher, dict) else {}
    name = teacher if isinstance(teacher, str) else info.get("name")
    source = LabelSource(
        file=file,
        teacher=name,
        feature_dim=provenance.get("feature_dim", info.get("feature_dim")),
        output=_teacher_output(provenance, info),
        k=provenance.get("k"),
        alignment=provenance.get("alignment"),
        normalization=provenance.get("normalization"),
        fit={key: provenance[key] for key in FIT_KEYS if key in provenance},
        skipped=(
            [s for s in provenance["skipped"] if isinstance(s, dict)]
            if isinstance(provenance.get("skipped"), list)
            else None
        ),
    )
    if isinstance(provenance.get("kmeans"), dict) and "seed" in provenance["kmeans"]:
        source.fit["seed"] = provenance["kmeans"]["seed"]
    fields = ("num_clusters", "label_teacher_name", "label_feature_dim", "label_frame_alignment")
    problems = label_config_problems(
        SimpleNamespace(**{key: config.get(key) for key in fields}),
        k=source.k,
        feature_dim=source.feature_dim,
        teacher_name=source.teacher,
        alignment=source.alignment,
    )
    if problems:
        raise UserError(f"{config_file} and {file} disagree about the labels: " + "; ".join(problems))
    return source


def _recorded(value: Any, fmt: str = "{}") -> str:
    return "not recorded" if value is None else fmt.format(value)


def targets_paragraph(config: dict[str, Any], source: LabelSource | None) -> list[str]:
    if source is None:
        return [
            "**Targets.** The label source is unknown: this checkpoint carries no k-means centroid "
            "provenance (`kmeans_centroids.json` / `centroids.json`), so which teacher, feature "
            "dimension and k made its training targets is not stated here. The model's cluster head "
            f"has {config.get('num_clusters')} outputs."
        ]
    lines = [
        f"**Targets.** k-means cluster ids (k = {_recorded(source.k)}) of the frame features of "
        f"`{_recorded(source.teacher)}` ({_recorded(source.feature_dim, '{}-dim')}, "
        f"{_recorded(source.output)}), aligned to the encoder's frames by "
        f"{_recorded(source.alignment, '`{}`')} alignment, feature normalisation "
        f"{_recorded(source.normalization, '`{}`')}. Source: `{source.file}` (the provenance saved with "
        "the centroids), checked against `config.json`."
    ]
    fit = source.fit
    if fit:
        parts = ", ".join(f"{key} = {json.dumps(value)}" for key, value in fit.items())
        lines += ["", f"The centroids were fitted on a subset of the pretraining audio: {parts}."]
    if source.skipped:
        shown = source.skipped[:10]
        names = "; ".join(
            f"`{s.get('name', s.get('index'))}` ({s.get('reason', 'no reason recorded')})" for s in shown
        )
        rest = len(source.skipped) - len(shown)
        more = f" and {rest} more (all listed in `{source.file}`)" if rest else ""
        lines += ["", f"Items skipped when fitting the centroids ({len(source.skipped)}): {names}{more}."]
    elif source.skipped is not None:
        lines += ["", "No item was skipped when fitting the centroids."]
    return lines


def objective_paragraph(config: dict[str, Any]) -> str:
    """The loss terms the config switches on (keys read with ``.get``: older configs lack some).

    loss = cluster_loss_weight * (masked CE + λ * denoising CE) + distill_loss_weight * regression
    + feature_penalty_weight * mean squared conv feature.
    """
    terms = []
    cluster = config.get("cluster_loss_weight", 1.0)
    if cluster:
        term = (
            "masked cluster prediction (cross-entropy over cosine logits / "
            f"{config.get('logit_temperature')} on masked frames; mask_time_prob {config.get('mask_time_prob')}, "
            f"spans of {config.get('mask_time_length')} frames)"
        )
        if cluster != 1:
            term += f" weighted by {cluster}"
        denoise = config.get("denoise_loss_weight") or 0
        if denoise:
            term += (
                f", with a denoising term weighted by λ = {denoise}: items corrupted with noise or another "
                f"utterance at {config.get('denoise_snr_min_db')}–{config.get('denoise_snr_max_db')} dB SNR "
                "must still predict the clean primary utterance's clusters"
            )
        else:
            term += ", no denoising term (λ = 0)"
        terms.append(term)
    distill = config.get("distill_loss_weight") or 0
    if distill:
        target = config.get("distill_target") or "frame"
        window = config.get("distill_window_seconds")
        window = f", {window} s windows" if target == "window-embedding" and window is not None else ""
        standardized = ", standardised per dimension" if config.get("distill_standardize") else ""
        terms.append(
            f"a distillation term weighted by {distill}: a linear head on the last layer regresses the "
            f"{target} features of `{config.get('distill_teacher_name') or 'a teacher (not recorded)'}` "
            f"({config.get('distill_dim')}-dim{window}{standardized}) with a {config.get('distill_loss')} "
            f"loss on {config.get('distill_frames')} frames"
        )
    penalty = config.get("feature_penalty_weight") or 0
    if penalty:
        terms.append(f"a penalty on the conv features' mean square weighted by {penalty}")
    if not terms:
        return "**Objective.** The config switches no loss term on (cluster_loss_weight = 0)."
    joined = "; plus ".join(terms)
    text = f"**Objective.** {joined[0].upper()}{joined[1:]}."
    if not cluster:
        text += " No cluster prediction (cluster_loss_weight = 0): the k-means ids only mark the real frames."
    grad_mult = config.get("feature_grad_mult")
    if grad_mult is not None and grad_mult != 1.0:
        text += f" The conv front end's gradient is scaled by {grad_mult}."
    return text


def training_section(
    config: dict[str, Any],
    training_config: dict[str, Any] | None,
    provenance: dict[str, Any] | None,
    source: LabelSource | None,
) -> str:
    lines = targets_paragraph(config, source)
    if provenance and source is not None:
        shown = {k: provenance[k] for k in sorted(provenance) if not isinstance(provenance[k], (dict, list))}
        lines += [
            "",
            f"Label provenance (`{source.file}`, scalar fields):",
            "",
            "```json",
            json.dumps(shown, indent=2),
            "```",
        ]
    lines += [
        "",
        objective_paragraph(config),
        "",
        f"**Encoder.** {config.get('num_hidden_layers')} layers, hidden size {config.get('hidden_size')}, "
        f"{config.get('num_attention_heads')} heads, 16 ms frames.",
    ]
    if training_config:
        lines += [
            "",
            "**Run configuration** (as used):",
            "",
            "```yaml",
            yaml.safe_dump(training_config, sort_keys=True).rstrip(),
            "```",
        ]
    else:
        lines += ["", "The training configuration was not supplied with this checkpoint."]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# The card
# --------------------------------------------------------------------------------------------------


def build_model_card(
    repo_id: str,
    config: dict[str, Any],
    results: dict[str, Any] | None = None,
    training_config: dict[str, Any] | None = None,
    provenance: dict[str, Any] | None = None,
    plots: list[str] | None = None,
    license: str = "apache-2.0",
    datasets: list[str] | None = None,
    provenance_file: str = "the label provenance",
) -> ModelCard:
    """Render the card. ``results`` must already be validated (``delulu_hf.hub.load_results``).

    ``provenance`` is the centroids' provenance JSON (``delulu_hf.hub.read_label_provenance``),
    ``provenance_file`` where the published repository keeps it (e.g. ``kmeans/centroids.json``).
    Raises ``UserError`` when it contradicts ``config``.
    """
    plots = plots or []
    model_name = repo_id.split("/")[-1]
    source = label_source(config, provenance, provenance_file)
    training = training_section(config, training_config, provenance, source)
    eval_results = eval_results_from(results) if results else None
    metric_names = sorted({r.metric_type for r in eval_results}) if eval_results else None
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="feature-extraction",
        license=license,
        tags=["speech", "audio", "self-supervised-learning", "speaker-verification", "delulu", "custom_code"],
        datasets=datasets,
        metrics=metric_names,
        model_name=model_name if eval_results else None,
        eval_results=eval_results or None,
    )
    architecture = (config.get("architectures") or ["DeluluModel"])[0]
    data_limitations = ""
    if training_config and "demo" in json.dumps(training_config).lower():
        data_limitations = (
            "- This checkpoint was trained on the small embedded demo corpus (synthetic MBROLA voices, "
            "non-commercial licence): it demonstrates the pipeline and is not a general-purpose encoder."
        )
    teacher = f"`{source.teacher}`" if source and source.teacher else "not recorded for this checkpoint"
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        model_name=model_name,
        repo_id=repo_id,
        architecture_sentence=f"`{architecture}` (loads as the bare encoder with `AutoModel`).",
        training_section=training,
        evaluation_section=evaluation_section(results, plots),
        teacher_name=teacher,
        data_limitations=data_limitations,
    )


def load_training_config(checkpoint: Path) -> dict[str, Any] | None:
    """The run configuration saved beside a checkpoint by ``training/pretrain.py``, if any."""
    for folder in (checkpoint, checkpoint.parent):
        for name in ("training_config.json", "training_config.yaml", "config.yaml"):
            path = folder / name
            if path.is_file():
                text = path.read_text()
                return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    return None


def card_for_checkpoint(
    checkpoint: str | Path,
    repo_id: str,
    results: dict[str, Any] | None = None,
    plots: list[str] | None = None,
    license: str = "apache-2.0",
    datasets: list[str] | None = None,
) -> ModelCard:
    """The card of a checkpoint folder: its ``config.json`` (checked to be DELULU), the label
    provenance saved with it, its run configuration. No weights are loaded."""
    from delulu_hf.hub import CENTROIDS_SUBDIR, read_checkpoint_config, read_label_provenance

    checkpoint = Path(checkpoint)
    config = read_checkpoint_config(checkpoint)
    found = read_label_provenance(checkpoint)
    provenance_file = f"{CENTROIDS_SUBDIR}/{found[0].name}" if found else "the label provenance"
    if found:  # name the user's files, not the published repository's, when they disagree
        label_source(config, found[1], str(found[0]), str(checkpoint / "config.json"))
    return build_model_card(
        repo_id,
        config,
        results=results,
        training_config=load_training_config(checkpoint),
        provenance=found[1] if found else None,
        plots=plots,
        license=license,
        datasets=datasets,
        provenance_file=provenance_file,
    )


@dataclass
class CardArguments:
    checkpoint: str = field(metadata={"help": "a DELULU save_pretrained folder"})
    repo_id: str = field(metadata={"help": "ORG/NAME on the Hub (used in the usage snippets)"})
    results: str | None = field(default=None, metadata={"help": "results.json from training/evaluate.py"})
    output: str = field(default="README.md", metadata={"help": "where to write the card"})


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from delulu_hf.atomic import atomic_write_text
    from delulu_hf.cli import ArgumentParser, require_path
    from delulu_hf.hub import load_results

    args = ArgumentParser(CardArguments, prog="generate.py", description=__doc__.split("\n\n")[0]).parse_one(
        argv
    )
    require_path(args.checkpoint, "--checkpoint", "dir")
    require_path(args.results, "--results", "file")
    results = load_results(args.results) if args.results else None
    card = card_for_checkpoint(args.checkpoint, args.repo_id, results)
    atomic_write_text(args.output, str(card))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from delulu_hf.cli import main_entry

    main_entry(main)
