"""Atomic file writes: write to a temporary file next to the target, then ``os.replace``.

Readers never see a half-written file, and a failed write leaves the target untouched and no
temporary file behind.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["atomic_path", "atomic_write", "atomic_write_csv", "atomic_write_text"]

StrPath = str | os.PathLike[str]


def _umask() -> int:
    """The process umask (read from /proc when possible, so it is not changed even briefly)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def _resolve_target(path: StrPath) -> Path:
    """Check that ``path`` can be written atomically; return the file to replace."""
    target = Path(path)
    if target.is_symlink():  # replace the file the link points to, keep the link
        target = target.resolve()
    directory = target.parent
    if not directory.exists():
        raise FileNotFoundError(f"cannot write {target}: directory {directory} does not exist")
    if not directory.is_dir():
        raise NotADirectoryError(f"cannot write {target}: {directory} is not a directory")
    if target.is_dir():
        raise IsADirectoryError(f"cannot write {target}: it is a directory")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {target}: directory {directory} is not writable")
    return target


@contextlib.contextmanager
def atomic_path(path: StrPath) -> Iterator[Path]:
    """Yield a temporary path in the target's directory; on success move it onto ``path``.

    The body writes the complete file to the yielded path. When the body exits normally the
    file is flushed to disk and atomically renamed onto ``path`` (keeping the permissions of
    an existing target, or the umask default for a new one). On any exception the temporary
    file is removed, the target is left as it was, and the exception propagates.

    Raises FileNotFoundError / NotADirectoryError / PermissionError / IsADirectoryError, with
    a message naming the path, when the target directory is missing or not writable.
    """
    target = _resolve_target(path)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except PermissionError as exc:
        raise PermissionError(
            f"cannot write {target}: directory {target.parent} is not writable"
        ) from exc
    os.close(fd)
    tmp = Path(name)
    try:
        if target.exists():
            mode = stat.S_IMODE(target.stat().st_mode)
        else:
            mode = 0o666 & ~_umask()
        os.chmod(tmp, mode)
        yield tmp
        if tmp.exists():  # the body may have replaced it; make sure the data are on disk
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    with contextlib.suppress(OSError):  # persist the rename itself (best effort, POSIX only)
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_write(path: StrPath, write_fn: Callable[[Path], object]) -> None:
    """Call ``write_fn(tmp_path)`` to write the whole file, then move it atomically to ``path``."""
    with atomic_path(path) as tmp:
        write_fn(tmp)


def atomic_write_text(path: StrPath, text: str, encoding: str = "utf-8") -> None:
    """Atomically write ``text`` to ``path`` (no newline translation)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding=encoding, newline="") as fh:
        fh.write(text)


def atomic_write_csv(df: pd.DataFrame, path: StrPath, **to_csv_kwargs: object) -> None:
    """Atomically write ``df`` as CSV (``DataFrame.to_csv``; ``index=False`` unless given)."""
    to_csv_kwargs.setdefault("index", False)
    with atomic_path(path) as tmp:
        df.to_csv(tmp, **to_csv_kwargs)  # type: ignore[call-overload]
