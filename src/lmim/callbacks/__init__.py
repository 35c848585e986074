"""Lightning callbacks: throughput / device-hours and reconstruction pictures."""

from lmim.callbacks.perf import PerfMonitor
from lmim.callbacks.reconstruction import ReconstructionFigure

__all__ = ["PerfMonitor", "ReconstructionFigure"]
