"""reliability.md tests 4, 5 and 20: storage's own checksums are not the trust anchor, and a
storage endpoint that refuses connections at first is a transient failure.

Each test builds a :class:`DownloadCore` directly on real Azurite, so what is checked is the core
alone, with waits recorded rather than slept.
"""

from __future__ import annotations

import base64
import hashlib
import random
import socket
import threading
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from azure.storage.blob import ContentSettings

from pytest_cmg._client.download import DownloadCore
from pytest_cmg._client.retry import RetryPolicy
from pytest_cmg._protocol.manifest import ContentManifest, ManifestFile

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from pytest_cmg._storage.clouddp import CloudDP

DATA = random.Random(45).randbytes(3 * 1024 * 1024 + 17)
SHA = hashlib.sha256(DATA).hexdigest()


def manifest_for(dp: CloudDP, relpath: str, rewrite: Callable[[str], str] = str) -> ContentManifest:
    now = datetime.now(UTC)
    url = dp.signed_url(
        "PS100012", 1, relpath, start=now - timedelta(minutes=15), expiry=now + timedelta(hours=1)
    )
    item = ManifestFile(relpath=relpath, size=len(DATA), sha256=SHA, url=rewrite(url))
    return ContentManifest(package_id="PS100012", version=1, files=(item,))


def upload(dp: CloudDP, relpath: str, **kwargs: object) -> None:
    blob = dp._container.get_blob_client(dp.blob_name("PS100012", 1, relpath))
    blob.upload_blob(DATA, overwrite=True, **kwargs)


def test_a_stale_storage_md5_does_not_fail_a_download_the_manifest_verifies(
    cloud_dp: CloudDP, tmp_path: Path
) -> None:
    # reliability.md 4: Content-MD5 on the blob is wrong (stale); the manifest's SHA-256 is the
    # trust anchor, so the download succeeds (azcopy's FailIfDifferent would not: a deliberate
    # difference, documented in docs/emulation.md).
    wrong_md5 = hashlib.md5(b"another version").digest()
    upload(cloud_dp, "stale.bin")
    blob = cloud_dp._container.get_blob_client(cloud_dp.blob_name("PS100012", 1, "stale.bin"))
    # Set after the upload: storage checks an MD5 sent with the bytes, not a property set later.
    blob.set_http_headers(content_settings=ContentSettings(content_md5=wrong_md5))
    props = blob.get_blob_properties()
    assert bytes(props.content_settings.content_md5) == wrong_md5  # the fault is really there
    core = DownloadCore(retry=RetryPolicy(sleep=lambda s: None))
    try:
        stats = core.download(manifest_for(cloud_dp, "stale.bin"), tmp_path)
    finally:
        core.close()
    assert stats.files == 1 and stats.retries == 0
    assert (tmp_path / "stale.bin").read_bytes() == DATA


def test_a_blob_without_md5_downloads_and_verifies(cloud_dp: CloudDP, tmp_path: Path) -> None:
    # reliability.md 5: a block-list upload carries no Content-MD5; nothing depends on it.
    relpath = "blocks.bin"
    blob = cloud_dp._container.get_blob_client(cloud_dp.blob_name("PS100012", 1, relpath))
    block_ids = []
    for index, start in enumerate(range(0, len(DATA), 1024 * 1024)):
        block_id = base64.b64encode(f"{index:08d}".encode()).decode()
        blob.stage_block(block_id, DATA[start : start + 1024 * 1024])
        block_ids.append(block_id)
    blob.commit_block_list(block_ids)
    assert not blob.get_blob_properties().content_settings.content_md5
    core = DownloadCore(retry=RetryPolicy(sleep=lambda s: None))
    try:
        core.download(manifest_for(cloud_dp, relpath), tmp_path)
    finally:
        core.close()
    assert hashlib.sha256((tmp_path / relpath).read_bytes()).hexdigest() == SHA


class _LateForwarder:
    """A loopback port that refuses connections until :meth:`open`, then relays to storage.

    The socket is bound at once (so the port is ours) but only listens once opened: until then
    the kernel answers a connect with RST, which is what a storage front end that is down does.
    """

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._threads: list[threading.Thread] = []

    def open(self) -> None:
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        thread = threading.Thread(target=self._accept, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _accept(self) -> None:
        while self.sock.fileno() != -1:
            try:
                client, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            server = socket.create_connection(self.upstream, timeout=10)
            for src, dst in ((client, server), (server, client)):
                pump = threading.Thread(target=self._pump, args=(src, dst), daemon=True)
                pump.start()
                self._threads.append(pump)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(65536):
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()
        for thread in self._threads:
            thread.join(timeout=5)


def test_storage_refusing_connections_at_first_is_retried_until_it_is_up(
    cloud_dp: CloudDP, tmp_path: Path
) -> None:
    # reliability.md 20: connection refused is transient; the core backs off (virtual waits) and
    # succeeds once storage listens. It comes up during the second wait.
    upload(cloud_dp, "late.bin")
    forwarder = _LateForwarder(cloud_dp.endpoint.url)
    netloc = urlsplit(cloud_dp.endpoint.url).netloc
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 2:
            forwarder.open()

    core = DownloadCore(retry=RetryPolicy(sleep=sleep, attempts=5))
    try:
        manifest = manifest_for(
            cloud_dp, "late.bin", lambda url: url.replace(netloc, f"127.0.0.1:{forwarder.port}")
        )
        stats = core.download(manifest, tmp_path)
    finally:
        core.close()
        forwarder.close()
    assert len(waits) == 2, waits  # two refusals, then the transfer
    assert stats.retries == 2
    assert forwarder.accepted >= 1
    assert (tmp_path / "late.bin").read_bytes() == DATA
    assert not list(tmp_path.glob("*.part*"))
