"""``python -m pytest_cmg serve``, driven by a client that does not use pytest_cmg's code.

The client below is written from protocol.md (CCM envelope, ContentLocationRequest/Reply),
docs/emulation.md (cloud record, access token, manifest, package hash) and the README's JSON
contract only. It imports nothing from pytest_cmg, so it checks the documented contract, not the
implementation talking to itself.
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import hashlib
import json
import os
import select
import signal
import subprocess
import sys
import time
import uuid
import zlib
from pathlib import Path
from urllib.parse import parse_qs, urlsplit
from xml.etree import ElementTree as ET

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
SCENARIO = ROOT / "scenarios" / "ipu" / "on-demand-token-software-center.cmg.yaml"
BOUNDARY = "aAbBcCdDv1234567890VxXyYzZ"


def ccm_envelope(body_xml: str) -> bytes:
    body = zlib.compress((body_xml + "\x00").encode("utf-16-le"))
    header = (
        '<Msg SchemaVersion="1.1" ReplyCompression="zlib">'
        f"<ID>{{{str(uuid.uuid4()).upper()}}}</ID><SourceID>GUID:independent</SourceID>"
        "<SourceHost>client</SourceHost><TargetAddress>mp:[http]MP_LocationManager</TargetAddress>"
        "<ReplyTo>direct:client:LS_ReplyLocations</ReplyTo><Priority>3</Priority>"
        "<Timeout>600</Timeout><ReqVersion>5931</ReqVersion><TargetHost>mp</TargetHost>"
        "<TargetEndpoint>MP_LocationManager</TargetEndpoint><ReplyMode>Sync</ReplyMode>"
        f'<Protocol>http</Protocol><Body Type="ByteRange" Offset="0" Length="{len(body)}"/>'
        '<Hooks><Hook3 Name="zlib-compress"/></Hooks><Payload Type="inline"/></Msg>'
    )
    return (
        f"--{BOUNDARY}\r\ncontent-type: text/plain; charset=UTF-16\r\n\r\n".encode()
        + b"\xff\xfe" + header.encode("utf-16-le")
        + f"\r\n--{BOUNDARY}\r\ncontent-type: application/octet-stream\r\n\r\n".encode()
        + body
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


def ccm_reply_body(response: requests.Response) -> str:
    raw = b"Content-Type: " + response.headers["Content-Type"].encode() + b"\r\n\r\n" + response.content
    message = email.message_from_bytes(raw, policy=email.policy.HTTP)
    parts = list(message.iter_parts())
    assert len(parts) == 2
    payload = parts[1].get_payload(decode=True)
    return zlib.decompress(payload).decode("utf-16-le").rstrip("\x00")


def location_request(package_id: str, version: int, site_code: str) -> str:
    return (
        '<ContentLocationRequest SchemaVersion="1.00" BGRVersion="1">'
        f'<Package ID="{package_id}" Version="{version}"/>'
        f'<AssignedSite SiteCode="{site_code}"/>'
        '<ClientLocationInfo LocationType="SMSPackage" UseAzure="1" UseInternetDP="1" '
        'AllowHTTP="1" DPTokenAuth="1"><BoundaryGroups/></ClientLocationInfo>'
        "</ContentLocationRequest>"
    )


def package_hash(files: list[tuple[str, int, str]]) -> str:
    lines = sorted(files, key=lambda f: f[0].encode("utf-8"))
    text = "".join(f"{relpath}\t{size}\t{sha.lower()}\n" for relpath, size, sha in lines)
    return hashlib.sha256(text.encode("utf-8")).hexdigest().upper()


def ccm_token_for_aad(contract: dict) -> str:
    """The README's Azure AD path: the device token in, a CCM token out, at CCM_STS."""
    with requests.Session() as session:
        session.trust_env = False
        session.verify = contract["ca_cert"]
        url = f"{contract['cmg_url']}/CCM_Proxy_ServerAuth/{contract['mp_role_id']}/CCM_STS"
        answer = session.post(
            url,
            data=contract["client_id"].encode("utf-8"),
            headers={"Authorization": f"Bearer {contract['aad_token']}"},
            timeout=30,
        )
    assert answer.status_code == 200, answer.reason
    return answer.text.strip()


