"""The time base of the logged throughput: wall time between two device synchronisations.

Inside a training step nothing waits for the GPU (no host syncs), so the host runs ahead of the device and a
step's host time says little about the step: the queued work is paid at the next check point, whose read
(Trainer.check_steps) waits for it and belongs to no step. Timing each step on the host and averaging would
leave that wait out (tokens/s and MFU too high, by up to the device's lag). So tokens/s, MFU, the data-wait
fraction and the ETA are taken over a window that opens just after a check point's read (the device's queue
drained) and closes at the next log's read (the queue drained again): the real time of the steps in it.
Evaluations and checkpoints happen after the read that closes a window and before the next opens, so their
time is in no window.
"""

from __future__ import annotations

import time


class ThroughputWindow:
    def __init__(self, first_step: int):
        self.first_step = first_step  # steps done when the window opened
        self.start = time.perf_counter()
        self.data_seconds = 0.0  # time spent waiting for batches in the window

    def steps(self, done: int) -> int:
        return done - self.first_step

    def seconds(self) -> float:
        """Wall time since the window opened; read it right after a device synchronisation."""
        return time.perf_counter() - self.start
