"""Fetch transformers' own test sources (they ship only in the sdist) into a cache outside the repo.

``ModelTesterMixin`` and ``ConfigTester`` live in ``tests/`` of the transformers source
distribution, not in the wheel. This script downloads the sdist of the *installed*
transformers version with pip and extracts its ``tests/`` folder to
``$DELULU_HF_TRANSFORMERS_TESTS`` or ``~/.cache/delulu-hf/transformers-tests/<version>/``.
It is idempotent: a finished extraction (marked by a ``.complete`` file) is reused.

Usage: ``python tests/fetch_transformers_tests.py`` (prints the folder to put on ``sys.path``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path


def cache_dir(version: str | None = None) -> Path:
    """Folder holding ``tests/`` of the transformers sdist for ``version`` (default: installed)."""
    if version is None:
        from importlib.metadata import version as dist_version

        version = dist_version("transformers")
    root = os.environ.get("DELULU_HF_TRANSFORMERS_TESTS")
    base = Path(root) if root else Path.home() / ".cache" / "delulu-hf" / "transformers-tests"
    return base / version


def _mark_package(target: Path) -> None:
    """The upstream ``tests/`` is a package (``tests/__init__.py``, empty) but the sdist omits that file;
    ``test_configuration_common.py`` executes it, so recreate it."""
    marker = target / "tests" / "__init__.py"
    if not marker.exists():
        marker.write_text("")


def fetch(version: str | None = None) -> Path:
    """Download and extract the sdist's ``tests/`` once; return the folder that contains ``tests/``."""
    target = cache_dir(version)
    if (target / ".complete").exists():
        _mark_package(target)
        return target
    version = target.name
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--no-binary",
                ":all:",
                "--dest",
                tmp,
                f"transformers=={version}",
            ],
            check=True,
        )
        archives = [p for p in Path(tmp).iterdir() if p.name.endswith((".tar.gz", ".tgz"))]
        if len(archives) != 1:
            raise RuntimeError(
                f"expected one transformers sdist in {tmp}, found {[p.name for p in archives]}"
            )
        staging = Path(tmp) / "extract"
        with tarfile.open(archives[0]) as tar:
            members = []
            for member in tar.getmembers():
                parts = Path(member.name).parts
                # Only `<top>/tests/...` regular files and folders: no links, nothing outside the target.
                if len(parts) >= 2 and parts[1] == "tests" and (member.isfile() or member.isdir()):
                    member.name = str(Path(*parts[1:]))
                    members.append(member)
            if not members:
                raise RuntimeError(f"{archives[0].name} has no tests/ folder")
            tar.extractall(staging, members=members, filter="data")
        # Publish atomically: a concurrent or interrupted run never leaves a half-extracted folder in place.
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        staging.rename(partial)
        _mark_package(partial)
        (partial / ".complete").write_text(version + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(partial, target)
    return target


if __name__ == "__main__":
    print(fetch(sys.argv[1] if len(sys.argv) > 1 else None))
