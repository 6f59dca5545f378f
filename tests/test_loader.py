"""Stage 1: YAML text -> plain data with a location for every key path."""

from __future__ import annotations

import pytest

from genspec.errors import Location, Problem, SpecError, format_path
from genspec.lang.loader import Document, load_file, load_text
from genspec.lang.validate import validate

from spec_helpers import QUICKSTART


def _only_problem(exc: pytest.ExceptionInfo) -> Problem:
    assert len(exc.value.problems) == 1, exc.value.problems
    return exc.value.problems[0]


# ---------------------------------------------------------------- locations

NESTED = """\
top: 1
outer:
  inner:
    leaf: x
    items:
      - 10
      - {k: v, k2: [a, b]}
      -
        deep: 3
"""


def test_locations_of_nested_keys_and_list_items():
    doc = load_text(NESTED, "n.yaml")
    assert doc.data == {"top": 1, "outer": {"inner": {"leaf": "x", "items": [10, {"k": "v", "k2": ["a", "b"]}, {"deep": 3}]}}}
    where = {path: (loc.line, loc.column) for path, loc in doc.locations.items()}
    assert where[("top",)] == (1, 1)
    assert where[("outer",)] == (2, 1)
    assert where[("outer", "inner")] == (3, 3)
    assert where[("outer", "inner", "leaf")] == (4, 5)
    assert where[("outer", "inner", "items")] == (5, 5)
    assert where[("outer", "inner", "items", 0)] == (6, 9)  # the item itself, after "- "
    assert where[("outer", "inner", "items", 1)] == (7, 9)
    assert where[("outer", "inner", "items", 1, "k")] == (7, 10)
    assert where[("outer", "inner", "items", 1, "k2")] == (7, 16)
    assert where[("outer", "inner", "items", 1, "k2", 1)] == (7, 24)
    assert where[("outer", "inner", "items", 2, "deep")] == (9, 9)
    assert all(loc.file == "n.yaml" for loc in doc.locations.values())


def test_where_falls_back_to_the_nearest_located_ancestor():
    doc = load_text(NESTED, "n.yaml")
    assert doc.where(("outer", "inner", "leaf", "missing", 3)) == Location("n.yaml", 4, 5)
    assert doc.where(("nowhere",)) == doc.locations[()]
    assert str(doc.where(("outer", "inner"))) == "n.yaml:3:3"


def test_locations_in_the_quickstart_point_at_the_right_lines():
    doc = load_file(QUICKSTART)
    lines = QUICKSTART.read_text().splitlines()
    for path in [("networks", "enc", "layers", 3), ("losses", "elbo"), ("objectives", "vae", "optimizer"),
                 ("data", "split", "test"), ("latent", "z", "shape", 0)]:
        loc = doc.where(path)
        line = lines[loc.line - 1]
        key = path[-1]
        if isinstance(key, str):
            assert line[loc.column - 1:].startswith(key), (path, line)
        else:  # a list item: the location is the item's value
            value = doc.data
            for part in path:
                value = value[part]
            assert line[loc.column - 1:].startswith(str(value)), (path, line)


# ---------------------------------------------------------------- errors

def test_duplicate_key_is_located_at_the_second_occurrence():
    with pytest.raises(SpecError) as exc:
        load_text("a:\n  b: 1\n  c: 2\n  b: 3\n", "d.yaml")
    problem = _only_problem(exc)
    assert str(problem) == "d.yaml:4:3: a.b: duplicate key"


def test_duplicate_top_level_key():
    with pytest.raises(SpecError) as exc:
        load_text("name: a\ngenspec: 1\nname: b\n", "d.yaml")
    assert str(_only_problem(exc)) == "d.yaml:3:1: name: duplicate key"


@pytest.mark.parametrize("text, line, column, fragment", [
    ("a: b: c\n", 1, 5, "mapping values are not allowed here"),
    ("a:\n  b: 1\n c: 2\n", 3, 2, "expected <block end>"),
    ("a: [1, 2\n", 2, 1, "expected ',' or ']'"),
    ("a: 'unterminated\n", 2, 1, "found unexpected end of stream"),
    ("a: *nope\n", 1, 4, "found undefined alias 'nope'"),
    ("a: 1\n---\nb: 2\n", 2, 1, "expected a single document"),
])
def test_yaml_syntax_errors_become_located_spec_errors(text, line, column, fragment):
    with pytest.raises(SpecError) as exc:
        load_text(text, "bad.yaml")
    problem = _only_problem(exc)
    assert (problem.location.file, problem.location.line, problem.location.column) == ("bad.yaml", line, column)
    assert problem.message.startswith("YAML syntax error: ")
    assert fragment in problem.message
    assert problem.path == ()


def test_a_tab_indent_is_a_spec_error_not_a_yaml_exception():
    with pytest.raises(SpecError) as exc:
        load_text("a:\n\tb: 1\n", "t.yaml")
    problem = _only_problem(exc)
    assert problem.location.line == 2 and "YAML syntax error" in problem.message


def test_unreadable_character_is_a_spec_error():
    with pytest.raises(SpecError) as exc:
        load_text("a: \x00\n", "c.yaml")
    assert _only_problem(exc).message.startswith("YAML error: ")


def test_merge_keys_are_refused():
    with pytest.raises(SpecError) as exc:
        load_text("base: &b {x: 1}\nother:\n  <<: *b\n  y: 2\n", "m.yaml")
    problem = _only_problem(exc)
    assert (problem.location.line, problem.location.column) == (3, 3)
    assert "merge keys (<<) are not supported; use `extends`" in problem.message


