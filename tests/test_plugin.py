"""The plugin as users meet it: real pytest sessions driven by pytester."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

# Imported here, before any inner session: pytester's in-process runs drop modules first imported
# inside them, and cryptography's Rust bindings then reject the re-imported curve classes.
import pytest_cmg._gateway.server
import pytest_cmg._storage.clouddp  # noqa: F401
from pytest_cmg._scenario.language import SCENARIO as MODEL
from pytest_cmg._util.cachedir import CACHE_ENV, cache_dir

TS_KEYS = ", ".join(MODEL.fields["task_sequence"].spec.fields)

SCENARIO = """\
scenario: {name}
seed: 7
packages:
  - id: PS100012
    type: os_upgrade
    files: 3
    size: 512KiB
  - id: PS100013
    type: driver
    files: 6
    size: 64KiB
    locale: ja_JP
task_sequence:
  id: PS100020
  name: Windows 11 in-place upgrade
  steps:
    - name: Upgrade the operating system
      action: upgrade_os
      package: PS100012
    - name: Apply drivers
      action: apply_driver_package
      package: PS100013
expect:
  outcome: {outcome}
  cache: [PS100012.1, PS100013.1]
  requests:
    location: 2
    manifest: 2
"""

# Records, at the end of the inner session, whether the harness ever started a service.
PROBE = """
from pytest_cmg.plugin import _HARNESS

def pytest_sessionfinish(session):
    harness = session.config.stash[_HARNESS]
    with open("harness-state.txt", "w") as handle:
        handle.write(f"started={harness.started} gateway={harness._gateway is not None}")
"""


@pytest.fixture(scope="session")
def azurite_cache():
    # Resolved in the outer session: pytester points HOME at a temporary folder, which would
    # make every inner session install Azurite again (~30 s each).
    return str(cache_dir())


@pytest.fixture(autouse=True)
def shared_azurite_cache(azurite_cache, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, azurite_cache)


def write(pytester, name, outcome="success", folder="scenarios"):
    path = pytester.path / folder / f"{name}.cmg.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(SCENARIO.format(name=name.replace("-", " "), outcome=outcome))
    return path


def test_scenario_files_are_collected_as_items_at_their_yaml_line(pytester):
    write(pytester, "upgrade-on-demand")
    (pytester.path / "notes.yaml").write_text("not: a scenario\n")
    result = pytester.runpytest("--collect-only", "-q")
    result.stdout.fnmatch_lines(["scenarios/upgrade-on-demand.cmg.yaml::upgrade on demand", "1 test collected*"])
    assert result.ret == 0


def test_collect_only_starts_no_service(pytester):
    write(pytester, "upgrade-on-demand")
    pytester.makeconftest(PROBE)
    result = pytester.runpytest("--collect-only")
    assert result.ret == 0
    assert (pytester.path / "harness-state.txt").read_text() == "started=False gateway=False"


def test_a_scenario_runs_end_to_end_and_reports_both_services(pytester):
    write(pytester, "upgrade-on-demand")
    pytester.makeconftest(PROBE)
    result = pytester.runpytest("-rA")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([
        "*Azurite blob service: http://127.0.0.1:*/devstoreaccount1 (backend process, pid *)",
        "*Fake CMG: https://127.0.0.1:*",
    ])
    assert (pytester.path / "harness-state.txt").read_text() == "started=True gateway=True"


def test_a_broken_scenario_file_is_one_collection_error_naming_file_line_and_rule(pytester):
    path = write(pytester, "broken")
    text = path.read_text()
    text = text.replace("  steps:", "  dowload: on_demand\n  steps:")
    text = text.replace("size: 64KiB", "size: lots")
    path.write_text(text)
    bad_key_line = text.splitlines().index("  dowload: on_demand") + 1
    bad_size_line = text.splitlines().index("    size: lots") + 1
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines([
        "*ERROR collecting scenarios/broken.cmg.yaml*",
        "*2 problems in scenario file:",
        f"  scenarios/broken.cmg.yaml:{bad_size_line}: packages?1?.size 'lots' is not a size*",
        f"  scenarios/broken.cmg.yaml:{bad_key_line}: unknown key 'dowload' in task_sequence"
        f" (did you mean 'download'? allowed keys: {TS_KEYS})",
    ])
    # The rendering is the scenario's, not a Python traceback into the plugin.
    assert "Traceback" not in result.stdout.str()


def test_a_failed_expectation_points_at_the_scenario_line(pytester):
    path = write(pytester, "expects-failure", outcome="failure")
    line = path.read_text().splitlines().index("  outcome: failure") + 1
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        f"*expects-failure.cmg.yaml:{line}: expectation expect.outcome failed",
        "*expected: failure",
        "*actual:   success",
        "*smsts.log and the client cache are kept in*",
    ])


def test_junit_report_points_at_the_yaml_file(pytester):
    write(pytester, "upgrade-on-demand")
    # xunit1 is the JUnit flavour that records file and line (pytest's default xunit2 does not).
    result = pytester.runpytest("--junitxml=report.xml", "-o", "junit_family=xunit1")
    result.assert_outcomes(passed=1)
    case = ET.parse(pytester.path / "report.xml").getroot().find(".//testcase")
    assert case is not None
    assert case.get("file") == "scenarios/upgrade-on-demand.cmg.yaml"
    assert case.get("line") == "0"  # the `scenario:` key is on the first line (0-based)


def test_scenarios_run_in_parallel_with_xdist(pytester):
    for name in ("first-client", "second-client", "third-client", "fourth-client"):
        write(pytester, name)
    result = pytester.runpytest("-n", "2", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)


def test_item_ids_are_the_same_on_every_collection(pytester):
    write(pytester, "upgrade-on-demand")
    first = pytester.runpytest("--collect-only", "-q").stdout.lines[0]
    second = pytester.runpytest("--collect-only", "-q").stdout.lines[0]
    assert first == second == "scenarios/upgrade-on-demand.cmg.yaml::upgrade on demand"


def test_scenario_pattern_option_and_ini(pytester):
    path = pytester.path / "story.yml"
    path.write_text(SCENARIO.format(name="custom pattern", outcome="success"))
    result = pytester.runpytest("--collect-only", "-q", "--cmg-scenario-pattern=story.yml")
    result.stdout.fnmatch_lines(["story.yml::custom pattern"])
    pytester.makeini("[pytest]\ncmg_scenario_pattern = *.yml\n")
    result = pytester.runpytest("--collect-only", "-q")
    result.stdout.fnmatch_lines(["story.yml::custom pattern"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cmg-azurite=docker"], "*--cmg-azurite='docker' is not a backend; choose one of process, container, external*"),
        (["--cmg-azurite=external"], "*--cmg-azurite=external needs a storage connection string*"),
        (["--cmg-azurite-timeout=soon"], "*--cmg-azurite-timeout must be a positive number*"),
    ],
)
def test_bad_options_are_usage_errors(pytester, args, message):
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_fixtures_work_in_plain_python_tests(pytester):
    # The README's example, run in a fresh session where the plugin loads by its entry point.
    example = Path(__file__).parent / "examples" / "test_howto_fixtures.py"
    pytester.makepyfile(test_example=example.read_text(encoding="utf-8"))
    result = pytester.runpytest()
    result.assert_outcomes(passed=1)


# --- HTTPS storage and the Azure AD client ----------------------------------------------------

# Records every SAS URL the gateway mints, so the run can show they are https-only. The class
# is shared with the outer session (pytester runs in process): it is put back at the end.
SAS_PROBE = """
from pytest_cmg._storage.clouddp import CloudDP

