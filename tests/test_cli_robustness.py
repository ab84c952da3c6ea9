"""``python -m pytest_cmg serve`` and ``client`` when the world around them misbehaves.

serve: a scenario file that cannot be read is told in one line (exit 2), and SIGTERM or SIGINT
stop it within 5 s at any moment, Azurite included, even while it distributes thousands of
files (issue 10, items 11 and 14). client: a full disk, a failing disk and bad paths end in its
JSON summary and a documented exit code, never a traceback (item 15).

The serve tests run the real command in a subprocess and find its Azurite through /proc (the
JSON line that names it is not printed yet while it distributes).
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import CancelledError
from pathlib import Path

import pytest
import yaml
from test_serve import SCENARIO, run_client, start_serve, stop_serve

from pytest_cmg._cli import main
from pytest_cmg._storage.clouddp import CloudDP
from pytest_cmg._storage.endpoint import DEV_ACCOUNT_KEY, DEV_ACCOUNT_NAME

#: The promise: any signal, at any moment, ends serve within this many seconds.
STOP_WITHIN = 5.0
#: Files in the package of the long distribution: about 20 s of uploads on a 2-core machine.
MANY_FILES = 10000


# --- /proc: serve's Azurite before the JSON line names it ----------------------------------


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state first), None if it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def azurite_child(parent: int) -> int | None:
    """The Azurite (node) process ``parent`` started, if there is one yet."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat(int(entry.name))
        if fields is None or int(fields[1]) != parent:
            continue
        try:
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"azurite" in command:
            return int(entry.name)
    return None


def listening_port(pid: int) -> int | None:
    """The TCP port ``pid`` listens on, from its sockets' inodes and /proc/net/tcp."""
    inodes = set()
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return None
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                return int(fields[1].rsplit(":", 1)[1], 16)
    return None


def blob_count(port: int, at_least: int) -> int:
    """Blobs in all containers of the Azurite on ``port``, counted up to ``at_least``."""
    from azure.storage.blob import BlobServiceClient

    connection = (
        f"DefaultEndpointsProtocol=http;AccountName={DEV_ACCOUNT_NAME};"
        f"AccountKey={DEV_ACCOUNT_KEY};BlobEndpoint=http://127.0.0.1:{port}/{DEV_ACCOUNT_NAME};"
    )
    with BlobServiceClient.from_connection_string(
        connection, retry_total=0, connection_timeout=5, read_timeout=10
    ) as service:
        count = 0
        for container in service.list_containers():
            blobs = service.get_container_client(container.name).list_blobs()
            count += sum(1 for _ in itertools.islice(blobs, at_least))
        return count


def many_files_scenario(folder: Path) -> Path:
    path = folder / "many-files.cmg.yaml"
    path.write_text(
        f"""\
scenario: a package of {MANY_FILES} small files, long enough to distribute to be interrupted
seed: 1014
packages:
  - id: PS100050
    type: package
    files: {MANY_FILES}
    size: {MANY_FILES}KiB
task_sequence:
  id: PS100060
  name: Download the package
  steps:
    - name: Download it
      action: download_package_content
      packages: [PS100050]
expect:
  outcome: success
""",
        encoding="utf-8",
    )
    return path


def start_serve_on(scenario: Path, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "pytest_cmg", "serve", str(scenario)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
    )


def end(process: subprocess.Popen[str], azurite: int | None) -> None:
    """After a failed assertion: the serve we started, and its Azurite, must not outlive us."""
    if process.poll() is None:
        process.kill()
        process.wait(timeout=10)
    if azurite is not None and alive(azurite):
        os.kill(azurite, signal.SIGKILL)


def failure(process: subprocess.Popen[str], what: str) -> AssertionError:
    if process.poll() is None:
        process.kill()
    _, err = process.communicate(timeout=10)
    return AssertionError(f"{what}; serve's stderr:\n{err[-3000:]}")


