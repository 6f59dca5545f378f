"""The JSON Schema and the registry describe the same language, and every spec points its editor at the schema."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest

from genspec.lang import registry as R
from genspec.lang.validate import SCHEMA_PATH, schema

from spec_helpers import REPO

SCHEMA = json.loads((REPO / "schemas" / "genspec.schema.json").read_text())
ROW = SCHEMA["$defs"]["row"]["oneOf"][1]["properties"]
SPECS = sorted((REPO / "specs").glob("*.yaml"))


def test_schema_is_a_valid_draft_2020_12_schema():
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


def test_validate_reads_the_same_schema_file():
    assert SCHEMA_PATH == (REPO / "schemas" / "genspec.schema.json").resolve()
    assert schema() == SCHEMA


def test_row_op_enum_is_the_registry_layer_ops():
    assert ROW["op"]["enum"] == list(R.LAYER_OPS)


def test_row_act_enum_is_the_registry_activations():
    assert ROW["act"]["enum"] == list(R.ACTIVATIONS)


def test_row_norm_enum_is_the_registry_norms():
    assert ROW["norm"]["enum"] == list(R.NORMS)


def test_row_keys_and_upsample_modes():
    assert list(ROW) == list(R.ROW_KEYS)
    assert ROW["mode"]["enum"] == list(R.UPSAMPLE_MODES)


def test_dataset_enum_is_the_registry_datasets():
    assert SCHEMA["properties"]["data"]["properties"]["dataset"]["enum"] == list(R.DATASETS)
    # image folders and CelebA take their size from data.image_size
    assert set(R.DATASET_SHAPES) == set(R.DATASET_CLASSES) == set(R.DATASETS) - set(R.FILE_DATASETS)


def test_loader_enum_is_the_registry_loaders():
    assert SCHEMA["properties"]["train"]["properties"]["loader"]["enum"] == list(R.LOADERS)
    assert set(R.FILE_DATASETS) <= set(R.DATASETS)


def test_tracking_enum_is_the_registry_trackers():
    assert SCHEMA["properties"]["train"]["properties"]["tracking"]["items"]["enum"] == list(R.TRACKERS)


def test_top_level_properties_are_the_registry_top_level_keys():
    assert set(SCHEMA["properties"]) == set(R.TOP_LEVEL_KEYS)
    assert len(R.TOP_LEVEL_KEYS) == len(set(R.TOP_LEVEL_KEYS))
    assert SCHEMA["additionalProperties"] is False


def test_format_version():
    assert SCHEMA["properties"]["genspec"]["const"] == R.FORMAT_VERSION


def _pattern_names(pattern: str) -> list[str]:
    return re.search(r"\(([a-z_|]+)\)", pattern).group(1).split("|")


def test_optimizer_init_and_prior_patterns_name_the_registry_entries():
    objectives = SCHEMA["properties"]["objectives"]["additionalProperties"]["properties"]
    assert _pattern_names(objectives["optimizer"]["pattern"]) == list(R.OPTIMIZERS)
    assert _pattern_names(SCHEMA["$defs"]["network"]["properties"]["init"]["pattern"]) == list(R.INITS)
    prior = SCHEMA["properties"]["latent"]["additionalProperties"]["properties"]["prior"]
    assert _pattern_names(prior["pattern"]) == list(R.PRIORS)


def test_freeze_modes_and_grids():
    freeze = SCHEMA["$defs"]["network"]["properties"]["freeze"]["oneOf"]
    assert [alt["const"] for alt in freeze if "const" in alt] == list(R.FREEZE_MODES)
    grids = SCHEMA["properties"]["evaluate"]["properties"]["grids"]["oneOf"]
    assert grids[0]["items"]["enum"] == list(R.GRIDS)
    assert list(grids[1]["properties"]) == list(R.GRIDS)


def test_expression_ops_have_known_argument_kinds():
    kinds = {"dist", "latent", "tensor", "target", "labels", "any", "network", "number", "count", "distribution", "value"}
    for name, op in R.EXPRESSION_OPS.items():
        assert set(op["args"]) <= kinds, name
        assert op["result"] in {"tensor", "scalar", "same", "per_example", "broadcast", "dist", "labels"}, name
        assert 0 <= op.get("optional", 0) < len(op["args"]), name


def test_there_are_specs():
    assert SPECS, "specs/*.yaml is empty"


@pytest.mark.parametrize("spec", SPECS, ids=[p.name for p in SPECS])
def test_every_spec_names_the_schema_on_its_first_line(spec: Path):
    first = spec.read_text().splitlines()[0]
    prefix = "# yaml-language-server: $schema="
    assert first.startswith(prefix), first
    target = (spec.parent / first[len(prefix):].strip()).resolve()
    assert target == (REPO / "schemas" / "genspec.schema.json").resolve()
    assert target.is_file()


@pytest.mark.parametrize("spec", sorted((REPO / "tests" / "fixtures" / "invalid").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_fixture_names_the_schema_on_its_first_line(spec: Path):
    first = spec.read_text().splitlines()[0]
    prefix = "# yaml-language-server: $schema="
    assert first.startswith(prefix), first
    assert (spec.parent / first[len(prefix):].strip()).resolve() == SCHEMA_PATH


def test_grid_kinds_are_the_registry_grids():
    grids = SCHEMA["properties"]["evaluate"]["properties"]["grids"]["oneOf"]
    assert grids[0]["items"]["enum"] == list(R.GRIDS)
    assert sorted(grids[1]["properties"]) == sorted(R.GRIDS)


def test_block_skips_are_the_registry_block_skips():
    blocks = SCHEMA["properties"]["blocks"]["additionalProperties"]
    assert blocks["properties"]["skip"]["enum"] == list(R.BLOCK_SKIPS)
    assert blocks["properties"]["layers"]["items"] == blocks["properties"]["shortcut"]["items"] == {"$ref": "#/$defs/row"}
