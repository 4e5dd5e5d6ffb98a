"""Make transformers' own common model tests importable as the package ``transformers_tests``.

``ModelTesterMixin`` / ``ConfigTester`` ship only in the transformers sdist; ``fetch_transformers_tests.py``
extracts its ``tests/`` folder into a cache outside this repo. The sdist's ``tests/`` is a package whose
modules use relative imports, so it is registered here under its own name (no clash with this repo's
``tests/``). Three sibling modules it imports are not in the sdist and only serve other model kinds
(torch.export, text generation, the base-config kwargs list); minimal stand-ins replace them.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

from fetch_transformers_tests import cache_dir

PACKAGE = "transformers_tests"


class ExportTesterMixin:
    """Stand-in for ``tests/exporters/test_export.py``: DELULU is not exported with torch.export/ONNX."""


class GenerationTesterMixin:
    """Stand-in for ``tests/generation/test_utils.py``: DELULU does not generate."""


# Stand-in for ``tests/utils/test_configuration_utils.py``: non-default values for the base
# `PreTrainedConfig` attributes, which `ConfigTester.check_config_arguments_init` checks a config keeps.
config_common_kwargs = {
    "return_dict": False,
    "output_hidden_states": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["DeluluModel"],
    "id2label": {0: "label_0", 1: "label_1", 2: "label_2"},
    "label2id": {"label_0": 0, "label_1": 1, "label_2": 2},
    "problem_type": "regression",
}


def _module(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    sys.modules[name] = module
    return module


def install() -> Path | None:
    """Register ``transformers_tests`` (idempotent); ``None`` when the sdist tests were not fetched."""
    root = cache_dir() / "tests"
    if not (root / "test_modeling_common.py").exists():
        return None
    if PACKAGE in sys.modules:
        return root
    package = _module(PACKAGE, __path__=[str(root)], __file__=str(root / "__init__.py"))
    package.__package__ = PACKAGE
    for sub, attributes in (
        ("exporters", {}),
        ("exporters.test_export", {"ExportTesterMixin": ExportTesterMixin}),
        ("generation", {}),
        ("generation.test_utils", {"GenerationTesterMixin": GenerationTesterMixin}),
        ("utils", {}),
        ("utils.test_configuration_utils", {"config_common_kwargs": config_common_kwargs}),
    ):
        _module(f"{PACKAGE}.{sub}", **attributes)
    return root
