"""The download core's resume, retry and integrity rules, through the storage fault proxy.

reliability.md tests 9, 14-19 and 21, on virtual time (``cmg_time``): waits are recorded, never
slept.
"""

from __future__ import annotations

import random

import pytest

from pytest_cmg import Step, TaskSequence
from pytest_cmg._client.retry import RetryPolicy, is_transient_status, parse_retry_after
from pytest_cmg._protocol import codes
from pytest_cmg.faults import ignore_range, reset_after, respond

SIZE = 4 * 1024 * 1024
DATA = random.Random(9).randbytes(SIZE)
# The task sequence's own retries (SMSTSDownloadRetryCount) are off here, so each test sees the
# download core alone; the last tests switch them back on.
ONE_FILE = TaskSequence(
    "PS100020",
    "IPU",
    (Step("Upgrade", "upgrade_os", "PS100012"),),
    variables={"SMSTSDownloadRetryCount": "0"},
)


@pytest.fixture
def big_package(cloud_dp):
    return cloud_dp.distribute("PS100012", 1, {"sources/install.wim": DATA})


def run(cmg_client):
    engine = cmg_client()
    return engine, engine.run(ONE_FILE)


def assert_verified(engine):
    [entry] = engine.cache.entries()
    assert (entry.path / "sources/install.wim").read_bytes() == DATA
    assert engine.cache.staging_leftovers() == []


def requests_for(proxy):
    proxy.wait_idle(10)
    return [e for e in proxy.log if e.path.endswith("install.wim")]


