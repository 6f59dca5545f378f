"""Located spec errors.

Every stage reports problems as `Problem`s that carry the file, line and column of the
offending key, so the CLI can print `FILE:LINE:COL: key.path: message` for each of them
and exit with status 2 instead of a traceback.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Location:
    """Where a key or value came from: a file position, or a command-line override."""

    file: str
    line: int = 0  # 1-based; 0 when unknown (e.g. a --set override)
    column: int = 0  # 1-based

    def __str__(self) -> str:
        if self.line:
            return f"{self.file}:{self.line}:{self.column}"
        return self.file


def format_path(path: tuple) -> str:
    """`("networks", "enc", "layers", 3)` -> `networks.enc.layers[3]`."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


@dataclass(frozen=True)
class Problem:
    location: Location
    path: tuple
    message: str
    excerpt: str = ""  # the source line, when the column points at a token inside a value

    def __str__(self) -> str:
        head = f"{self.location}: {format_path(self.path)}: {self.message}"
        if not self.excerpt:
            return head
        # the line as written, and a caret under the offending token
        return f"{head}\n    {self.excerpt}\n    {' ' * (self.location.column - 1)}^"


@dataclass
class SpecError(Exception):
    """One or more located problems with a spec. The only exception spec stages raise."""

    problems: list[Problem] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(str(p) for p in self.problems)


def relayed(exc: BaseException) -> str:
    """Another library's error text (torch's are often a page long) as one line plus at most one
    hint line, for quoting inside a genspec message."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return "; ".join(lines[:2]) if lines else type(exc).__name__


class RunError(Exception):
    """A run that cannot go on (missing data, diverged loss, refused resume): a clear message, no traceback."""


@contextlib.contextmanager
def writing(what: str, path):
    """Say what was being written, and where, when the system refuses it (a folder where a file
    should go, a full disk, no permission): `cannot write the report (reports/x/report.md): ...`."""
    try:
        yield
    except OSError as exc:
        where = exc.filename or path
        raise RunError(f"cannot write {what} ({where}): {exc.strerror or exc}") from None


class Collector:
    """Gathers problems of one stage so they can be reported together."""

    def __init__(self, where) -> None:
        self.where = where  # callable: path -> Location
        # a Document's where: its `point` finds the offending token inside the value
        self.point = getattr(getattr(where, "__self__", None), "point", None)
        self.problems: list[Problem] = []

    def add(self, path: tuple, message: str) -> None:
        path = tuple(path)
        pointed = self.point(path, message) if self.point else None
        if pointed:
            self.problems.append(Problem(pointed[0], path, message, pointed[1]))
        else:
            self.problems.append(Problem(self.where(path), path, message))

    def raise_if_any(self) -> None:
        if self.problems:
            raise SpecError(sorted(self.problems, key=_problem_order))


def _problem_order(p: Problem):
    return (p.location.file, p.location.line, p.location.column, format_path(p.path))


def suggest(name: str, known) -> str:
    """"; did you mean 'x'?" for the closest of `known` to a misspelt name, else nothing."""
    import difflib

    hint = difflib.get_close_matches(str(name), [str(k) for k in known], n=1)
    return f"; did you mean {hint[0]!r}?" if hint else ""


def plural(n: int, noun: str) -> str:
    """'1 epoch', '2 epochs'."""
    return f"{n} {noun}{'' if n == 1 else 's'}"
