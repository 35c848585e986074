"""Lightning callbacks: throughput / device-hours, reconstruction pictures, resumable
checkpoints with preemption handling, budget-point checkpoints, k-NN monitoring, bad-data
reporting and host-synchronisation counting."""

from lmim.callbacks.bad_data import BadDataMonitor
from lmim.callbacks.budget import BudgetCheckpoints
from lmim.callbacks.host_sync import HostSyncMonitor
from lmim.callbacks.knn import KNNMonitor
from lmim.callbacks.perf import PerfMonitor
from lmim.callbacks.preemption import ResumeCheckpoint
from lmim.callbacks.reconstruction import ReconstructionFigure

__all__ = [
    "BadDataMonitor",
    "BudgetCheckpoints",
    "HostSyncMonitor",
    "KNNMonitor",
    "PerfMonitor",
    "ReconstructionFigure",
    "ResumeCheckpoint",
]
