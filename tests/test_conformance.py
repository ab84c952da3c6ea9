"""Conformance mode: the scenario suite run against another downloader (issue 11, item 2).

``--cmg-download-program`` hands every package to a program (an alternate content provider),
``requires`` in a scenario file makes an item not applicable, and ``--cmg-conformance-report``
writes one JSON record per item and counts them in the terminal summary, also under xdist.
"""

from __future__ import annotations

import json
import stat
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

# Imported here, before any inner session: pytester's in-process runs drop modules first imported
# inside them, and cryptography's Rust bindings then reject the re-imported curve classes.
import pytest_cmg._gateway.server
import pytest_cmg._storage.clouddp  # noqa: F401
from pytest_cmg._scenario.load import load_scenario
from pytest_cmg._scenario.runner import with_download_program
from pytest_cmg._scenario.vocabulary import APPLICABILITY
from pytest_cmg._util.cachedir import CACHE_ENV, cache_dir

if TYPE_CHECKING:
    from collections.abc import Iterator

SCENARIO = """\
scenario: {name}
seed: 7
{extra}packages:
  - id: PS100012
    type: os_upgrade
    files: 3
    size: 96KiB
  - id: PS100013
    type: driver
    files: 4
    size: 16KiB
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
  downloaded: [PS100012, PS100013]
  absent_log: ["sig="]
"""

#: Records its arguments and whether the CMG (a token-authentication location) was offered in
#: the INI, then downloads (DOWNLOADING_ACP): in conformance mode the program must deliver.
RECORDING_ACP = """\
#!/bin/sh
offered=$(grep -c '^TokenAuth = true' "$1")
echo "$1 $2 $3 token_auth_locations=$offered" >> "{record}"
exec "{python}" "{downloader}" "{record}.delivered" "$@"
"""

#: Downloads for real, stdlib only, from the INI contract (README): the CMG location's manifest
#: with the token's signature, then every file from its SAS URL.
DOWNLOADING_ACP = r"""
import configparser, os, ssl, sys, urllib.request
import xml.etree.ElementTree as ET

ini_path, package_id, destination = sys.argv[-3:]
ini = configparser.ConfigParser(interpolation=None)
ini.optionxform = str
ini.read(ini_path, encoding="utf-8")
count = int(ini["Package"]["Locations"])
locations = [dict(ini[f"Location{n}"]) for n in range(1, count + 1)]
cmg = next(loc for loc in locations if loc["TokenAuth"] == "true")
tls = ssl.create_default_context(cafile=cmg["CAFile"])
request = urllib.request.Request(
    cmg["ManifestURL"], headers={cmg["SignatureHeader"]: cmg["Signature"]}
)
with urllib.request.urlopen(request, context=tls, timeout=30) as answer:
    manifest = ET.fromstring(answer.read())
for item in manifest.findall("File"):
    target = os.path.join(destination, *item.get("RelPath").split("/"))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with urllib.request.urlopen(item.get("Url"), timeout=30) as body, open(target, "wb") as out:
        out.write(body.read())
with open(sys.argv[1], "a", encoding="utf-8") as record:
    record.write(f"{package_id}\n")
sys.exit(0)
"""


@pytest.fixture(scope="session")
def azurite_cache() -> str:
    # Resolved in the outer session: pytester points HOME at a temporary folder, which would
    # make every inner session install Azurite again (~30 s each).
    return str(cache_dir())


