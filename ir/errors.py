"""Typed errors with source locations.

Every user-facing failure in einshard is one of these classes. Each carries an optional
``Location`` so that the CLI can print ``file:line:col: message``, the offending source line
and a caret, without a traceback. Anything else that escapes is an internal bug (exit 70, compiler/exit_codes.py).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Location:
    """A point in a source text: 1-based line and column, plus the line itself for carets."""

    file: str
    line: int
    col: int
    source_line: str | None = None
    length: int = 1

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


def location_in(text: str, file: str, line: int, col: int, length: int = 1) -> Location:
    """Builds a Location for 1-based ``line``/``col`` in ``text``, capturing the source line."""
    lines = text.split("\n")  # lark counts lines by '\n' only
    src = lines[line - 1] if 0 < line <= len(lines) else None
    return Location(file, line, col, src, max(1, length))


class EinshardError(Exception):
    """Base class of every documented einshard error."""

    kind = "error"

    def __init__(self, message: str, loc: Location | None = None, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.loc = loc
        self.hint = hint

    def render(self) -> str:
        """``file:line:col: kind: message``, the source line with a caret, then the hint."""
        head = f"{self.loc}: " if self.loc else ""
        out = [f"{head}{self.kind}: {self.message}"]
        if self.loc and self.loc.source_line is not None:
            out.append("  " + self.loc.source_line.rstrip("\n"))
            out.append("  " + " " * (self.loc.col - 1) + "^" + "~" * (self.loc.length - 1))
        if self.hint:
            out.append(f"  hint: {self.hint}")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.render()


class SpecError(EinshardError):
    """A model spec file or a command-line override is malformed or inconsistent."""

    kind = "spec error"


class ParseError(EinshardError):
    """Textual IR or a pipeline string does not parse."""

    kind = "parse error"


class VerifyError(EinshardError):
    """The IR breaks an invariant (SSA, types, sharding legality)."""

    kind = "verify error"


class PassError(EinshardError):
    """A pass cannot run on its input, or its options are wrong."""

    kind = "pass error"


class LayoutError(EinshardError):
    """A sharding layout does not fit the model and mesh (sizes that do not divide, ...)."""

    kind = "layout error"


class WeightsError(EinshardError):
    """A checkpoint is missing tensors, has mis-shaped ones, or cannot be read."""

    kind = "weights error"


class LoweringError(EinshardError):
    """An op has no rule for the chosen backend (reference, SPMD simulator, JAX)."""

    kind = "lowering error"


class CheckError(EinshardError):
    """An execution result disagrees with the reference beyond the stated tolerance."""

    kind = "check error"


def did_you_mean(word: str, choices: list[str] | tuple[str, ...]) -> str:
    """A hint listing the valid choices, closest first when one is close."""
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    listed = ", ".join(choices)
    if close:
        return f"did you mean '{close[0]}'? valid choices: {listed}"
    return f"valid choices: {listed}"


class FileError(EinshardError):
    """A file or directory named by the user cannot be read or written (missing, a directory where
    a file is needed, not UTF-8, no permission)."""

    kind = "file error"


class CostError(EinshardError):
    """The cost model cannot price a configuration: no layout fits in memory, unknown hardware."""

    kind = "cost error"


class DistributedError(EinshardError):
    """Processes of a multi-process run cannot start or lost each other: a peer that died, never
    arrived, or a coordinator port already in use. The message names the process."""

    kind = "distributed error"
