"""The pytest plugin (entry point ``pytest11: cmg``): options, scenario collection and fixtures.

It only wires the parts together. Nothing starts at import or collection time: the harness (blob
service + fake CMG) starts when the first test that needs it runs, once per session, which means
once per xdist worker, and stops at the end of that session.
"""

from __future__ import annotations

import fnmatch
import os
from typing import TYPE_CHECKING

import pytest

from ._errors import InvalidValueError
from ._harness import Harness
from ._storage.azurite import BACKENDS

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from _pytest.terminal import TerminalReporter

    from ._client.acp import ContentProvider
    from ._client.engine import StepEvent, TaskSequenceEngine
    from ._client.retry import VirtualTime
    from ._gateway.server import FakeCMG
    from ._net.proxy import FaultProxy
    from ._protocol.settings import ClientSettings, DeploymentSettings

    # Named in a string (the stash key below): imported at run time only when it is on.
    from ._scenario.conformance import Conformance  # noqa: F401
    from ._storage.clouddp import CloudDP

_HARNESS = pytest.StashKey[Harness]()
_FIXTURES = pytest.StashKey["tuple[Path, ...] | None"]()
_DOWNLOAD_PROGRAM = pytest.StashKey[str | None]()
_CONFORMANCE = pytest.StashKey["Conformance"]()
CONNECTION_STRING_ENV = "PYTEST_CMG_CONNECTION_STRING"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("cmg", "pytest-cmg: fake CMG and cloud DP on Azurite")
    group.addoption(
        "--cmg-azurite",
        dest="cmg_azurite",
        default=None,
        metavar="BACKEND",
        help=f"blob service backend: {', '.join(BACKENDS)} (default: process, or ini cmg_azurite)",
    )
    group.addoption(
        "--cmg-connection-string",
        dest="cmg_connection_string",
        default=None,
        metavar="CS",
        help=f"storage connection string for the external backend (or ${CONNECTION_STRING_ENV})",
    )
    group.addoption(
        "--cmg-azurite-timeout",
        dest="cmg_azurite_timeout",
        default=None,
        metavar="SECONDS",
        help="seconds Azurite may take to report readiness (default 60)",
    )
    group.addoption(
        "--cmg-scenario-pattern",
        dest="cmg_scenario_pattern",
        default=None,
        metavar="GLOB",
        help="file name pattern of scenario files (default *.cmg.yaml)",
    )
    parser.addini(
        "cmg_azurite", "blob service backend (process, container, external)", default="process"
    )
    parser.addini("cmg_connection_string", "connection string for the external backend", default="")
    parser.addini("cmg_azurite_timeout", "Azurite readiness timeout in seconds", default="60")
    parser.addini(
        "cmg_scenario_pattern", "file name pattern of scenario files", default="*.cmg.yaml"
    )
    group.addoption(
        "--cmg-fixtures",
        dest="cmg_fixtures",
        action="append",
        default=None,
        metavar="DIR",
        help="your folder of shared worlds and package catalogs for scenario include/ref, "
        "looked in before the ones shipped with pytest-cmg; give it again for more folders, "
        "searched in order (default: ini cmg_fixtures, else the nearest 'fixtures' folder "
        "above each scenario)",
    )
    parser.addini(
        "cmg_fixtures",
        "folders of shared scenario worlds and catalogs, one a line, searched in order, "
        "relative to the rootdir",
        type="linelist",
        default=[],
    )
    group.addoption(
        "--cmg-storage-https",
        dest="cmg_storage_https",
        action="store_true",
        default=None,
        help="serve storage over HTTPS (process backend; SAS URLs are spr=https); storage faults "
        "then cannot be injected (or ini cmg_storage_https)",
    )
    parser.addini(
        "cmg_storage_https",
        "serve storage over HTTPS with a test CA (process backend)",
        type="bool",
        default=False,
    )
    _add_conformance_options(group, parser)
    _add_bench_options(group, parser)


def _add_conformance_options(group: pytest.OptionGroup, parser: pytest.Parser) -> None:
    # Conformance mode (issue 11): the scenario suite judges another downloader.
    group.addoption(
        "--cmg-download-program",
        dest="cmg_download_program",
        default=None,
        metavar="CMD",
        help="run every scenario with SMSTSDownloadProgram=CMD (an alternate content provider, "
        "offered the CMG: site >= 2203, SMSTSAllowTokenAuthURLForACP=true); scenarios whose "
        "'requires' rules it out are skipped as not applicable (or ini cmg_download_program)",
    )
    group.addoption(
        "--cmg-conformance-report",
        dest="cmg_conformance_report",
        default=None,
        metavar="PATH",
        help="write a JSON record per scenario item (passed, failed with the expectation, or "
        "not applicable with the reason) and show the counts in the summary",
    )
    parser.addini(
        "cmg_download_program",
        "alternate content provider command line every scenario runs with",
        default="",
    )


