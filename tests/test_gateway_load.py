"""Load smoke (reliability.md test 42): many clients at once through the gateway and Azurite.

Bounded: 50 client engines (one thread each) locate and download one small package at the same
moment. Everything must verify, the gateway must give back every thread and file descriptor it
used, closed engines must hold no connection to the gateway or to storage, and its location latency (measured by the gateway itself, ``LoggedRequest.elapsed``) must
stay under a generous budget on a loaded 2-core machine.
"""

from __future__ import annotations

import gc
import hashlib
import math
import os
import socket
import threading
import time
from urllib.parse import urlsplit

import pytest

from pytest_cmg import Step, TaskSequence
from pytest_cmg._client.factory import build_engine, connection_for

CLIENTS = 50
PACKAGE = "PS100042"
FILES = {f"payload/part{n}.bin": hashlib.sha256(bytes([n])).digest() * 1024 for n in range(4)}
SIZE = sum(map(len, FILES.values()))
#: Budgets are generous on purpose: the machine is shared; they catch a gateway that serialises
#: or stalls, not a slow CPU.
GATEWAY_P99_BUDGET = 2.0
CLIENT_P99_BUDGET = 15.0
SETTLE_SECONDS = 15.0


def p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[math.ceil(0.99 * len(ordered)) - 1]


def _count_sockets(port: int, *, peer: bool, skip: set[int] | frozenset[int] = frozenset()) -> int:
    """Open inet sockets of this process whose local (or, with ``peer``, remote) port is
    ``port``; descriptors in ``skip`` are not counted."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        if int(name) in skip:
            continue
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
            probe = socket.socket(fileno=os.dup(int(name)))
        except OSError:
            continue  # closed meanwhile, or not an inet socket
        try:
            address = probe.getpeername() if peer else probe.getsockname()
            if isinstance(address, tuple) and address[1] == port:
                count += 1
        except OSError:
            pass  # not connected (a listener), or closed meanwhile
        finally:
            probe.close()
    return count


def sockets_on(port: int) -> int:
    """Open sockets of this process whose local port is ``port`` (a server's, listener included)."""
    return _count_sockets(port, peer=False)


def urllib3_fds() -> set[int]:
    """Descriptors held by urllib3 connections: the test's own azure-storage-blob client (the
    cloud DP's) keeps a pool of them to Azurite; the engines never use urllib3 for storage."""
    import urllib3.connection

    fds = set()
    for obj in gc.get_objects():
        if isinstance(obj, urllib3.connection.HTTPConnection):
            sock = getattr(obj, "sock", None)
            if sock is not None and sock.fileno() >= 0:
                fds.add(sock.fileno())
    return fds


def client_sockets_to(port: int) -> int:
    """Open sockets of this process connected to ``port``, except urllib3's (see above)."""
    return _count_sockets(port, peer=True, skip=urllib3_fds())


def settled(port: int, before: tuple[int, int]) -> tuple[int, int]:
    """The gateway's thread and socket counts once connections wound down (bounded wait)."""
    deadline = time.monotonic() + SETTLE_SECONDS
    while True:
        gc.collect()
        now = threading.active_count(), sockets_on(port)
        if (now[0] <= before[0] and now[1] <= before[1]) or time.monotonic() > deadline:
            return now
        time.sleep(0.1)


def make_engine(cmg, folder, client_id, cmg_time):
    return build_engine(connection_for(cmg, client_id), folder, retry=cmg_time.policy())


def test_fifty_clients_locate_and_download_at_once(cmg, cloud_dp, tmp_path, cmg_time, capsys):
    cloud_dp.distribute(PACKAGE, 1, FILES)
    sequence = TaskSequence(PACKAGE, "Load", (Step("Install", "run_command_line", PACKAGE),))
    gc.collect()
    # The listener, and any connection an earlier test left open (it may close meanwhile).
    before = threading.active_count(), sockets_on(cmg.port)
    assert before[1] >= 1
    storage_port = urlsplit(cloud_dp.endpoint.url).port or 80

    engines = [
        make_engine(cmg, tmp_path / f"c{n}", f"GUID:load-{n:02d}", cmg_time) for n in range(CLIENTS)
    ]
    round_trips: list[float] = []
    results: dict[int, object] = {}
    lock = threading.Lock()
    start = threading.Barrier(CLIENTS, timeout=60)

    def run(n: int) -> None:
        engine = engines[n]
        locate = engine.client.locate

        def timed(*args: object) -> object:
            began = time.perf_counter()
            try:
                return locate(*args)  # type: ignore[arg-type]
            finally:
                with lock:
                    round_trips.append(time.perf_counter() - began)

        engine.client.locate = timed  # type: ignore[method-assign]
        start.wait()
        try:
            results[n] = engine.run(sequence)
        except BaseException as exc:  # reported below, never lost in a thread
            results[n] = exc

    began = time.perf_counter()
    workers = [threading.Thread(target=run, args=(n,), name=f"load-{n}") for n in range(CLIENTS)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    wall = time.perf_counter() - began
    assert not any(w.is_alive() for w in workers), "a client thread is still running"
    for engine in engines:
        engine.close()
    engines.clear()
    # Client side (reliability.md 42, "no fd leak"): closed engines hold no connection to the
    # gateway or to storage; their download cores' kept-alive sockets were closed with them.
    gc.collect()
    left = {"gateway": client_sockets_to(cmg.port), "storage": client_sockets_to(storage_port)}
    assert left == {"gateway": 0, "storage": 0}, "closed engines kept connections open"

    failed = {n: r for n, r in results.items() if not getattr(r, "succeeded", False)}
    assert len(results) == CLIENTS
    assert failed == {}
    assert all(r.bytes_from_storage(PACKAGE) == SIZE for r in results.values())  # type: ignore[attr-defined]
    for n in range(CLIENTS):
        folder = tmp_path / f"c{n}" / "Windows" / "ccmcache" / f"{PACKAGE}.1"
        for relpath, data in FILES.items():
            assert (folder / relpath).read_bytes() == data

    locations = cmg.log.matching("location")
    assert [e.status for e in locations] == [200] * CLIENTS
    assert cmg.log.count("manifest", status=200) == CLIENTS
    assert len({e.client_id for e in locations}) == CLIENTS
    gateway_p99 = p99([e.elapsed for e in locations])
    client_p99 = p99(round_trips)

    after = settled(cmg.port, before)
    with capsys.disabled():
        print(
            f"\nload: {CLIENTS} clients in {wall:.2f} s; location p99 gateway "
            f"{gateway_p99 * 1000:.1f} ms, round trip {client_p99 * 1000:.1f} ms; threads "
            f"{before[0]}->{after[0]}, gateway sockets {before[1]}->{after[1]}"
        )
    assert after[0] <= before[0], "the gateway kept handler threads"
    assert after[1] <= before[1], "the gateway kept connections open"
    assert gateway_p99 < GATEWAY_P99_BUDGET
    assert client_p99 < CLIENT_P99_BUDGET
    cmg.check()


@pytest.mark.parametrize("samples", [[0.1] * 99 + [5.0], [float(n) for n in range(1, 201)]])
def test_p99_is_the_99th_percentile(samples):
    expected = 0.1 if len(samples) == 100 else 198.0
    assert p99(samples) == expected
