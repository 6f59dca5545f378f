"""Stage 1: read a YAML spec into plain data, remembering where every key came from.

PyYAML's safe composer gives a node tree with line/column marks; we build plain dicts,
lists and scalars from it ourselves and keep a side table `path -> Location`, so later
stages can point at `specs/x.yaml:12:7` for any key they complain about.
"""

from __future__ import annotations

import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from genspec.errors import Location, Problem, SpecError

# YAML 1.1 reads `1e-3` as a string (it wants `1.0e-3`); hyper-parameters are written
# that way in every paper, so plain scalars of this shape are read as floats.
_BARE_EXPONENT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")
_MAX_DEPTH = 64
_MAX_NODES = 200_000  # aliases can multiply a small file ("billion laughs"); no spec is this big
MAX_SPEC_BYTES = 1_000_000  # the largest shipped spec is a few kB


@dataclass
class Document:
    """Plain data of a spec and the location of each key path in it."""

    data: object
    locations: dict[tuple, Location] = field(default_factory=dict)
    file: str = "<string>"

    def point(self, path: tuple, message: str) -> tuple[Location, str] | None:
        """(location of the offending token inside the value at `path`, its source line), for a
        message that quotes the token (`undefined name 'relu'`) or gives its character; None
        where the value is not a one-line scalar of a file, or the token is not in it."""
        start = self.locations.get(tuple(path) + (VALUE,))
        value = _value_at(self.data, tuple(path))
        if start is None or not isinstance(value, str) or not start.line:
            return None
        offset = _token_offset(value, message)
        if offset is None:
            return None
        line = _source_line(start.file, start.line)
        if line is None:
            return None
        return Location(start.file, start.line, start.column + offset), line

    def where(self, path: tuple) -> Location:
        """The location of `path`, or of its nearest ancestor that has one."""
        path = tuple(path)
        while path:
            if path in self.locations:
                return self.locations[path]
            path = path[:-1]
        return self.locations.get((), Location(self.file, 1, 1))


VALUE = "\x00value"  # locations[path + (VALUE,)]: where a one-line scalar's text starts (inside its quotes)


def _value_at(data, path: tuple):
    for part in path:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _token_offset(text: str, message: str) -> int | None:
    """Where in `text` the message's offending token starts: `(at character N)` of a parse
    error, else the first quoted token of the message found in the text as a whole word."""
    at = re.search(r"at character (\d+)", message)  # 1-based; one past the end for "found the end"
    if at and 1 <= int(at.group(1)) <= len(text) + 1:
        return int(at.group(1)) - 1
    for token in re.findall(r"'([^']+)'", message):
        if token == text:
            continue
        found = re.search(rf"(?<![\w.]){re.escape(token)}(?!\w)", text)
        if found:
            return found.start()
    return None


def _source_line(file: str, number: int) -> str | None:
    try:
        path = Path(file)
        if not path.is_file() or path.stat().st_size > MAX_SPEC_BYTES:
            return None
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    return lines[number - 1] if 0 < number <= len(lines) else None


def _value_start(file: str, node: yaml.Node) -> Location | None:
    """Where a one-line scalar's text starts (after its opening quote); None for anything else."""
    if not isinstance(node, yaml.ScalarNode) or node.start_mark.line != node.end_mark.line:
        return None
    if node.style in ("|", ">"):
        return None
    quoted = 1 if node.style in ('"', "'") else 0
    return Location(file, node.start_mark.line + 1, node.start_mark.column + 1 + quoted)


def _flow_hint(exc: yaml.MarkedYAMLError, text: str) -> str:
    """The usual cause of a broken {...} or [...]: an unquoted value with its own commas or
    brackets, such as adam(lr, betas=[0.5, 0.999]), which YAML splits at the commas."""
    if "flow" not in str(exc.context or "") or exc.problem_mark is None:
        return ""
    lines = text.splitlines()
    first = exc.context_mark.line if exc.context_mark else exc.problem_mark.line
    unquoted = [re.sub(r'"[^"]*"|\'[^\']*\'', "", line) for line in lines[first:exc.problem_mark.line + 1]]
    if not any(re.search(r"\w\([^)]*,", line) for line in unquoted):  # name(a, b) outside quotes
        return ""
    return ("; inside { } or [ ] a value with commas or brackets of its own needs quotes, "
            'e.g. optimizer: "adam(lr, betas=[0.5, 0.999])"')


