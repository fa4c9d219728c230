"""Files the user names (spec, IR, chip file, -o, --dump-dir): typed, located errors on failure.

Every reader of a user-named file needs the same refusals: the path cannot be read (missing, a
directory, no permission), or its bytes are not UTF-8. A bad byte is located by line and column
so that the error can point at it like any syntax error. Writers refuse a directory where a file
is wanted, a missing parent, or a file where a folder is wanted, as FileError.
"""

from __future__ import annotations

from pathlib import Path

from ir.errors import EinshardError, FileError, Location


def read_user_text(path: str | Path, error: type[EinshardError], what: str) -> str:
    """The UTF-8 text of ``path``, or ``error`` (e.g. ParseError) naming ``what`` ("IR file")."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except IsADirectoryError:
        raise error(f"cannot read {what} '{p}': it is a directory") from None
    except OSError as e:
        raise error(f"cannot read {what} '{p}': {e.strerror or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        start = data.rfind(b"\n", 0, e.start) + 1
        end = data.find(b"\n", e.start)
        raw = data[start:end if end >= 0 else len(data)]
        shown = raw.decode("utf-8", errors="replace")
        col = len(data[start:e.start].decode("utf-8", errors="replace")) + 1
        loc = Location(str(p), line, col, shown)
        raise error(f"{what} '{p}' is not UTF-8 text: byte 0x{data[e.start]:02x} at offset {e.start}",
                    loc, "save the file as UTF-8") from None


def check_output_file(path: str | Path, what: str) -> None:
    """Refuses, before any work, a file path that cannot be written: a directory, or a parent
    that is missing or is a file. (Permissions show up when writing, see write_user_text.)"""
    p = Path(path)
    if p.is_dir():
        raise FileError(f"{what} '{p}' is a directory", hint="name a file inside it")
    parent = p.parent
    if not parent.exists():
        raise FileError(f"{what} '{p}': folder '{parent}' does not exist")
    if not parent.is_dir():
        raise FileError(f"{what} '{p}': '{parent}' is not a folder")


def write_user_text(path: str | Path, text: str, what: str) -> None:
    """Writes ``text`` to ``path``; any OS refusal is a FileError naming ``what``."""
    check_output_file(path, what)
    try:
        Path(path).write_text(text, encoding="utf-8")
    except OSError as e:
        raise FileError(f"cannot write {what} '{path}': {e.strerror or e}") from None


def ensure_dir(path: str | Path, what: str) -> Path:
    """Creates folder ``path`` (and its parents) unless it exists; a file in the way, or no
    permission, is a FileError naming ``what``."""
    p = Path(path)
    for q in (p, *p.parents):
        if q.exists() and not q.is_dir():
            raise FileError(f"{what} '{p}': '{q}' is a file, not a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FileError(f"cannot create {what} '{p}': {e.strerror or e}") from None
    return p
