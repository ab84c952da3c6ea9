"""The client engine against real Azurite and the HTTPS fake CMG."""

from __future__ import annotations

import hashlib
import time

import pytest

from pytest_cmg import DeploymentSettings, DownloadMode, Step, TaskSequence
from pytest_cmg._protocol import codes

BIG = bytes(range(256)) * 4096  # 1 MiB
IPU = TaskSequence(
    "PS100020",
    "IPU",
    (
        Step("Upgrade", "upgrade_os", "PS100012"),
        Step("Drivers", "apply_driver_package", "PS100013"),
    ),
)


@pytest.fixture
def two_packages(cloud_dp):
    upgrade = cloud_dp.distribute("PS100012", 1, {"sources/install.wim": BIG, "setup.exe": b"MZ"})
    drivers = cloud_dp.distribute("PS100013", 1, {"net/e1000.inf": b"[Version]", "net/e1000.sys": b"S"})
    return upgrade, drivers


def no_secrets(engine):
    text = engine.log.path.read_text(encoding="utf-8")
    assert "sig=" not in text
    assert "Bearer" not in text


def test_on_demand_downloads_each_package_just_before_its_step(cmg, cmg_client, two_packages):
    engine = cmg_client()
    result = engine.run(IPU)
    assert result.succeeded, result.error
    assert [t.package_id for t in result.transfers] == ["PS100012", "PS100013"]
    assert result.bytes_from_storage("PS100012") == len(BIG) + 2
    messages = engine.log.messages
    # The drivers package is located only after the upgrade step completed.
    upgrade_done = messages.index(
        "TSManager: Successfully completed the action (Upgrade) with the exit win32 code 0"
    )
    drivers_located = messages.index("TSManager: Resolving local content for PS100013:1")
    assert upgrade_done < drivers_located
    for entry, manifest in zip(engine.cache.entries(), two_packages, strict=True):
        for item in manifest.files:
            data = (entry.path / item.relpath).read_bytes()
            assert hashlib.sha256(data).hexdigest() == item.sha256
    assert engine.variables["_SMSTSDownloadOnDemand"] == "true"
    no_secrets(engine)


def test_a_step_never_reached_never_fetches_its_package(cmg, cmg_client, cloud_dp, two_packages):
    sequence = TaskSequence(
        "PS100020", "IPU",
        (Step("Missing", "run_command_line", "PS1000FF"), *IPU.steps),
    )
    engine = cmg_client()
    result = engine.run(sequence)
    assert result.exit_code == codes.NO_LOCATIONS
    assert result.failed_step == "Missing"
    assert result.transfers == []
    cmg.log.assert_request_made("location", count=1, package_id="PS1000FF")
    assert cmg.log.count("manifest") == 0
    for line in ("TSManager: Processing 0 locations.", "TSManager: No static content server.",
                 "TSManager: Content location request for PS1000FF:1 failed, hr=0x80040102"):
        assert line in engine.log.messages


def test_download_all_before_start_fetches_everything_first(cmg, cmg_client, two_packages):
    engine = cmg_client(deployment=DeploymentSettings(download_mode=DownloadMode.ALL_BEFORE_START))
    result = engine.run(IPU)
    assert result.succeeded
    messages = engine.log.messages
    first_step = next(i for i, m in enumerate(messages) if "Start executing an instruction" in m)
    last_hash = max(i for i, m in enumerate(messages) if "Hash verification succeeded" in m)
    assert last_hash < first_step
    assert engine.variables["_SMSTSDownloadOnDemand"] == "false"


def test_cached_content_is_reused_without_network(cmg, cmg_client, two_packages):
    engine = cmg_client()
    assert engine.run(IPU).succeeded
    cmg.log.clear()
    again = engine.run(IPU)
    assert again.succeeded
    cmg.log.assert_no_requests()
    assert all(t.from_cache and t.bytes == 0 for t in again.transfers)


