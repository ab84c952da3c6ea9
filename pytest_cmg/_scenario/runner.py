"""Running a scenario: build its world on the harness, run the client, check the expectations."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .._client.cache import ClientCache
from .._client.engine import CMGClient, CMGConnection, TaskSequenceEngine, TaskSequenceResult
from .._client.log import SmstsLog
from .._client.retry import VirtualTime
from .._errors import ExpectationFailed
from .._protocol.paths import Endpoint
from .content import generate_package

if TYPE_CHECKING:
    from pathlib import Path

    from .._gateway.requestlog import LoggedRequest
    from .._gateway.server import FakeCMG
    from .._harness import Harness
    from .._protocol.manifest import ContentManifest
    from .._storage.clouddp import CloudDP
    from .model import Scenario

__all__ = ["CLIENT_ID", "ScenarioRun", "World", "build_world", "check_expectations", "run_scenario"]

#: The SMSID of the client a scenario runs (stable, so logs compare across runs).
CLIENT_ID = "GUID:5C1E7A2B-0D1A-4E0F-9C3B-6A8D2E4F1B07"


@dataclass
class ScenarioRun:
    """Everything a scenario's expectations are checked against."""

    result: TaskSequenceResult
    smsts: list[str]
    gateway_log: list[str]
    requests: list[LoggedRequest]
    cache: ClientCache
    manifests: dict[str, ContentManifest]
    blob_endpoint: str
    cmg_url: str
    workdir: Path


@dataclass
class World:
    """A scenario's world on a running harness: its cloud DP, gateway and distributed content."""

    dp: CloudDP
    gateway: FakeCMG
    manifests: dict[str, ContentManifest]

    def connection(self, client_id: str, auth: str) -> CMGConnection:
        """How a client with ``client_id`` reaches the gateway (token or client certificate)."""
        gateway = self.gateway
        certificate = gateway.issue_client_certificate(client_id) if auth == "certificate" else None
        return CMGConnection(
            cmg_url=gateway.url,
            ca_cert=gateway.ca_pem,
            site_code=gateway.site_code,
            mp_role_id=gateway.role_id,
            client_id=client_id,
            token=gateway.issue_token(client_id) if certificate is None else None,
            client_cert=certificate.cert if certificate else None,
            client_key=certificate.key if certificate else None,
        )


def build_world(scenario: Scenario, harness: Harness) -> World:
    """Distribute the scenario's packages into a fresh container and set the gateway up for it.

    The caller owns the world: ``world.dp.delete()`` removes its content.
    """
    dp = harness.new_cloud_dp()
    gateway = harness.gateway
    gateway.clear()
    try:
        manifests = {}
        for package in scenario.packages:
            if package.on_cloud_dp:
                files = generate_package(package, scenario.seed)
                manifests[package.id] = dp.distribute(package.id, package.version, files)
    except BaseException:
        dp.delete()
        raise
    gateway.site_code = scenario.site_code
    gateway.configure(settings=scenario.cmg, cloud_dp=dp, deployment=scenario.deployment)
    return World(dp, gateway, manifests)


