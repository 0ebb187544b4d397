"""How busy the machine was during a measurement: this process's CPU time and the whole machine's.

The benchmarks replace rounds in which other processes used the CPUs (their epoch times are
noise). Standard library only: the benchmarks import it before torch.
"""

from __future__ import annotations

import os


def own_cpu_seconds() -> float:
    """CPU seconds this process has used so far, user and system.

    Example:
        >>> own_cpu_seconds() > 0
        True
    """
    times = os.times()
    return times.user + times.system


def machine_busy_seconds() -> float | None:
    """CPU seconds the whole machine has been busy so far (Linux /proc/stat), or None elsewhere.

    Example:
        >>> busy = machine_busy_seconds()
        >>> busy is None or busy >= own_cpu_seconds()
        True
    """
    try:
        with open("/proc/stat") as stat:
            fields = [int(value) for value in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # user .. steal, not guest (in user)