def test_blob_changed_after_distribution_is_a_hash_failure_and_leaves_nothing(
    cmg, cmg_client, cloud_dp, two_packages
):
    # Same size, different bytes: only the hash can tell.
    tampered = bytearray(BIG)
    tampered[700_000] ^= 0xFF
    cloud_dp._container.upload_blob(
        cloud_dp.blob_name("PS100012", 1, "sources/install.wim"), bytes(tampered), overwrite=True
    )
    engine = cmg_client()
    result = engine.run(IPU)
    assert result.exit_code == codes.HASH_MISMATCH
    assert engine.cache.entries() == []
    assert engine.cache.staging_leftovers() == []
    assert "TSManager: Hash could not be matched for the downloaded content" in engine.log.messages
    no_secrets(engine)


def test_truncated_blob_is_refused(cmg, cmg_client, cloud_dp, two_packages):
    cloud_dp._container.upload_blob(
        cloud_dp.blob_name("PS100012", 1, "sources/install.wim"), BIG[:-1], overwrite=True
    )
    engine = cmg_client()
    result = engine.run(IPU)
    assert result.exit_code == codes.HASH_MISMATCH
    assert "storage holds 1048575 bytes, manifest says 1048576" in str(result.error)
    assert engine.cache.entries() == []
    assert engine.cache.staging_leftovers() == []


def test_manifest_failure_is_0x87d0027e(cmg, cmg_client, two_packages):
    # Every attempt: the first and the task sequence's two retries (SMSTSDownloadRetryCount).
    cmg.fail("manifest", status=400, times=3)
    engine = cmg_client()
    result = engine.run(IPU)
    assert result.exit_code == codes.BAD_HTTP_STATUS
    assert "DataTransferService: Error retrieving manifest (0x87d0027e)." in engine.log.messages
    assert any("HTTP code 400, status 'Bad Request'" in m for m in engine.log.messages)
    assert engine.cache.entries() == []


def test_deployment_not_allowed_on_internet_fails_before_any_request(cmg, cmg_client, two_packages):
    engine = cmg_client(deployment=DeploymentSettings(allow_internet=False))
    result = engine.run(IPU)
    assert result.exit_code == 0x87D01018
    assert result.steps_run == []
    cmg.log.assert_no_requests()


def test_package_larger_than_the_cache_is_refused_before_transfer(
    cmg, cmg_client, cloud_dp
):
    cloud_dp.distribute("PS100012", 1, {"big.bin": BIG * 2})
    engine = cmg_client(cache_mb=1)
    result = engine.run(TaskSequence("PS100020", "IPU", (Step("Upgrade", "upgrade_os", "PS100012"),)))
    assert result.exit_code == codes.CACHE_TOO_SMALL
    assert result.transfers == []
    assert engine.cache.entries() == []


def test_a_byte_flipped_in_transit_is_a_hash_failure(cmg, cmg_client, two_packages, storage_faults):
    from pytest_cmg.faults import flip_byte

    storage_faults.add(flip_byte(123_456), times=2)
    engine = cmg_client()
    result = engine.run(IPU)
    assert result.exit_code == codes.HASH_MISMATCH
    assert engine.cache.entries() == []
    assert all("sig=" not in entry.path for entry in storage_faults.log)


def test_a_client_that_does_not_trust_the_cmg_never_sends_its_token(cmg, two_packages, tmp_path):
    # reliability.md 31: server certificate validation comes before any credential is sent.
    from pytest_cmg import CMGConnection
    from pytest_cmg._client.factory import build_engine
    from pytest_cmg._net.pki import CertificateAuthority

    stranger = CertificateAuthority("some other CA").write_pem(tmp_path / "other-ca.pem")
    connection = CMGConnection(
        cmg_url=cmg.url, ca_cert=stranger, site_code=cmg.site_code, mp_role_id=cmg.role_id,
        client_id="GUID:wary", token=cmg.issue_token("GUID:wary"),
    )
    engine = build_engine(connection, tmp_path)
    try:
        result = engine.run(IPU)
    finally:
        engine.close()
    assert result.exit_code == codes.NO_LOCATIONS
    assert "SSLError" in str(result.error)
    cmg.log.assert_no_requests()
    # The gateway logs the refused handshake from its connection thread: allow it a moment.
    deadline = time.monotonic() + 5
    while not any("TLS handshake" in line for line in cmg.service_lines):
        assert time.monotonic() < deadline, cmg.service_lines
        time.sleep(0.05)
