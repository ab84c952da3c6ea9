"""The JSON Schema (draft 2020-12) of scenario files, generated from the spec that validates them.

Run ``python -m pytest_cmg._scenario.schema > docs/scenario.schema.json``; a test fails when the
committed file differs. ``$defs/world`` describes included world files and
``$defs/catalog_package`` catalog entries; a scenario is checked against ``$defs/scenario``, or,
when it has an ``include``, against ``$defs/scenario_with_include`` (nothing but its name
required, packages may give only their id and what they change). The schema is what an editor
can check; collection checks more (references to declared packages and steps, marker
registration, case values in place).
"""

from __future__ import annotations

import json
from typing import Any

from .language import CATALOG_PACKAGE, FRAGMENT, SCENARIO, SCENARIO_WITH_INCLUDE

__all__ = ["SCHEMA_ID", "render_schema", "scenario_schema"]

SCHEMA_ID = "https://pytest-cmg.invalid/scenario.schema.json"


def scenario_schema() -> dict[str, Any]:
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "pytest-cmg scenario file (*.cmg.yaml)",
        "description": SCENARIO.doc,
        # A file with an include may take any required key (but its name) from the worlds it
        # includes, which a schema cannot see; collection checks the assembled file.
        "if": {"type": "object", "required": ["include"]},
        "then": {"$ref": "#/$defs/scenario_with_include"},
        "else": {"$ref": "#/$defs/scenario"},
        "$defs": {
            "scenario": SCENARIO.schema(),
            "scenario_with_include": SCENARIO_WITH_INCLUDE.schema(),
            "world": {"title": "pytest-cmg shared world (include)", **FRAGMENT.schema()},
            "catalog_package": {
                "title": "pytest-cmg catalog package (ref)",
                **CATALOG_PACKAGE.schema(),
            },
        },
    }


def render_schema() -> str:
    return json.dumps(scenario_schema(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    print(render_schema(), end="")
