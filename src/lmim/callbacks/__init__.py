"""Lightning callbacks: throughput / device-hours, reconstruction pictures, resumable
checkpoints with preemption handling, and bad-data reporting."""

from lmim.callbacks.bad_data import BadDataMonitor
from lmim.callbacks.knn import KNNMonitor
from lmim.callbacks.perf import PerfMonitor
from lmim.callbacks.preemption import ResumeCheckpoint
from lmim.callbacks.reconstruction import ReconstructionFigure

__all__ = [
    "BadDataMonitor",
    "KNNMonitor",
    "PerfMonitor",
    "ReconstructionFigure",
    "ResumeCheckpoint",
]
