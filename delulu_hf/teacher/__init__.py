"""The frame-level speaker teacher whose features DELULU's labels cluster.

* ``base``: ``SpeakerTeacher``, the four facts the label pipeline needs of any teacher.
* ``redimnet``: the ReDimNet port (official checkpoint layout, presets, padded-batch-exact frame
  features, window embeddings) and ``load_teacher`` (folder, official ``.pt`` or preset name).
* ``training``: the AAM-softmax recipe that trains a ReDimNet on a speaker-labelled corpus
  (``training/train_teacher.py``); imported on demand, not here, since it pulls in accelerate.

Imports only flow base -> redimnet -> training, so there is no cycle.
"""

from delulu_hf.teacher.base import SpeakerTeacher
from delulu_hf.teacher.redimnet import (
    PRESETS,
    CheckpointMismatchError,
    ReDimNet,
    ReDimNetConfig,
    ReDimNetWindowEmbeddings,
    load_teacher,
)

__all__ = [
    "PRESETS",
    "CheckpointMismatchError",
    "ReDimNet",
    "ReDimNetConfig",
    "ReDimNetWindowEmbeddings",
    "SpeakerTeacher",
    "load_teacher",
]