def run_scenario(scenario: Scenario, harness: Harness, workdir: Path) -> ScenarioRun:
    """Build the scenario's world and run its task sequence on a client engine."""
    world = build_world(scenario, harness)
    gateway = world.gateway
    try:
        log = SmstsLog(workdir / "smsts.log")
        cache = ClientCache(workdir / "ccmcache", size_mb=max(1, scenario.cache_size // 2**20))
        engine = TaskSequenceEngine(
            CMGClient(world.connection(CLIENT_ID, scenario.auth), log, scenario.client),
            cache,
            log,
            scenario.deployment,
            # Scenarios run on virtual time: retry waits are recorded, never slept.
            retry=VirtualTime().policy(),
            site_version=scenario.cmg.site_version,
        )
        try:
            result = engine.run(scenario.task_sequence, scenario.launch)
        finally:
            engine.close()
        gateway.check()
        return ScenarioRun(
            result=result,
            smsts=log.messages,
            gateway_log=gateway.service_lines,
            requests=gateway.log.entries,
            cache=cache,
            manifests=world.manifests,
            blob_endpoint=world.dp.endpoint.url,
            cmg_url=gateway.url,
            workdir=workdir,
        )
    finally:
        world.dp.delete()


def _verified_entries(run: ScenarioRun) -> tuple[list[str], list[str]]:
    """Cache entries, and any whose bytes do not match the manifest they were distributed with."""
    keys, bad = [], []
    for entry in run.cache.entries():
        keys.append(entry.key)
        manifest = run.manifests.get(entry.package_id)
        if manifest is None or manifest.version != entry.version:
            bad.append(f"{entry.key}: no distributed manifest matches this entry")
            continue
        for item in manifest.files:
            path = entry.path / item.relpath
            if not path.is_file():
                bad.append(f"{entry.key}: {item.relpath} is missing")
                continue
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            if digest != item.sha256:
                bad.append(
                    f"{entry.key}: {item.relpath} has SHA-256 {digest}, manifest {item.sha256}"
                )
    return keys, bad


def _excerpt(title: str, lines: list[str], limit: int = 12) -> str:
    if not lines:
        return f"{title}: (empty)"
    shown = lines[-limit:]
    more = f" (last {limit} of {len(lines)})" if len(lines) > limit else ""
    return f"{title}{more}:\n" + "\n".join(f"    {line}" for line in shown)


def check_expectations(scenario: Scenario, run: ScenarioRun) -> list[ExpectationFailed]:
    """Every expectation that does not hold, each pointing at its line in the scenario file."""
    expect = scenario.expect
    failures: list[ExpectationFailed] = []
    result = run.result

    def fail(where: str, expected: str, actual: str, *context: str) -> None:
        detail = f"  expected: {expected}\n  actual:   {actual}"
        if context:
            detail += "\n" + "\n".join(context)
        failures.append(ExpectationFailed(scenario.path, scenario.line(where), where, detail))

    smsts = _excerpt("  smsts.log", run.smsts)
    requests = _excerpt("  gateway requests", [r.summary() for r in run.requests])

    outcome = "success" if result.succeeded else "failure"
    if outcome != expect["outcome"]:
        why = f"failure 0x{result.exit_code:08X}"
        if result.failed_step:
            why += f" at step {result.failed_step!r}"
        if result.error:
            why += f": {result.error}"
        fail(
            "expect.outcome",
            expect["outcome"],
            why if outcome == "failure" else outcome,
            smsts,
            requests,
        )
    if expect["exit_code"] is not None and int(expect["exit_code"], 16) != result.exit_code:
        fail("expect.exit_code", expect["exit_code"], f"0x{result.exit_code:08X}", smsts)

    keys, bad = _verified_entries(run)
    if bad:
        fail("expect", "every cache entry matches its manifest", "; ".join(bad))
    if expect["cache"] is not None and sorted(expect["cache"]) != sorted(keys):
        fail(
            "expect.cache",
            ", ".join(sorted(expect["cache"])) or "(empty)",
            ", ".join(sorted(keys)) or "(empty)",
            smsts,
        )
    leftovers = run.cache.staging_leftovers()
    if leftovers:
        fail(
            "expect",
            "no unverified download left in the cache",
            ", ".join(p.name for p in leftovers),
        )

    if expect["downloaded"] is not None:
        read = sorted({t.package_id for t in result.transfers if t.bytes > 0})
        if sorted(expect["downloaded"]) != read:
            fail(
                "expect.downloaded",
                ", ".join(sorted(expect["downloaded"])) or "(none)",
                ", ".join(read) or "(none)",
                requests,
            )

    for endpoint in (Endpoint.LOCATION, Endpoint.MANIFEST):
        wanted = (expect["requests"] or {}).get(endpoint)
        if wanted is None:
            continue
        got = sum(1 for r in run.requests if r.endpoint == endpoint)
        if got != wanted:
            fail(
                f"expect.requests.{endpoint}", f"{wanted} {endpoint} request(s)", str(got), requests
            )

    for key, lines, title in (
        ("log", run.smsts, "smsts.log"),
        ("gateway_log", run.gateway_log, "gateway log"),
    ):
        for index, pattern in enumerate(expect[key] or []):
            if not any(re.search(pattern, line) for line in lines):
                fail(
                    f"expect.{key}[{index}]",
                    f"a {title} line matching /{pattern}/",
                    "no such line",
                    _excerpt(f"  {title}", lines),
                )
    return failures
