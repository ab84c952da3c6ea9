"""Documentation that is code must stay true."""

from __future__ import annotations

import re
from pathlib import Path

from pytest_cmg._scenario.reference import render_reference

ROOT = Path(__file__).resolve().parent.parent


def test_scenario_reference_is_generated_from_the_language():
    committed = (ROOT / "docs" / "scenarios.md").read_text(encoding="utf-8")
    assert committed == render_reference(), (
        "docs/scenarios.md is stale: run "
        "`python -m pytest_cmg._scenario.reference > docs/scenarios.md`"
    )


def test_readme_fixture_example_is_the_tested_example():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    example = (ROOT / "tests" / "examples" / "test_howto_fixtures.py").read_text(encoding="utf-8")
    body = example.split("\n\n", 1)[1]  # without the __future__ import
    assert body.strip() in [b.strip() for b in blocks]


def test_readme_has_the_commands_ci_runs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "<!-- ci:install -->\n```bash\npython -m pip install -e \".[test]\"\n```" in readme
    assert "<!-- ci:test -->\n```bash\npython -m pytest -n 2\n```" in readme


def test_readme_timeline_example_is_a_passing_scenario_file():
    """The README's fault timeline is copied from a scenario the suite runs, so it stays true."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("```yaml\ninclude: [worlds/small-ipu-world]\n", 1)[1].split("```", 1)[0]
    scenario = ROOT / "scenarios/faults/a-reset-a-busy-cmg-and-an-expired-token.cmg.yaml"
    assert block in scenario.read_text(encoding="utf-8")


def test_the_tutorial_scenarios_are_valid_files(tmp_path):
    from pytest_cmg._scenario.load import load_scenarios

    tutorial = (ROOT / "docs" / "tutorial.md").read_text(encoding="utf-8")
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", tutorial, flags=re.S) if b.startswith("scenario:")]
    assert len(blocks) >= 3
    for index, block in enumerate(blocks):
        path = tmp_path / f"tutorial-{index}.cmg.yaml"
        path.write_text(block, encoding="utf-8")
        assert load_scenarios(path, fixtures=ROOT / "fixtures"), block
