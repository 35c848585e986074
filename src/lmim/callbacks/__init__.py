"""Lightning callbacks: throughput / device-hours and reconstruction pictures."""

from lmim.callbacks.knn import KNNMonitor
from lmim.callbacks.perf import PerfMonitor
from lmim.callbacks.reconstruction import ReconstructionFigure

__all__ = ["KNNMonitor", "PerfMonitor", "ReconstructionFigure"]
