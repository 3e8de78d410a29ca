"""An fsspec filesystem as a pyarrow one (writer.open_filesystem's fallback, for a scheme
pyarrow has none for), with what a read-only one (http://) cannot do refused as an
OSError, as pyarrow's own filesystems refuse it: fsspec raises NotImplementedError,
which no caller's `except OSError` (naming its flag) would catch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pyarrow.fs import FSSpecHandler


def _refused_as_os_error(name: str) -> Callable[..., Any]:
    done = getattr(FSSpecHandler, name)

    def method(self: FSSpecHandler, *args: Any) -> Any:
        try:
            return done(self, *args)
        except NotImplementedError:
            protocol = self.fs.protocol  # a name, or a tuple of the names it goes by
            scheme = protocol[0] if isinstance(protocol, tuple) else protocol
            raise OSError(f"{scheme}: a read-only filesystem, no {name}") from None

    method.__name__ = name
    return method


class FsspecFiles(FSSpecHandler):  # type: ignore[misc]
    pass


for _name in (
    "create_dir", "delete_dir", "delete_dir_contents", "delete_root_dir_contents",
    "delete_file", "move", "copy_file", "open_output_stream", "open_append_stream",
):  # fmt: skip
    setattr(FsspecFiles, _name, _refused_as_os_error(_name))
