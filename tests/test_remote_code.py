"""A saved DELULU folder loads in a fresh, offline process: with `delulu_hf` installed, and without it
(Hub remote code, ``trust_remote_code=True``), giving the same outputs as the model that saved it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from delulu_hf import DeluluConfig, DeluluForPreTraining

# Runs in the child process. argv: mode ("package" | "remote"), folder, inputs file, outputs file.
CHILD = r"""
import json, sys
mode, folder, inputs_path, outputs_path = sys.argv[1:5]
if mode == "remote":
    class BlockDelulu:
        # Makes the installed package unimportable, as on a machine that only has transformers.
        def find_spec(self, name, path=None, target=None):
            if name == "delulu_hf" or name.startswith("delulu_hf."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
            return None
    sys.meta_path.insert(0, BlockDelulu())
    try:
        import delulu_hf  # noqa: F401
        raise SystemExit("delulu_hf is still importable")
    except ModuleNotFoundError:
        pass
    kwargs = {"trust_remote_code": True}
else:
    import delulu_hf  # noqa: F401  (registers the Auto classes)
    kwargs = {}

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoFeatureExtractor, AutoModel, AutoModelForAudioClassification, AutoModelForAudioXVector,
    AutoModelForPreTraining,
)

inputs = load_file(inputs_path)
pretraining = AutoModelForPreTraining.from_pretrained(folder, **kwargs).eval()
base = AutoModel.from_pretrained(folder, **kwargs).eval()
xvector = AutoModelForAudioXVector.from_pretrained(folder, **kwargs)
classifier = AutoModelForAudioClassification.from_pretrained(folder, **kwargs)
extractor = AutoFeatureExtractor.from_pretrained(folder, **kwargs)
features = extractor([inputs["raw"].numpy()], sampling_rate=16000, return_tensors="pt")
with torch.no_grad():
    logits = pretraining(inputs["values"], attention_mask=inputs["mask"]).logits
    hidden = base(inputs["values"], attention_mask=inputs["mask"]).last_hidden_state
save_file({"logits": logits, "hidden": hidden, "features": features.input_values}, outputs_path)
print(json.dumps({
    "module": type(pretraining).__module__,
    "classes": [type(m).__name__ for m in (pretraining, base, xvector, classifier, extractor)],
    "delulu_hf_imported": "delulu_hf" in sys.modules,
}))
"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny trained-looking model saved to a folder, the inputs, and its own outputs on them."""
    root = tmp_path_factory.mktemp("remote")
    config = DeluluConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        conv_dim=(16,) * 7,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        num_clusters=12,
        final_dim=8,
    )
    torch.manual_seed(0)
    model = DeluluForPreTraining(config).eval()
    folder = root / "delulu-tiny"
    model.save_pretrained(folder)

    generator = torch.Generator().manual_seed(0)
    values = torch.randn(2, 16000, generator=generator)
    mask = torch.ones(2, 16000, dtype=torch.long)
    values[1, 9000:], mask[1, 9000:] = 0.0, 0
    raw = torch.randn(12000, generator=generator) * 0.1 + 0.05
    save_file({"values": values, "mask": mask, "raw": raw}, root / "inputs.safetensors")
    with torch.no_grad():
        logits = model(values, attention_mask=mask).logits
        hidden = model.delulu(values, attention_mask=mask).last_hidden_state
    return {"root": root, "folder": folder, "logits": logits, "hidden": hidden, "raw": raw}


def run_child(saved: dict, mode: str) -> tuple[dict, dict]:
    root = saved["root"]
    outputs = root / f"outputs-{mode}.safetensors"
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_MODULES_CACHE=str(root / f"modules-{mode}"),
        PYTHONPATH="",  # nothing from this checkout except what is installed
    )
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD,
            mode,
            str(saved["folder"]),
            str(root / "inputs.safetensors"),
            str(outputs),
        ],
        cwd=root,  # not the repo root, so `delulu_hf` is not importable from the working directory
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"child ({mode}) failed:\n{result.stderr[-4000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1]), load_file(outputs)


EXPECTED_CLASSES = [
    "DeluluForPreTraining",
    "DeluluModel",
    "DeluluForXVector",
    "DeluluForSequenceClassification",
    "Wav2Vec2FeatureExtractor",
]


def check_outputs(saved: dict, outputs: dict) -> None:
    torch.testing.assert_close(outputs["logits"], saved["logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outputs["hidden"], saved["hidden"], atol=1e-5, rtol=1e-5)
    # The saved feature extractor normalises each utterance to zero mean and unit variance.
    features = outputs["features"][0]
    assert abs(float(features.mean())) < 1e-3 and abs(float(features.std()) - 1.0) < 1e-2


def test_fresh_process_with_the_package(saved: dict):
    info, outputs = run_child(saved, "package")
    assert info["module"] == "delulu_hf.modeling_delulu"
    assert info["classes"] == EXPECTED_CLASSES
    check_outputs(saved, outputs)


def test_fresh_process_without_the_package(saved: dict):
    info, outputs = run_child(saved, "remote")
    assert info["module"].startswith("transformers_modules.")
    assert not info["delulu_hf_imported"]
    assert info["classes"] == EXPECTED_CLASSES
    check_outputs(saved, outputs)
    # Only the config and modeling files travel with the weights.
    assert {p.name for p in Path(saved["folder"]).glob("*.py")} == {
        "configuration_delulu.py",
        "modeling_delulu.py",
    }