def load_text(text: str, file: str = "<string>") -> Document:
    """Parse YAML text. Raises SpecError (never a YAML exception) on bad input."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        context = exc.context
        if context and exc.context_mark and exc.problem_mark and exc.context_mark.line != exc.problem_mark.line:
            context += f" (opened at {exc.context_mark.line + 1}:{exc.context_mark.column + 1})"
        message = ": ".join(str(x) for x in (context, exc.problem) if x) + _flow_hint(exc, text)
        raise SpecError([Problem(Location(file, line, col), (), f"YAML syntax error: {message}")]) from None
    except (yaml.YAMLError, RecursionError, ValueError) as exc:
        raise SpecError([Problem(Location(file, 1, 1), (), f"YAML error: {exc}")]) from None
    doc = Document(data=None, file=file)
    if node is None:
        doc.data = {}
        doc.locations[()] = Location(file, 1, 1)
        return doc
    doc.locations[()] = _location(file, node)
    doc.data = _build(node, (), doc, file, 0)
    return doc


def regular_file_problem(path: Path) -> str | None:
    """Why `path` cannot be a spec: missing, not a regular file (a folder, a device such as
    /dev/zero, a FIFO: reading those never ends or never starts), or larger than any spec."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return "no such file"
    except OSError as exc:
        return f"cannot read: {exc.strerror or exc}"
    if not stat.S_ISREG(info.st_mode):
        kind = "a folder" if stat.S_ISDIR(info.st_mode) else "a device, FIFO or socket"
        return f"not a regular file ({kind}); a spec is a YAML file"
    if info.st_size > MAX_SPEC_BYTES:
        return f"{info.st_size:,} bytes: larger than any spec (the limit is {MAX_SPEC_BYTES:,} bytes)"
    return None


def load_file(path: str | Path) -> Document:
    path = Path(path)
    problem = regular_file_problem(path)
    if problem:
        raise SpecError([Problem(Location(str(path)), (), problem)])
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_SPEC_BYTES + 1)  # bounded even if the file grows after the check
        if len(raw) > MAX_SPEC_BYTES:
            raise SpecError([Problem(Location(str(path)), (), f"larger than any spec (the limit is {MAX_SPEC_BYTES:,} bytes)")])
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError([Problem(Location(str(path)), (), f"cannot read: {exc}")]) from None
    return load_text(text, str(path))


def _location(file: str, node: yaml.Node) -> Location:
    return Location(file, node.start_mark.line + 1, node.start_mark.column + 1)


# the tags a node has without one written (and the same written out, `!!str 5`); any other tag
# (`!!python/object`, `!custom`, `!!set`) would be dropped or misread, so it is refused
_PLAIN_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "seq", "map", "timestamp",
                                                   "binary", "merge")}


def _build(node: yaml.Node, path: tuple, doc: Document, file: str, depth: int):
    if node.tag not in _PLAIN_TAGS:
        raise SpecError([Problem(_location(file, node), path, f"YAML tag {node.tag!r} is not supported in a spec; "
                                                              "write the plain value")])
    doc.node_count = getattr(doc, "node_count", 0) + 1
    if doc.node_count > _MAX_NODES:
        raise SpecError([Problem(_location(file, node), path, f"document expands to more than {_MAX_NODES} values (YAML aliases?)")])
    if depth > _MAX_DEPTH:
        raise SpecError([Problem(_location(file, node), path, f"nesting deeper than {_MAX_DEPTH} levels")])
    if isinstance(node, yaml.MappingNode):
        return _build_mapping(node, path, doc, file, depth)
    if isinstance(node, yaml.SequenceNode):
        out = []
        for i, item in enumerate(node.value):
            doc.locations[path + (i,)] = _location(file, item)
            start = _value_start(file, item)
            if start:
                doc.locations[path + (i, VALUE)] = start
            out.append(_build(item, path + (i,), doc, file, depth + 1))
        return out
    return _scalar(node, path, file)


def _build_mapping(node: yaml.MappingNode, path: tuple, doc: Document, file: str, depth: int) -> dict:
    out: dict = {}
    for key_node, value_node in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            raise SpecError([Problem(_location(file, key_node), path, "YAML merge keys (<<) are not supported; use `extends`")])
        if not isinstance(key_node, yaml.ScalarNode):
            raise SpecError([Problem(_location(file, key_node), path, "mapping keys must be plain names")])
        key = _scalar(key_node, path, file)
        if not isinstance(key, (str, int)) or isinstance(key, bool):
            key = str(key_node.value)
        if key in out:
            raise SpecError([Problem(_location(file, key_node), path + (key,), "duplicate key")])
        doc.locations[path + (key,)] = _location(file, key_node)
        start = _value_start(file, value_node)
        if start:
            doc.locations[path + (key, VALUE)] = start
        out[key] = _build(value_node, path + (key,), doc, file, depth + 1)
    return out


_constructor = yaml.SafeLoader("")


def _scalar(node: yaml.ScalarNode, path: tuple, file: str):
    if node.style is None and node.tag == "tag:yaml.org,2002:str" and _BARE_EXPONENT.match(node.value):
        return float(node.value)
    try:
        value = _constructor.construct_object(node, deep=True)
    except (yaml.YAMLError, ValueError, TypeError, OverflowError) as exc:
        raise SpecError([Problem(_location(file, node), path, f"bad scalar {node.value!r}: {exc}")]) from None
    if not isinstance(value, (str, int, float, bool, type(None))):
        # timestamps, binary and the like have no meaning in a spec: keep the text
        return str(node.value)
    return value


def project_root(spec_file: str) -> Path | None:
    """The project a spec belongs to: the nearest folder at or above the spec's own that holds a
    specs/ folder or a pyproject.toml (a run folder's spec.resolved.yaml finds the project the
    run was made in). None for a spec that is not a file."""
    path = Path(spec_file)
    if not path.is_file():
        return None
    for folder in path.resolve().parents:
        if (folder / "specs").is_dir() or (folder / "pyproject.toml").is_file():
            return folder
    return path.resolve().parent
