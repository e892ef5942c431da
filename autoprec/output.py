"""Files the commands write (`export -o`, `report -o`, `trials -o`, `Policy.save`): one set of rules.

- `-` is standard output (where the caller allows it).
- A SQLite database is never written over (a study store, whatever its name), nor the store being
  read or its `-wal`/`-shm`/`-journal` files.
- Another existing, non-empty file is replaced only when the caller forces it (the CLI's `--force`).
- A symlink is written through: its target is replaced, the link stays.
- A regular file is written under a unique temporary name beside it, then renamed over it: nothing
  half-written, and two writers to one path never share a temporary file. A device or a FIFO
  (`/dev/stdout`, a pipe) is written in place, never replaced.
- Every refusal and write failure is one `AutoprecError` line naming the path and the fix.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from autoprec.errors import AutoprecError

STDOUT = "-"
SQLITE_MAGIC = b"SQLite format 3\x00"
_STORE_COMPANIONS = ("", "-wal", "-shm", "-journal")


@dataclass(frozen=True)
class Output:
    """A checked place to write: standard output, a file written in place, or a file replaced atomically."""

    shown: str  # as the user named it, for messages
    target: Path | None  # the file written (symlinks resolved); None: standard output
    in_place: bool  # a device or FIFO: opened and written, never replaced
    flag: str = "-o"

    @property
    def is_stdout(self) -> bool:
        return self.target is None

    @property
    def suffix(self) -> str:
        return Path(self.shown).suffix.lower() if not self.is_stdout else ""


def is_sqlite_file(path: Path) -> bool:
    """True when `path` starts with SQLite's file header."""
    try:
        with open(path, "rb") as f:
            return f.read(len(SQLITE_MAGIC)) == SQLITE_MAGIC
    except OSError:
        return False


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _store_file(target: Path, protected: Iterable[Path]) -> bool:
    for store in protected:
        for companion in _STORE_COMPANIONS:
            if _same(target, Path(f"{store}{companion}")):
                return True
    return False


def check_output(path: str | os.PathLike[str], *, force: bool = False, protected: Iterable[Path | None] = (),
                 allow_stdout: bool = False, flag: str = "-o") -> Output:
    """Where to write `path`, refused with one line before anything is computed.

    `protected`: the SQLite files of the store being read (never written over, even forced).
    `force`: replace an existing non-empty file that is not a SQLite database.
    """
    shown = os.fspath(path)
    if allow_stdout and shown == STDOUT:
        return Output(shown, None, True, flag)
    if not shown:
        raise AutoprecError(f"{flag} '': name the file to write")
    given = Path(shown)
    stores = [Path(p) for p in protected if p is not None]
    try:
        info = os.stat(given)  # follows symlinks
    except FileNotFoundError:
        info = None
    except OSError as exc:
        raise AutoprecError(f"{flag} {shown}: cannot use it ({exc.strerror}); name another file") from None
    if info is not None and stat.S_ISDIR(info.st_mode):
        raise AutoprecError(f"{flag} {shown}: is a folder; name the file to write")
    if info is not None and not stat.S_ISREG(info.st_mode):  # /dev/stdout, a FIFO, a terminal: write into it
        return Output(shown, given, True, flag)
    target = Path(os.path.realpath(given))  # a symlink is written through: its target is replaced
    if _store_file(target, stores):
        raise AutoprecError(f"{flag} {shown}: that is the study store being read; name another file "
                            "(autoprec never writes over a study store)")
    if info is not None:
        if is_sqlite_file(target):
            raise AutoprecError(f"{flag} {shown}: is a SQLite database (a study store?); autoprec never writes "
                                "over one: name another file")
        if info.st_size > 0 and not force:
            raise AutoprecError(f"{flag} {shown}: the file exists; pass --force to overwrite it, or name another file")
    folder = target.parent
    if not folder.is_dir():
        raise AutoprecError(f"{flag} {shown}: the folder {given.parent} does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise AutoprecError(f"{flag} {shown}: cannot write in the folder {folder} (permission denied); "
                            "name a file in a folder you can write")
    return Output(shown, target, False, flag)


def _new_file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_output(out: Output, data: str | bytes) -> None:
    """Write `data` where `out` says: all of it, or (for a file) nothing at all."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    if out.is_stdout:
        sys.stdout.flush()
        sys.stdout.buffer.write(raw)
        sys.stdout.buffer.flush()
        return
    assert out.target is not None
    try:
        if out.in_place:
            with open(out.target, "wb") as f:
                f.write(raw)
            return
        _replace(out.target, raw)
    except OSError as exc:
        raise AutoprecError(f"{out.flag} {out.shown}: cannot write it ({exc.strerror or exc}); "
                            "nothing was written there") from None


def _replace(target: Path, raw: bytes) -> None:
    """Write `raw` to a unique temporary file beside `target` and rename it over `target`."""
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        mode = _new_file_mode()
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        if is_sqlite_file(target):  # became a database since it was checked: still never written over
            raise AutoprecError(f"{target}: is a SQLite database (a study store?); autoprec never writes over one")
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