def fetch_package(
    contract: dict, package: dict, auth: str, folder: Path, *, token: str | None = None
) -> list[tuple[str, int, str]]:
    session = requests.Session()
    session.trust_env = False
    session.verify = contract["ca_cert"]
    headers = {"Content-Type": f'multipart/mixed; boundary="{BOUNDARY}"'}
    if auth in ("token", "azure_ad"):
        url = f"{contract['cmg_url']}/CCM_Proxy_ServerAuth/{contract['mp_role_id']}/ccm_system_tokenauth/request"
        headers["Authorization"] = f"Bearer {token or contract['token']}"
    else:
        url = f"{contract['cmg_url']}/CCM_Proxy_MutualAuth/{contract['mp_role_id']}/ccm_system/request"
        session.cert = (contract["client_cert"], contract["client_key"])
    body = ccm_envelope(location_request(package["id"], package["version"], contract["site_code"]))
    reply = session.request("CCM_POST", url, data=body, headers=headers, timeout=30)
    assert reply.status_code == 200, reply.reason
    root = ET.fromstring(ccm_reply_body(reply))
    assert root.get("HashAlgorithm") == "32780"
    assert root.get("Hash") == package["hash"]
    record = root.find("Sites/Site/LocationRecords/LocationRecord")
    assert record is not None
    assert record.findtext("DPType") == "CLOUD"
    token = record.find("AccessToken")
    params = {k: token.get(k) for k in ("tid", "iss", "alg", "st", "et")}
    manifest_url = record.find("URL").get("Name") + "&" + "&".join(
        f"{k}={requests.utils.quote(v, safe='')}" for k, v in params.items()
    )
    manifest = session.get(
        manifest_url, headers={"X-Cmg-Token-Signature": token.get("Signature")}, timeout=30
    )
    assert manifest.status_code == 200
    files = []
    # Storage is another server: trusted through storage_ca_cert when it is HTTPS.
    storage = requests.Session()
    storage.trust_env = False
    storage.verify = contract.get("storage_ca_cert", True)
    for node in ET.fromstring(manifest.text).iterfind("File"):
        # The README: SAS URLs allow HTTPS only when storage is HTTPS.
        spr = parse_qs(urlsplit(node.get("Url")).query)["spr"]
        assert spr == (["https"] if "storage_ca_cert" in contract else ["https,http"])
        blob = storage.get(node.get("Url"), timeout=30)
        assert blob.status_code == 200
        digest = hashlib.sha256(blob.content).hexdigest()
        assert digest == node.get("Hash").lower()
        assert len(blob.content) == int(node.get("Size"))
        target = folder / node.get("RelPath")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(blob.content)
        files.append((node.get("RelPath"), int(node.get("Size")), digest))
    session.close()
    storage.close()
    return files


def read_line(process: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 0.5)
        if ready:
            return process.stdout.readline()
        if process.poll() is not None:
            break
    raise AssertionError(f"serve printed no line in {timeout} s; stderr: {process.stderr.read()}")


