"""Publish a DELULU checkpoint to the Hugging Face Hub.

Builds the complete repository folder (weights, config with ``auto_map``, remote code,
feature extractor, model card generated from ``results.json``, plots, k-means centroids with
their provenance), loads it in a fresh process where ``delulu_hf`` is unimportable and checks
its outputs equal the source model's, then creates the repo and uploads the folder.

    python training/push_to_hub.py --checkpoint runs/demo/final --repo-id ORG/NAME \
        --results runs/eval/results.json [--private] [--dry-run] [--output-dir DIR]

The token comes from ``HF_TOKEN`` or ``huggingface-cli login``. ``--dry-run`` does everything but
the network calls and prints the file list.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # model_card/ lives beside the package, not inside the wheel

from delulu_hf.hub import (  # noqa: E402
    build_repo_folder,
    find_centroids,
    load_checkpoint_model,
    load_results,
    upload_repo_folder,
    verify_repo_folder,
)
from model_card.generate import build_model_card, load_training_config  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--checkpoint", required=True, help="a DELULU save_pretrained folder (e.g. OUTPUT/final)"
    )
    parser.add_argument("--repo-id", required=True, help="ORG/NAME on the Hub")
    parser.add_argument("--results", help="results.json written by training/evaluate.py")
    parser.add_argument("--private", action="store_true")
    parser.add_argument(
        "--dry-run", action="store_true", help="build and verify, print the files, upload nothing"
    )
    parser.add_argument("--output-dir", help="where to build the repository folder (default: a temp dir)")
    parser.add_argument("--license", default="apache-2.0")
    parser.add_argument("--dataset", action="append", help="Hub dataset id(s) the model was trained on")
    parser.add_argument("--token", help="Hub token (default: HF_TOKEN / huggingface-cli login)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, api=None) -> int:
    args = parse_args(argv)
    if "/" not in args.repo_id:
        raise SystemExit(f"--repo-id must be ORG/NAME, got {args.repo_id!r}")
    checkpoint = Path(args.checkpoint)
    # Validate everything that can be wrong before building anything.
    results = load_results(args.results) if args.results else None
    source = load_checkpoint_model(checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    centroids = find_centroids(checkpoint)
    provenance = json.loads(centroids[1].read_text()) if centroids else None
    plots = sorted(Path(args.results).parent.glob("*.png")) if args.results else []

    card = build_model_card(
        args.repo_id,
        config,
        results=results,
        training_config=load_training_config(checkpoint),
        provenance=provenance,
        plots=[f"plots/{p.name}" for p in plots],
        license=args.license,
        datasets=args.dataset,
    )
    output_dir = (
        Path(args.output_dir) if args.output_dir else Path(tempfile.mkdtemp(prefix="delulu-hub-")) / "repo"
    )
    extra = {"results.json": args.results} if args.results else None
    files = build_repo_folder(checkpoint, output_dir, str(card), plots=plots, extra_files=extra, model=source)
    report = verify_repo_folder(output_dir, source)
    print(
        f"verified {output_dir}: loads without delulu_hf as {report['model_class']} "
        f"({report['model_module']}), max abs diff {report['max_abs_diff']:.2e}"
    )
    print("files:")
    for name in files:
        print(f"  {name}")
    if args.dry_run:
        print(f"dry run: nothing uploaded; the folder is {output_dir}")
        return 0
    url = upload_repo_folder(output_dir, args.repo_id, private=args.private, token=args.token, api=api)
    print(f"uploaded to {url}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
