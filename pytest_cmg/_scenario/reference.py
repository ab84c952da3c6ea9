"""Render the scenario key reference (docs/scenarios.md) from the spec that validates files.

Run ``python -m pytest_cmg._scenario.reference > docs/scenarios.md``; a test fails when the
committed file differs, so the reference cannot fall behind the language.
"""

from __future__ import annotations

from .model import SCENARIO
from .spec import Choice, Field, ListOf, Record, Spec

__all__ = ["render_reference"]

_INTRO = """# Scenario file reference

Generated from the scenario language's own definition (`pytest_cmg/_scenario/model.py`) by
`python -m pytest_cmg._scenario.reference`; do not edit by hand.

A scenario file is YAML named `*.cmg.yaml` (option `--cmg-scenario-pattern`). Every key below is
checked at collection: an unknown key, a wrong type or a dangling reference is reported with the
file and line, all problems of a file at once. The annotated example is
`scenarios/ipu/on-demand-token-software-center.cmg.yaml`.

| key | required | default | value | meaning |
|---|---|---|---|---|
"""


def _default(item: Field) -> str:
    if item.required:
        return ""
    if isinstance(item.default, bool):
        return str(item.default).lower()
    if item.default is None or isinstance(item.default, dict):
        return ""
    return f"`{item.default}`" if item.default != "" else '`""`'


def _rows(record: Record, prefix: str) -> list[str]:
    rows = []
    for name, item in record.fields.items():
        key = f"{prefix}{name}"
        spec: Spec = item.spec
        value = (
            spec.describe()
            if not isinstance(spec, Record | ListOf)
            else ("mapping" if isinstance(spec, Record) else "list")
        )
        if isinstance(spec, Choice):
            value = " \\| ".join(f"`{c}`" for c in spec.choices)
        doc = (item.doc or spec.doc).replace("|", "\\|")
        rows.append(
            f"| `{key}` | {'yes' if item.required else ''} | {_default(item)} | {value} | {doc} |"
        )
        if isinstance(spec, Record):
            rows.extend(_rows(spec, f"{key}."))
        elif isinstance(spec, ListOf) and isinstance(spec.item, Record):
            rows.extend(_rows(spec.item, f"{key}[]."))
        elif isinstance(spec, ListOf):
            rows[-1] = rows[-1].replace("| list |", f"| list of {spec.item.describe()} |")
    return rows


def render_reference() -> str:
    return _INTRO + "\n".join(_rows(SCENARIO, "")) + "\n"


if __name__ == "__main__":
    print(render_reference(), end="")
