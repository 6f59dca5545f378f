"""Stage 2: `extends` chains (deep merge, locations follow the data) and `--set` overrides."""

from __future__ import annotations

import textwrap

import pytest

from genspec.errors import Location, SpecError
from genspec.graph.pipeline import load_spec
from genspec.lang.resolve import resolve, split_key

from spec_helpers import QUICKSTART, QUICKSTART_TEXT, run_cli


def _write(folder, name, text):
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def family(tmp_path):
    base = _write(tmp_path, "base.yaml", """\
        a:
          b: 1
          c: [1, 2, 3]
          d:
            e: x
            f: y
        top: 5
        """)
    child = _write(tmp_path, "variants/child.yaml", """\
        extends: ../base.yaml
        a:
          b: 2
          c: [9]
          d:
            f: z
        new: 1
        """)
    return base, child


# ---------------------------------------------------------------- extends

def test_extends_deep_merges_child_over_base(family):
    base, child = family
    doc = resolve(child)
    assert doc.data == {"a": {"b": 2, "c": [9], "d": {"e": "x", "f": "z"}}, "top": 5, "new": 1}
    assert "extends" not in doc.data
    assert doc.file == str(child)


def test_extends_locations_follow_the_data(family):
    base, child = family
    doc = resolve(child)
    # inherited keys point into the base file ...
    assert doc.where(("top",)) == Location(str(base.resolve()), 7, 1)
    assert doc.where(("a", "d", "e")) == Location(str(base.resolve()), 5, 5)
    # ... overridden and new ones into the child
    assert doc.where(("a", "b")) == Location(str(child), 3, 3)
    assert doc.where(("a", "c")) == Location(str(child), 4, 3)
    assert doc.where(("a", "c", 0)) == Location(str(child), 4, 7)
    assert doc.where(("a", "d", "f")) == Location(str(child), 6, 5)
    assert doc.where(("new",)) == Location(str(child), 7, 1)


def test_extends_replaces_lists_whole(family):
    base, child = family
    assert resolve(child).data["a"]["c"] == [9]


def test_extends_chain_of_three_and_relative_paths(tmp_path):
    _write(tmp_path, "a/root.yaml", "x: 1\ny: {p: 1, q: 1}\n")
    _write(tmp_path, "b/mid.yaml", "extends: ../a/root.yaml\ny: {q: 2}\nz: 2\n")
    leaf = _write(tmp_path, "b/c/leaf.yaml", "extends: ../mid.yaml\ny: {p: 3}\n")
    doc = resolve(leaf)
    assert doc.data == {"x": 1, "y": {"p": 3, "q": 2}, "z": 2}
    assert doc.where(("x",)).file.endswith("root.yaml")
    assert doc.where(("y", "q")).file.endswith("mid.yaml")
    assert doc.where(("y", "p")).file.endswith("leaf.yaml")


def test_extends_cycle_is_an_error(tmp_path):
    _write(tmp_path, "one.yaml", "extends: two.yaml\nx: 1\n")
    _write(tmp_path, "two.yaml", "y: 2\nextends: one.yaml\n")
    with pytest.raises(SpecError) as exc:
        resolve(tmp_path / "one.yaml")
    (problem,) = exc.value.problems
    assert problem.path == ("extends",)
    assert problem.location.file.endswith("two.yaml") and problem.location.line == 2
    assert problem.message == "extends itself through one.yaml"


def test_extends_itself(tmp_path):
    path = _write(tmp_path, "self.yaml", "name: s\nextends: self.yaml\n")
    with pytest.raises(SpecError) as exc:
        resolve(path)
    assert str(exc.value) == f"{path}:2:1: extends: extends itself through self.yaml"


def test_missing_base(tmp_path):
    path = _write(tmp_path, "orphan.yaml", "name: o\n\nextends: nowhere/base.yaml\n")
    with pytest.raises(SpecError) as exc:
        resolve(path)
    assert str(exc.value) == f"{path}:3:1: extends: base spec nowhere/base.yaml not found"


