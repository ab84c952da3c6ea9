"""The public API is exactly ``pytest_cmg.__all__``, derived from one list (``pytest_cmg._API``).

The rules (httpx's test_exported_members guard, extended):

1. ``__all__`` is ``_API``'s names, sorted; the lazy ``__getattr__`` serves exactly those names.
2. The ``TYPE_CHECKING`` imports (for type checkers) name the same names from the same modules.
3. Every name imports from a private module (inside a ``pytest_cmg._x`` package or module)
   that defines it; reprs and tracebacks name it ``pytest_cmg.<name>``.
4. Nothing internal leaks: no ``_`` name, no module, nothing defined outside the package, and
   ``dir(pytest_cmg)`` holds nothing public besides ``__all__`` and the public submodules.
5. It exports what users receive: :data:`RECEIVED` says how each name reaches a user, and the
   test checks it against the code (a fixture's or a method's annotation, a raise site).
6. What a public object hands out is public too: a class of the package named in a public
   field, property, method or function signature is exported, or listed in
   :data:`NOT_EXPORTED` with the reason.
7. README.md's "Public API" section names every exported name, and no name it does not export.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import pytest_cmg
from pytest_cmg import PytestCmgError

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "pytest_cmg"
#: Public submodules: attributes of the package once imported, and not API names themselves.
SUBMODULES = {"plugin", "faults"}

#: How each exported name reaches a user. The kinds:
#:   ("fixture", f): a plugin fixture whose return annotation names it;
#:   ("returns", "Owner.attr"): a public object's field, property or method result names it;
#:   ("takes", "Owner.method.param"): a public callable takes it (the user builds one to pass);
#:   ("raises", ""): an error of the tree that the package creates (raises, or collects and
#:   reports, as a scenario's failed expectations);
#:   ("starts", why): a user begins here (README shows it); ``why`` says what for.
#: DownloadStats, PackageTransfer and TaskSequenceCache stay public because a public object
#: hands them out (DownloadCore.download, TaskSequenceResult.transfers, TaskSequenceEngine.ts_cache).
RECEIVED: dict[str, tuple[str, str]] = {
    "AZURITE_VERSION": ("starts", "the Azurite version the harness installs and pins"),
    "AccessToken": ("returns", "LocationRecord.access_token"),
    "AzureADTenant": ("takes", "CmgSite.issue_aad_token.tenant"),
    "AzuriteProcess": ("starts", "an Azurite a test starts itself, without the harness"),
    "BlobEndpoint": ("returns", "AzuriteProcess.start"),
    "CMGClient": ("takes", "TaskSequenceEngine.__init__.client"),
    "CMGConnection": ("takes", "CMGClient.__init__.connection"),
    "CacheEntry": ("returns", "ClientCache.entries"),
    "CacheSpaceError": ("raises", ""),
    "CheckFailed": ("raises", ""),
    "ClientCache": ("takes", "TaskSequenceEngine.__init__.cache"),
    "ClientSettings": ("takes", "CMGClient.__init__.settings"),
    "CloudDP": ("fixture", "cloud_dp"),
    "CmgSettings": ("takes", "CmgSite.configure.settings"),
    "CmgSite": ("starts", "the gateway's decisions in process, without sockets"),
    "Condition": ("returns", "Step.conditions"),
    "ContentDestination": ("starts", "the values of Step.destination"),
    "ContentError": ("raises", ""),
    "ContentLocationReply": ("returns", "CMGClient.locate"),
    "ContentLocationRequest": ("takes", "CmgSite.locate.request"),
    "ContentManifest": ("returns", "CloudDP.distribute"),
    "ContentProvider": ("takes", "TaskSequenceEngine.__init__.provider"),
    "Credentials": ("returns", "FakeCMG.issue_client_certificate"),
    "DeploymentSettings": ("takes", "TaskSequenceEngine.__init__.deployment"),
    "DownloadCore": ("takes", "TaskSequenceEngine.__init__.download_core"),
    "DownloadMode": ("starts", "the values of DeploymentSettings.download_mode"),
    "DownloadStats": ("returns", "DownloadCore.download"),
    "Eviction": ("returns", "SpaceReport.evicted"),
    "ExpectationFailed": ("raises", ""),
    "ExternalStorage": (
        "starts",
        "a storage backend given by connection string, as AzuriteProcess",
    ),
    "FakeCMG": ("fixture", "cmg"),
    "FakeClock": ("starts", "a clock a test moves by hand, for CmgSite(clock=...)"),
    "GatewayError": ("raises", ""),
    "GatewayFault": ("returns", "FakeCMG.fail"),
    "Harness": ("fixture", "cmg_harness"),
    "InvalidValueError": ("raises", ""),
    "Lease": ("returns", "ClientCache.acquire"),
    "LocationRecord": ("takes", "CMGClient.manifest.record"),
    "LoggedRequest": ("returns", "RequestLog.entries"),
    "ManifestFile": ("returns", "ContentManifest.files"),
    "NotFoundError": ("raises", ""),
    "NotRunningError": ("raises", ""),
    "OnPremDP": ("returns", "CmgSite.add_on_prem_dp"),
    "PackageSource": ("takes", "CloudDP.distribute.files"),
    "PackageTransfer": ("returns", "TaskSequenceResult.transfers"),
    "ProgramProvider": ("starts", "a download program as a content provider (README, ACP)"),
    "ProviderLocation": ("returns", "ProviderRequest.locations"),
    "ProviderRequest": ("takes", "ContentProvider.fetch.request"),
    "ProviderRun": ("returns", "TaskSequenceResult.provider_runs"),
    "ProviderToken": ("returns", "ProviderLocation.token"),
    "ProvisioningError": ("raises", ""),
    "PytestCmgError": ("raises", ""),
    "RequestLog": ("starts", "the gateway's request log, cmg.log (an instance attribute)"),
    "RetryPolicy": ("returns", "VirtualTime.policy"),
    "Scenario": ("returns", "load_scenario"),
    "ScenarioError": ("raises", ""),
    "ScenarioProblem": ("takes", "ScenarioError.__init__.problems"),
    "ServiceStartError": ("raises", ""),
    "Setup": ("returns", "Step.setup"),
    "SiteRequest": ("takes", "CmgSite.handle.request"),
    "SiteResponse": ("returns", "CmgSite.handle"),
    "SmstsLog": ("takes", "TaskSequenceEngine.__init__.log"),
    "SpaceReport": ("returns", "ClientCache.make_room"),
    "Step": ("returns", "TaskSequence.steps"),
    "StepEvent": ("takes", "TaskSequenceEngine.__init__.on_step"),
    "TaskSequence": ("takes", "TaskSequenceEngine.run.sequence"),
    "TaskSequenceCache": ("returns", "TaskSequenceEngine.ts_cache"),
    "TaskSequenceEngine": ("fixture", "cmg_client"),
    "TaskSequenceResult": ("returns", "TaskSequenceEngine.run"),
    "VirtualTime": ("fixture", "cmg_time"),
    "load_scenario": ("starts", "a scenario file read from Python"),
    "load_scenarios": ("starts", "every case of a scenario file read from Python"),
}

#: Classes of the package that public signatures name, yet are not exported: name -> why.
NOT_EXPORTED = {
    "GatewayTLS": "cmg.tls, the gateway's certificate authorities for this repo's TLS tests; "
    "users trust cmg.ca_pem",
    "Clock": "a Protocol: any object with now() will do, and FakeClock is the exported one",
    "ContentStore": "a Protocol: the three methods of CloudDP the gateway reads; users pass a CloudDP",
    "NodeRuntime": "AzuriteProcess finds Node.js itself; the parameter is for this repo's tests",
    # Scenario's parts: the scenario language's model, documented by docs/scenarios.md (what a
    # file may say), not as Python types.
    "BenchmarkSpec": "a part of Scenario (the scenario language's model)",
    "DistributionPointSpec": "a part of Scenario (the scenario language's model)",
    "Expectations": "a part of Scenario (the scenario language's model)",
    "MarkerUse": "a part of Scenario (the scenario language's model)",
    "PackageSpec": "a part of Scenario (the scenario language's model)",
    "TimelineEvent": "a part of Scenario (the scenario language's model)",
}


def _private(module: str) -> bool:
    parts = module.split(".")
    return parts[0] == "pytest_cmg" and len(parts) > 1 and parts[1].startswith("_")


def _annotation(owner: Any, attr: str) -> str:
    """The annotation text of ``owner.attr``: a field, a property's or a method's result."""
    if inspect.isclass(owner):
        for klass in owner.__mro__:
            if attr in vars(klass).get("__annotations__", {}):
                return str(vars(klass)["__annotations__"][attr])
    found = inspect.getattr_static(owner, attr)
    if isinstance(found, property):
        assert found.fget is not None
        found = found.fget
    if isinstance(found, staticmethod | classmethod):
        found = found.__func__
    return str(found.__annotations__["return"])


def _fixture_annotations() -> dict[str, str]:
    tree = ast.parse((PACKAGE / "plugin.py").read_text())
    return {
        node.name: ast.unparse(node.returns)
        for node in tree.body
        if isinstance(node, ast.FunctionDef)
        and node.returns is not None
        and any("fixture" in ast.unparse(d) for d in node.decorator_list)
    }


def _created_names() -> set[str]:
    """The names the package calls (``raise X(...)``, ``failures.append(X(...))``)."""
    names = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                names.add(node.func.id)
    return names


def _subclasses(cls: type) -> set[type]:
    found = set()
    for sub in cls.__subclasses__():
        found |= {sub, *_subclasses(sub)}
    return found


def test_all_is_the_one_list():
    assert pytest_cmg.__all__ == sorted(pytest_cmg._API)
    assert len(set(pytest_cmg.__all__)) == len(pytest_cmg.__all__)


def test_type_checking_imports_match_the_list():
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    imported: dict[str, str] = {}
    blocks = [
        n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING"
    ]
    assert len(blocks) == 1
    for node in blocks[0].body:
        assert isinstance(node, ast.ImportFrom), ast.unparse(node)
        for alias in node.names:
            # ``X as X``: the explicit re-export type checkers need, since __all__ is computed.
            assert alias.asname == alias.name, ast.unparse(node)
            assert alias.name not in imported, alias.name
            imported[alias.name] = "." * node.level + (node.module or "")
    assert imported == pytest_cmg._API


def test_every_name_imports_from_a_private_module_that_defines_it():
    for name, home in pytest_cmg._API.items():
        module = importlib.import_module(home, "pytest_cmg")
        assert _private(module.__name__), f"{name}: {module.__name__} is not a private module"
        value = getattr(pytest_cmg, name)
        assert value is getattr(module, name), name
        # Defined there, not imported into it from elsewhere (a third-party object, a re-export).
        tree = ast.parse(Path(module.__file__ or "").read_text())
        defined = {n.name for n in tree.body if isinstance(n, ast.ClassDef | ast.FunctionDef)}
        defined |= {
            t.id
            for n in tree.body
            if isinstance(n, ast.Assign | ast.AnnAssign)
            for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
            if isinstance(t, ast.Name)
        }
        assert name in defined, f"{name} is not defined in {module.__name__}"
        if inspect.isclass(value) or inspect.isfunction(value):
            # The public home, for reprs and tracebacks.
            assert value.__module__ == "pytest_cmg", name


def test_nothing_internal_leaks():
    for name in pytest_cmg.__all__:
        assert not name.startswith("_"), name
        assert not inspect.ismodule(getattr(pytest_cmg, name)), name
    # isidentifier: pytest's assertion rewriting adds "@py_builtins" when pytester sessions
    # import the plugin; those are not names a user can reach.
    public = {n for n in dir(pytest_cmg) if not n.startswith("_") and n.isidentifier()}
    tools = {"annotations", "importlib", "TYPE_CHECKING", "Any"}
    assert public - SUBMODULES - tools == set(pytest_cmg.__all__)


def test_each_name_is_something_users_receive():
    assert set(RECEIVED) == set(pytest_cmg.__all__)
    fixtures = _fixture_annotations()
    created = _created_names()
    for name, (kind, where) in RECEIVED.items():
        value = getattr(pytest_cmg, name)
        if kind == "fixture":
            assert re.search(rf"\b{name}\b", fixtures[where]), (name, fixtures[where])
        elif kind == "returns":
            owner_name, _, attr = where.partition(".")
            owner = getattr(pytest_cmg, owner_name)
            text = _annotation(owner, attr) if attr else str(owner.__annotations__["return"])
            assert re.search(rf"\b{name}\b", text), (name, where, text)
        elif kind == "takes":
            owner_name, method, param = where.split(".")
            annotations = getattr(getattr(pytest_cmg, owner_name), method).__annotations__
            assert re.search(rf"\b{name}\b", str(annotations[param])), (name, where)
        elif kind == "raises":
            assert issubclass(value, PytestCmgError), name
            importlib.import_module("pytest_cmg._scenario.expectations")  # ExpectationFailed's subclass
            family = {value, *_subclasses(value)}
            assert name == "PytestCmgError" or {c.__name__ for c in family} & created, (
                f"{name} (or a subclass) is created nowhere"
            )
        else:
            assert kind == "starts", (name, kind)
            assert where, name


def _package_classes() -> set[str]:
    return {
        node.name
        for path in PACKAGE.rglob("*.py")
        for node in ast.parse(path.read_text()).body
        if isinstance(node, ast.ClassDef)
    }


def _signatures(value: Any) -> dict[str, str]:
    """Where -> annotation text, for every public field, property and method of ``value``."""
    if inspect.isfunction(value):
        return {f"({k})": str(a) for k, a in value.__annotations__.items()}
    found: dict[str, str] = {}
    if not inspect.isclass(value):
        return found
    for klass in value.__mro__:
        if not klass.__module__.startswith("pytest_cmg"):
            continue
        for attr, annotation in vars(klass).get("__annotations__", {}).items():
            if not attr.startswith("_"):
                found[f".{attr}"] = str(annotation)
        for attr, member in vars(klass).items():
            if attr.startswith("_") and attr != "__init__":
                continue
            function = member.fget if isinstance(member, property) else member
            if isinstance(function, staticmethod | classmethod):
                function = function.__func__
            if inspect.isfunction(function):
                for key, annotation in function.__annotations__.items():
                    found[f".{attr}({key})"] = str(annotation)
    return found


def test_what_public_objects_hand_out_is_public():
    import pytest_cmg.faults as faults

    public = set(pytest_cmg.__all__) | set(faults.__all__)
    classes = _package_classes()
    unexported = []
    for name in sorted(public):
        value = getattr(pytest_cmg, name, None) or getattr(faults, name)
        for where, annotation in _signatures(value).items():
            for word in set(re.findall(r"[A-Za-z_]\w*", annotation)):
                if word in classes and word not in public and word not in NOT_EXPORTED:
                    unexported.append(f"{name}{where}: {word}")
    assert not unexported, (
        "public signatures name classes that are not exported; export them (pytest_cmg._API) "
        "or list them in NOT_EXPORTED with the reason:\n" + "\n".join(sorted(unexported))
    )
    # The allowance stays honest: each entry is still a class of the package, not yet exported.
    assert set(NOT_EXPORTED) <= classes
    assert not set(NOT_EXPORTED) & public


def test_readme_names_exactly_the_public_api():
    text = (ROOT / "README.md").read_text()
    section = text.split("### Public API", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", section))
    assert set(pytest_cmg.__all__) <= named, set(pytest_cmg.__all__) - named
    # Any other capitalised name in backquotes there is pytest_cmg.faults' (the fault proxy's
    # public home), never a name that looks exported but is not.
    import pytest_cmg.faults as faults

    other = named - set(pytest_cmg.__all__) - set(faults.__all__) - set(dir(builtins))
    stray = {n for n in other if n[0].isupper()}
    assert not stray, stray


def test_unknown_name_is_an_attribute_error_naming_it():
    with pytest.raises(AttributeError, match=r"NotAThing.*pytest_cmg\.__all__"):
        pytest_cmg.NotAThing  # noqa: B018


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
