"""A process's (or one thread's) CPU time and resident memory, from /proc/<pid>/stat.

The engine reads its front ends' this way at scrape time; the load tools read the
servers' around a measured interval (CPU per request does not depend on how busy a
shared machine is).
"""

from __future__ import annotations

import os
from pathlib import Path


def process_usage(
    pid: int, tid: int | None = None, proc: Path = Path("/proc")
) -> tuple[float, int] | None:
    """(CPU seconds, user + system; resident bytes) of a live process, or with `tid` of
    that one thread (the main thread's tid is the pid); None if there is no such one."""
    stat = proc / str(pid) / "stat" if tid is None else proc / str(pid) / "task" / str(tid) / "stat"
    try:
        text = stat.read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The fields after the command name, which is in parentheses and may hold spaces:
    # utime and stime (clock ticks) are the 14th and 15th fields, rss (pages) the 24th.
    fields = text.rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return cpu, int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