@pytest.mark.parametrize("value", ["[]", "3", "{a: b.yaml}", "[a.yaml, 3]"])
def test_extends_must_be_a_path_or_a_list_of_paths(tmp_path, value):
    path = _write(tmp_path, "bad.yaml", f"extends: {value}\n")
    with pytest.raises(SpecError) as exc:
        resolve(path)
    assert str(exc.value) == (f"{path}:1:1: extends: must be a path to a base spec, "
                              "or a list of them (merged in order, later wins)")


@pytest.fixture
def row_and_reading(tmp_path):
    """A paper's row spec, and a reading (a fragment) that changes its generator."""
    _write(tmp_path, "paper.yaml", """\
        source: {table: "Table 1", reported: {is: 7.8}}
        networks:
          gen: {input: z, layers: [fc 10, deconv 1]}
          dis: {input: x, layers: [conv 8, fc 1]}
        train: {epochs: 13, batch_size: 64}
        """)
    _write(tmp_path, "_readings/bn.yaml", """\
        source: {reading: batch norm}
        networks:
          gen:
            layers: [fc 10, bn, upsample 4, conv 1]
        train: {batch_size: 256}
        """)
    return tmp_path


def test_a_list_of_bases_merges_in_order_and_the_spec_last(row_and_reading):
    row = _write(row_and_reading, "rows/row.yaml", """\
        extends: [../paper.yaml, ../_readings/bn.yaml]
        source: {table: "Table 1; batch norm"}
        train: {epochs: 2}
        """)
    doc = resolve(row)
    assert doc.data == {
        "source": {"table": "Table 1; batch norm", "reported": {"is": 7.8}, "reading": "batch norm"},
        "networks": {"gen": {"input": "z", "layers": ["fc 10", "bn", "upsample 4", "conv 1"]},
                     "dis": {"input": "x", "layers": ["conv 8", "fc 1"]}},
        "train": {"epochs": 2, "batch_size": 256},
    }
    # each key points into the file it came from
    assert doc.where(("networks", "dis")).file.endswith("paper.yaml")
    assert doc.where(("networks", "gen", "layers", 1)).file.endswith("bn.yaml")
    assert doc.where(("source", "table")).file.endswith("row.yaml")
    # the order is the list's: the reading first, then the paper, gives the paper's generator back
    other = _write(row_and_reading, "rows/other.yaml", "extends: [../_readings/bn.yaml, ../paper.yaml]\n")
    assert resolve(other).data["networks"]["gen"]["layers"] == ["fc 10", "deconv 1"]
    # a one-item list is the plain form
    single = _write(row_and_reading, "rows/single.yaml", "extends: [../paper.yaml]\n")
    assert resolve(single).data == resolve(row_and_reading / "paper.yaml").data


def test_a_bad_item_of_a_list_of_bases_is_named_at_its_line_and_column(row_and_reading):
    row = _write(row_and_reading, "row.yaml", """\
        name: r
        extends:
          - paper.yaml
          - _readings/nowhere.yaml
        """)
    with pytest.raises(SpecError) as exc:
        resolve(row)
    assert str(exc.value) == f"{row}:4:5: extends[1]: base spec _readings/nowhere.yaml not found"
    looped = _write(row_and_reading, "loop.yaml", "extends: [paper.yaml, loop.yaml]\n")
    with pytest.raises(SpecError) as exc:
        resolve(looped)
    assert str(exc.value) == f"{looped}:1:23: extends[1]: extends itself through loop.yaml"


