"""Publish a DELULU checkpoint to the Hugging Face Hub.

Builds the complete repository folder (weights, config with ``auto_map``, remote code,
feature extractor, model card generated from ``results.json``, plots, k-means centroids with
their provenance), loads it in a fresh process where ``delulu_hf`` is unimportable and checks
its outputs equal the source model's, then creates the repo and uploads the folder.

    python training/push_to_hub.py --checkpoint runs/demo/final --repo_id ORG/NAME \
        --results runs/eval/results.json [--private] [--dry_run] [--output_dir DIR]

The token comes from ``HF_TOKEN`` or ``huggingface-cli login``. ``--dry_run`` does everything but
the network calls and prints the file list.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # model_card/ lives beside the package, not inside the wheel

from delulu_hf.cli import ArgumentParser, UserError, main_entry, require_path  # noqa: E402
from delulu_hf.hub import (  # noqa: E402
    build_repo_folder,
    load_checkpoint_model,
    load_results,
    upload_repo_folder,
    verify_repo_folder,
)
from model_card.generate import card_for_checkpoint  # noqa: E402


@dataclass
class PushArguments:
    checkpoint: str = field(metadata={"help": "a DELULU save_pretrained folder (e.g. OUTPUT/final)"})
    repo_id: str = field(metadata={"help": "ORG/NAME on the Hub"})
    results: str | None = field(
        default=None, metadata={"help": "results.json written by training/evaluate.py"}
    )
    private: bool = field(default=False, metadata={"help": "create the Hub repository as private"})
    dry_run: bool = field(
        default=False, metadata={"help": "build and verify, print the files, upload nothing"}
    )
    output_dir: str | None = field(
        default=None, metadata={"help": "where to build the repository folder (none: a new temporary folder)"}
    )
    license: str = field(default="apache-2.0", metadata={"help": "license of the model card"})
    dataset: list[str] | None = field(
        default=None,
        metadata={
            "help": "Hub dataset id(s) the model was trained on: --dataset A B, or repeated --dataset A --dataset B",
            "action": "extend",
        },
    )
    token: str | None = field(
        default=None, metadata={"help": "Hub token (none: HF_TOKEN or the huggingface-cli login)"}
    )

    def __post_init__(self) -> None:
        if "/" not in self.repo_id:
            raise ValueError(f"--repo_id must be ORG/NAME, got {self.repo_id!r}")


def parse_args(argv: list[str] | None = None) -> PushArguments:
    parser = ArgumentParser(PushArguments, prog="push_to_hub.py", description=__doc__.split("\n\n")[0])
    return parser.parse_one(argv)


def main(argv: list[str] | None = None, api=None) -> int:
    args = parse_args(argv)
    # Validate everything that can be wrong (paths, the results file, the checkpoint's config.json,
    # its label provenance against that config) before any model is loaded or folder is built.
    require_path(args.checkpoint, "--checkpoint", "dir")
    require_path(args.results, "--results", "file")
    if args.output_dir and Path(args.output_dir).is_file():
        raise UserError(f"--output_dir {args.output_dir}: is a file, expected a folder")
    checkpoint = Path(args.checkpoint)
    results = load_results(args.results) if args.results else None
    plots = sorted(Path(args.results).parent.glob("*.png")) if args.results else []
    card = card_for_checkpoint(
        checkpoint,
        args.repo_id,
        results=results,
        plots=[f"plots/{p.name}" for p in plots],
        license=args.license,
        datasets=args.dataset,
    )
    source = load_checkpoint_model(checkpoint)
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
    main_entry(main)
