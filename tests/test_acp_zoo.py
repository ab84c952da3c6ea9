"""The reference ACP (examples/acp/acp.py) and its zoo of broken ones, through real task sequences
(issue 11, item 3).

Each *situation* is a small story told against the real gateway and Azurite: a plain download,
a connection cut mid-file, a 503 with Retry-After, an expired SAS, a flipped byte, storage that
recovers on the last try or not at all, a second content version, a task sequence that asks for
an older version than the CMG serves, a location reply whose package hash the manifest does not
match. Each returns the *problems* it saw: the task sequence's outcome, who delivered the
package (the ACP, or the built-in download it fell back to), the ACP's exit codes, its output
(secrets), what it left in the destination when it exited, what it asked the gateway and storage
for, how long it waited, and whether a torn file ever stood under a package file's name.

The reference must show no problem anywhere. Each zoo member (tests/acp_zoo/zoo.py: the
reference with one realistic bug) must show one somewhere: it is then *killed*. Note that the
engine falls back to its built-in download when an ACP fails, which would hide many bugs; so
the situations check that the ACP itself delivered (the transfer's provider, and no manifest
asked for without the ACP's User-Agent) whenever it should have.

Every ACP is the task sequence's ``SMSTSDownloadProgram``, ``python tests/acp_zoo/observe.py
<record> <acp.py> [options]``: the observer runs ``<acp.py>`` as ``__main__`` with the product's
three arguments, and records its exit code, wall time and output and the destination as it left
it. A member meets the situations in order until one catches it, as mutation testers do (the
reference meets them all); ``PYTEST_CMG_ZOO_FULL=1`` runs every member through every situation
(about 2.5 minutes) to print the full matrix.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from pytest_cmg import CmgSettings, Step, TaskSequence
from pytest_cmg._protocol import codes
from pytest_cmg.faults import (
    FaultProxy,
    close_after,
    flip_byte,
    ignore_range,
    reset_after,
    respond,
    stall_after,
)

if TYPE_CHECKING:
    from collections.abc import Callable

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "examples" / "acp" / "acp.py"
OBSERVE = ROOT / "tests" / "acp_zoo" / "observe.py"
USER_AGENT = "pytest-cmg-example-acp/1"
#: 5 tries per request, with waits of 10 to 80 ms between them (a Retry-After is waited in full).
ACP_OPTIONS = ("--retries", "4", "--backoff", "0.01")
TRIES = 5


def _load_zoo():
    spec = importlib.util.spec_from_file_location("acp_zoo", ROOT / "tests" / "acp_zoo" / "zoo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


ZOO = _load_zoo()

WIM = bytes(range(256)) * 2048  # 512 KiB
UPGRADE = {"sources/install.wim": WIM, "setup.exe": b"MZ" * 100}
DRIVERS = {"net/e1000.inf": b"[Version]\r\n", "net/e1000.sys": b"SYS" * 50}


def app(version: int) -> dict[str, bytes]:
    return {
        "app.msi": f"MSI build {version};".encode() * 400,
        "docs/readme.txt": f"version {version}\n".encode(),
    }


def step(package_id: str) -> Step:
    return Step(f"Install {package_id}", "install_package", package_id)


# --- the world a member runs in -----------------------------------------------------------------


@dataclass
class Run:
    """One task sequence run with an ACP, and everything it left to look at."""

    program: str
    result: object
    records: list[dict]
    gateway: list
    storage: list
    torn: list[str]

    def provided(self, package_id: str) -> bool:
        return any(
            t.package_id == package_id and t.provider == self.program and not t.from_cache
            for t in self.result.transfers
        )

    def manifests(self, *, acp: bool) -> int:
        """Manifest requests by the ACP (its User-Agent), or by the built-in download."""
        return sum(1 for e in self.gateway if e.endpoint == "manifest" and _by_acp(e) == acp)

    def requests(self, package_id: str, relpath: str, version: int = 1) -> list:
        suffix = f"/{package_id}.{version}/{relpath}"
        return [r for r in self.storage if r.path.endswith(suffix)]

    def exits(self) -> list[int]:
        return [r["exit"] for r in self.records]


def _by_acp(entry) -> bool:
    return any(k.lower() == "user-agent" and v == USER_AGENT for k, v in entry.headers.items())


def _short(text: object, limit: int = 160) -> str:
    text = str(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class World:
    """The gateway, the cloud DP behind a fault proxy, and a way to run a member's ACP.

    The fault proxy is built here, not taken from ``storage_faults``, to give it a ``sleep``:
    a scripted stall (``stall_after``) calls :meth:`_on_stall`, which looks into the ACP's
    destination while the ACP waits mid-file, instead of sleeping.
    """

    def __init__(self, cmg, cloud_dp, cmg_client, folder: Path, programs: dict[str, Path]):
        #: member -> the ACP file (or, as a tuple, the file and the arguments that come first).
        self.cmg = cmg
        self.cloud_dp = cloud_dp
        self.cmg_client = cmg_client
        self.folder = folder
        self.programs = programs
        self.content: dict[tuple[str, int], dict[str, tuple[int, str]]] = {}
        self.manifests: dict[tuple[str, int], object] = {}
        self._watch: tuple[Path, dict[str, tuple[int, str]]] | None = None
        self._torn: list[str] = []
        cmg.configure(settings=CmgSettings(site_version=2203))
        self.proxy = FaultProxy(cloud_dp.endpoint.url, sleep=self._on_stall).start()
        cloud_dp.route_through(self.proxy.rewrite)

    def close(self) -> None:
        self.cloud_dp.route_through(None)
        self.proxy.stop()

    def distribute(self, package_id: str, version: int, files: dict[str, bytes]) -> None:
        if (package_id, version) in self.manifests:
            return
        self.manifests[package_id, version] = self.cloud_dp.distribute(package_id, version, files)
        self.content[package_id, version] = {
            relpath: (len(data), hashlib.sha256(data).hexdigest())
            for relpath, data in files.items()
        }

    def run(
        self,
        member: str,
        label: str,
        packages: dict[str, int],
        *,
        engine=None,
        cache: Path | None = None,
        gateway_faults: tuple[dict, ...] = (),
        storage_faults: tuple[tuple[object, dict], ...] = (),
        on_prem: tuple[tuple[str, int], ...] = (),
        watch: tuple[str, int] | None = None,
    ) -> Run:
        self.cmg.log.clear()
        self.cmg.faults.clear()
        self.proxy.clear()
        self.cmg.on_prem_dps = []
        for package_id, version in on_prem:
            self.cmg.add_on_prem_dp("dp01.contoso.test", self.manifests[package_id, version])
        for fault in gateway_faults:
            self.cmg.fail(**fault)
        for fault, where in storage_faults:
            self.proxy.add(fault, **where)
        record = self.folder / f"{label}-{member}.jsonl"
        record.unlink(missing_ok=True)
        acp = self.programs[member]
        argv = [
            sys.executable,
            str(OBSERVE),
            str(record),
            *map(str, acp if isinstance(acp, tuple) else (acp,)),
        ]
        argv += ACP_OPTIONS
        if cache is not None:
            argv += ["--cache", str(cache)]
        program = shlex.join(argv)
        if engine is None:
            engine = self.cmg_client(name=f"{label}-{member}")
        engine.download_program_timeout = 60.0
        sequence = TaskSequence(
            "PS100020",
            "Zoo",
            tuple(step(p) for p in packages),
            package_versions=dict(packages),
            variables={"SMSTSDownloadProgram": program, "SMSTSAllowTokenAuthURLForACP": "true"},
        )
        self._torn = []
        self._watch = (engine.cache.root, self.content[watch]) if watch else None
        try:
            result = engine.run(sequence)
        finally:
            self._watch = None
        self.proxy.wait_idle(10)
        lines = record.read_text(encoding="utf-8").splitlines() if record.exists() else []
        return Run(
            program=program,
            result=result,
            records=[json.loads(line) for line in lines],
            gateway=self.cmg.log.entries,
            storage=self.proxy.log,
            torn=list(self._torn),
        )

    def _on_stall(self, seconds: float) -> None:
        """A scripted stall mid-file: what stands under the package's file names right now?"""
        watch = self._watch
        if watch is None:
            return
        root, expected = watch
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            seen: dict[str, int] = {}
            for folder in root.glob(".staging/.acp-*"):
                for path in folder.rglob("*"):
                    try:
                        if path.is_file():
                            seen[path.relative_to(folder).as_posix()] = path.stat().st_size
                    except OSError:
                        continue
            unfinished = {
                rel for rel, size in seen.items() if expected.get(rel, (None,))[0] != size
            }
            if unfinished:  # the ACP is writing the stalled file: under which name?
                self._torn += sorted(rel for rel in unfinished if rel in expected)
                return
            time.sleep(0.005)


