"""The alternate content provider (ACP): SMSTSDownloadProgram, its INI, exit codes and fallback,
and the Python ContentProvider interface (issue 11, item 1).

The program is a small stdlib-only Python ACP written into ``tmp_path``. It knows nothing of
pytest_cmg: it reads the INI, fetches the manifest through the CMG with the token fields, the
signature and the CA the INI names, and downloads each file's SAS URL from the real Azurite. That
it succeeds proves the INI is enough. Its options come before the three arguments the product
appends (``--mode``, ``--record``), which also proves the program string is split like a shell's.
"""

from __future__ import annotations

import configparser
import hashlib
import json
import os
import stat
import sys
import time
from pathlib import Path

import pytest

from pytest_cmg import (
    CmgSettings,
    ContentError,
    ContentProvider,
    DeploymentSettings,
    DownloadMode,
    ProgramProvider,
    ProviderRequest,
    Step,
    TaskSequence,
)
from pytest_cmg._client.acp import (
    E_ABORT,
    INI_NAME,
    ProviderLocation,
    ProviderTimeout,
    ProviderToken,
    parse_abort_code,
    read_folder,
    render_ini,
)
from pytest_cmg._protocol import codes

ACP_SOURCE = r'''
"""A minimal ACP: stdlib only, written from the INI contract alone."""
import configparser, json, os, ssl, subprocess, sys, time, urllib.request
import xml.etree.ElementTree as ET

args = sys.argv[1:]
ini_path, package_id, destination = args[-3:]
options = dict(zip(args[:-3:2], args[1:-3:2]))
mode = options.get("--mode", "ok")
record = {"argv": sys.argv, "ini": ini_path, "pid": os.getpid(), "pgid": os.getpgid(0)}
st = os.stat(ini_path)
record["ini_mode"] = st.st_mode & 0o777
record["ini_folder_mode"] = os.stat(os.path.dirname(ini_path)).st_mode & 0o777
record["destination_entries"] = os.listdir(destination)
ini = configparser.ConfigParser(interpolation=None)
ini.optionxform = str
ini.read(ini_path, encoding="utf-8")
record["sections"] = ini.sections()
record["package"] = dict(ini["Package"])
record["client"] = dict(ini["Client"])
locations = [dict(ini[f"Location{n}"]) for n in range(1, int(ini["Package"]["Locations"]) + 1)]
record["locations"] = locations


def save():
    with open(options["--record"], "w", encoding="utf-8") as handle:
        json.dump(record, handle)


cmg = next((loc for loc in locations if loc["TokenAuth"] == "true"), None)
if cmg is not None:
    record["secrets"] = [cmg["Signature"], cmg["ClientToken"]]
save()
if mode.startswith("exit-"):
    sys.exit(int(mode[5:]))
if mode in ("sleep", "straggler"):
    child = subprocess.Popen(["sleep", "60"])
    record["child"] = child.pid
    save()
    if mode == "straggler":  # exits, leaving its child running in its process group
        sys.exit(4)
    time.sleep(60)
    sys.exit(0)
if cmg is None:
    print("acp: no token-authentication source offered; cannot download", file=sys.stderr)
    sys.exit(3)

cmg_tls = ssl.create_default_context(cafile=cmg["CAFile"])
request = urllib.request.Request(
    cmg["ManifestURL"],
    headers={cmg["SignatureHeader"]: cmg["Signature"], "User-Agent": "test-acp/1"},
)
with urllib.request.urlopen(request, context=cmg_tls, timeout=30) as answer:
    manifest = ET.fromstring(answer.read())
assert manifest.get("PackageID") == package_id
storage_ca = ini["Client"]["StorageCAFile"]
storage_tls = ssl.create_default_context(cafile=storage_ca) if storage_ca else None
files = manifest.findall("File")
if mode == "missing":
    files = files[:-1]
for item in files:
    target = os.path.join(destination, *item.get("RelPath").split("/"))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    opener = {"context": storage_tls} if item.get("Url").startswith("https:") else {}
    with urllib.request.urlopen(item.get("Url"), timeout=30, **opener) as body, \
            open(target, "wb") as out:
        out.write(body.read())
if mode == "wrong-byte":
    first = os.path.join(destination, *files[0].get("RelPath").split("/"))
    with open(first, "r+b") as handle:
        byte = handle.read(1)
        handle.seek(0)
        handle.write(bytes([byte[0] ^ 0xFF]))
if mode == "extra":
    with open(os.path.join(destination, "acp.log"), "w") as handle:
        handle.write("downloaded\n")
sys.exit(0)
'''

