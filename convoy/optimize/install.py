"""Putting a built version directory in place, as a server polling the repository
must see it: never half a version, and never a version that vanishes.

A new version is one rename. Replacing one (`--force`) cannot be: on Linux rename()
will not replace a non-empty directory, and moving the old one aside first leaves a
moment without the version, in which a poll unloads it. So the two directories are
swapped with renameat2(RENAME_EXCHANGE), atomically: a load sees all of the old
version or all of the new. Where the kernel, the filesystem or the C library cannot
exchange (non-Linux, some network and overlay filesystems), the version directory
stays where it is and its entries are replaced one by one with os.replace (each
atomic): a load in that window may see old and new files side by side, but the
version is never missing.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

_AT_FDCWD = -100
_RENAME_EXCHANGE = 1 << 1
# What renameat2 answers where it cannot exchange: not in this kernel, not on this
# filesystem; anything else is a real error (permissions, a path gone).
_CANNOT_EXCHANGE = frozenset({errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP})

_Renameat2 = Callable[[int, bytes, int, bytes, int], int]


def install_version(staging: Path, target: Path) -> None:
    """Put the directory `staging` at `target` (siblings: one filesystem); `staging`
    is gone afterwards. `target` exists at every moment if it existed before."""
    if not target.exists():
        os.rename(staging, target)
        return
    if exchange(staging, target):
        shutil.rmtree(staging)  # the old version, now out of the repository's view
        return
    replace_entries(staging, target)
    shutil.rmtree(staging)


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically; False where that cannot be done here (nothing moved)."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in _CANNOT_EXCHANGE:
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


@functools.cache
def _renameat2() -> _Renameat2 | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28, musl 1.2.3
    except (OSError, AttributeError):
        return None
    fd, path = ctypes.c_int, ctypes.c_char_p
    function.argtypes = [fd, path, fd, path, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def replace_entries(source: Path, target: Path) -> None:
    """Make directory `target` hold what `source` holds, moving entries across one by
    one (subdirectories merged the same way) and removing those `source` lacks;
    `target` itself is never moved."""
    names = sorted(os.listdir(source))
    for name in names:
        src, dst = source / name, target / name
        if _real_dir(src) and _real_dir(dst):
            replace_entries(src, dst)
            continue
        if _real_dir(dst):
            shutil.rmtree(dst)  # a directory replaced by a file
        elif _real_dir(src) and os.path.lexists(dst):
            os.unlink(dst)  # a file replaced by a directory
        os.replace(src, dst)
    for name in sorted(set(os.listdir(target)) - set(names)):
        stale = target / name
        if _real_dir(stale):
            shutil.rmtree(stale)
        else:
            os.unlink(stale)


def _real_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()
