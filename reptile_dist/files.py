"""Writing a local file whole or not at all."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def atomic_write(path: str | Path, content: bytes | Callable[[BinaryIO], None]) -> None:
    """Write `content` (bytes, or a function that writes into the open file) to `path`.

    It goes to a unique temporary file in the same folder, is synced, then renamed over `path`, so
    a reader (or a crash) sees the old file or the new one, never a part; the temporary is removed
    on any error. Parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as sink:
            if callable(content):
                content(sink)
            else:
                sink.write(content)
            sink.flush()
            os.fsync(sink.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; models, tables and CSVs are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)


def _sync_folder(folder: Path) -> None:
    """Make the rename itself durable (it lives in the folder's entry table)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform or filesystem that cannot open folders for syncing
        return
    try:
        os.fsync(fd)
    except OSError:  # some network filesystems refuse to sync a folder; the data itself is synced
        pass
    finally:
        os.close(fd)