def _add_bench_options(group: pytest.OptionGroup, parser: pytest.Parser) -> None:
    # Benchmark mode (docs/benchmarks.md); the bench package is imported only when it is on.
    group.addoption(
        "--cmg-bench",
        dest="cmg_bench",
        action="store_true",
        default=False,
        help="run the download-core benchmark as one item per workload instead of the tests "
        "(refused under xdist)",
    )
    group.addoption(
        "--cmg-bench-workloads",
        dest="cmg_bench_workloads",
        default=None,
        metavar="LIST",
        help="comma-separated among big, m1, k16 (default all, or ini cmg_bench_workloads)",
    )
    group.addoption(
        "--cmg-bench-rounds",
        dest="cmg_bench_rounds",
        default=None,
        metavar="N",
        help="rounds per case (default 5, 1 with --cmg-bench-quick)",
    )
    group.addoption(
        "--cmg-bench-quick",
        dest="cmg_bench_quick",
        action="store_true",
        default=False,
        help="small workloads and 1 round",
    )
    group.addoption(
        "--cmg-bench-json",
        dest="cmg_bench_json",
        default=None,
        metavar="PATH",
        help="write the benchmark JSON (pytest-benchmark layout)",
    )
    group.addoption(
        "--cmg-bench-chart",
        dest="cmg_bench_chart",
        default=None,
        metavar="PATH",
        help="write a PNG chart of the benchmark (needs matplotlib)",
    )
    group.addoption(
        "--cmg-bench-compare",
        dest="cmg_bench_compare",
        default=None,
        metavar="BASELINE.json|targets",
        help="fail a workload's item when a ratio is more than the margin below the baseline's",
    )
    group.addoption(
        "--cmg-bench-margin",
        dest="cmg_bench_margin",
        default=None,
        metavar="FRACTION",
        help="allowed shortfall for --cmg-bench-compare (default 0.15)",
    )
    group.addoption(
        "--cmg-bench-with-aria2",
        dest="cmg_bench_with_aria2",
        action="store_true",
        default=False,
        help="fetch aria2 from Debian packages into the cache when it is missing",
    )
    parser.addini("cmg_bench_workloads", "benchmark workloads", default="big,m1,k16")
    parser.addini("cmg_bench_rounds", "benchmark rounds per case", default="")
    parser.addini("cmg_bench_compare", "benchmark baseline JSON, or 'targets'", default="")
    parser.addini("cmg_bench_margin", "benchmark compare margin (fraction)", default="0.15")


def _option(config: pytest.Config, name: str) -> str:
    value = config.getoption(name)
    return str(value) if value is not None else str(config.getini(name))


def pytest_configure(config: pytest.Config) -> None:
    backend = _option(config, "cmg_azurite")
    if backend not in BACKENDS:
        msg = f"--cmg-azurite={backend!r} is not a backend; choose one of {', '.join(BACKENDS)}"
        raise pytest.UsageError(msg)
    connection_string = _option(config, "cmg_connection_string") or os.environ.get(
        CONNECTION_STRING_ENV, ""
    )
    if backend == "external" and not connection_string:
        msg = (
            "--cmg-azurite=external needs a storage connection string: pass "
            f"--cmg-connection-string, set ini cmg_connection_string, or set ${CONNECTION_STRING_ENV}"
        )
        raise pytest.UsageError(msg)
    try:
        timeout = float(_option(config, "cmg_azurite_timeout"))
    except ValueError:
        timeout = -1.0
    if timeout <= 0:
        msg = "--cmg-azurite-timeout must be a positive number of seconds, e.g. 60"
        raise pytest.UsageError(msg)
    storage_https = config.getoption("cmg_storage_https")
    if storage_https is None:
        storage_https = bool(config.getini("cmg_storage_https"))
    if storage_https and backend != "process":
        msg = (
            f"--cmg-storage-https needs the process backend (--cmg-azurite=process), not "
            f"{backend!r}: only the Azurite subprocess is started with a test certificate"
        )
        raise pytest.UsageError(msg)
    config.stash[_HARNESS] = Harness(
        backend,
        connection_string=connection_string or None,
        startup_timeout=timeout,
        storage_https=storage_https,
    )
    config.stash[_FIXTURES] = _fixtures_folders(config)
    _configure_conformance(config)
    # Scenario files put these on their items (``markers: [slow]``); registered here so that
    # --strict-markers accepts them in any project.
    config.addinivalue_line("markers", "slow: long-running scenario or test")
    config.addinivalue_line("markers", "benchmark: throughput scenario or test")
    if config.getoption("cmg_bench"):
        from ._bench._items import configure_bench

        configure_bench(config)


