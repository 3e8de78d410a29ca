"""The CPU priority of a batch job's own process: a job scoring through `--server` yields the
CPU to anything else on its host (the server and its online callers, when they share it).

    idle    Linux SCHED_IDLE: runs only on CPU time nothing else wants; another thread
            that wakes takes the CPU from it at once (elsewhere: nice 19)
    low     nice 19
    normal  unchanged
"""

from __future__ import annotations

import contextlib
import logging
import os

log = logging.getLogger(__name__)

PRIORITIES = ("normal", "low", "idle")
LOWEST_NICE = 19


def lower_cpu_priority(priority: str) -> str:
    """Apply `priority` to every thread of this process (a Linux policy or nice value is
    per thread; threads started later inherit it). Returns what was applied: a platform
    without SCHED_IDLE gets nice 19; one that refuses both keeps "normal" (logged)."""
    if priority not in PRIORITIES:
        raise ValueError(f"--cpu-priority: {priority!r} is not one of {', '.join(PRIORITIES)}")
    if priority == "normal":
        return "normal"
    threads = _threads()
    if priority == "idle" and hasattr(os, "SCHED_IDLE"):
        try:
            for tid in threads:
                with contextlib.suppress(ProcessLookupError):  # a thread that just ended
                    os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
            return "idle"
        except OSError as exc:  # refused for the first thread: the rest is unchanged
            log.warning("convoy batch: SCHED_IDLE refused (%s); trying nice %d", exc, LOWEST_NICE)
    if not hasattr(os, "setpriority"):
        log.warning("convoy batch: this platform cannot lower a process's CPU priority")
        return "normal"
    try:
        for tid in threads:
            with contextlib.suppress(ProcessLookupError):
                os.setpriority(os.PRIO_PROCESS, tid, LOWEST_NICE)
        return "low"
    except OSError as exc:
        log.warning("convoy batch: cannot lower the CPU priority: %s", exc)
        return "normal"


def _threads() -> list[int]:
    """This process's thread ids (Linux), else [0]: the calling thread."""
    try:
        return [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        return [0]