def test_the_shipped_readings_resolve_as_their_rows_restated_them():
    """specs/_readings/bn_resize_generator.yaml mixed into a row gives the generator the row specs
    once restated in full (the runs in the ledger were made from those)."""
    from spec_helpers import REPO

    gen = ["concat label", "fc 1024, bn, relu", "fc 6272, bn, relu", "reshape 128 7 7", "upsample 4",
           "conv 1 5x5, sigmoid"]
    rows = sorted((REPO / "specs").glob("cgan*/*bn_resize.yaml"))
    assert len(rows) == 8
    for row in rows:
        data = resolve(row).data
        assert data["networks"]["gen"]["layers"] == gen, row
        assert data["source"]["reading"] == "batch norm generator, resize-convolution", row
        assert "batch norm and a resize-convolution" in data["source"]["table"], row


def test_quickstart_variant_through_extends_validates(tmp_path):
    variant = _write(tmp_path, "small.yaml", f"""\
        extends: {QUICKSTART}
        name: small
        train: {{epochs: 2}}
        networks:
          enc:
            layers: [flatten, "fc 32, relu", gaussian 8]
        """)
    spec = load_spec(variant)
    assert spec.name == "small"
    assert spec.train["epochs"] == 2 and spec.train["batch_size"] == 64  # merged, not replaced
    assert [r["op"] for r in spec.networks["enc"].rows] == ["flatten", "fc", "gaussian"]
    assert spec.networks["enc"].input == (1, 8, 8)  # `input: x` inherited from the base
    assert spec.where("networks", "enc", "input").file == str(QUICKSTART.resolve())
    assert spec.where("networks", "enc", "layers").file == str(variant)


def test_error_in_an_inherited_key_points_into_the_base(tmp_path):
    base = _write(tmp_path, "base.yaml", QUICKSTART_TEXT.replace("  batch_size: 64\n", "  batch_size: lots\n"))
    child = _write(tmp_path, "child.yaml", "extends: base.yaml\nname: child\n")
    with pytest.raises(SpecError) as exc:
        load_spec(child)
    (problem,) = exc.value.problems
    line = QUICKSTART_TEXT.splitlines().index("  batch_size: 64") + 1
    assert str(problem) == f"{base.resolve()}:{line}:3: train.batch_size: expected integer, got string 'lots'"


# ---------------------------------------------------------------- --set

@pytest.mark.parametrize("text, parts", [
    ("networks.enc.layers[2]", ("networks", "enc", "layers", 2)),
    ("networks.enc.layers.2", ("networks", "enc", "layers", 2)),
    ("a[1][2].b", ("a", 1, 2, "b")),
    ("train.epochs", ("train", "epochs")),
    ("a..b", ("a", "b")),
    ("", ()),
])
def test_split_key(text, parts):
    assert split_key(text) == parts


def test_overrides_set_values_in_lists_and_create_missing_keys(family):
    base, _ = family
    doc = resolve(base, ["a.c[2]=7", "a.c.0=8", "a.new.deep=3", "top=[1, 2]", "a.b=1e-3", "empty="])
    assert doc.data == {"a": {"b": 0.001, "c": [8, 2, 7], "d": {"e": "x", "f": "y"}, "new": {"deep": 3}},
                        "top": [1, 2], "empty": ""}
    assert doc.where(("a", "c", 2)) == Location("--set a.c[2]=7")
    assert doc.where(("a", "c", 0)) == Location("--set a.c.0=8")
    assert doc.where(("a", "c", 1)).file == str(base)  # untouched item keeps its place
    assert doc.where(("a", "new", "deep")) == Location("--set a.new.deep=3")
    assert doc.where(("top", 1)) == Location("--set top=[1, 2]")  # everything below an override is the override's


def test_override_replaces_a_whole_subtree_and_its_locations(family):
    base, _ = family
    doc = resolve(base, ["a.d={g: 1}"])
    assert doc.data["a"]["d"] == {"g": 1}
    assert ("a", "d", "e") not in doc.locations
    assert doc.where(("a", "d", "g")) == Location("--set a.d={g: 1}")


def test_later_overrides_win(family):
    base, _ = family
    assert resolve(base, ["top=1", "top=2"]).data["top"] == 2