def _fixtures_folders(config: pytest.Config) -> tuple[Path, ...] | None:
    """The user's fixtures folders in search order, or None for the nearest one per scenario.

    Every ``--cmg-fixtures`` (relative to where pytest runs) replaces the ini's lines
    (``cmg_fixtures``, relative to the rootdir), as a command-line option overrides its ini
    value. A folder that does not exist is a usage error now, not a "not found" per scenario.
    """
    given = config.getoption("cmg_fixtures")
    if given:
        folders = [(config.invocation_params.dir / str(d), "--cmg-fixtures", str(d)) for d in given]
    else:
        lines = [str(line) for line in config.getini("cmg_fixtures")]
        folders = [(config.rootpath / line, "ini cmg_fixtures", line) for line in lines]
    for folder, source, text in folders:
        if not folder.is_dir():
            msg = (
                f"{source} {text}: no folder {folder}; create it, or give the folder of your "
                "shared worlds and catalogs (a command-line path is relative to where pytest "
                "runs, an ini one to the rootdir)"
            )
            raise pytest.UsageError(msg)
    return tuple(folder for folder, _, _ in folders) or None


def _configure_conformance(config: pytest.Config) -> None:
    given = config.getoption("cmg_download_program")
    program = str(given) if given is not None else str(config.getini("cmg_download_program"))
    report = config.getoption("cmg_conformance_report")
    config.stash[_DOWNLOAD_PROGRAM] = None
    if given is None and not program.strip() and report is None:
        return  # the built-in client, and no report: nothing to set up
    from ._scenario.conformance import Conformance, check_download_program, check_report_path

    here = config.invocation_params.dir
    # An ini value that is empty means "not set"; an empty command-line value is a mistake. As
    # for --cmg-fixtures, a command-line path is relative to where pytest runs, an ini one to
    # the rootdir.
    base = here if given is not None else config.rootpath
    checked = check_download_program(program, base) if given is not None or program else None
    config.stash[_DOWNLOAD_PROGRAM] = checked
    conformance = Conformance(
        checked, check_report_path(str(report), here) if report is not None else None
    )
    config.stash[_CONFORMANCE] = conformance
    # A plugin of its own: its pytest_runtest_logreport sees every report, on the xdist
    # controller too (workers' reports are replayed there).
    config.pluginmanager.register(conformance, "cmg-conformance")


def pytest_sessionfinish(session: pytest.Session) -> None:
    conformance = session.config.stash.get(_CONFORMANCE, None)
    # Only the controller writes: under xdist a worker sees its own items' reports only.
    if conformance is not None and not hasattr(session.config, "workerinput"):
        conformance.write()


def pytest_unconfigure(config: pytest.Config) -> None:
    harness = config.stash.get(_HARNESS, None)
    if harness is not None:
        harness.stop()


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    if fnmatch.fnmatch(file_path.name, _option(parent.config, "cmg_scenario_pattern")):
        from ._scenario.items import ScenarioFile

        config = parent.config
        return ScenarioFile.from_parent(
            parent,
            path=file_path,
            harness=lambda: config.stash[_HARNESS],
            fixtures=config.stash.get(_FIXTURES, None),
            download_program=config.stash.get(_DOWNLOAD_PROGRAM, None),
        )
    return None


def pytest_terminal_summary(terminalreporter: TerminalReporter) -> None:
    # Benchmark scenarios' figures, read from the reports (so also under xdist), pass or fail.
    from ._scenario.benchmark import terminal_summary

    terminal_summary(terminalreporter)
    conformance = terminalreporter.config.stash.get(_CONFORMANCE, None)
    if conformance is not None:
        conformance.terminal_summary(terminalreporter)


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def cmg_harness(pytestconfig: pytest.Config) -> Harness:
    """The session's services (blob backend and fake CMG), started on first use."""
    return pytestconfig.stash[_HARNESS]