def test_complex_mapping_keys_are_refused():
    with pytest.raises(SpecError) as exc:
        load_text("? [a, b]\n: 1\n", "k.yaml")
    assert _only_problem(exc).message == "mapping keys must be plain names"


def test_recursive_alias_is_stopped_at_the_depth_limit():
    with pytest.raises(SpecError) as exc:
        load_text("a: &x [*x]\n", "r.yaml")
    assert "nesting deeper than 64 levels" in _only_problem(exc).message


def test_unknown_tag_is_a_located_spec_error_and_never_constructs_objects():
    with pytest.raises(SpecError) as exc:
        load_text("a: 1\nb: !!python/name:os.system ''\n", "p.yaml")
    problem = _only_problem(exc)
    assert (problem.location.line, problem.location.column, problem.path) == (2, 4, ("b",))
    assert "YAML tag 'tag:yaml.org,2002:python/name:os.system' is not supported" in problem.message
    # a tag on a collection is refused too (it used to be dropped silently)
    with pytest.raises(SpecError) as exc:
        load_text("b: !!python/object/apply:os.system [echo hi]\n", "p.yaml")
    assert "is not supported" in _only_problem(exc).message


def test_bad_tagged_scalar_is_located():
    with pytest.raises(SpecError) as exc:
        load_text("x: 1\ny: !!int seven\n", "s.yaml")
    problem = _only_problem(exc)
    assert (problem.location.line, problem.location.column, problem.path) == (2, 4, ("y",))
    assert problem.message.startswith("bad scalar 'seven'")


def test_missing_file():
    with pytest.raises(SpecError) as exc:
        load_file("/nonexistent/dir/spec.yaml")
    assert str(_only_problem(exc)) == "/nonexistent/dir/spec.yaml: (top level): no such file"


def test_non_utf8_file(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(SpecError) as exc:
        load_file(path)
    assert _only_problem(exc).message.startswith("cannot read: ")


# ---------------------------------------------------------------- scalars

@pytest.mark.parametrize("text, value", [
    ("1e-3", 0.001), ("-2E+5", -200000.0), (".5e1", 5.0), ("1.0e-3", 0.001), ("3e2", 300.0), ("+1e0", 1.0),
])
def test_bare_exponent_numbers_are_floats(text, value):
    data = load_text(f"v: {text}\n").data
    assert data == {"v": value} and type(data["v"]) is float


@pytest.mark.parametrize("text, value", [
    ("'1e-3'", "1e-3"), ('"2e5"', "2e5"), ("1e-3x", "1e-3x"), ("e3", "e3"),
])
def test_quoted_or_non_numeric_exponent_text_stays_a_string(text, value):
    assert load_text(f"v: {text}\n").data == {"v": value}


def test_plain_scalars_keep_their_yaml_types():
    data = load_text("a: 1\nb: 1.5\nc: true\nd: null\ne: text\nf: 0x10\ng: 2001-01-01\n").data
    assert data == {"a": 1, "b": 1.5, "c": True, "d": None, "e": "text", "f": 16, "g": "2001-01-01"}
    assert type(data["a"]) is int and type(data["g"]) is str  # dates have no meaning in a spec: kept as text


def test_non_string_keys():
    data = load_text("1: a\n1.5: b\nnull: c\ntrue: d\n").data
    assert data == {1: "a", "1.5": "b", "null": "c", "true": "d"}


# ---------------------------------------------------------------- empty and non-mapping documents

@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_empty_document_is_an_empty_mapping(text):
    doc = load_text(text, "e.yaml")
    assert isinstance(doc, Document)
    assert doc.data == {}
    assert doc.locations == {(): Location("e.yaml", 1, 1)}


def test_empty_document_fails_validation_with_a_located_missing_key():
    with pytest.raises(SpecError) as exc:
        validate(load_text("", "e.yaml"))
    assert str(exc.value.problems[0]) == "e.yaml:1:1: (top level): missing required key 'genspec'"


@pytest.mark.parametrize("text, line", [("- a\n- b\n", 1), ("just text\n", 1), ("42\n", 1), ("# c\n\n- 1\n", 3)])
def test_non_mapping_top_level_gives_a_located_spec_error(text, line):
    doc = load_text(text, "top.yaml")
    with pytest.raises(SpecError) as exc:
        validate(doc)
    problem = _only_problem(exc)
    assert str(problem) == f"top.yaml:{line}:1: (top level): a spec is a mapping of sections (genspec, name, data, networks, ...)"


# ---------------------------------------------------------------- errors module

def test_format_path_and_problem_text():
    assert format_path(("networks", "enc", "layers", 3)) == "networks.enc.layers[3]"
    assert format_path(("a", 0, 1, "b")) == "a[0][1].b"
    assert format_path(()) == "(top level)"
    assert str(Location("--set a=1")) == "--set a=1"
    assert str(Problem(Location("f.yaml", 2, 5), ("x", 1), "bad")) == "f.yaml:2:5: x[1]: bad"


def test_spec_error_lists_every_problem_in_order_of_appearance():
    doc = load_text("a: 1\nb:\n  c: 2\n", "o.yaml")
    from genspec.errors import Collector

    problems = Collector(doc.where)
    problems.add(("b", "c"), "second")
    problems.add(("a",), "first")
    with pytest.raises(SpecError) as exc:
        problems.raise_if_any()
    assert str(exc.value) == "o.yaml:1:1: a: first\no.yaml:3:3: b.c: second"
    Collector(doc.where).raise_if_any()  # nothing collected: no error
