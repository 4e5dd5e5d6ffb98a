"""Shared pytest setup: small thread pool, and the import hook for transformers' common test sources."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

# The CI machine has 2 cores; more threads only add contention.
torch.set_num_threads(2)

# Test helpers in this folder import each other by module name, whatever pytest's import mode.
TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

import transformers_test_support  # noqa: E402

# Registers `transformers_tests` (the sdist's tests/ fetched by fetch_transformers_tests.py), if present.
transformers_test_support.install()


def pytest_configure(config) -> None:
    # Markers used by transformers' common tests (registered in transformers' own conftest, not shipped).
    for marker in (
        "accelerate_tests",
        "flash_attn_test",
        "flash_attn_3_test",
        "flash_attn_4_test",
        "torch_compile_test",
    ):
        config.addinivalue_line("markers", f"{marker}: marker used by transformers' common model tests")