# --- what every run must show -------------------------------------------------------------------


def invariants(world: World, run: Run) -> list[str]:
    """No secret in the ACP's output; no partial or foreign file left behind by a failure."""
    problems = []
    for record in run.records:
        package = record["package"]
        if record["leaked"]:
            problems.append(f"{package}: the ACP's output held {', '.join(record['leaked'])}")
        if record["exit"] != 0:
            wanted = world.content.get((package, int(record["version"])), {})
            stray = sorted(
                rel
                for rel, (size, sha) in record["destination"].items()
                if wanted.get(rel) != (size, sha)
            )
            if stray:
                problems.append(
                    f"{package}: the ACP exited {record['exit']} leaving {stray} in the destination "
                    "(partial or foreign files, which a fallback download would find)"
                )
    if run.torn:
        problems.append(f"a torn file stood under its final name mid-download: {run.torn}")
    return problems


def delivered(run: Run, *packages: str) -> list[str]:
    """The task sequence succeeded and the ACP itself delivered every package (no fallback)."""
    problems = []
    if not run.result.succeeded:
        problems.append(
            f"the task sequence failed with 0x{run.result.exit_code:08X}: {_short(run.result.error)}"
        )
    for package_id in packages:
        if not run.provided(package_id):
            problems.append(f"{package_id} was not delivered by the ACP")
    if run.manifests(acp=False):
        problems.append(
            f"the built-in download fetched {run.manifests(acp=False)} manifest(s): a fallback"
        )
    if any(run.exits()):
        problems.append(f"the ACP exited {run.exits()}")
    return problems


