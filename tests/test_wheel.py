"""The shipped worlds work as a user gets them: from a wheel, in a fresh venv, in an empty folder.

The test builds the wheel from a copy of the sources (a build in the checkout would reuse a
stale ``build/lib``, which could hide a file missing from the package data), installs it into a
new venv, and runs pytest in an empty folder on two scenarios: one that includes a shipped
world (must pass) and one that includes a world nobody has (must fail with the error that names
the file, the line, the folders searched and the fix).

Only pytest-cmg comes from the wheel. Its dependencies come from this environment: a ``.pth``
file adds this environment's site-packages to the new venv (``--system-site-packages`` would
add the base interpreter's, which lacks them when this environment is itself a venv). A path
listed in a ``.pth`` file is not scanned for ``.pth`` files of its own, so the editable install
of the checkout (an import hook started by such a file) stays off; the test still checks where
``pytest_cmg`` is imported from, and runs with ``-P``, no PYTHONPATH and the empty folder as the
working directory, so the source tree cannot be reached.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Each step's bound: building and installing take a few seconds, the scenario run about ten.
STEP_TIMEOUT = 120

PASSING = """\
scenario: a user's scenario on a shipped world
include: [worlds/small-ipu-world]
expect:
  outcome: success
  cache: [PS100012.3, PS100013.1]
"""

UNKNOWN = """\
scenario: a user's scenario on a world nobody ships
include: [worlds/no-such-world]
expect:
  outcome: success
"""


def _run(argv: list[str], *, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=STEP_TIMEOUT, check=False
    )


def _clean_env() -> dict[str, str]:
    """This process's environment without what would point the child at the checkout or at
    this session: PYTHONPATH, and PYTEST_* (CI's --junitxml in PYTEST_ADDOPTS, xdist's worker
    variables), except the cache folder that holds the installed Azurite."""
    return {
        key: value
        for key, value in os.environ.items()
        if key != "PYTHONPATH"
        and not key.startswith("VIRTUAL_ENV")
        and (not key.startswith("PYTEST_") or key == "PYTEST_CMG_CACHE_DIR")
    }


def _copy_sources(to: Path) -> Path:
    """What the wheel is built from: pyproject, README (the long description) and the package."""
    to.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, to / name)
    shutil.copytree(
        ROOT / "pytest_cmg",
        to / "pytest_cmg",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    return to


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The python of a fresh venv with pytest-cmg installed from a wheel of this checkout."""
    base = tmp_path_factory.mktemp("wheel")
    env = _clean_env()
    sources = _copy_sources(base / "src")
    dist = base / "dist"
    built = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(sources),
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(dist),
            "-q",
        ],
        cwd=base,
        env=env,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = dist.glob("pytest_cmg-*.whl")
    venv = base / "venv"
    made = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=base, env=env)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    own = _run(
        [str(python), "-c", "import site; print(site.getsitepackages()[0])"], cwd=base, env=env
    )
    assert own.returncode == 0, own.stderr
    deps = [p for p in site.getsitepackages() if Path(p).is_dir()]
    Path(own.stdout.strip(), "dependencies-from-the-test-environment.pth").write_text(
        "\n".join(deps) + "\n", encoding="utf-8"
    )
    # --ignore-installed: pip must not look at (let alone uninstall) the checkout's editable
    # install, which it sees on the added path; the wheel goes into the new venv only.
    installed = _run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--force-reinstall",
            "--ignore-installed",
            "--disable-pip-version-check",
            str(wheel),
        ],
        cwd=base,
        env=env,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return python


def _pytest(python: Path, folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return _run(
        [str(python), "-P", "-m", "pytest", "-p", "no:cacheprovider", "-q", *args],
        cwd=folder,
        env=_clean_env(),
    )


def test_the_package_comes_from_the_wheel_with_its_worlds(installed: Path, tmp_path: Path) -> None:
    probe = _run(
        [
            str(installed),
            "-P",
            "-c",
            "import pytest_cmg, pytest_cmg._scenario.assemble as a; "
            "print(pytest_cmg.__file__); print(a.SHIPPED)",
        ],
        cwd=tmp_path,
        env=_clean_env(),
    )
    assert probe.returncode == 0, probe.stderr
    module, shipped = (Path(line) for line in probe.stdout.split())
    assert not module.is_relative_to(ROOT), f"pytest_cmg was imported from the checkout: {module}"
    assert module.is_relative_to(installed.parent.parent), module
    assert sorted(p.relative_to(shipped).as_posix() for p in shipped.glob("*/*.yaml")) == sorted(
        p.relative_to(ROOT / "pytest_cmg/shipped").as_posix()
        for p in (ROOT / "pytest_cmg/shipped").glob("*/*.yaml")
    )


def test_a_scenario_in_an_empty_folder_includes_a_shipped_world(
    installed: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "upgrade.cmg.yaml").write_text(PASSING, encoding="utf-8")
    ran = _pytest(installed, folder, "-p", "no:randomly", "upgrade.cmg.yaml")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "1 passed" in ran.stdout, ran.stdout


def test_an_unknown_world_fails_with_the_folders_searched_and_the_fix(
    installed: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "unknown.cmg.yaml").write_text(UNKNOWN, encoding="utf-8")
    ran = _pytest(installed, folder, "-p", "no:randomly", "unknown.cmg.yaml")
    assert ran.returncode != 0, ran.stdout
    shipped = installed.parent.parent / "lib"
    expected = (
        textwrap.dedent(
            """\
        unknown.cmg.yaml:2: include 'worlds/no-such-world': no file worlds/no-such-world.yaml in
        """
        )
        .replace("\n", " ")
        .strip()
    )
    assert expected in ran.stdout, ran.stdout
    line = next(line for line in ran.stdout.splitlines() if expected in line)
    # The folders searched: none of the user's, and the shipped one inside the new venv.
    assert "the shipped folder " + str(shipped) in line, line
    assert "no fixtures folder is set" in line, line
    # The fix, with the shipped worlds to choose from.
    assert "--cmg-fixtures DIR" in line, line
    assert "use a shipped one: worlds/ipu-world, worlds/small-ipu-world" in line, line
