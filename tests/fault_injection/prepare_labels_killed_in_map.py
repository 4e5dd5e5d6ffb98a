"""``training/prepare_labels.py`` that SIGKILLs itself during the label map: the crash a rerun must survive.

    python tests/fault_injection/prepare_labels_killed_in_map.py --kill_at_assignment 5 \\
        --data CORPUS --features mfcc --output OUT ...

Runs ``training/prepare_labels.py``'s ``main()`` unchanged, with one thing patched in the library:
the ``--kill_at_assignment``-th call of ``ClusterAssigner`` (the map's last step for a batch of
frames; the fit never assigns) kills the process with SIGKILL before it assigns, so nothing (no
``finally``, no atexit hook) tidies up and the shard being labelled is lost half done. Test-only:
the library has no fault hooks of its own.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from delulu_hf.cli import main_entry  # noqa: E402
from delulu_hf.labels import assign  # noqa: E402

FLAG = "--kill_at_assignment"


def pop_kill_call(argv: list[str]) -> int:
    """Remove ``FLAG N`` from ``argv`` (in place) and return N."""
    index = argv.index(FLAG)
    call = int(argv[index + 1])
    del argv[index : index + 2]
    return call


def kill_at_assignment(call: int) -> None:
    """Make the ``call``-th ``ClusterAssigner.__call__`` of this process SIGKILL it."""
    original = assign.ClusterAssigner.__call__
    calls = 0

    def assign_or_die(self, features):
        nonlocal calls
        calls += 1
        if calls == call:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, features)

    assign.ClusterAssigner.__call__ = assign_or_die


def load_script(name: str):
    """``training/<name>.py`` as a module (it is a script, not part of a package)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "training", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    kill_at_assignment(pop_kill_call(sys.argv))
    main_entry(load_script("prepare_labels").main)