def expect(problems: list[str], ok: bool, message: str) -> None:
    if not ok:
        problems.append(message)


def request_counts(run: Run, package_id: str, files: dict[str, bytes], version: int = 1) -> str:
    return ", ".join(f"{rel}: {len(run.requests(package_id, rel, version))}" for rel in files)


# --- the situations -----------------------------------------------------------------------------

WIM_PATH = "PS100001.1/sources/install.wim"
SETUP_PATH = "PS100001.1/setup.exe"


def plain(world: World, member: str) -> list[str]:
    """Two packages, no fault; an intranet DP is listed before the CMG for the first."""
    world.distribute("PS100001", 1, UPGRADE)
    world.distribute("PS100002", 1, DRIVERS)
    run = world.run(member, "plain", {"PS100001": 1, "PS100002": 1}, on_prem=(("PS100001", 1),))
    problems = delivered(run, "PS100001", "PS100002") + invariants(world, run)
    expect(
        problems,
        run.manifests(acp=True) == 2,
        f"the ACP asked for {run.manifests(acp=True)} manifests, not 2",
    )
    once = all(
        [r.range for r in run.requests(p, rel)] == [None]
        for p, files in (("PS100001", UPGRADE), ("PS100002", DRIVERS))
        for rel in files
    )
    expect(
        problems,
        once,
        "a file was not fetched in exactly one whole request: "
        + request_counts(run, "PS100001", UPGRADE)
        + ", "
        + request_counts(run, "PS100002", DRIVERS),
    )
    return problems


