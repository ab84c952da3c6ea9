"""The public API is exactly ``pytest_cmg.__all__`` (httpx's test_exported_members guard)."""

from __future__ import annotations

import subprocess
import sys

import pytest_cmg


def test_all_is_sorted_and_unique():
    assert list(pytest_cmg.__all__) == sorted(set(pytest_cmg.__all__))


def test_every_public_name_resolves_and_lives_at_the_package():
    for name in pytest_cmg.__all__:
        value = getattr(pytest_cmg, name)
        if isinstance(value, type):
            assert value.__module__ == "pytest_cmg", name


def test_no_other_public_names():
    # isidentifier: pytest's assertion rewriting adds "@py_builtins" when pytester sessions
    # import the plugin; those are not names a user can reach.
    public = {n for n in dir(pytest_cmg) if not n.startswith("_") and n.isidentifier()}
    # Submodules appear as attributes once imported; they are not API.
    modules = {"plugin", "faults"}
    assert public - modules - {"annotations", "importlib", "TYPE_CHECKING", "Any"} == set(
        pytest_cmg.__all__
    )


def test_unknown_name_is_an_attribute_error_naming_it():
    try:
        pytest_cmg.NotAThing  # noqa: B018
    except AttributeError as exc:
        assert "NotAThing" in str(exc)
    else:
        raise AssertionError("expected AttributeError")


def test_plugin_import_stays_light():
    # pytest imports the plugin in every session; the heavy parts must load only when used.
    code = (
        "import sys, pytest_cmg.plugin; "
        "heavy = [m for m in ('azure.storage.blob', 'cryptography', 'trustme', 'faker', 'requests') "
        "if m in sys.modules]; print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_fault_constructors_module_is_explicit():
    import pytest_cmg.faults as faults

    assert sorted(faults.__all__) == sorted(
        n for n in vars(faults) if n.isidentifier() and not n.startswith("_") and n != "annotations"
    )