def wait_for_distribution(process: subprocess.Popen[str], blobs: int = 200) -> int:
    """Azurite's pid once it holds ``blobs`` blobs: serve is then distributing."""
    deadline = time.monotonic() + 180
    azurite = port = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise failure(process, "serve ended before its distribution was under way")
        azurite = azurite or azurite_child(process.pid)
        if azurite is not None:
            port = port or listening_port(azurite)
        if port is not None:
            try:
                if blob_count(port, blobs) >= blobs:
                    return azurite
            except Exception:  # Azurite busy or just started: ask again
                pass
        time.sleep(0.2)
    raise failure(process, f"no {blobs} blobs were distributed within 180 s")


def stop_and_time(process: subprocess.Popen[str], sig: signal.Signals) -> float:
    process.send_signal(sig)
    sent = time.monotonic()
    try:
        process.wait(timeout=STOP_WITHIN)
    except subprocess.TimeoutExpired:
        raise failure(process, f"serve still ran {STOP_WITHIN} s after {sig.name}") from None
    return time.monotonic() - sent


# --- serve: signals --------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_distribution_stops_serve_and_azurite_within_5_s(tmp_path, sig):
    process = start_serve_on(many_files_scenario(tmp_path), tmp_path)
    azurite = None
    try:
        azurite = wait_for_distribution(process)
        took = stop_and_time(process, sig)
        out, err = process.communicate(timeout=10)
        assert process.returncode == 128 + sig, err
        assert out == ""  # no JSON line: nothing was served
        assert f"stopped by {sig.name} during start-up" in err
        assert "Traceback" not in err
        assert not alive(azurite), f"Azurite (pid {azurite}) outlived serve"
        print(f"serve stopped {took:.2f} s after {sig.name} during distribution")
    finally:
        end(process, azurite)


def test_sigterm_during_azurite_start_up_stops_serve_and_azurite(tmp_path):
    process = start_serve_on(SCENARIO, tmp_path)
    azurite = None
    try:
        deadline = time.monotonic() + 120
        while azurite is None and time.monotonic() < deadline:
            if process.poll() is not None:
                raise failure(process, "serve ended before it started Azurite")
            azurite = azurite_child(process.pid)
            time.sleep(0.01)
        assert azurite is not None, "serve started no Azurite within 120 s"
        # Azurite needs about a second to listen: the signal lands while serve waits for it.
        stop_and_time(process, signal.SIGTERM)
        out, err = process.communicate(timeout=10)
        assert process.returncode == 128 + signal.SIGTERM, err
        assert out == ""
        assert "Traceback" not in err
        assert not alive(azurite), f"Azurite (pid {azurite}) outlived serve"
    finally:
        end(process, azurite)


# --- serve and client: a scenario file that cannot be read ------------------------------------


