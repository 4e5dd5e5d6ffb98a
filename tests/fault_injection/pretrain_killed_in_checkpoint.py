"""``training/pretrain.py`` that SIGKILLs itself mid-checkpoint: the crash a resumed run must survive.

    python tests/fault_injection/pretrain_killed_in_checkpoint.py --kill_in_checkpoint_at_step 8 \\
        --config tiny.yaml --output_dir OUT

Runs ``training/pretrain.py``'s ``main()`` unchanged, with one thing patched in the library: when the
checkpoint of step ``--kill_in_checkpoint_at_step`` is about to be renamed into place (its
``.tmp-step_N`` folder holds every state file, ``trainer_state.json`` included), the process kills
itself with SIGKILL, so nothing (no ``finally``, no atexit hook) tidies up. Test-only: the library
has no fault hooks of its own.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from delulu_hf.cli import main_entry  # noqa: E402
from delulu_hf.pretraining import checkpoints  # noqa: E402

FLAG = "--kill_in_checkpoint_at_step"


def pop_kill_step(argv: list[str]) -> int:
    """Remove ``FLAG STEP`` from ``argv`` (in place) and return STEP."""
    index = argv.index(FLAG)
    step = int(argv[index + 1])
    del argv[index : index + 2]
    return step


def kill_before_rename(step: int) -> None:
    """Make ``save_checkpoint`` SIGKILL the process right before it renames ``step``'s folder."""
    rename = checkpoints.replace_dir
    target = os.path.basename(checkpoints.checkpoint_path("", step))

    def replace_dir(tmp: str, final: str) -> None:
        if os.path.basename(final) == target:
            os.kill(os.getpid(), signal.SIGKILL)
        rename(tmp, final)

    checkpoints.replace_dir = replace_dir


def load_pretrain_script():
    """``training/pretrain.py`` as a module (it is a script, not part of a package)."""
    path = os.path.join(REPO, "training", "pretrain.py")
    spec = importlib.util.spec_from_file_location("pretrain", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    kill_before_rename(pop_kill_step(sys.argv))
    main_entry(load_pretrain_script().main)
