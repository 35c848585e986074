"""Lightning callbacks: throughput / device-hours, reconstruction pictures, resumable
checkpoints with preemption handling, budget-point checkpoints, k-NN monitoring and bad-data
reporting."""

from lmim.callbacks.bad_data import BadDataMonitor
from lmim.callbacks.budget import BudgetCheckpoints
from lmim.callbacks.knn import KNNMonitor
from lmim.callbacks.perf import PerfMonitor
from lmim.callbacks.preemption import ResumeCheckpoint
from lmim.callbacks.reconstruction import ReconstructionFigure

__all__ = [
    "BadDataMonitor",
    "BudgetCheckpoints",
    "KNNMonitor",
    "PerfMonitor",
    "ReconstructionFigure",
    "ResumeCheckpoint",
]