def cut_mid_file(world: World, member: str) -> list[str]:
    """install.wim's connection is reset after 200,000 bytes (and stalls at 64 KiB, when the
    destination is looked at); setup.exe's closes cleanly after 100 bytes, then storage answers
    the resume with a 200 and the whole file."""
    world.distribute("PS100001", 1, UPGRADE)
    run = world.run(
        member,
        "cut",
        {"PS100001": 1},
        storage_faults=(
            (stall_after(65_536, 1.0), {"request": 1, "path": WIM_PATH}),
            (reset_after(200_000), {"request": 1, "path": WIM_PATH}),
            (close_after(100), {"request": 1, "path": SETUP_PATH}),
            (ignore_range(), {"request": 2, "path": SETUP_PATH}),
        ),
        watch=("PS100001", 1),
    )
    problems = delivered(run, "PS100001") + invariants(world, run)
    wim = run.requests("PS100001", "sources/install.wim")
    resumed = (
        len(wim) == 2
        and wim[0].range is None
        and wim[1].status == 206
        and 0 < int((wim[1].range or "bytes=0-").removeprefix("bytes=").rstrip("-")) <= 200_000
    )
    expect(
        problems,
        resumed,
        "install.wim was not resumed in one ranged request after the reset: "
        f"{[(r.range, r.status) for r in wim]}",
    )
    setup = run.requests("PS100001", "setup.exe")
    expect(
        problems,
        [(r.range, r.status) for r in setup] == [(None, 200), ("bytes=100-", 200)],
        "setup.exe: not resumed from byte 100 with the 200 answer taken as the whole file: "
        f"{[(r.range, r.status) for r in setup]}",
    )
    return problems


def retry_after(world: World, member: str) -> list[str]:
    """Storage answers install.wim's first request 503 with Retry-After: 1."""
    world.distribute("PS100001", 1, UPGRADE)
    busy = respond(503, headers={"Retry-After": "1"})
    run = world.run(
        member,
        "retry-after",
        {"PS100001": 1},
        storage_faults=((busy, {"request": 1, "path": WIM_PATH}),),
    )
    problems = delivered(run, "PS100001") + invariants(world, run)
    waited = [r["seconds"] for r in run.records]
    expect(
        problems,
        all(s >= 1.0 for s in waited),
        f"the ACP ran {waited} s: it did not wait the 1 s asked",
    )
    expect(
        problems,
        len(run.requests("PS100001", "sources/install.wim")) == 2,
        f"install.wim was asked for {len(run.requests('PS100001', 'sources/install.wim'))} times, not 2",
    )
    return problems


def expired_sas(world: World, member: str) -> list[str]:
    """The first manifest's SAS URLs expired a minute before they were issued."""
    world.distribute("PS100001", 1, UPGRADE)
    run = world.run(
        member,
        "expired-sas",
        {"PS100001": 1},
        gateway_faults=({"endpoint": "manifest", "request": 1, "sas_ttl": -60},),
    )
    problems = delivered(run, "PS100001") + invariants(world, run)
    expect(
        problems,
        run.manifests(acp=True) == 2,
        f"the ACP asked for {run.manifests(acp=True)} manifests, not 2 (one renewal)",
    )
    refused = [r for r in run.storage if r.status == 403]
    expect(problems, len(refused) == 1, f"storage refused {len(refused)} requests, not 1")
    return problems


def flipped_byte(world: World, member: str) -> list[str]:
    """Byte 10 of setup.exe arrives flipped the first time."""
    world.distribute("PS100001", 1, UPGRADE)
    run = world.run(
        member,
        "flipped",
        {"PS100001": 1},
        storage_faults=((flip_byte(10), {"request": 1, "path": SETUP_PATH}),),
    )
    problems = delivered(run, "PS100001") + invariants(world, run)
    setup = run.requests("PS100001", "setup.exe")
    expect(
        problems,
        [r.range for r in setup] == [None, None],
        f"setup.exe: {[r.range for r in setup]}, not fetched again whole after the bad byte",
    )
    return problems


def flaky(world: World, member: str) -> list[str]:
    """The CMG answers the first manifest request 503; install.wim is reset after 100,000
    bytes four times, so the fifth try (the last of --retries 4) completes it."""
    world.distribute("PS100001", 1, UPGRADE)
    run = world.run(
        member,
        "flaky",
        {"PS100001": 1},
        gateway_faults=({"endpoint": "manifest", "request": 1, "status": 503},),
        storage_faults=(
            (reset_after(100_000), {"request": 1, "times": TRIES - 1, "path": WIM_PATH}),
        ),
    )
    problems = delivered(run, "PS100001") + invariants(world, run)
    expect(
        problems,
        run.manifests(acp=True) == 2,
        f"the ACP asked for {run.manifests(acp=True)} manifests, not 2",
    )
    wim = run.requests("PS100001", "sources/install.wim")
    expect(problems, len(wim) == TRIES, f"install.wim was asked for {len(wim)} times, not {TRIES}")
    return problems


