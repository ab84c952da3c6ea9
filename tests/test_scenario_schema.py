"""The published JSON Schema and the key reference are generated from the language, and true.

jsonschema (test extra) validates every shipped scenario, world and catalog entry against the
committed schema, and shows the schema refuses what collection refuses for the same reasons.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from pytest_cmg._scenario.language import SCENARIO
from pytest_cmg._scenario.reference import example_of, reference_rows, render_reference
from pytest_cmg._scenario.schema import render_schema, scenario_schema
from pytest_cmg._scenario.spec import Validation

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_FILE = ROOT / "docs" / "scenario.schema.json"
SCENARIOS = sorted((ROOT / "scenarios").rglob("*.cmg.yaml"))
# The shipped worlds and catalogs (package data) and any of this repository's own in fixtures/.
WORLDS = sorted([*(ROOT / "pytest_cmg/shipped/worlds").glob("*.yaml"), *(ROOT / "fixtures/worlds").glob("*.yaml")])
CATALOG = sorted([*(ROOT / "pytest_cmg/shipped/catalog").glob("*.yaml"), *(ROOT / "fixtures/catalog").glob("*.yaml")])


@pytest.fixture(scope="module")
def schema() -> dict:
    return json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))


def validator(schema: dict, definition: str | None = None) -> jsonschema.Draft202012Validator:
    if definition is None:
        return jsonschema.Draft202012Validator(schema)
    return jsonschema.Draft202012Validator({"$ref": f"#/$defs/{definition}", "$defs": schema["$defs"]})


def test_the_published_schema_is_the_generated_one() -> None:
    assert SCHEMA_FILE.read_text(encoding="utf-8") == render_schema(), (
        "docs/scenario.schema.json is stale: run "
        "`python -m pytest_cmg._scenario.schema > docs/scenario.schema.json`"
    )


def test_the_schema_is_a_valid_draft_2020_12_schema(schema: dict) -> None:
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    scenario = schema["$defs"]["scenario"]
    assert scenario["additionalProperties"] is False
    assert scenario["required"] == ["scenario", "packages", "task_sequence", "expect"]
    assert set(scenario["properties"]) == set(SCENARIO.fields)
    # A scenario with an include may take its required keys from the included worlds.
    assert schema["if"] == {"type": "object", "required": ["include"]}
    assert schema["$defs"]["scenario_with_include"]["required"] == ["scenario"]


def test_the_schema_carries_docs_enums_and_size_patterns() -> None:
    schema = scenario_schema()["$defs"]["scenario"]
    package = schema["properties"]["packages"]["items"]
    assert package["properties"]["type"]["enum"] == ["package", "os_upgrade", "driver", "application"]
    assert package["properties"]["size"]["description"] == "Total generated size, e.g. 8MiB."
    size = package["properties"]["size"]["oneOf"][1]
    assert size["type"] == "string"
    for text, ok in (("64MiB", True), ("1.5GiB", True), ("64 mib", False), ("lots", False)):
        assert (jsonschema.Draft202012Validator(size).is_valid(text)) is ok, text
    # A package given by ref needs neither id nor size.
    assert package["anyOf"] == [{"required": ["ref"]}, {"required": ["id", "size"]}]
    fault = schema["properties"]["faults"]["anyOf"][0]["items"]
    assert fault["oneOf"] == [
        {"required": ["gateway"]},
        {"required": ["storage"]},
        {"required": ["service"]},
        {"required": ["clock"]},
        {"required": ["restart"]},
    ]


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_scenario_validates(schema: dict, path: Path) -> None:
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    errors = [f"{e.json_path}: {e.message}" for e in validator(schema).iter_errors(document)]
    assert errors == []


@pytest.mark.parametrize(
    ("path", "definition"),
    [*((p, "world") for p in WORLDS), *((p, "catalog_package") for p in CATALOG)],
    ids=lambda x: x.name if isinstance(x, Path) else x,
)
def test_every_shipped_world_and_catalog_entry_validates(schema: dict, path: Path, definition: str) -> None:
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert list(validator(schema, definition).iter_errors(document)) == []


def test_there_are_worlds_and_catalog_entries() -> None:
    assert len(WORLDS) >= 1
    assert len(CATALOG) >= 2


@pytest.mark.parametrize(
    ("change", "definition"),
    [
        ({"pakages": []}, None),
        ({"seed": -1}, None),
        ({"cmg": {"site_version": 1905}}, None),
        ({"faults": [{"gateway": {"status": 503}, "clock": "9h"}]}, None),
        ({"faults": [{"storage": {"reset_after": "lots"}}]}, None),
        ({"markers": [{"slow": 1, "fast": 2}]}, None),
        ({"expect": {"outcome": "success", "elapsed": {"maximum": "3s"}}}, None),
        ({"scenario": "a world may not name one"}, "world"),
        ({"ref": "catalog/x"}, "catalog_package"),
        ({"include": ["worlds/x"], "cmg": {"site_version": 1905}}, None),
    ],
)
def test_the_schema_refuses_what_collection_refuses(schema: dict, change: dict, definition: str | None) -> None:
    base = yaml.safe_load(SCENARIOS[0].read_text(encoding="utf-8")) if definition is None else {}
    assert validator(schema, definition).is_valid(base)
    assert not validator(schema, definition).is_valid({**base, **change})


def test_the_reference_is_generated_from_the_language() -> None:
    committed = (ROOT / "docs" / "scenarios.md").read_text(encoding="utf-8")
    assert committed == render_reference()


def test_every_key_has_an_example_that_its_rule_accepts() -> None:
    rows = reference_rows(SCENARIO)
    assert len(rows) > 80
    for key, item in rows:
        example = example_of(item)
        assert example, key
        v = Validation(Path("example.yaml"))
        node = yaml.compose(example, Loader=yaml.SafeLoader)
        value = item.spec.check(node, key, v)
        assert v.problems == [], (key, example, [str(p) for p in v.problems])
        assert value is not None, (key, example)
    assert ("matrix", SCENARIO.fields["matrix"]) in rows
    assert any(key == "faults[].storage.reset_after" for key, _ in rows)


def test_every_reference_row_has_six_cells() -> None:
    import re

    rows = [line for line in render_reference().splitlines() if line.startswith("| `")]
    assert len(rows) == len(reference_rows(SCENARIO))
    for row in rows:
        cells = re.split(r"(?<!\\)\|", row)
        assert len(cells) == 8, row  # six cells between the outer pipes