BIG = bytes(range(256)) * 2048  # 512 KiB
UPGRADE = {"sources/install.wim": BIG, "setup.exe": b"MZ" * 100}
DRIVERS = {"net/e1000.inf": b"[Version]\r\n", "net/e1000.sys": b"SYS" * 50}


@pytest.fixture
def packages(cloud_dp):
    return (
        cloud_dp.distribute("PS100012", 1, UPGRADE),
        cloud_dp.distribute("PS100013", 1, DRIVERS),
    )


@pytest.fixture
def acp(tmp_path):
    """``acp(mode)``: the program string and the file its last run recorded itself in."""
    script = tmp_path / "acp dir" / "acp.py"  # a space: the string must be quoted, and split
    script.parent.mkdir()
    script.write_text(ACP_SOURCE, encoding="utf-8")
    record = tmp_path / "acp-record.json"

    def make(mode: str = "ok") -> tuple[str, Path]:
        program = f'{sys.executable} "{script}" --mode {mode} --record "{record}"'
        return program, record

    return make


def ipu(**variables: str) -> TaskSequence:
    return TaskSequence(
        "PS100020",
        "IPU",
        (
            Step("Upgrade", "upgrade_os", "PS100012"),
            Step("Drivers", "apply_driver_package", "PS100013"),
        ),
        variables=dict(variables),
    )


def acp_variables(program: str, **more: str) -> dict[str, str]:
    return {"SMSTSDownloadProgram": program, "SMSTSAllowTokenAuthURLForACP": "true", **more}


def site(cmg, version: int = 2203) -> None:
    cmg.configure(settings=CmgSettings(site_version=version))


def log_text(engine) -> str:
    return engine.log.path.read_text(encoding="utf-8")


def assert_entry_matches(folder: Path, files: dict[str, bytes]) -> None:
    found = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert found == sorted(files)
    for relpath, data in files.items():
        assert (folder / relpath).read_bytes() == data


def acp_manifest_requests(cmg) -> int:
    return sum(1 for e in cmg.log.entries if e.endpoint == "manifest" and _by_acp(e))


def builtin_manifest_requests(cmg) -> int:
    return sum(1 for e in cmg.log.entries if e.endpoint == "manifest" and not _by_acp(e))


def _by_acp(entry) -> bool:
    return any(v == "test-acp/1" for k, v in entry.headers.items() if k.lower() == "user-agent")