def test_serve_refuses_a_scenario_that_is_not_utf8_in_one_line(tmp_path):
    bad = tmp_path / "latin1.cmg.yaml"
    bad.write_bytes(SCENARIO.read_bytes().replace(b"scenario: ", b"scenario: caf\xe9 ", 1))
    result = subprocess.run(
        [sys.executable, "-m", "pytest_cmg", "serve", str(bad)],
        capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert "latin1.cmg.yaml" in result.stderr


@pytest.mark.parametrize(
    "error",
    [
        UnicodeDecodeError("utf-8", b"caf\xe9", 3, 4, "invalid continuation byte"),
        yaml.YAMLError("mapping values are not allowed here"),
        RecursionError("maximum recursion depth exceeded"),
        TypeError("unhashable type: 'dict'"),
    ],
    ids=["UnicodeDecodeError", "YAMLError", "RecursionError", "TypeError"],
)
def test_whatever_escapes_the_scenario_loader_is_one_line_and_exit_2(
    tmp_path, monkeypatch, capsys, error
):
    scenario = tmp_path / "broken.cmg.yaml"
    scenario.write_text("scenario: broken\n", encoding="utf-8")

    def load_scenarios(path, **kwargs):
        raise error

    monkeypatch.setattr("pytest_cmg._scenario.load.load_scenarios", load_scenarios)
    assert main(["serve", str(scenario)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1, err
    assert str(scenario) in err
    assert err.startswith("pytest-cmg serve: ")


def test_client_refuses_a_task_sequence_file_that_is_not_utf8(tmp_path, capsys):
    connection = tmp_path / "serve.json"
    connection.write_text(json.dumps({
        "cmg_url": "https://127.0.0.1:9", "ca_cert": "ca.pem", "site_code": "PS1",
        "mp_role_id": "1", "client_id": "GUID:1", "token": "t",
    }))
    bad = tmp_path / "latin1.cmg.yaml"
    bad.write_bytes(SCENARIO.read_bytes().replace(b"scenario: ", b"scenario: caf\xe9 ", 1))
    assert main(["client", str(connection), "--task-sequence", str(bad)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "latin1.cmg.yaml" in err


# --- client: bad paths and failing disks -------------------------------------------------------


@pytest.fixture(scope="module")
def contract(tmp_path_factory):
    """The JSON line of one served world (test_serve's), for the client tests."""
    process, line = start_serve(tmp_path_factory.mktemp("serve"))
    yield line
    stop_serve(process)


def summary_of(result) -> dict:
    assert "Traceback" not in result.stderr, result.stderr
    return json.loads(result.stdout)


def test_client_cache_naming_a_file_is_bad_usage_with_a_summary(contract, tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    result = run_client(tmp_path, contract, "--package", "PS100013", "--cache", "afile")
    assert result.returncode == 2, result.stderr
    summary = summary_of(result)
    assert summary["outcome"] == "error"
    assert summary["exit_code"] == "0x80070003"  # ERROR_PATH_NOT_FOUND
    assert "--cache afile" in summary["error"] and "not a folder" in summary["error"]
    assert summary["packages"] == []


def test_client_log_in_a_folder_that_cannot_be_made_is_bad_usage(contract, tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    result = run_client(
        tmp_path, contract, "--package", "PS100013", "--log", "afile/logs/smsts.log"
    )
    assert result.returncode == 2, result.stderr
    summary = summary_of(result)
    assert summary["outcome"] == "error"
    assert summary["exit_code"] == "0x80070003"
    assert "--log afile/logs/smsts.log" in summary["error"]


def test_client_log_in_a_folder_nobody_may_write_is_bad_usage(contract, tmp_path):
    # sysfs refuses new files even to root, unlike a chmod-ed folder.
    target = Path("/sys/pytest-cmg-smsts.log")
    try:
        target.open("a").close()
    except OSError:
        pass
    else:
        pytest.skip("/sys accepts new files here")
    result = run_client(tmp_path, contract, "--package", "PS100013", "--log", str(target))
    assert result.returncode == 2, result.stderr
    summary = summary_of(result)
    assert summary["outcome"] == "error"
    assert summary["exit_code"] in ("0x80070005", "0x80070013")  # access denied, write-protected


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_client_goes_on_without_a_log_on_a_full_disk_and_says_so(contract, tmp_path):
    result = run_client(tmp_path, contract, "--package", "PS100013", "--log", "/dev/full")
    assert result.returncode == 0, result.stderr
    summary = summary_of(result)
    assert summary["outcome"] == "success"
    assert summary["packages"][0]["bytes"] > 0
    assert "ENOSPC, 0x80070070" in summary["log_error"]
    assert "went on without the log" in summary["log_error"]
    assert "warning" in result.stderr and "/dev/full" in result.stderr


def _connection(tmp_path: Path, contract: dict) -> str:
    path = tmp_path / "serve.json"
    path.write_text(json.dumps(contract))
    return str(path)


def test_client_with_no_space_to_make_its_cache_ends_in_a_summary(
    contract, tmp_path, monkeypatch, capsys
):
    cache = tmp_path / "ccmcache"
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):
        if Path(path).resolve().is_relative_to(cache):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    code = main(["client", _connection(tmp_path, contract), "--package", "PS100013",
                 "--cache", str(cache), "--log", str(tmp_path / "smsts.log"), "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 1, err
    summary = json.loads(out)
    assert summary["outcome"] == "error"
    assert summary["exit_code"] == "0x80070070"  # ERROR_DISK_FULL
    assert str(cache) in summary["error"]


def test_client_meeting_an_io_error_in_its_cache_ends_in_a_summary(
    contract, tmp_path, monkeypatch, capsys
):
    cache = tmp_path / "ccmcache"
    real_open = os.open
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT

    def failing_open(path, flags, *args, **kwargs):
        if flags & writing and Path(os.fsdecode(path)).resolve().is_relative_to(cache):
            raise OSError(errno.EIO, os.strerror(errno.EIO), os.fsdecode(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", failing_open)
    code = main(["client", _connection(tmp_path, contract), "--package", "PS100013",
                 "--cache", str(cache), "--log", str(tmp_path / "smsts.log"), "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 1, err
    summary = json.loads(out)
    assert summary["outcome"] == "error"
    assert summary["exit_code"] == "0x8007045D"  # ERROR_IO_DEVICE
    assert "--cache" in summary["error"]


def test_client_goes_on_when_its_log_meets_an_io_error(contract, tmp_path, monkeypatch, capsys):
    log = tmp_path / "smsts.log"
    real_open = pathlib.Path.open

    def failing_open(self, mode="r", *args, **kwargs):
        if self == log and "a" in mode:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(self))
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "open", failing_open)
    code = main(["client", _connection(tmp_path, contract), "--package", "PS100013",
                 "--cache", str(tmp_path / "ccmcache"), "--log", str(log), "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads(out)
    assert summary["outcome"] == "success"
    assert "EIO, 0x8007045D" in summary["log_error"]


# --- CloudDP: a cancelled distribution -----------------------------------------------------------


def _blobs(dp: CloudDP) -> list[str]:
    with dp.endpoint.service_client() as service:
        return [b.name for b in service.get_container_client(dp.container).list_blobs()]


def _distribute_in_background(dp: CloudDP, files: dict[str, bytes]) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def run():
        try:
            dp.distribute("PS1000CA", 1, files)
        except BaseException as error:
            outcome["error"] = error
        outcome["ended"] = time.monotonic()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def _upload_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("clouddp-upload")]


def test_a_cancelled_distribution_stops_between_files_and_publishes_no_manifest(cmg_harness):
    cancel = threading.Event()
    dp = CloudDP(cmg_harness.endpoint, f"cancel-{uuid.uuid4().hex[:12]}", cancel=cancel)
    dp.create()
    try:
        files = {f"drivers/f{i:05d}.sys": i.to_bytes(4, "big") * 128 for i in range(5000)}
        thread, outcome = _distribute_in_background(dp, files)
        deadline = time.monotonic() + 60
        while len(_blobs(dp)) < 100 and time.monotonic() < deadline and thread.is_alive():
            time.sleep(0.05)
        cancel.set()
        cancelled_at = time.monotonic()
        thread.join(timeout=10)
        assert not thread.is_alive(), "distribute still ran 10 s after the cancel"
        assert isinstance(outcome.get("error"), CancelledError), outcome
        assert "PS1000CA.1" in str(outcome["error"])
        assert outcome["ended"] - cancelled_at < 3.0
        deadline = time.monotonic() + 10
        while _upload_threads() and time.monotonic() < deadline:
            time.sleep(0.05)
        uploaded = _blobs(dp)
        assert 100 <= len(uploaded) < len(files)
        assert not any(name.endswith(".manifest.xml") for name in uploaded)
        assert dp.versions("PS1000CA") == []
    finally:
        dp.delete()
        dp.close()


def test_a_cancel_stops_a_large_upload_between_its_blocks(cmg_harness):
    # Over the SDK's 64 MiB single put, a file goes up as 4 MiB blocks: about 9 s for these two
    # here. Cancelled, the blocks not yet read are never sent and no blob is committed.
    cancel = threading.Event()
    dp = CloudDP(cmg_harness.endpoint, f"cancel-{uuid.uuid4().hex[:12]}", cancel=cancel)
    dp.create()
    try:
        files = {"sources/install.wim": os.urandom(192 << 20), "sources/boot.wim": os.urandom(192 << 20)}
        thread, outcome = _distribute_in_background(dp, files)
        time.sleep(0.7)
        cancel.set()
        thread.join(timeout=30)
        assert not thread.is_alive()
        assert isinstance(outcome.get("error"), CancelledError), outcome
        deadline = time.monotonic() + 30
        while _upload_threads() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _upload_threads() == []
        assert _blobs(dp) == []  # neither upload went on to commit its blob
    finally:
        dp.delete()
        dp.close()
