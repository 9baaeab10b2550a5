"""CPU and wall seconds for `make bench-scale` (benchmarks/scale.py): a sampler of a process tree's CPU
seconds and the machine's load while a step runs, and a stopwatch of this process's steps."""
from __future__ import annotations

import bisect
import os
import statistics
import threading
import time
from pathlib import Path


class Sampler:
    """While a step runs, every second: the machine's 1-minute load average (others share the cores) and,
    once `root` is set to a process id, the CPU seconds its process tree has used so far (from /proc;
    each process counted at its last sample, so at most a second of each is missed)."""

    TICK = os.sysconf("SC_CLK_TCK")

    def __init__(self):
        self.root, self.load, self.cpu_by_pid, self.cpu = None, [os.getloadavg()[0]], {}, [(time.time(), 0.0)]

    def __enter__(self):
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self.stop.wait(1):
            self._sample()

    def _sample(self):
        self.load.append(os.getloadavg()[0])
        if self.root is None:
            return
        children, used = {}, {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                except OSError:
                    continue
                fields = stat[stat.rindex(")") + 2:].split()  # state, ppid, ..., utime (11), stime (12)
                children.setdefault(int(fields[1]), []).append(int(entry))
                used[int(entry)] = (int(fields[11]) + int(fields[12])) / self.TICK
        stack = [self.root]
        while stack:
            pid = stack.pop()
            if pid in used:
                self.cpu_by_pid[pid] = max(self.cpu_by_pid.get(pid, 0.0), used[pid])
            stack += children.get(pid, [])
        self.cpu.append((time.time(), sum(self.cpu_by_pid.values())))

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self._sample()
        self.mean_load = statistics.mean(self.load)

    def cpu_between(self, start: float, end: float) -> float:
        """CPU seconds the tree used between two time.time() instants (linear between samples)."""
        times, totals = zip(*self.cpu)

        def at(instant):
            index = max(0, min(len(times) - 1, bisect.bisect_left(times, instant)))
            if index == 0 or times[index] <= instant:
                return totals[index]
            t0, t1, c0, c1 = times[index - 1], times[index], totals[index - 1], totals[index]
            return c0 + (c1 - c0) * (instant - t0) / (t1 - t0)

        return at(end) - at(start)


class Stopwatch:
    """Wall seconds, this process's CPU seconds (all its threads) and the time.time() window of each step."""

    def __init__(self):
        self.seconds, self.cpu, self.windows = {}, {}, {}

    def __call__(self, name: str, function, *args, **kwargs):
        wall, cpu, start = time.perf_counter(), time.process_time(), time.time()
        value = function(*args, **kwargs)
        self.seconds[name] = time.perf_counter() - wall
        self.cpu[name] = time.process_time() - cpu
        self.windows[name] = (start, time.time())
        return value