def test_a_reset_resumes_from_the_last_byte_received(cmg, cmg_client, cmg_time, big_package, storage_faults):
    # reliability.md 9: the second request asks for exactly what is missing, nothing is
    # fetched twice, and the hash covers the whole file across both responses.
    storage_faults.add(reset_after(2_500_000), request=1)
    engine, result = run(cmg_client)
    assert result.succeeded, result.error
    assert_verified(engine)
    first, second = requests_for(storage_faults)
    assert first.outcome == "reset" and first.range is None
    resumed_at = int(second.range.removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= 2_500_000
    assert second.status == 206
    assert len(cmg_time.waits) == 1
    assert any("retry 1" in m and f"from byte {resumed_at}" in m for m in engine.log.messages)


def test_transient_statuses_are_retried_honouring_retry_after(cmg, cmg_client, cmg_time, big_package, storage_faults):
    # reliability.md 15 and 17.
    storage_faults.add(respond(503, headers={"Retry-After": "7", "x-ms-error-code": "ServerBusy"}), request=1)
    storage_faults.add(respond(500), request=2)
    storage_faults.add(respond(408), request=3)
    engine, result = run(cmg_client)
    assert result.succeeded, result.error
    assert_verified(engine)
    assert cmg_time.waits[0] == 7.0
    assert len(cmg_time.waits) == 3
    assert [e.status for e in requests_for(storage_faults)] == [503, 500, 408, 200]


@pytest.mark.parametrize("status", [400, 404, 405, 501, 505])
def test_fatal_statuses_are_not_retried(cmg, cmg_client, cmg_time, big_package, storage_faults, status):
    # reliability.md 16: exactly one attempt, a clear error, nothing cached.
    storage_faults.add(respond(status), request=1)
    engine, result = run(cmg_client)
    assert result.exit_code == codes.BAD_HTTP_STATUS
    assert f"answered {status}" in str(result.error)
    assert len(requests_for(storage_faults)) == 1
    assert cmg_time.waits == []
    assert engine.cache.entries() == []


def test_the_retry_budget_ends_a_storm(cmg, cmg_client, cmg_time, big_package, storage_faults):
    # reliability.md 18: bounded attempts, then a clean failure with nothing cached.
    storage_faults.add(respond(503), times=50)
    engine, result = run(cmg_client)
    assert result.exit_code == codes.CONNECTION_ABORTED
    assert "gave up after 6 failed tries" in str(result.error)
    assert len(requests_for(storage_faults)) == 6
    assert len(cmg_time.waits) == 5
    assert engine.cache.entries() == []
    assert engine.cache.staging_leftovers() == []


def test_a_200_to_a_resume_is_never_appended(cmg, cmg_client, cmg_time, big_package, storage_faults):
    # reliability.md 7 and 14: the server "loses" range support after a reset; the core starts
    # the file again instead of appending a second copy of its first bytes.
    storage_faults.add(reset_after(2_500_000), request=1)
    storage_faults.add(ignore_range(), request=2)
    engine, result = run(cmg_client)
    assert result.succeeded, result.error
    assert_verified(engine)
    statuses = [e.status for e in requests_for(storage_faults)]
    assert statuses[:2] == [200, 200]
    assert any("restarting from 0" in m and "range ignored" in m for m in engine.log.messages)


def test_a_changed_blob_restarts_the_file_never_splices(cmg, cmg_client, cmg_time, big_package, storage_faults):
    # reliability.md 6: If-Match on the resume; 412 means another version, so start again.
    storage_faults.add(reset_after(2_500_000), request=1)
    storage_faults.add(respond(412, headers={"x-ms-error-code": "ConditionNotMet"}), request=2)
    engine, result = run(cmg_client)
    assert result.succeeded, result.error
    assert_verified(engine)
    assert any("restarting from 0" in m and "412" in m for m in engine.log.messages)
    assert requests_for(storage_faults)[2].range is None  # the restart asks for the whole file


def test_an_expired_sas_is_renewed_through_the_gateway_once(cmg, cmg_client, cmg_time, big_package, storage_faults):
    # reliability.md 21: 403 from storage mid-download -> one new manifest from the CMG, then
    # the download resumes from its offset.
    storage_faults.add(reset_after(2_500_000), request=1)
    storage_faults.add(
        respond(403, headers={"x-ms-error-code": "AuthenticationFailed"}), request=2
    )
    engine, result = run(cmg_client)
    assert result.succeeded, result.error
    assert_verified(engine)
    cmg.log.assert_request_made("manifest", count=2, package_id="PS100012")
    third = requests_for(storage_faults)[2]
    assert third.range is not None and third.status == 206
    assert any("SAS refused (AuthenticationFailed), renewing" in m for m in engine.log.messages)
    assert all("sig=" not in m for m in engine.log.messages)


def test_a_sas_refused_again_after_renewal_is_final(cmg, cmg_client, cmg_time, big_package, storage_faults):
    storage_faults.add(respond(403, headers={"x-ms-error-code": "AuthenticationFailed"}), times=5)
    engine, result = run(cmg_client)
    assert result.exit_code == codes.BAD_HTTP_STATUS
    assert len(requests_for(storage_faults)) == 2
    assert engine.cache.entries() == []


def test_backoff_grows_with_bounded_jitter_and_caps():
    # reliability.md 19: pure function of the policy, no network.
    policy = RetryPolicy(base_delay=1.0, max_delay=10.0, jitter=0.25, rng=random.Random(3))
    for failures in range(1, 9):
        base = min(2.0 ** (failures - 1), 10.0)
        for _ in range(50):
            wait = policy.backoff(failures)
            assert base * 0.75 <= wait <= base * 1.25
    assert policy.backoff(1, retry_after=7.0) == 7.0
    assert policy.backoff(1, retry_after=3600.0) == policy.max_retry_after


def test_status_classification_follows_bits_and_the_sdk():
    assert all(is_transient_status(s) for s in (408, 429, 500, 502, 503, 504))
    assert not any(is_transient_status(s) for s in (400, 401, 403, 404, 409, 412, 416, 501, 505))


def test_retry_after_accepts_seconds_and_http_dates():
    assert parse_retry_after("12") == 12.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


def test_the_task_sequence_retries_a_failed_download_as_smstsdownloadretrycount_says(
    cmg, cmg_client, cmg_time, big_package, storage_faults
):
    # The core gives up after 6 tries; the task sequence then waits SMSTSDownloadRetryDelay
    # (15 s by default, on virtual time) and tries the package again, up to 2 times.
    storage_faults.add(respond(503), times=6)
    engine = cmg_client()
    result = engine.run(TaskSequence("PS100020", "IPU", ONE_FILE.steps))
    assert result.succeeded, result.error
    assert_verified(engine)
    assert 15.0 in cmg_time.waits
    assert any("retry 1 of 2 in 15 seconds" in m for m in engine.log.messages)


def test_no_task_sequence_retry_when_the_retry_count_is_zero(cmg, cmg_client, cmg_time, big_package, storage_faults):
    storage_faults.add(respond(503), times=6)
    engine = cmg_client()
    sequence = TaskSequence(
        "PS100020", "IPU", ONE_FILE.steps, variables={"SMSTSDownloadRetryCount": "0"}
    )
    result = engine.run(sequence)
    assert result.exit_code == codes.CONNECTION_ABORTED
    assert 15.0 not in cmg_time.waits


def test_download_all_before_start_retries_too(cmg, cmg_client, cmg_time, big_package, storage_faults):
    from pytest_cmg import DeploymentSettings, DownloadMode

    storage_faults.add(respond(503), times=6)
    engine = cmg_client(deployment=DeploymentSettings(download_mode=DownloadMode.ALL_BEFORE_START))
    result = engine.run(TaskSequence("PS100020", "IPU", ONE_FILE.steps))
    assert result.succeeded, result.error
    assert 15.0 in cmg_time.waits