def test_override_into_a_list_item_mapping(family):
    base, _ = family
    doc = resolve(base, ["a.c[1].x=0"])
    assert doc.data["a"]["c"] == [1, {"x": 0}, 3]


@pytest.mark.parametrize("override, message", [
    ("noequals", "--set noequals: (top level): an override is KEY=VALUE, for example train.epochs=2"),
    ("=3", "--set =3: (top level): empty key"),
    ("a.c[5]=7", "--set a.c[5]=7: a.c[5]: no item 5 here (the list has 3)"),
    ("a.c.x=0", "--set a.c.x=0: a.c.x: no item x here (the list has 3)"),
    ("a.c[7].x=0", "--set a.c[7].x=0: a.c[7]: no such list item or mapping here"),
])
def test_bad_overrides_are_located_at_the_override(family, override, message):
    base, _ = family
    with pytest.raises(SpecError) as exc:
        resolve(base, [override])
    assert str(exc.value) == message


def test_override_that_breaks_the_schema_is_reported_at_the_override():
    with pytest.raises(SpecError) as exc:
        load_spec(QUICKSTART, ["train.epochs=zero"])
    assert str(exc.value) == "--set train.epochs=zero: train.epochs: expected integer, got string 'zero'"


def test_override_with_a_bad_row_is_reported_at_the_override():
    with pytest.raises(SpecError) as exc:
        load_spec(QUICKSTART, ["networks.enc.layers[1]=fc 128 relu"])
    assert str(exc.value) == ("--set networks.enc.layers[1]=fc 128 relu: networks.enc.layers[1]: "
                              "unexpected 'relu': expected 'fc N' or 'fc HxWxC' and optional 'bias=false'")


def test_override_that_adds_an_unknown_key_is_reported_at_the_override():
    with pytest.raises(SpecError) as exc:
        load_spec(QUICKSTART, ["train.epoch=3"])
    assert str(exc.value) == "--set train.epoch=3: train.epoch: unknown key 'epoch'; did you mean 'epochs'?"


def test_valid_overrides_change_the_spec():
    spec = load_spec(QUICKSTART, ["train.epochs=2", "networks.enc.layers.1=fc 100, relu", "params.beta=4"])
    assert spec.train["epochs"] == 2
    assert spec.networks["enc"].rows[1] == {"op": "fc", "out": 100, "act": "relu"}
    assert spec.params["beta"] == 4
    assert spec.networks["enc"].info.rows[1].params == 64 * 100 + 100


def test_cli_reports_a_bad_set_with_its_location():
    result = run_cli(["validate", "specs/quickstart.yaml", "--set", "train.batch_size=-1"])
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr == "--set train.batch_size=-1: train.batch_size: -1 is out of range (minimum 1)\n"
    assert result.stdout == ""


def test_yaml_error_in_an_override_value_names_the_key(family):
    base, _ = family
    with pytest.raises(SpecError) as exc:
        resolve(base, ["a.b=[1,"])
    (problem,) = exc.value.problems
    assert problem.path == ("a", "b")
    assert str(problem.location) == "--set a.b=[1,"
    assert problem.message == ("bad value '[1,': YAML syntax error: while parsing a flow node: expected the node "
                               "content, but found '<stream end>'")


def test_validating_a_fragment_alone_says_what_it_is(row_and_reading):
    result = run_cli(["validate", str(row_and_reading / "_readings" / "bn.yaml")])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    first = result.stderr.splitlines()[0]
    assert first.startswith(f"{row_and_reading / '_readings' / 'bn.yaml'}:1:1: ") and "a fragment" in first
    assert "missing required key 'genspec'" in result.stderr  # the problems themselves still follow
    plain = run_cli(["validate", str(row_and_reading / "paper.yaml")])
    assert plain.returncode == 2 and "not a spec" not in plain.stderr