def start_serve(folder, *options):
    process = subprocess.Popen(
        [sys.executable, "-m", "pytest_cmg", "serve", str(SCENARIO), *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=folder,
    )
    return process, json.loads(read_line(process, timeout=120))


def stop_serve(process):
    if process.poll() is None:
        process.kill()
        process.wait(timeout=10)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One served world for the tests that only read from it (starting one costs ~5 s)."""
    process, contract = start_serve(tmp_path_factory.mktemp("serve"))
    yield process, contract
    stop_serve(process)


@pytest.fixture
def served_alone(tmp_path):
    """A served world of the test's own, for tests that stop it."""
    process, contract = start_serve(tmp_path)
    yield process, contract
    stop_serve(process)


def test_the_json_line_carries_the_documented_contract(served):
    _, contract = served
    for key in ("cmg_url", "ca_cert", "site_code", "mp_role_id", "token", "client_cert",
                "client_key", "blob_endpoint", "packages"):
        assert contract[key], key
    assert contract["cmg_url"].startswith("https://127.0.0.1:")
    assert contract["blob_endpoint"].startswith("http://127.0.0.1:")
    assert {p["id"] for p in contract["packages"]} == {"PS100012", "PS100013"}
    for path in ("ca_cert", "client_cert", "client_key"):
        assert Path(contract[path]).is_file()
    assert contract["contract"] == 1  # fields were only added
    assert contract["aad_token"].count(".") == 2 and contract["aad_token"] != contract["token"]
    assert str(uuid.UUID(contract["tenant_id"])) == contract["tenant_id"]
    assert "storage_ca_cert" not in contract  # storage is plain HTTP here


def test_an_independent_client_downloads_on_the_azure_ad_path(served, tmp_path):
    _, contract = served
    # What ccmsetup asks first: the tenant's Azure AD properties, through the CMG, no auth.
    with requests.Session() as session:
        session.trust_env = False
        session.verify = contract["ca_cert"]
        info = session.get(
            f"{contract['cmg_url']}/CCM_Proxy_ServerAuth/AADAuthInfo",
            params={"TenantID": contract["tenant_id"]},
            timeout=30,
        )
    assert info.status_code == 200
    assert ET.fromstring(info.text).get("TenantID") == contract["tenant_id"]
    ccm_token = ccm_token_for_aad(contract)
    assert ccm_token.count(".") == 2 and ccm_token != contract["aad_token"]
    package = next(p for p in contract["packages"] if p["id"] == "PS100013")
    files = fetch_package(contract, package, "azure_ad", tmp_path / "aad", token=ccm_token)
    assert len(files) == package["files"]
    assert package_hash(files) == package["hash"]


def test_a_tampered_azure_ad_token_is_refused_at_ccm_sts(served):
    _, contract = served
    with requests.Session() as session:
        session.trust_env = False
        session.verify = contract["ca_cert"]
        url = f"{contract['cmg_url']}/CCM_Proxy_ServerAuth/{contract['mp_role_id']}/CCM_STS"
        tampered = contract["aad_token"][:-4] + ("AAAA" if not contract["aad_token"].endswith("AAAA") else "BBBB")
        answer = session.post(
            url, data=contract["client_id"].encode(), headers={"Authorization": f"Bearer {tampered}"}, timeout=30
        )
    assert answer.status_code == 401
    assert answer.reason == "CMGService_Invalid_Token"


def test_serve_with_https_storage_names_its_ca_and_signs_https_only(tmp_path):
    process, contract = start_serve(tmp_path, "--storage-https")
    try:
        assert contract["blob_endpoint"].startswith("https://127.0.0.1:")
        assert Path(contract["storage_ca_cert"]).is_file()
        package = next(p for p in contract["packages"] if p["id"] == "PS100013")
        files = fetch_package(contract, package, "token", tmp_path / "https")
        assert package_hash(files) == package["hash"]
        # This project's client trusts the storage CA from the line too.
        result = run_client(tmp_path, contract, "--package", "PS100013", "--auth", "azure_ad")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["packages"][0]["bytes"] == package["size"]
    finally:
        stop_serve(process)


@pytest.mark.parametrize("auth", ["token", "certificate"])
def test_an_independent_client_downloads_and_verifies_a_package(served, tmp_path, auth):
    _, contract = served
    package = next(p for p in contract["packages"] if p["id"] == "PS100013")
    files = fetch_package(contract, package, auth, tmp_path / auth)
    assert len(files) == package["files"]
    assert package_hash(files) == package["hash"]


def test_sigterm_stops_the_gateway_and_azurite(served_alone):
    process, contract = served_alone
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    pid = contract["azurite_pid"]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
            state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
            if state == "Z":
                break
        except (ProcessLookupError, FileNotFoundError):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"Azurite (pid {pid}) still runs after serve stopped")
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(contract["cmg_url"], verify=False, timeout=5)


