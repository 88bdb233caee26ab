"""Small file helpers shared across the package: atomic writes and JSON; imports nothing of cifarlab but its
errors (the bottom of the import graph)."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from .errors import CifarlabError


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file's object, ``{}`` when the file does not exist; a damaged one is a one-line error."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CifarlabError(f"cannot read {path}: {e}") from None


_UMASK = os.umask(0o022)  # read once at import (os.umask can only be read by setting it) and restored at once
os.umask(_UMASK)


def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "wb",
                 keep_previous: str | Path | None = None) -> None:
    """Write via a temp file in the same folder, fsync, then rename: a crash leaves the old file or the new.

    A failed write (a full disk, no permission) leaves the old file untouched and raises a CifarlabError.
    ``keep_previous``: once the new file is on disk, the file it replaces becomes that path (see _keep).
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise _write_error(path, e) from None
    try:
        with os.fdopen(fd, mode) as f:
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)  # mkstemp makes 0600 files; follow the umask like open() does
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous is not None:
            _keep(path, Path(keep_previous))
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        os_error = _os_error_in(e) if isinstance(e, Exception) else None
        if os_error is not None:
            raise _write_error(path, os_error) from None
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def _keep(path: Path, previous: Path) -> None:
    """Make ``previous`` the file ``path`` holds now, with ``path`` in place at every instant.

    A hard link under a temporary name, renamed over ``previous``: both renames are atomic, so a kill leaves
    ``previous`` old or new and ``path`` whole. Where hard links are not supported (some network and FUSE file
    systems) ``path`` itself is renamed: until the new file replaces it a moment later only ``previous`` is
    there, which the resume falls back to (train/resume.py).
    """
    if not path.is_file():
        return
    link = previous.with_name(f".{previous.name}.{os.getpid()}.tmp")
    try:
        link.unlink(missing_ok=True)
        os.link(path, link)
        os.replace(link, previous)
    except OSError:
        link.unlink(missing_ok=True)
        try:
            os.replace(path, previous)
        except OSError:
            pass  # an older previous checkpoint (or none) is kept; the new one is written all the same


def previous_path(path: str | Path) -> Path:
    """``last.pt`` -> ``last.prev.pt``: where :func:`save_checkpoint` keeps the checkpoint it replaced."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def _os_error_in(e: BaseException | None) -> OSError | None:
    """The OSError behind ``e``: torch.save turns a failed write into a RuntimeError raised while it closes
    the archive ("unexpected pos"), with the ENOSPC OSError only as its context."""
    for _ in range(8):
        if e is None or isinstance(e, OSError):
            return e
        e = e.__cause__ or e.__context__
    return None


def _write_error(path: Path, e: OSError) -> CifarlabError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return CifarlabError(f"no disk space left to write {path}; the previous {path.name} (if any) is intact. "
                             f"Free some space and run again (a training run continues with --resume)")
    return CifarlabError(f"cannot write {path}: {e.strerror or e}")


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), mode="w")