def gone(pid: int) -> bool:
    """The process no longer runs (a zombie waiting for a reaper counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def no_leftovers(engine) -> None:
    assert engine.cache.staging_leftovers() == []
    if engine._ts_cache is not None:
        assert engine.ts_cache.staging_leftovers() == []


# --- the program, end to end -----------------------------------------------------------------


def test_the_acp_downloads_through_the_cmg_from_the_ini_alone(cmg, cmg_client, packages, acp):
    site(cmg, 2203)
    program, record_path = acp()
    engine = cmg_client()
    result = engine.run(ipu(**acp_variables(program)))
    assert result.succeeded, result.error
    assert [(t.package_id, t.provider) for t in result.transfers] == [
        ("PS100012", program),
        ("PS100013", program),
    ]
    entries = {e.package_id: e.path for e in engine.cache.entries()}
    assert_entry_matches(entries["PS100012"], UPGRADE)
    assert_entry_matches(entries["PS100013"], DRIVERS)
    # The ACP fetched each manifest; the engine fetched none (it verified from the bytes).
    assert acp_manifest_requests(cmg) == 2
    assert builtin_manifest_requests(cmg) == 0
    record = json.loads(record_path.read_text())
    # The product's argument order, after the program's own arguments.
    assert record["argv"][-2] == "PS100013"
    assert Path(record["argv"][-3]).name == INI_NAME
    assert Path(record["argv"][-1]).parent.name == ".staging"  # the staging folder it commits
    assert record["destination_entries"] == []
    assert record["ini_mode"] == 0o600
    assert record["ini_folder_mode"] == 0o700
    assert not Path(record["ini"]).exists()
    assert not Path(record["ini"]).parent.exists()
    assert record["sections"] == ["Package", "Client", "Location1"]
    assert record["package"]["PackageID"] == "PS100013"
    assert record["package"]["Hash"] == packages[1].hash
    assert record["package"]["HashAlgorithm"] == "32780"
    assert record["client"]["ClientID"] == "GUID:client"
    assert record["client"]["SiteVersion"] == "2203"
    cloud = record["locations"][0]
    assert (cloud["Type"], cloud["TokenAuth"]) == ("CLOUD", "true")
    assert cloud["ClientToken"].count(".") == 2  # the CCM token, a JWT
    assert cloud["CAFile"] == str(cmg.ca_pem)
    text = log_text(engine)
    for secret in record["secrets"]:
        assert secret and secret not in text
    assert "sig=" not in text and "Bearer" not in text
    assert "TSManager: Process completed with exit code 0" in engine.log.messages
    assert any(
        m.startswith("TSManager: Executing command line: ") and INI_NAME in m
        for m in engine.log.messages
    )
    assert "CAS: Hash verification succeeded for content PS100013.1 downloaded under context System" in engine.log.messages
    no_leftovers(engine)


def test_download_all_hands_every_package_to_the_acp_before_the_first_step(
    cmg, cmg_client, packages, acp
):
    site(cmg, 2203)
    program, _ = acp()
    engine = cmg_client(deployment=DeploymentSettings(download_mode=DownloadMode.ALL_BEFORE_START))
    result = engine.run(ipu(**acp_variables(program)))
    assert result.succeeded, result.error
    fetched = [t for t in result.transfers if not t.from_cache]
    assert [(t.package_id, t.provider) for t in fetched] == [
        ("PS100012", program),
        ("PS100013", program),
    ]
    messages = engine.log.messages
    first_step = next(i for i, m in enumerate(messages) if "Start executing an instruction" in m)
    runs = [i for i, m in enumerate(messages) if m.startswith("TSManager: Executing command line")]
    assert len(runs) == 2 and max(runs) < first_step
    assert acp_manifest_requests(cmg) == 2 and builtin_manifest_requests(cmg) == 0


def test_download_package_content_to_a_custom_path_through_the_acp(
    cmg, cmg_client, packages, acp, tmp_path
):
    site(cmg, 2203)
    program, _ = acp()
    engine = cmg_client()
    sequence = TaskSequence(
        "PS100020",
        "Stage",
        (
            Step("Stage drivers", "download_package_content", "PS100013",
                 destination="custom", path="Drivers/HP"),
        ),
        variables=acp_variables(program),
    )
    result = engine.run(sequence)
    assert result.succeeded, result.error
    assert result.transfers[0].provider == program
    assert_entry_matches(engine.system_drive / "Drivers" / "HP" / "PS100013", DRIVERS)
    assert engine.cache.entries() == []
    no_leftovers(engine)


@pytest.mark.parametrize("mode", ["wrong-byte", "extra", "missing"])
def test_an_acp_that_lies_fails_the_package_and_commits_nothing(
    cmg, cmg_client, packages, acp, mode
):
    site(cmg, 2203)
    program, record_path = acp(mode)
    engine = cmg_client()
    result = engine.run(ipu(**acp_variables(program)))
    assert result.exit_code == codes.HASH_MISMATCH
    assert result.failed_step == "Upgrade"
    assert "the alternate content provider" in str(result.error)
    assert engine.cache.entries() == []
    no_leftovers(engine)
    # Wrong content is not retried and not fallen back from: the built-in never ran.
    assert builtin_manifest_requests(cmg) == 0
    assert cmg.log.count("location") == 1
    for line in (
        "CAS: Hash does not match expected for content PS100012.1",
        "TSManager: Hash could not be matched for the downloaded content",
        "TSManager: Task sequence execution failed with error code 0x80091007",
    ):
        assert line in engine.log.messages
    assert not Path(json.loads(record_path.read_text())["ini"]).exists()


def test_the_abort_code_fails_the_download_with_no_other_method(cmg, cmg_client, packages, acp):
    site(cmg, 2203)
    program, record_path = acp("exit-7")
    engine = cmg_client()
    result = engine.run(ipu(**acp_variables(program, SMSTSDownloadAbortCode="7")))
    assert result.exit_code == E_ABORT
    assert result.failed_step == "Upgrade"
    assert cmg.log.count("manifest") == 0  # neither the ACP nor a fallback fetched anything
    assert cmg.log.count("location") == 1  # and the task sequence did not retry
    assert engine.cache.entries() == []
    no_leftovers(engine)
    messages = engine.log.messages
    assert "TSManager: Process completed with exit code 7" in messages
    assert (
        "TSManager: The alternate content provider exited with 7, the abort code "
        "(SMSTSDownloadAbortCode): the download of PS100012.1 failed and no other download "
        "method is tried"
    ) in messages
    assert "CAS: Download failed for content PS100012.1 under context System, error 0x80004004" in messages
    assert not Path(json.loads(record_path.read_text())["ini"]).exists()


def test_another_non_zero_exit_falls_back_to_the_built_in_download(
    cmg, cmg_client, packages, acp
):
    site(cmg, 2203)
    program, record_path = acp("exit-5")
    engine = cmg_client()
    result = engine.run(ipu(**acp_variables(program, SMSTSDownloadAbortCode="0x7")))
    assert result.succeeded, result.error
    assert [t.provider for t in result.transfers] == [None, None]
    assert builtin_manifest_requests(cmg) == 2 and acp_manifest_requests(cmg) == 0
    assert (
        "TSManager: The alternate content provider exited with 5 for content PS100012.1; "
        "falling back to the built-in download"
    ) in engine.log.messages
    assert_entry_matches(engine.cache.lookup("PS100012", 1).path, UPGRADE)
    assert not Path(json.loads(record_path.read_text())["ini"]).exists()
    no_leftovers(engine)


def test_a_timeout_kills_the_acps_process_group_then_falls_back(
    cmg, cmg_client, packages, acp
):
    site(cmg, 2203)
    program, record_path = acp("sleep")
    engine = cmg_client()
    engine.download_program_timeout = 2.0
    started = time.monotonic()
    result = engine.run(ipu(**acp_variables(program)))
    assert result.succeeded, result.error
    assert time.monotonic() - started < 20  # two 2 s timeouts, not two 60 s sleeps
    record = json.loads(record_path.read_text())
    assert record["pgid"] == record["pid"]  # a session (and process group) of its own
    assert gone(record["pid"])
    assert gone(record["child"])
    assert not Path(record["ini"]).exists()
    assert any(
        "did not exit within 2 seconds: killed its process group" in m
        for m in engine.log.messages
    )
    assert builtin_manifest_requests(cmg) == 2
    no_leftovers(engine)


def test_what_the_acp_leaves_running_is_killed_when_it_exits(cmg, cmg_client, packages, acp):
    site(cmg, 2203)
    program, record_path = acp("straggler")
    engine = cmg_client()
    assert engine.run(ipu(**acp_variables(program))).succeeded
    record = json.loads(record_path.read_text())
    # Killed before the engine went on: nothing may write into a folder after its verification.
    assert gone(record["child"])
    assert "TSManager: Process completed with exit code 4" in engine.log.messages


@pytest.mark.parametrize(
    ("version", "allow", "why"),
    [
        (2107, "true", "SMSTSAllowTokenAuthURLForACP applies from site version 2203; this site is 2107"),
        (2203, None, "SMSTSAllowTokenAuthURLForACP is not true"),
        (2203, "false", "SMSTSAllowTokenAuthURLForACP is not true"),
    ],
)
def test_token_auth_sources_are_left_out_below_2203_or_without_the_variable(
    cmg, cmg_client, packages, acp, version, allow, why
):
    site(cmg, version)
    program, record_path = acp()
    variables = {"SMSTSDownloadProgram": program}
    if allow is not None:
        variables["SMSTSAllowTokenAuthURLForACP"] = allow
    engine = cmg_client()
    result = engine.run(ipu(**variables))
    assert result.succeeded, result.error
    record = json.loads(record_path.read_text())
    assert record["sections"] == ["Package", "Client"]
    assert record["package"]["Locations"] == "0"
    assert "Signature" not in json.dumps(record)
    assert [t.provider for t in result.transfers] == [None, None]
    assert builtin_manifest_requests(cmg) == 2
    assert (
        "TSManager: Not offering the token-authentication source 'cmg.contoso.test' to the "
        f"alternate content provider: {why}"
    ) in engine.log.messages
    assert "TSManager: Process completed with exit code 3" in engine.log.messages


def test_intranet_sources_are_offered_without_a_token(cmg, cmg_client, packages, acp):
    site(cmg, 2203)
    cmg.add_on_prem_dp("dp01.contoso.test", packages[0], locality="SUBNET")
    program, record_path = acp("exit-5")
    engine = cmg_client()
    sequence = TaskSequence(
        "PS100020", "IPU", (Step("Upgrade", "upgrade_os", "PS100012"),),
        variables=acp_variables(program),
    )
    assert engine.run(sequence).succeeded
    locations = json.loads(record_path.read_text())["locations"]
    by_type = {loc["Type"]: loc for loc in locations}
    assert set(by_type) == {"SERVER", "CLOUD"}
    intranet = by_type["SERVER"]
    assert intranet["TokenAuth"] == "false"
    assert intranet["Locality"] == "SUBNET"
    assert intranet["Server"] == "dp01.contoso.test"
    assert "Signature" not in intranet and "ManifestURL" not in intranet


def test_a_program_that_cannot_start_falls_back(cmg, cmg_client, packages, tmp_path):
    engine = cmg_client()
    missing = tmp_path / "no-such-acp"
    result = engine.run(ipu(SMSTSDownloadProgram=str(missing)))
    assert result.succeeded, result.error
    assert any(
        "The alternate content provider failed for content PS100012.1 (FileNotFoundError" in m
        and "falling back to the built-in download" in m
        for m in engine.log.messages
    )


def test_a_program_string_that_cannot_be_split_uses_the_built_in_download(
    cmg, cmg_client, packages
):
    engine = cmg_client()
    result = engine.run(ipu(SMSTSDownloadProgram='python3 "unclosed'))
    assert result.succeeded
    assert any("cannot be split into arguments" in m for m in engine.log.messages)
    assert all(t.provider is None for t in result.transfers)


# --- the Python interface ----------------------------------------------------------------------


class CopyProvider:
    """A Python provider that writes known bytes (as a peer cache would), optionally wrong."""

    def __init__(self, content: dict[str, dict[str, bytes]], *, code: int = 0, tamper: bool = False):
        self.content = content
        self.code = code
        self.tamper = tamper
        self.requests: list[ProviderRequest] = []

    def fetch(self, request: ProviderRequest) -> int:
        self.requests.append(request)
        assert request.destination.is_dir() and not any(request.destination.iterdir())
        for relpath, data in self.content.get(request.package_id, {}).items():
            target = request.destination / relpath
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data[:-1] + b"?" if self.tamper else data)
        return self.code


def test_a_python_content_provider_plugs_in_through_cmg_client(cmg, cmg_client, packages):
    provider = CopyProvider({"PS100012": UPGRADE, "PS100013": DRIVERS})
    assert isinstance(provider, ContentProvider)
    engine = cmg_client(provider=provider)
    result = engine.run(ipu())
    assert result.succeeded, result.error
    assert [t.provider for t in result.transfers] == ["CopyProvider", "CopyProvider"]
    assert cmg.log.count("manifest") == 0  # nothing came from the CMG but the locations
    assert [r.package_id for r in provider.requests] == ["PS100012", "PS100013"]
    # The default site (2107) withholds the CMG, as it does from a program.
    assert provider.requests[0].locations == ()
    assert provider.requests[0].package_hash == packages[0].hash
    assert_entry_matches(engine.cache.lookup("PS100013", 1).path, DRIVERS)
    no_leftovers(engine)


def test_a_python_provider_gets_the_cmg_token_from_2203(cmg, cmg_client, packages):
    site(cmg, 2203)
    provider = CopyProvider({"PS100012": UPGRADE, "PS100013": DRIVERS})
    engine = cmg_client(provider=provider)
    sequence = ipu(SMSTSAllowTokenAuthURLForACP="TRUE")
    assert engine.run(sequence).succeeded
    (location,) = provider.requests[0].locations
    assert location.token is not None
    assert location.token.manifest_url.startswith(location.url + "&tid=")
    assert location.token.signature_header == "X-Cmg-Token-Signature"
    # Secrets stay out of reprs, which tracebacks and logs show.
    assert location.token.signature not in repr(provider.requests[0])
    assert location.token.client_token not in repr(provider.requests[0])


def test_a_lying_python_provider_is_0x80091007(cmg, cmg_client, packages):
    engine = cmg_client(provider=CopyProvider({"PS100012": UPGRADE}, tamper=True))
    result = engine.run(ipu())
    assert result.exit_code == codes.HASH_MISMATCH
    assert engine.cache.entries() == []
    assert cmg.log.count("manifest") == 0
    no_leftovers(engine)


def test_a_python_provider_returning_the_abort_code_aborts_and_others_fall_back(
    cmg, cmg_client, packages
):
    aborting = cmg_client(name="a", provider=CopyProvider({}, code=9))
    result = aborting.run(ipu(SMSTSDownloadAbortCode="9"))
    assert result.exit_code == E_ABORT
    falling = cmg_client(name="b", provider=CopyProvider({}, code=9))
    assert falling.run(ipu()).succeeded  # no abort code set: 9 is any other failure

    class Raising:
        def fetch(self, request: ProviderRequest) -> int:
            raise RuntimeError("peer cache unreachable")

    raising = cmg_client(name="c", provider=Raising())
    assert raising.run(ipu()).succeeded
    assert any(
        "(RuntimeError: peer cache unreachable); falling back to the built-in download" in m
        for m in raising.log.messages
    )


def test_the_task_sequence_variable_wins_over_the_engines_provider(
    cmg, cmg_client, packages, acp
):
    site(cmg, 2203)
    program, _ = acp()
    provider = CopyProvider({})
    engine = cmg_client(provider=provider)
    assert engine.run(ipu(**acp_variables(program))).succeeded
    assert provider.requests == []
    assert acp_manifest_requests(cmg) == 2


# --- units: the INI, the folder check, the program runner ---------------------------------------


def _request(tmp_path: Path, **changes) -> ProviderRequest:
    token = ProviderToken(
        tid="42", iss="PS1", alg="1.2.840.113549.1.1.11", st="2026-01-01T00:00:00",
        et="2026-01-01T08:00:00", signature="c2lnbmF0dXJl", signature_header="X-Cmg-Token-Signature",
        manifest_url="https://cmg/x?pid=P&cid=P&tid=42&st=2026-01-01T00%3A00%3A00",
        ca_file=tmp_path / "ca.pem", client_token="eyJ.a.b",
    )
    values = {
        "package_id": "PS100013", "version": 2, "package_hash": "AB" * 32,
        "destination": tmp_path / "dest",
        "locations": (ProviderLocation("https://cmg/x?pid=P&cid=P", "CLOUD", "REMOTE", "cmg", 2, token),),
        "site_code": "PS1", "client_id": "GUID:1", "site_version": 2203, "abort_code": 7,
    }
    values.update(changes)
    return ProviderRequest(**values)


def test_the_ini_reads_back_with_configparser(tmp_path):
    text = render_ini(_request(tmp_path))
    ini = configparser.ConfigParser(interpolation=None)
    ini.read_string(text)
    assert ini.sections() == ["Package", "Client", "Location1"]
    assert ini["Package"]["packageid"] == "PS100013"
    assert ini["Package"]["Version"] == "2"
    assert ini["Client"]["AbortCode"] == "7"
    assert ini["Client"]["StorageCAFile"] == ""
    assert ini["Location1"]["ManifestURL"].endswith("st=2026-01-01T00%3A00%3A00")
    assert ini["Location1"]["Signature"] == "c2lnbmF0dXJl"
    assert ini["Location1"]["TokenEt"] == "2026-01-01T08:00:00"


def test_a_value_with_a_line_break_is_refused_not_written(tmp_path):
    bad = ProviderLocation("https://dp/x\n[Package]\nHash = 00", "SERVER", "LOCAL", "dp", 1)
    with pytest.raises(ValueError, match=r"\[Location1\] URL: the value holds a line break"):
        render_ini(_request(tmp_path, locations=(bad,)))


def test_abort_codes_are_decimal_or_hex():
    assert parse_abort_code(" 7 ") == 7
    assert parse_abort_code("0x80004004") == 0x80004004
    with pytest.raises(ValueError, match="SMSTSDownloadAbortCode='seven' is not an exit code"):
        parse_abort_code("seven")


def test_read_folder_hashes_bytes_and_refuses_links(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f.bin").write_bytes(b"abc")
    (tmp_path / "link").symlink_to(tmp_path / "a" / "f.bin")
    os.mkfifo(tmp_path / "pipe")
    content = read_folder(tmp_path)
    assert content.files == {"a/f.bin": (3, hashlib.sha256(b"abc").hexdigest())}
    assert content.refused == ["link", "pipe"]


def test_a_provider_that_writes_a_link_fails_verification(cmg, cmg_client, packages, tmp_path):
    class Linking(CopyProvider):
        def fetch(self, request: ProviderRequest) -> int:
            code = super().fetch(request)
            (request.destination / "setup.exe").unlink()
            outside = tmp_path / "outside.exe"
            outside.write_bytes(UPGRADE["setup.exe"])
            (request.destination / "setup.exe").symlink_to(outside)
            return code

    engine = cmg_client(provider=Linking({"PS100012": UPGRADE}))
    result = engine.run(ipu())
    assert result.exit_code == codes.HASH_MISMATCH
    assert "not files (links, special files" in str(result.error)
    assert engine.cache.entries() == []


def test_the_ini_is_deleted_when_the_program_raises_or_is_interrupted(tmp_path, monkeypatch):
    seen: list[Path] = []
    runner = ProgramProvider("true", temp_dir=tmp_path)

    def boom(argv: list[str]) -> int:
        ini = Path(argv[-3])
        assert stat.S_IMODE(ini.stat().st_mode) == 0o600
        seen.append(ini)
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "_run", boom)
    (tmp_path / "dest").mkdir()
    with pytest.raises(KeyboardInterrupt):
        runner.fetch(_request(tmp_path))
    assert seen and not seen[0].exists()
    assert list(tmp_path.glob("pytest-cmg-acp-*")) == []


def test_a_program_timeout_raises_after_killing_the_group(tmp_path):
    lines: list[str] = []
    runner = ProgramProvider("sh -c 'sleep 30 & sleep 30'", timeout=0.5, temp_dir=tmp_path,
                             on_event=lines.append)
    (tmp_path / "dest").mkdir()
    started = time.monotonic()
    with pytest.raises(ProviderTimeout, match=r"did not exit within 0.5 s"):
        runner.fetch(_request(tmp_path))
    assert time.monotonic() - started < 10
    assert list(tmp_path.glob("pytest-cmg-acp-*")) == []
    assert lines[-1].startswith("The alternate content provider did not exit within 0.5 seconds")


def test_program_provider_refuses_an_empty_program_and_a_bad_timeout():
    with pytest.raises(ValueError, match="SMSTSDownloadProgram is empty"):
        ProgramProvider("  ")
    with pytest.raises(ValueError, match="timeout must be positive"):
        ProgramProvider("true", timeout=0)


def test_content_error_is_what_a_lie_raises_from_resolve(cmg, cmg_client, packages):
    engine = cmg_client(provider=CopyProvider({"PS100013": {"net/e1000.inf": b"x"}}))
    with pytest.raises(ContentError) as caught:
        engine.resolve("PS100013", 1)
    assert caught.value.hresult == codes.HASH_MISMATCH
    assert "net/e1000.inf (1 bytes)" in str(caught.value)


def test_a_flooding_program_is_logged_within_the_bounds_and_never_blocks(tmp_path):
    from pytest_cmg._client.acp import OUTPUT_MAX_LINE, OUTPUT_MAX_LINES

    lines: list[str] = []
    # More lines than are logged, one of them longer than a line may be, all on a pipe that
    # would fill (64 KiB) long before the program ends if nobody read it.
    script = (
        f"import sys; sys.stdout.write('x' * {OUTPUT_MAX_LINE + 10} + '\\n'); "
        f"sys.stdout.write(''.join(f'line {{n}}\\n' for n in range({OUTPUT_MAX_LINES + 4}))); "
        "sys.stderr.write('to stderr\\n')"
    )
    runner = ProgramProvider(
        f"{sys.executable} -c \"{script}\"", timeout=60, temp_dir=tmp_path, on_output=lines.append
    )
    (tmp_path / "dest").mkdir()
    assert runner.fetch(_request(tmp_path)) == 0
    assert len(lines) == OUTPUT_MAX_LINES + 1
    assert lines[0] == "x" * OUTPUT_MAX_LINE + "... (10 characters cut)"
    assert lines[1] == "line 0"
    assert lines[-1] == f"... 6 more output line(s) not logged (at most {OUTPUT_MAX_LINES} are)"