_signed = CloudDP.signed_url


def pytest_configure(config):
    record = config.rootpath / "sas-urls.txt"

    def recording(self, *args, **kwargs):
        url = _signed(self, *args, **kwargs)
        with record.open("a") as handle:
            handle.write(url + "\\n")
        return url

    CloudDP.signed_url = recording


def pytest_unconfigure(config):
    CloudDP.signed_url = _signed
"""

AAD_FIXTURE_TEST = """
from pytest_cmg import Step, TaskSequence


def test_an_azure_ad_engine_downloads(cloud_dp, cmg, cmg_client):
    cloud_dp.distribute("PS100013", 1, {"drivers/net.inf": b"[Version]"})
    engine = cmg_client(auth="azure_ad")
    result = engine.run(TaskSequence("PS100020", "Drivers",
                                     (Step("Apply drivers", "apply_driver_package", "PS100013"),)))
    assert result.succeeded, result.error
    cmg.log.assert_request_made("sts", count=1)
    cmg.log.assert_request_made("manifest", count=1, package_id="PS100013")


def test_storage_faults_need_plain_http(storage_faults):
    raise AssertionError("not reached: skipped under HTTPS storage")
"""


def test_https_storage_runs_a_scenario_and_fixtures_over_https(pytester):
    write(pytester, "upgrade-over-https")
    faulty = write(pytester, "storage-fault-over-https")
    text = faulty.read_text()
    faulty.write_text(text.replace("expect:", "faults:\n  - storage: {request: 1, reset_after: 1000}\nexpect:"))
    fault_line = faulty.read_text().splitlines().index("  - storage: {request: 1, reset_after: 1000}") + 1
    pytester.makeconftest(SAS_PROBE)
    pytester.makepyfile(test_aad=AAD_FIXTURE_TEST)
    result = pytester.runpytest("--cmg-storage-https", "-rA")
    result.assert_outcomes(passed=2, failed=1, skipped=1)
    result.stdout.fnmatch_lines([
        "*Azurite blob service: https://127.0.0.1:*/devstoreaccount1 (backend process, pid *)",
        "PASSED scenarios/upgrade-over-https.cmg.yaml::upgrade over https",
        "PASSED test_aad.py::test_an_azure_ad_engine_downloads",
        "SKIPPED *storage_faults needs plain-HTTP storage*",
    ])
    # The fault scenario fails before anything runs, naming its storage fault's line.
    result.stdout.fnmatch_lines([
        f"*storage-fault-over-https.cmg.yaml:{fault_line}: faults[[]0[]]: storage faults need "
        "plain-http storage behind the fault proxy, and storage is https*",
    ])
    urls = (pytester.path / "sas-urls.txt").read_text().split()
    # Two scenario packages and the fixture test's one, each file signed for HTTPS only.
    assert len(urls) == 3 + 6 + 1
    for url in urls:
        assert url.startswith("https://127.0.0.1:")
        assert "spr=https&" in url


def test_storage_https_needs_the_process_backend(pytester):
    result = pytester.runpytest(
        "--cmg-storage-https", "--cmg-azurite=external", "--cmg-connection-string=UseDevelopmentStorage=true"
    )
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--cmg-storage-https needs the process backend*"])


def test_storage_https_from_the_ini_file(pytester):
    pytester.makeini("[pytest]\ncmg_storage_https = true\n")
    pytester.makeconftest(PROBE.replace(
        'f"started={harness.started} gateway={harness._gateway is not None}"',
        'f"https={harness._backend.https}"',
    ))
    result = pytester.runpytest("--collect-only")
    assert result.ret == pytest.ExitCode.NO_TESTS_COLLECTED
    assert (pytester.path / "harness-state.txt").read_text() == "https=True"
