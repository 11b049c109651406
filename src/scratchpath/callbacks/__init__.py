"""Training callbacks: online evaluation, throughput and memory, preemption-safe checkpoints.

``scratchpath fit`` adds :class:`Throughput`, :class:`ProgressLog` and
:class:`PreemptionCheckpoint` to every run; :class:`OnlineEvaluation` is switched on from a
recipe's ``trainer.callbacks`` because it needs a labelled store. All of them are plain Lightning
callbacks and work with a hand-built ``Trainer``. One module per job: ``online_eval`` (probes
during training), ``progress`` (speed, memory, the progress line), ``checkpointing`` (atomic
writes, preemption saves).
"""

from scratchpath.callbacks.checkpointing import AtomicCheckpointIO, PreemptionCheckpoint
from scratchpath.callbacks.online_eval import OnlineEvaluation
from scratchpath.callbacks.progress import ProgressLog, Throughput

__all__ = [
    "AtomicCheckpointIO",
    "OnlineEvaluation",
    "PreemptionCheckpoint",
    "ProgressLog",
    "Throughput",
]