@pytest.fixture(autouse=True)
def shared_azurite_cache(azurite_cache: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv(CACHE_ENV, azurite_cache)
    yield


def write(
    pytester: pytest.Pytester, name: str, *, outcome: str = "success", extra: str = ""
) -> Path:
    path = pytester.path / "scenarios" / f"{name}.cmg.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(SCENARIO.format(name=name.replace("-", " "), outcome=outcome, extra=extra))
    return path


def executable(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def recording_script(record: Path, downloader_folder: Path) -> str:
    downloader = downloader_folder / "download.py"
    downloader.write_text(DOWNLOADING_ACP, encoding="utf-8")
    return RECORDING_ACP.format(record=record, python=sys.executable, downloader=downloader)


def recording_acp(tmp_path: Path) -> tuple[Path, Path]:
    record = tmp_path / "argv.txt"
    return executable(tmp_path / "acp.sh", recording_script(record, tmp_path)), record


# --- the scenario as it runs with a program ----------------------------------------------------


def test_with_download_program_sets_the_variables_and_raises_the_site(tmp_path: Path) -> None:
    path = tmp_path / "s.cmg.yaml"
    path.write_text(
        SCENARIO.format(name="s", outcome="success", extra="cmg: {site_version: 2010}\n")
    )
    scenario = load_scenario(path)
    ran = with_download_program(scenario, "/opt/acp --fast")
    assert ran.task_sequence.variables["SMSTSDownloadProgram"] == "/opt/acp --fast"
    assert ran.task_sequence.variables["SMSTSAllowTokenAuthURLForACP"] == "true"
    assert ran.cmg.site_version == 2203
    # A newer site is never lowered, and the file's own scenario is left as it was.
    newer = with_download_program(with_download_program(scenario, "x"), "y").cmg.site_version
    assert newer == 2203
    assert scenario.cmg.site_version == 2010
    assert "SMSTSDownloadProgram" not in scenario.task_sequence.variables


def test_requires_is_read_from_the_file_and_an_unknown_term_is_a_collection_error(
    pytester: pytest.Pytester,
) -> None:
    path = write(pytester, "needs-the-core", extra="requires: [builtin_download, site_gates]\n")
    scenario = load_scenario(path)
    assert scenario.requires == ("builtin_download", "site_gates")
    write(pytester, "misspelt", extra="requires: [builtin_downlaod]\n")
    result = pytester.runpytest("--collect-only", "-q")
    result.stdout.fnmatch_lines(
        [
            "*misspelt.cmg.yaml:3: requires[[]0[]] 'builtin_downlaod' is not one of "
            "builtin_download, site_gates, acp_variables (did you mean 'builtin_download'?)",
        ]
    )
    assert result.ret == pytest.ExitCode.INTERRUPTED
    assert set(APPLICABILITY) >= {"builtin_download", "site_gates"}


# --- the option in a real session --------------------------------------------------------------


def test_the_program_is_run_for_every_package_and_offered_the_cmg(
    pytester: pytest.Pytester, tmp_path: Path
) -> None:
    write(pytester, "upgrade-on-demand")
    acp, record = recording_acp(tmp_path)
    result = pytester.runpytest("-p", "no:cacheprovider", f"--cmg-download-program={acp}")
    result.assert_outcomes(passed=1)
    lines = record.read_text().splitlines()
    assert [line.split()[1] for line in lines] == ["PS100012", "PS100013"]
    for line in lines:
        ini, _, destination, offered = line.split()
        assert ini.endswith("/SMSTSDownload.INI")
        assert "/ccmcache/" in destination
        # The site (2107 in the file) was raised and the variable set: the CMG was offered.
        assert offered == "token_auth_locations=1"


def test_without_the_option_no_program_runs_and_requires_changes_nothing(
    pytester: pytest.Pytester, tmp_path: Path
) -> None:
    write(pytester, "needs-the-core", extra="requires: [builtin_download]\n")
    _, record = recording_acp(tmp_path)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert not record.exists()
    assert "pytest-cmg conformance" not in result.stdout.str()


def test_an_ini_program_is_used_and_a_relative_path_is_resolved_against_the_rootdir(
    pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(pytester, "upgrade-on-demand")
    record = tmp_path / "argv.txt"
    executable(pytester.path / "acp.sh", recording_script(record, tmp_path))
    pytester.makeini("[pytest]\ncmg_download_program = ./acp.sh\n")
    # Started from the scenarios folder: the ini's ./acp.sh is still the rootdir's.
    monkeypatch.chdir(pytester.path / "scenarios")
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert len(record.read_text().splitlines()) == 2
    result.stdout.fnmatch_lines([f"downloader: --cmg-download-program {pytester.path}/acp.sh"])


def test_a_program_that_downloads_passes_and_delivered_the_content(
    pytester: pytest.Pytester, tmp_path: Path
) -> None:
    write(pytester, "upgrade-on-demand")
    script = tmp_path / "acp.py"
    script.write_text(DOWNLOADING_ACP, encoding="utf-8")
    delivered = tmp_path / "delivered.txt"
    # The record file first: the engine appends the INI, package and destination after it.
    program = f"python3 {script} {delivered}"
    result = pytester.runpytest("-p", "no:cacheprovider", "--cmg-download-program", program)
    result.assert_outcomes(passed=1)
    # The program, not the fallback, delivered both packages.
    assert delivered.read_text().split() == ["PS100012", "PS100013"]


def test_not_applicable_items_are_skipped_with_the_reason_and_the_program_never_runs(
    pytester: pytest.Pytester, tmp_path: Path
) -> None:
    write(pytester, "needs-the-core", extra="requires: [builtin_download]\n")
    acp, record = recording_acp(tmp_path)
    result = pytester.runpytest("-p", "no:cacheprovider", "-rs", f"--cmg-download-program={acp}")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(
        [
            "SKIPPED [[]1[]] scenarios/needs-the-core.cmg.yaml: not applicable to "
            "--cmg-download-program (needs-the-core.cmg.yaml:3): requires builtin_download: "
            "asserts what the built-in download core does on its own*",
        ]
    )
    assert not record.exists()


# --- the report -----------------------------------------------------------------------------


def three_scenarios(pytester: pytest.Pytester) -> Path:
    write(pytester, "a-passes")
    failing = write(pytester, "b-fails", outcome="failure")
    write(pytester, "c-not-applicable", extra="requires: [site_gates]\n")
    return failing


def report(path: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return document


def test_the_report_has_a_record_per_item_and_the_summary_counts_them(
    pytester: pytest.Pytester, tmp_path: Path
) -> None:
    failing = three_scenarios(pytester)
    acp, _ = recording_acp(tmp_path)
    out = pytester.path / "conformance.json"
    result = pytester.runpytest(
        "-p",
        "no:cacheprovider",
        f"--cmg-download-program={acp}",
        "--cmg-conformance-report",
        "conformance.json",
    )
    result.assert_outcomes(passed=1, failed=1, skipped=1)
    result.stdout.fnmatch_lines(
        [
            "*= pytest-cmg conformance =*",
            f"downloader: --cmg-download-program {acp}",
            "conformance: 1 passed, 1 failed, 1 not applicable (of 3 scenario item(s))",
            "  FAILED scenarios/b-fails.cmg.yaml::b fails: scenarios/b-fails.cmg.yaml:23 "
            "expect.outcome",
            f"report: {out}",
        ]
    )
    document = report(out)
    assert document["format"] == 1
    assert document["download_program"] == str(acp)
    assert document["counts"] == {"passed": 1, "failed": 1, "not_applicable": 1, "skipped": 0}
    items = {item["scenario"]: item for item in document["items"]}
    assert items["a passes"] == {
        "nodeid": "scenarios/a-passes.cmg.yaml::a passes",
        "scenario": "a passes",
        "file": "scenarios/a-passes.cmg.yaml",
        "line": 1,
        "status": "passed",
    }
    failed = items["b fails"]
    assert failed["status"] == "failed"
    line = failing.read_text().splitlines().index("  outcome: failure") + 1
    assert failed["failures"] == [
        {
            "key": "expect.outcome",
            "file": "scenarios/b-fails.cmg.yaml",
            "line": line,
            "expected": "failure",
            "actual": "success",
        }
    ]
    skipped = items["c not applicable"]
    assert skipped["status"] == "not_applicable"
    assert skipped["line"] == 3  # the requires line: where the reason comes from
    assert skipped["reason"] == f"requires site_gates: {APPLICABILITY['site_gates']}"


def test_the_report_is_the_same_under_xdist(pytester: pytest.Pytester, tmp_path: Path) -> None:
    three_scenarios(pytester)
    acp, _ = recording_acp(tmp_path)
    runs = {}
    for workers in ("0", "2"):
        result = pytester.runpytest(
            "-p",
            "no:cacheprovider",
            "-n",
            workers,
            f"--cmg-download-program={acp}",
            f"--cmg-conformance-report=report-{workers}.json",
        )
        result.assert_outcomes(passed=1, failed=1, skipped=1)
        result.stdout.fnmatch_lines(
            ["conformance: 1 passed, 1 failed, 1 not applicable (of 3 scenario item(s))"]
        )
        runs[workers] = report(pytester.path / f"report-{workers}.json")
    assert runs["2"] == runs["0"]
    assert len(runs["2"]["items"]) == 3


def test_a_report_without_a_program_judges_the_built_in_client(
    pytester: pytest.Pytester,
) -> None:
    # ``requires`` names what the built-in client has: nothing is not applicable to it.
    write(pytester, "needs-the-core", extra="requires: [builtin_download]\n")
    result = pytester.runpytest("-p", "no:cacheprovider", "--cmg-conformance-report=r.json")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        ["downloader: the built-in client", "conformance: 1 passed (of 1 scenario item(s))"]
    )
    document = report(pytester.path / "r.json")
    assert document["download_program"] is None
    assert [item["status"] for item in document["items"]] == ["passed"]


def test_an_error_that_is_not_an_expectation_is_recorded_as_failed(
    pytester: pytest.Pytester, tmp_path: Path
) -> None:
    write(pytester, "a-passes")
    pytester.makeconftest(
        textwrap.dedent(
            """
            import pytest

            @pytest.hookimpl(tryfirst=True)
            def pytest_runtest_setup(item):
                raise RuntimeError("the harness broke")
            """
        )
    )
    result = pytester.runpytest("-p", "no:cacheprovider", "--cmg-conformance-report=r.json")
    result.assert_outcomes(errors=1)
    (item,) = report(pytester.path / "r.json")["items"]
    assert item["status"] == "failed"
    assert item["error"] == "setup: RuntimeError: the harness broke"


# --- bad values --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cmg-download-program="], "*--cmg-download-program: SMSTSDownloadProgram is empty*"),
        (
            ["--cmg-download-program=acp 'unclosed"],
            "*--cmg-download-program: SMSTSDownloadProgram=*cannot be split*quote it*",
        ),
        (
            ["--cmg-download-program=./missing-acp.sh"],
            "*--cmg-download-program='./missing-acp.sh': */missing-acp.sh is not an executable "
            "file; create it and make it executable*",
        ),
        (
            ["--cmg-download-program=no-such-acp-program --fast"],
            "*'no-such-acp-program' is not found on PATH; give a path to the program*",
        ),
        (
            ["--cmg-conformance-report=no/such/folder/r.json"],
            "*--cmg-conformance-report='no/such/folder/r.json': the folder */no/such/folder "
            "does not exist*",
        ),
        (["--cmg-conformance-report=."], "*--cmg-conformance-report='.' is not a file path*"),
    ],
)
def test_bad_option_values_are_usage_errors(
    pytester: pytest.Pytester, args: list[str], message: str
) -> None:
    write(pytester, "upgrade-on-demand")
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_a_file_that_cannot_run_is_a_usage_error(pytester: pytest.Pytester) -> None:
    (pytester.path / "acp.sh").write_text("#!/bin/sh\nexit 1\n")  # not executable
    result = pytester.runpytest("--cmg-download-program=./acp.sh")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*acp.sh is not an executable file*chmod +x*"])


def test_builtin_expect_keys_are_not_judged_with_a_program_and_the_rest_still_are(
    pytester: pytest.Pytester, tmp_path: Path
) -> None:
    # No retry happens in this run, so ``retries: 5`` fails whoever downloads; the file says it
    # judges the built-in core only.
    extra = "builtin_expect: [retries]\n"
    path = write(pytester, "core-retries", extra=extra)
    path.write_text(path.read_text() + "  retries: 5\n")
    acp, _ = recording_acp(tmp_path)
    plain = pytester.runpytest("-p", "no:cacheprovider")
    plain.assert_outcomes(failed=1)
    plain.stdout.fnmatch_lines(["*expectation expect.retries failed*"])
    result = pytester.runpytest(
        "-p", "no:cacheprovider", f"--cmg-download-program={acp}", "--cmg-conformance-report=r.json"
    )
    result.assert_outcomes(passed=1)
    (item,) = report(pytester.path / "r.json")["items"]
    assert item["status"] == "passed"
    assert item["not_judged"] == ["expect.retries"]
    # Every other expectation still holds the program to account.
    path.write_text(path.read_text().replace("outcome: success", "outcome: failure"))
    again = pytester.runpytest("-p", "no:cacheprovider", f"--cmg-download-program={acp}")
    again.assert_outcomes(failed=1)
    again.stdout.fnmatch_lines(["*expectation expect.outcome failed*"])
    assert "expect.retries failed" not in again.stdout.str()


def test_builtin_expect_refuses_the_keys_every_downloader_must_meet(
    pytester: pytest.Pytester,
) -> None:
    write(pytester, "too-lenient", extra="builtin_expect: [outcome, absent_log]\n")
    result = pytester.runpytest("--collect-only", "-q")
    result.stdout.fnmatch_lines(
        [
            "*too-lenient.cmg.yaml:3: builtin_expect[[]0[]] 'outcome' is not one of log,*",
            "*too-lenient.cmg.yaml:3: builtin_expect[[]1[]] 'absent_log' is not one of log,*",
        ]
    )


def test_a_scenario_setting_acp_variables_must_declare_it(pytester: pytest.Pytester) -> None:
    path = write(pytester, "own-acp")
    text = path.read_text().replace(
        "  name: Windows 11 in-place upgrade\n",
        "  name: Windows 11 in-place upgrade\n  variables: {SMSTSDownloadProgram: /opt/acp}\n",
    )
    path.write_text(text)
    result = pytester.runpytest("--collect-only", "-q")
    result.stdout.fnmatch_lines(
        [
            "*own-acp.cmg.yaml:15: task_sequence.variables.SMSTSDownloadProgram is an alternate "
            "content provider variable, which --cmg-download-program replaces (declare it with "
            "requires: [[]acp_variables[]]; the scenario is then not applicable to another "
            "downloader)",
        ]
    )
    assert result.ret == pytest.ExitCode.INTERRUPTED
    path.write_text("requires: [acp_variables]\n" + text)
    declared = pytester.runpytest("--collect-only", "-q")
    assert declared.ret == pytest.ExitCode.OK


# --- the rules every program is held to, whatever the file says (expectations._check_program) -------


def program_run(
    pytester: pytest.Pytester, tmp_path: Path, script: str
) -> tuple[pytest.RunResult, dict[str, Any]]:
    """The upgrade scenario (which the built-in client passes) run with the shell ``script``."""
    write(pytester, "upgrade-on-demand")
    acp = executable(tmp_path / "acp.sh", "#!/bin/sh\n" + script)
    result = pytester.runpytest(
        "-p", "no:cacheprovider", f"--cmg-download-program={acp}", "--cmg-conformance-report=r.json"
    )
    return result, report(pytester.path / "r.json")


def failed_keys(document: dict[str, Any]) -> list[str]:
    (item,) = document["items"]
    return [failure["key"] for failure in item.get("failures", [])]


def test_a_program_the_fallback_rescues_fails_the_item(
    pytester: pytest.Pytester, tmp_path: Path
) -> None:
    # Exit 1 falls back to the built-in download, which passes the scenario on its own: the
    # program failed where a downloader can succeed.
    result, document = program_run(pytester, tmp_path, "exit 1\n")
    result.assert_outcomes(failed=1)
    assert failed_keys(document) == ["download program: delivers"] * 2
    result.stdout.fnmatch_lines(
        ["*the program exited with 1, and the built-in download it fell back to delivered PS100012.1"]
    )


def test_a_program_that_fails_and_leaves_a_file_fails_the_item(
    pytester: pytest.Pytester, tmp_path: Path
) -> None:
    result, document = program_run(
        pytester, tmp_path, 'mkdir -p "$3/sources" && echo torn > "$3/sources/install.wim"\nexit 1\n'
    )
    result.assert_outcomes(failed=1)
    assert "download program: leaves nothing" in failed_keys(document)
    result.stdout.fnmatch_lines(["*it exited with 1 and left 1 file(s): sources/install.wim*"])


def test_a_program_exiting_0_with_content_that_does_not_verify_fails_the_item(
    pytester: pytest.Pytester, tmp_path: Path
) -> None:
    result, document = program_run(pytester, tmp_path, 'echo junk > "$3/junk.bin"\nexit 0\n')
    result.assert_outcomes(failed=1)
    keys = failed_keys(document)
    assert "download program: exit 0 means done" in keys
    assert "expect.outcome" in keys  # the engine refused it: 0x80091007


def test_the_programs_output_is_in_smsts_log_and_a_secret_in_it_fails_the_item(
    pytester: pytest.Pytester, tmp_path: Path
) -> None:
    downloader = tmp_path / "download.py"
    downloader.write_text(DOWNLOADING_ACP, encoding="utf-8")
    script = (
        'echo "starting $2"\n'
        'grep "^Signature = " "$1" >&2\n'
        f'exec "{sys.executable}" "{downloader}" "{tmp_path / "delivered"}" "$@"\n'
    )
    result, document = program_run(pytester, tmp_path, script)
    result.assert_outcomes(failed=1)
    assert failed_keys(document) == ["no secret in smsts.log"]
    # The lines are shown with the secret cut out, under the component of the program's output.
    result.stdout.fnmatch_lines(["*DownloadProgram: Signature = <secret>*"])
    workdir = next(
        line.split("Work folder: ", 1)[1].strip()
        for line in result.stdout.lines
        if "Work folder: " in line
    )
    log = (Path(workdir) / "smsts.log").read_text(encoding="utf-8")
    assert 'component="DownloadProgram"' in log and "starting PS100012" in log


def test_a_retry_sooner_than_retry_after_is_reported_only_inside_the_programs_run() -> None:
    from pytest_cmg._scenario.expectations import _early_retries
    from pytest_cmg.faults import ProxiedRequest

    def asked(number: int, at: float, status: int, wait: str | None = None) -> ProxiedRequest:
        return ProxiedRequest(
            number, 1, "GET", "/c/PS1.1/a.bin", None, (), True, status, 0, "complete", at, wait
        )

    early = [asked(1, 10.0, 429, "5"), asked(2, 11.0, 200)]
    assert _early_retries(early, 0.0, 100.0) == [
        "/c/PS1.1/a.bin: answered 429 with Retry-After: 5, asked again 1.00s later"
    ]
    # Waited in full (or within the slack), or asked again after the program had ended.
    assert _early_retries([asked(1, 10.0, 429, "5"), asked(2, 14.6, 200)], 0.0, 100.0) == []
    assert _early_retries(early, 0.0, 10.5) == []
    # An HTTP-date Retry-After is not judged: when it was sent is not known in the same clock.
    dated = [asked(1, 10.0, 503, "Fri, 04 Dec 2026 00:00:00 GMT"), asked(2, 10.1, 200)]
    assert _early_retries(dated, 0.0, 100.0) == []


def test_a_torn_file_under_a_package_name_is_seen_when_storage_stalls(tmp_path: Path) -> None:
    import hashlib

    from pytest_cmg._client.cache import ClientCache
    from pytest_cmg._protocol.manifest import ContentManifest, ManifestFile
    from pytest_cmg._scenario.runner import _TornWatch

    data = b"x" * 1000
    manifest = ContentManifest(
        package_id="PS100012",
        version=3,
        files=(ManifestFile("sources/install.wim", len(data), hashlib.sha256(data).hexdigest()),),
    )
    waited: list[float] = []
    watch = _TornWatch({"PS100012": manifest}, waited.append)
    cache = ClientCache(tmp_path / "ccmcache")
    watch.stalled(1.0)  # before the engine exists: nothing to look at, the wait still passes
    watch.cache = cache
    entry, provider = cache.final_folders("PS100012", 3)
    (provider / "sources").mkdir(parents=True)
    (provider / ".acp-partial").mkdir()
    (provider / ".acp-partial" / "0").write_bytes(data[:10])  # another name: fine
    watch.stalled(2.0)
    assert watch.found == []
    (provider / "sources" / "install.wim").write_bytes(data[:400])
    (entry / "sources").mkdir(parents=True)
    (entry / "sources" / "install.wim").write_bytes(b"y" * 1000)  # whole size, wrong bytes
    watch.stalled(3.0)
    assert sorted(watch.found) == [
        ".staging/.acp-PS100012.3/sources/install.wim: 400 of 1000 bytes",
        f"PS100012.3/sources/install.wim: 1000 bytes that are not the file's (SHA-256 "
        f"{hashlib.sha256(b'y' * 1000).hexdigest()[:12]}...)",
    ]
    assert waited == [1.0, 2.0, 3.0]