def gives_up(world: World, member: str) -> list[str]:
    """install.wim is reset after 100,000 bytes five times: the ACP gives up after its fifth
    try, and the task sequence's built-in download completes the package."""
    world.distribute("PS100001", 1, UPGRADE)
    run = world.run(
        member,
        "gives-up",
        {"PS100001": 1},
        storage_faults=((reset_after(100_000), {"request": 1, "times": TRIES, "path": WIM_PATH}),),
    )
    problems = invariants(world, run)
    expect(problems, run.result.succeeded, f"the task sequence failed: {_short(run.result.error)}")
    expect(problems, not run.provided("PS100001"), "the ACP delivered after more than its 5 tries")
    expect(problems, run.exits() != [0], f"the ACP exited {run.exits()}, not with a failure")
    return problems


def second_version(world: World, member: str) -> list[str]:
    """The client gets version 1 of a package through the ACP (with --cache), then version 2."""
    package_id = f"PS2{sorted(world.programs).index(member):05d}"
    world.distribute(package_id, 1, app(1))
    cache = world.folder / f"cache-{member}"
    first = world.run(member, "second-version-1", {package_id: 1}, cache=cache)
    problems = delivered(first, package_id) + invariants(world, first)
    world.distribute(package_id, 2, app(2))
    engine = world.cmg_client(name=f"second-version-{member}-again")
    second = world.run(member, "second-version-2", {package_id: 2}, cache=cache, engine=engine)
    problems += [
        f"version 2: {p}" for p in delivered(second, package_id) + invariants(world, second)
    ]
    return problems


def older_version(world: World, member: str) -> list[str]:
    """The task sequence asks for version 1; the CMG serves version 2 (the highest)."""
    world.distribute("PS100004", 1, app(1))
    world.distribute("PS100004", 2, app(2))
    run = world.run(member, "older-version", {"PS100004": 1})
    problems = invariants(world, run)
    expect(
        problems,
        run.result.exit_code == codes.HASH_MISMATCH,
        f"the task sequence ended 0x{run.result.exit_code:08X}, not with the built-in's 0x80091007",
    )
    expect(problems, run.exits() != [0], f"the ACP exited {run.exits()}")
    fetched = len(run.storage)
    expect(problems, fetched == 0, f"{fetched} storage request(s) for content of another version")
    return problems


def location_hash_differs(world: World, member: str) -> list[str]:
    """The location reply's package hash is not the content's; the manifest agrees with itself."""
    world.distribute("PS100002", 1, DRIVERS)
    run = world.run(
        member,
        "location-hash",
        {"PS100002": 1},
        gateway_faults=({"endpoint": "location", "request": 1, "package_hash": "wrong"},),
    )
    problems = invariants(world, run)
    expect(
        problems,
        run.result.exit_code == codes.HASH_MISMATCH,
        f"the task sequence ended 0x{run.result.exit_code:08X}, not 0x80091007",
    )
    expect(
        problems,
        run.exits() != [0] and run.exits(),
        f"the ACP exited {run.exits()}: it took content that does not match the INI's Hash",
    )
    fetched = len(run.storage)
    expect(
        problems,
        fetched == len(DRIVERS),
        f"{fetched} storage requests, not {len(DRIVERS)} (the fallback's only)",
    )
    return problems


#: In the order the zoo meets them: the cheap situations that catch the most bugs first.
SITUATIONS: dict[str, Callable[[World, str], list[str]]] = {
    "plain": plain,
    "cut-mid-file": cut_mid_file,
    "flipped-byte": flipped_byte,
    "expired-sas": expired_sas,
    "flaky": flaky,
    "gives-up": gives_up,
    "second-version": second_version,
    "older-version": older_version,
    "location-hash": location_hash_differs,
    "retry-after": retry_after,
}


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def programs(tmp_path_factory) -> dict[str, Path]:
    """The reference and each zoo member, as files to run with ``python``."""
    folder = tmp_path_factory.mktemp("acp-zoo")
    source = REFERENCE.read_text(encoding="utf-8")
    found = {"reference": REFERENCE}
    for member in ZOO.MEMBERS:
        path = folder / f"acp_{member.name.replace('-', '_')}.py"
        path.write_text(ZOO.mutate(source, member), encoding="utf-8")
        found[member.name] = path
    return found


