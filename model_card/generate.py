"""Generate the Hub model card of a DELULU checkpoint from real evaluation results.

Every evaluation number in the card comes from ``results.json`` (written by
``training/evaluate.py``), rendered exactly as stored, and the same numbers make the card's
``model-index``; the training section comes from the checkpoint's config, its training config
and the k-means label provenance. Nothing here measures or invents a number.

Usage (the push script calls :func:`build_model_card`; this CLI only writes the card)::

    python model_card/generate.py --checkpoint runs/demo/final --repo-id org/delulu \
        --results runs/eval/results.json --output README.md
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
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
#: Bookkeeping leaves: shown in the tables but not metrics of the model-index.
NON_METRIC_KEYS = {"seed", "best_layer", "last_layer", "num_layers", "k", "num_speakers", "collar", "layer"}


def flatten_metrics(metrics: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted_name, value)`` for every scalar leaf (lists are per-layer curves: left to plots)."""
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from flatten_metrics(value, f"{name}.")
        elif isinstance(value, (int, float, str)) and not isinstance(value, bool) or value is None:
            yield name, value


def is_metric(name: str, value: Any) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and leaf not in NON_METRIC_KEYS
        and not leaf.startswith("n_")
    )


def eval_results_from(results: dict[str, Any]) -> list[EvalResult]:
    """One ``EvalResult`` per numeric metric of every task, on the results' dataset."""
    data = str(results["data"])
    dataset = Path(data.rstrip("/")).name or data
    out = []
    for task, metrics in results["tasks"].items():
        for name, value in flatten_metrics(metrics):
            if is_metric(name, value):
                out.append(
                    EvalResult(
                        task_type=TASK_TYPES.get(task, task),
                        task_name=task,
                        dataset_type=dataset,
                        dataset_name=dataset,
                        metric_type=name,
                        metric_name=f"{task}/{name}",
                        metric_value=value,
                    )
                )
    return out


def evaluation_section(results: dict[str, Any] | None, plots: list[str]) -> str:
    if results is None:
        return "No evaluation results were supplied with this checkpoint; it has not been evaluated."
    lines = [
        f"Evaluated with `training/evaluate.py` on `{results['data']}` "
        "(held-out speakers; see `results.json` in the evaluation output for seeds and trial lists).",
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


def training_section(
    config: dict[str, Any], training_config: dict[str, Any] | None, provenance: dict[str, Any] | None
) -> str:
    lines = ["**Targets.**"]
    teacher = config.get("label_teacher_name")
    lines.append(
        f"k-means cluster ids (k = {config.get('num_clusters')}) of frame-level features of `{teacher}` "
        f"({config.get('label_feature_dim')}-dim), aligned to the encoder's frames by "
        f"`{config.get('label_frame_alignment')}` alignment."
    )
    if provenance:
        shown = {k: provenance[k] for k in sorted(provenance) if not isinstance(provenance[k], (dict, list))}
        lines += [
            "",
            "Label provenance (the JSON beside the centroids in `kmeans/`):",
            "",
            "```json",
            json.dumps(shown, indent=2),
            "```",
        ]
    lines += [
        "",
        "**Objective.** Masked cluster prediction (cross-entropy over cosine logits / "
        f"{config.get('logit_temperature')} on masked frames) plus a denoising term weighted by "
        f"λ = {config.get('denoise_loss_weight')}: items corrupted with noise or another utterance at "
        f"{config.get('denoise_snr_min_db')}–{config.get('denoise_snr_max_db')} dB SNR must still predict the "
        "clean primary utterance's clusters.",
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


def build_model_card(
    repo_id: str,
    config: dict[str, Any],
    results: dict[str, Any] | None = None,
    training_config: dict[str, Any] | None = None,
    provenance: dict[str, Any] | None = None,
    plots: list[str] | None = None,
    license: str = "apache-2.0",
    datasets: list[str] | None = None,
) -> ModelCard:
    """Render the card. ``results`` must already be validated (``delulu_hf.hub.load_results``)."""
    plots = plots or []
    model_name = repo_id.split("/")[-1]
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
        eval_results=eval_results,
    )
    architecture = (config.get("architectures") or ["DeluluModel"])[0]
    data_limitations = ""
    if training_config and "demo" in json.dumps(training_config).lower():
        data_limitations = (
            "- This checkpoint was trained on the small embedded demo corpus (synthetic MBROLA voices, "
            "non-commercial licence): it demonstrates the pipeline and is not a general-purpose encoder."
        )
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        model_name=model_name,
        repo_id=repo_id,
        architecture_sentence=f"`{architecture}` (loads as the bare encoder with `AutoModel`).",
        training_section=training_section(config, training_config, provenance),
        evaluation_section=evaluation_section(results, plots),
        teacher_name=config.get("label_teacher_name") or "the teacher",
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a DELULU save_pretrained folder")
    parser.add_argument("--repo-id", required=True)
    parser.add_argument("--results", help="results.json from training/evaluate.py")
    parser.add_argument("--output", default="README.md")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from delulu_hf.hub import find_centroids, load_results

    checkpoint = Path(args.checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    results = load_results(args.results) if args.results else None
    centroids = find_centroids(checkpoint)
    provenance = json.loads(centroids[1].read_text()) if centroids else None
    card = build_model_card(args.repo_id, config, results, load_training_config(checkpoint), provenance)
    card.save(args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