@pytest.fixture
def cloud_dp(cmg_harness: Harness) -> Iterator[CloudDP]:
    """A cloud DP in a fresh private container; deleted after the test."""
    dp = cmg_harness.new_cloud_dp()
    yield dp
    dp.delete()


@pytest.fixture
def storage_faults(cloud_dp: CloudDP) -> Iterator[FaultProxy]:
    """A fault proxy in front of ``cloud_dp``'s storage; the SAS URLs clients get go through it.

    Arm faults with ``storage_faults.add(reset_after(1_000_000), request=1)`` (constructors in
    ``pytest_cmg.faults``); ``storage_faults.log`` lists what clients asked storage for.
    """
    from ._net.proxy import FaultProxy

    if not cloud_dp.endpoint.url.startswith("http://"):
        pytest.skip(
            f"storage_faults needs plain-HTTP storage (the fault proxy speaks HTTP only); "
            f"storage is {cloud_dp.endpoint.url} (--cmg-storage-https)"
        )
    with FaultProxy(cloud_dp.endpoint.url) as proxy:
        cloud_dp.route_through(proxy.rewrite)
        try:
            yield proxy
        finally:
            cloud_dp.route_through(None)


@pytest.fixture
def cmg(cmg_harness: Harness, cloud_dp: CloudDP) -> Iterator[FakeCMG]:
    """The session's fake CMG, cleared before the test and serving ``cloud_dp``.

    After the test, any error the gateway hit while handling a request is re-raised.
    """
    gateway = cmg_harness.gateway
    gateway.clear()
    gateway.configure(cloud_dp=cloud_dp)
    yield gateway
    gateway.check()


@pytest.fixture
def cmg_time() -> VirtualTime:
    """Virtual time for the clients of a test: retry waits are recorded (``waits``), not slept."""
    from ._client.retry import VirtualTime

    return VirtualTime()


@pytest.fixture
def cmg_client(
    cmg: FakeCMG, tmp_path: Path, cmg_time: VirtualTime
) -> Iterator[Callable[..., TaskSequenceEngine]]:
    """A factory of client engines connected to ``cmg`` with a cache under ``tmp_path``.

    ``cmg_client(settings=ClientSettings(...), deployment=DeploymentSettings(...),
    cache_mb=5120, name="client", auth="token" | "certificate" | "azure_ad", provider=None,
    on_step=None)``
    returns a ready :class:`TaskSequenceEngine`; ``auth="certificate"`` uses mutual TLS with a
    client certificate from the gateway's client CA, ``auth="azure_ad"`` an Azure AD device token
    of ``cmg.tenant`` that the engine exchanges at CCM_STS for a CCM token. ``provider`` is a
    :class:`ContentProvider` each package is handed to before the built-in download (as an
    alternate content provider). ``on_step`` is the engine's step hook: it is called with a
    :class:`StepEvent` at each step's start and end. With HTTPS storage the engines trust its
    CA, and name it to providers.
    """
    from ._client.factory import AUTH_KINDS, build_engine, connection_for
    from ._storage.clouddp import CloudDP

    engines: list[TaskSequenceEngine] = []

    def make(
        *,
        settings: ClientSettings | None = None,
        deployment: DeploymentSettings | None = None,
        cache_mb: int = 5120,
        name: str = "client",
        auth: str = "token",
        provider: ContentProvider | None = None,
        on_step: Callable[[StepEvent], None] | None = None,
    ) -> TaskSequenceEngine:
        if auth not in AUTH_KINDS:
            msg = f"cmg_client(auth={auth!r}): choose one of {', '.join(map(repr, AUTH_KINDS))}"
            raise InvalidValueError(msg)
        # The gateway knows its storage only as a ContentStore; the endpoint is the cloud DP's.
        endpoint = cmg.cloud_dp.endpoint if isinstance(cmg.cloud_dp, CloudDP) else None
        storage_ca = endpoint.ca_cert if endpoint and endpoint.url.startswith("https:") else None
        engine = build_engine(
            connection_for(cmg, f"GUID:{name}", auth),
            tmp_path / name,
            cache_mb=cache_mb,
            settings=settings,
            deployment=deployment,
            retry=cmg_time.policy(),
            storage_ca_file=storage_ca,
            site_version=cmg.settings.site_version,
            provider=provider,
            on_step=on_step,
        )
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()