@pytest.fixture
def world(cmg, cloud_dp, cmg_client, tmp_path, programs):
    if not cloud_dp.endpoint.url.startswith("http://"):
        pytest.skip("the zoo needs plain-HTTP storage (the fault proxy speaks HTTP only)")
    made = World(cmg, cloud_dp, cmg_client, tmp_path, programs)
    yield made
    made.close()


# --- the tests -----------------------------------------------------------------------------------


@pytest.mark.parametrize("situation", list(SITUATIONS))
def test_the_reference_acp(world, situation):
    assert SITUATIONS[situation](world, "reference") == []


def test_every_zoo_member_is_caught_and_the_reference_is_not(world, capsys):
    full = os.environ.get("PYTEST_CMG_ZOO_FULL") == "1"
    members = ["reference", *(m.name for m in ZOO.MEMBERS)]
    matrix: dict[str, dict[str, list[str]]] = {}
    started = time.monotonic()
    for member in members:
        row = matrix[member] = {}
        for name, play in SITUATIONS.items():
            if any(row.values()) and not full:
                break  # caught: the next member
            row[name] = play(world, member)
    seconds = time.monotonic() - started
    width = max(map(len, members))
    lines = [
        f"ACP zoo kill matrix: K caught, . not caught, - not run ({len(members) - 1} members, "
        f"{len(SITUATIONS)} situations, {seconds:.0f} s)",
        " " * width + "  " + " ".join(f"{i + 1:>2}" for i in range(len(SITUATIONS))),
    ]
    for member in members:
        row = matrix[member]
        marks = " ".join(" -" if s not in row else " K" if row[s] else " ." for s in SITUATIONS)
        lines.append(f"{member:<{width}}  {marks}")
    lines += [f"{i + 1:>2} {name}" for i, name in enumerate(SITUATIONS)]
    for member in members[1:]:
        caught = next(((s, p) for s, p in matrix[member].items() if p), None)
        if caught:
            lines.append(f"{member}: {caught[0]}: {_short(caught[1][0], 200)}")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    reference = {s: p for s, p in matrix["reference"].items() if p}
    assert reference == {}, f"the reference ACP shows problems: {reference}"
    survivors = [m for m in members[1:] if not any(matrix[m].values())]
    assert survivors == [], f"zoo members no situation catches: {survivors}"


def test_each_zoo_member_is_the_reference_with_its_one_bug(programs):
    reference = REFERENCE.read_text(encoding="utf-8")
    names = [m.name for m in ZOO.MEMBERS]
    assert len(names) == len(set(names)) >= 15
    for member in ZOO.MEMBERS:
        source = ZOO.mutate(reference, member)
        assert source != reference
        compile(source, member.name, "exec")
        assert programs[member.name].read_text(encoding="utf-8") == source


def test_the_reference_acp_imports_only_the_standard_library():
    tree = ast.parse(REFERENCE.read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported - set(sys.stdlib_module_names) == set()


def test_a_zoo_member_runs_as_an_acp_from_the_command_line(world):
    # What a conformance run would give --cmg-download-program: python tests/acp_zoo/zoo.py <member>
    zoo = ROOT / "tests" / "acp_zoo" / "zoo.py"
    done = subprocess.run(
        [sys.executable, str(zoo), "no-hash-check", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "--retries" in done.stdout
    world.programs = {**world.programs, "zoo-cli": (zoo, "no-hash-check")}
    assert plain(world, "zoo-cli") == []
    problems = flipped_byte(world, "zoo-cli")
    assert problems and "0x80091007" in problems[0]


@pytest.mark.parametrize("auth", ["token", "certificate", "azure_ad"])
def test_the_reference_acp_on_each_client_authentication(world, auth):
    world.distribute("PS100002", 1, DRIVERS)
    engine = world.cmg_client(name=f"auth-{auth}", auth=auth)
    run = world.run("reference", f"auth-{auth}", {"PS100002": 1}, engine=engine)
    assert delivered(run, "PS100002") + invariants(world, run) == []