def test_a_broken_scenario_is_refused_with_its_line(tmp_path):
    bad = tmp_path / "bad.cmg.yaml"
    bad.write_text(SCENARIO.read_text().replace("  download: on_demand", "  dowload: on_demand"))
    result = subprocess.run(
        [sys.executable, "-m", "pytest_cmg", "serve", str(bad)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    line = bad.read_text().splitlines().index("  dowload: on_demand") + 1
    assert f"bad.cmg.yaml:{line}: unknown key 'dowload'" in result.stderr


# --- python -m pytest_cmg client, against the same served world -----------------------------


def run_client(tmp_path, contract, *args, stderr=subprocess.PIPE):
    connection = tmp_path / "serve.json"
    connection.write_text(json.dumps(contract))
    return subprocess.run(
        [sys.executable, "-m", "pytest_cmg", "client", str(connection), *args],
        stdout=subprocess.PIPE, stderr=stderr, text=True, timeout=120, check=False, cwd=tmp_path,
    )


def test_client_downloads_packages_and_summarises_in_json(served, tmp_path):
    _, contract = served
    result = run_client(tmp_path, contract, "--package", "PS100012", "--package", "PS100013:1")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["outcome"] == "success" and summary["exit_code"] == "0x00000000"
    sizes = {p["id"]: p["size"] for p in contract["packages"]}
    assert {p["id"]: p["bytes"] for p in summary["packages"]} == sizes
    # What landed in the cache is exactly what the server says it distributed.
    for package in contract["packages"]:
        folder = Path(summary["cache"]) / f"{package['id']}.{package['version']}"
        files = [
            (p.relative_to(folder).as_posix(), p.stat().st_size,
             hashlib.sha256(p.read_bytes()).hexdigest())
            for p in folder.rglob("*") if p.is_file()
        ]
        assert package_hash(files) == package["hash"]
    assert "\r" not in result.stderr  # no progress bar when stderr is not a terminal
    # Where things are on the client, in its own form (docs/emulation.md, "Windows form"):
    # the default cache folder (./Windows/ccmcache) is C:\Windows\ccmcache, the working
    # directory standing for C:.
    assert summary["client_paths"] == {
        "client_cache": "C:\\Windows\\ccmcache",
        "_SMSTSMDataPath": "C:\\_SMSTaskSequence",
        "_SMSTSLastContentDownloadLocation": "C:\\Windows\\ccmcache\\PS100013.1",
    }
    assert Path(summary["cache"]) == (tmp_path / "Windows" / "ccmcache").resolve()
    # What reads as the client's own output names no path of this machine.
    assert str(tmp_path) not in json.dumps(summary["client_paths"])
    assert str(tmp_path) not in (tmp_path / "smsts.log").read_text()


def test_client_over_mutual_tls_and_a_scenario_task_sequence(served, tmp_path):
    _, contract = served
    result = run_client(
        tmp_path, contract, "--task-sequence", str(SCENARIO), "--auth", "certificate", "--fsync"
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["steps_run"] == [
        "Check readiness", "Upgrade the operating system", "Apply drivers"
    ]


def test_client_failure_is_exit_1_with_the_product_code(served, tmp_path):
    _, contract = served
    result = run_client(tmp_path, contract, "--package", "PS1000FF")
    assert result.returncode == 1
    summary = json.loads(result.stdout)
    assert summary["exit_code"] == "0x80040102"
    assert summary["failed_step"] == "Download PS1000FF"


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("not json", "its first line is not JSON (Expecting value at character 0)"),
        # serve not yet ready: the file a shell redirect created is still empty.
        ("", "it holds no line (is serve still starting?"),
        ("[1]", "its first line is JSON but not an object"),
        ('{"cmg_url": "https://127.0.0.1:1"}', "its JSON line has no 'ca_cert' field"),
    ],
)
def test_client_bad_usage_is_exit_2(tmp_path, text, said):
    (tmp_path / "broken.json").write_text(text)
    result = subprocess.run(
        [sys.executable, "-m", "pytest_cmg", "client", str(tmp_path / "broken.json"),
         "--package", "PS100012"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("cannot use connection"), result.stderr
    assert said in result.stderr
    # Words, not an exception's repr.
    assert "Error(" not in result.stderr
    assert result.stdout == ""


def test_a_parametrised_file_needs_its_case_named(tmp_path):
    # serve and client refuse a file of several cases unless --case names one (an item ID).
    parametrised = ROOT / "scenarios" / "ipu" / "full-upgrade-with-setup-restarts.cmg.yaml"
    for extra, said in [
        ((), "is parametrised into 3 cases (azure-ad-token-renewed, site-token-outlives-"),
        (("--case", "nope"), "--case 'nope': no case has that ID; its cases are azure-ad-"),
    ]:
        result = subprocess.run(
            [sys.executable, "-m", "pytest_cmg", "serve", str(parametrised), *extra],
            capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path,
        )
        assert result.returncode == 2
        assert result.stdout == ""
        assert said in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "pytest_cmg", "serve", str(SCENARIO), "--case", "any"],
        capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "--case 'any': this file has no cases" in result.stderr


def test_client_draws_a_progress_bar_on_a_terminal(served, tmp_path):
    import pty

    _, contract = served
    master, slave = pty.openpty()
    try:
        result = run_client(tmp_path, contract, "--package", "PS100012", stderr=slave)
    finally:
        os.close(slave)
    drawn = b""
    with contextlib.suppress(OSError):
        while chunk := os.read(master, 65536):
            drawn += chunk
    os.close(master)
    assert result.returncode == 0
    assert b"PS100012.3 [" in drawn
    assert b"100%" in drawn and b"4/4 files" in drawn


def test_https_storage_needs_the_process_backend(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pytest_cmg", "serve", str(SCENARIO), "--storage-https",
         "--azurite=external", "--connection-string", "UseDevelopmentStorage=true"],
        capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert "--storage-https needs --azurite=process" in result.stderr


def test_client_on_the_azure_ad_path_needs_the_field(served, tmp_path):
    # A line from an older server has no aad_token: bad usage, not a crash.
    _, contract = served
    older = {k: v for k, v in contract.items() if k != "aad_token"}
    result = run_client(tmp_path, older, "--package", "PS100013", "--auth", "azure_ad")
    assert result.returncode == 2
    assert "cannot use connection" in result.stderr and "aad_token" in result.stderr


def test_client_runs_each_boot_of_a_restarting_sequence_as_a_process(served, tmp_path):
    _, contract = served
    text = SCENARIO.read_text().replace(
        "    - name: Apply drivers\n",
        "    - name: Restart Computer\n      action: restart_computer\n    - name: Apply drivers\n",
    )
    scenario = tmp_path / "restart.cmg.yaml"
    scenario.write_text(text)
    result = run_client(tmp_path, contract, "--task-sequence", str(scenario))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["steps_run"] == [
        "Check readiness", "Upgrade the operating system", "Restart Computer", "Apply drivers"
    ]
    assert "boot 1: restart_computer" in result.stderr
    assert "boot 2: ended" in result.stderr
    log = Path(summary["log"]).read_text(encoding="utf-8")
    assert "The computer is going to restart" in log
    assert "after a restart: restart 1, instruction pointer 3" in log
    # The last boot's paths cross to the parent, in the client's form.
    assert summary["client_paths"]["client_cache"] == "C:\\Windows\\ccmcache"
    assert summary["client_paths"]["_SMSTSMDataPath"] == "C:\\_SMSTaskSequence"
    assert str(tmp_path) not in json.dumps(summary["client_paths"])
