"""The built-in client (pytest_cmg/_client), each time with one realistic bug (issue 11).

A mutant is one named change to one file of the package: ``(old, new)`` source replacements,
each of which must occur exactly once in that file, so a refactor that a mutant no longer fits
fails loudly (``mutate``) instead of quietly testing the unchanged client.

A mutant runs as the whole package: ``build`` copies ``pytest_cmg/`` into a folder, applies
the change there, and ``run_scenarios`` runs ``python -m pytest <scenario paths>`` with that
folder first on ``PYTHONPATH`` (and ``python -P``, so the repository root that ``-m`` would put
first cannot win), from the repository root so that its conftest.py and scenarios resolve. The
pytest11 entry point ``pytest_cmg.plugin`` is then imported from the copy too. A probe plugin
(``-p``) records each item's outcome by node id and, at the end of the session, the file of
every ``pytest_cmg`` module imported; the run is refused unless each one is in the copy and the
mutated module is among them, so a mutant can never be "run" against the editable install by
accident (without ``-P`` it would be: the check was seen to catch that).

The scenario suite must kill each mutant: at least one scenario item fails (the same items
pass on the unchanged client). ``KILLERS`` records, per mutant, the fewest and fastest items
seen to kill it (``--matrix`` tells which); tests/test_builtin_mutants.py replays them.

From the command line (repository root)::

    python tests/builtin_mutants/mutants.py <mutant | none> [scenario paths or node ids]
    python tests/builtin_mutants/mutants.py --matrix [scenario paths]   # every mutant, all paths

Without paths a mutant meets its ``KILLERS``; ``--matrix`` defaults to ``scenarios/`` (without
the benchmarks, see ``MATRIX_OPTIONS``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "pytest_cmg"
#: The probe plugin's module name, and the environment variable naming the file it writes.
PROBE = "_builtin_mutant_probe"
_PROBE_OUT = "PYTEST_CMG_MUTANT_PROBE"
_PROBE_SOURCE = f'''"""Records where every pytest_cmg module came from, and each item's outcome by node id
(tests/builtin_mutants/mutants.py)."""
import os
import sys

_OUTCOMES = []


def pytest_runtest_logreport(report):
    # Every phase that failed (a setup error too), and each item's call or skip.
    if report.failed or report.skipped or report.when == "call":
        _OUTCOMES.append(f"{{report.outcome}}\\t{{report.nodeid}}")


def pytest_sessionfinish(session, exitstatus):
    # At the end: the plugin, the runner and the client are all imported by now.
    with open(os.environ["{_PROBE_OUT}"], "w", encoding="utf-8") as out:
        for name, module in sorted(sys.modules.items()):
            if name == "pytest_cmg" or name.startswith("pytest_cmg."):
                out.write(f"module\\t{{name}}\\t{{getattr(module, '__file__', None)}}\\n")
        for line in _OUTCOMES:
            out.write(line + "\\n")
'''


@dataclass(frozen=True)
class Mutant:
    name: str
    #: The bug, in one line; ``[...]`` quotes the issue 11 bug it stands for.
    bug: str
    #: The file it changes, relative to ``pytest_cmg/``.
    path: str
    changes: tuple[tuple[str, str], ...]

    @property
    def module(self) -> str:
        """The dotted name of the module it changes (the probe checks it was imported)."""
        return "pytest_cmg." + self.path.removesuffix(".py").replace("/", ".")


MUTANTS = (
    Mutant(
        "file-hash-not-compared",
        "[the hash is not compared] a downloaded file's size is checked, its SHA-256 never",
        "_client/_job.py",
        (
            (
                "if self.hashed != item.size or actual != item.sha256.lower():",
                "if self.hashed != item.size:",
            ),
        ),
    ),
    Mutant(
        "range-200-used",
        "[a 200 answer to a range request is used] any success status is taken as the answer "
        "to the range, so a 200's full body is written from the resume offset",
        "_client/_request.py",
        (
            (
                "if ranged and status == 200:",
                "if ranged and status not in (200, 206):",
            ),
        ),
    ),
    Mutant(
        "retry-after-ignored",
        "[Retry-After is ignored] a transient status's Retry-After is not read: the core's own "
        "backoff is used",
        "_client/_request.py",
        (
            (
                'raise Transient(reason, parse_retry_after(headers.get("retry-after")))',
                "raise Transient(reason)",
            ),
        ),
    ),
    Mutant(
        "sas-not-renewed",
        "[an expired SAS is not renewed] the download core gets no renewer: storage's 403 is "
        "final, no fresh manifest is fetched",
        "_client/_fetch.py",
        (
            (
                "stats = self.core.download(manifest, staged, renew=_Renewer(self.client, record))",
                "stats = self.core.download(manifest, staged, renew=None)",
            ),
        ),
    ),
    Mutant(
        "on-demand-fetches-up-front",
        "[on-demand mode fetches everything up front] the download mode is tested for truth, "
        "not compared, so every mode downloads all content before the first step",
        "_client/engine.py",
        (("if not on_demand:", "if self.deployment.download_mode:"),),
    ),
    Mutant(
        "download-all-honours-conditions",
        "[download-all mode honours step conditions] only the packages of steps whose "
        "conditions hold before the first step are downloaded up front",
        "_client/engine.py",
        (
            (
                "for package_id in dict.fromkeys(p for s in sequence.steps for p in s.packages):",
                "for package_id in dict.fromkeys(p for s in sequence.steps "
                "if all(c.holds(self.variables) for c in s.conditions) for p in s.packages):",
            ),
        ),
    ),
    Mutant(
        "cache-reuses-another-version",
        "[another content version's cache entry is reused] the cache lookup takes the newest "
        "cached version of the package, not the version asked for",
        "_client/engine.py",
        (
            (
                "lease = self.cache.acquire(package_id, version)",
                "lease = self.cache.acquire(package_id, max((e.version for e in "
                "self.cache.entries() if e.package_id == package_id), default=version))",
            ),
        ),
    ),
    Mutant(
        "sas-in-the-log",
        "[the SAS signature is written to the log] a storage request that failed with a status "
        "is logged with its full URL, SAS query and all",
        "_client/_request.py",
        (
            (
                'reason = f"GET {redact(url)} answered {status}"',
                'reason = f"GET {url} answered {status}"',
            ),
        ),
    ),
    Mutant(
        "launch-gate-wrong-context",
        "[the launch gate is checked against the wrong context] the gate is asked about "
        "Software Center, whatever the task sequence was started from",
        "_client/engine.py",
        (
            (
                "refusal = launch_refusal(self.site_version, launch, boot_image=sequence.boot_image)",
                "refusal = launch_refusal(self.site_version, LaunchContext.SOFTWARE_CENTER, "
                "boot_image=sequence.boot_image)",
            ),
        ),
    ),
    Mutant(
        "writes-final-name",
        "[bytes are written straight to the final name] a file downloads under its own name, "
        "not <name>.part",
        "_client/_job.py",
        (("self.part = self.target + PART", "self.part = self.target"),),
    ),
    Mutant(
        "retry-count-off-by-one",
        "[the retry count is off by one] SMSTSDownloadRetryCount=N makes N+1 retries",
        "_client/engine.py",
        (
            (
                "if attempt >= count or error.hresult in _NOT_RETRIED:",
                "if attempt > count or error.hresult in _NOT_RETRIED:",
            ),
        ),
    ),
    Mutant(
        "package-hash-from-manifest",
        "[the package hash is taken from the manifest] the computed package hash is compared "
        "with the manifest's own Hash attribute instead of the location reply's",
        "_client/_fetch.py",
        (
            (
                "if not self._hashes_match(reply, computed):",
                "if not self._hashes_match(replace(reply, package_hash=manifest.hash), computed):",
            ),
        ),
    ),
)

#: Mutant -> scenario files that kill it: one or two fast, single-item ones of those ``--matrix``
#: found (comments say why, where the choice is not plain); tests/test_builtin_mutants.py
#: asserts that at least one item of them fails with the mutant and none without it.
KILLERS: dict[str, tuple[str, ...]] = {
    # Not the flipped byte: the engine's package hash, computed from the digests of the bytes,
    # still fails that package. A wrong file hash in the manifest is what only this check sees.
    "file-hash-not-compared": ("scenarios/integrity/manifest-hash-wrong.cmg.yaml",),
    # integrity/range-ignored-restarts-from-zero kills it too but bounds the bytes served, which
    # depend on timing (it fails on the unchanged client under load): this file judges none.
    "range-200-used": ("scenarios/integrity/resume-answered-200-twice-is-never-spliced.cmg.yaml",),
    "retry-after-ignored": ("scenarios/retry/storage-429-retry-after-honoured.cmg.yaml",),
    # A refusal mid-download (after a 403), and a SAS already expired before its first use.
    "sas-not-renewed": (
        "scenarios/sas/sas-refused-by-storage-is-renewed-once.cmg.yaml",
        "scenarios/faults/expired-sas-renewed-once.cmg.yaml",
    ),
    "on-demand-fetches-up-front": (
        "scenarios/conditions/on-demand-skips-the-language-pack-it-does-not-need.cmg.yaml",
    ),
    "download-all-honours-conditions": (
        "scenarios/conditions/download-all-fetches-every-package-of-a-skipped-content-step.cmg.yaml",
    ),
    "cache-reuses-another-version": (
        "scenarios/cache/older-content-version-in-the-cache-is-not-reused.cmg.yaml",
    ),
    # Not sas/no-signature-in-any-log: its reset and its 403 log no URL. Every scenario with a
    # retried status checks absent_log sig=, and catches it.
    "sas-in-the-log": ("scenarios/retry/storage-5xx-each-retried.cmg.yaml",),
    "launch-gate-wrong-context": (
        "scenarios/launch/pxe-never.cmg.yaml",
        "scenarios/launch/boot-media-2006.cmg.yaml",
    ),
    # The only killer: a final name holding a partial file is re-checked and deleted on the
    # next try (its size is wrong), so the journal's resume is lost and the bytes are served
    # twice; a download that never fails leaves nothing to see.
    "writes-final-name": (
        "scenarios/resume/core-gives-up-and-the-task-sequence-retry-resumes.cmg.yaml",
    ),
    "retry-count-off-by-one": ("scenarios/retry/retry-count-zero-fails-at-once.cmg.yaml",),
    "package-hash-from-manifest": (
        "scenarios/integrity/location-package-hash-differs-from-a-consistent-manifest.cmg.yaml",
    ),
}


def mutant(name: str) -> Mutant:
    for each in MUTANTS:
        if each.name == name:
            return each
    msg = f"no mutant {name!r}; choose one of {', '.join(m.name for m in MUTANTS)}"
    raise KeyError(msg)


def mutate(source: str, chosen: Mutant) -> str:
    """``source`` with ``chosen``'s bug; ValueError if a change does not occur exactly once."""
    for old, new in chosen.changes:
        found = source.count(old)
        if found != 1:
            msg = (
                f"mutant {chosen.name}: {old!r} occurs {found} times in pytest_cmg/{chosen.path}, "
                "not once; update the mutant to the client"
            )
            raise ValueError(msg)
        source = source.replace(old, new)
    return source


def build(chosen: Mutant | None, into: Path) -> Path:
    """A copy of ``pytest_cmg/`` under ``into`` with ``chosen``'s bug (None: unchanged), and the
    probe plugin beside it; returns ``into``, the folder to put first on ``PYTHONPATH``."""
    shutil.copytree(PACKAGE, into / "pytest_cmg", ignore=shutil.ignore_patterns("__pycache__"))
    if chosen is not None:
        target = into / "pytest_cmg" / chosen.path
        source = target.read_text(encoding="utf-8")
        mutated = mutate(source, chosen)
        # A change that does not compile would be "killed" by a SyntaxError, not by a scenario.
        compile(mutated, str(target), "exec")
        target.write_text(mutated, encoding="utf-8")
    (into / f"{PROBE}.py").write_text(_PROBE_SOURCE, encoding="utf-8")
    return into


@dataclass
class Outcome:
    """One inner pytest session of scenarios against a (mutated) copy of the client."""

    exit_code: int
    #: Node ids of the items that failed (or errored), and of those that passed.
    failed: list[str] = field(default_factory=list)
    passed: list[str] = field(default_factory=list)
    skipped: int = 0
    seconds: float = 0.0
    output: str = ""

    @property
    def killed(self) -> bool:
        return bool(self.failed)


class HarnessError(RuntimeError):
    """The inner session did not run the scenarios against the copy (not a verdict)."""


def run_scenarios(
    chosen: Mutant | None,
    scenarios: tuple[str, ...] | list[str],
    *,
    options: tuple[str, ...] = (),
    timeout: float = 900,
) -> Outcome:
    """Run ``scenarios`` (paths or node ids, relative to the repository root) against the client
    with ``chosen``'s bug (None: unchanged), in a fresh pytest process; ``options`` are more
    pytest options (``-m "not benchmark"``).

    Returns the items that failed; raises :class:`HarnessError` when the session did not run
    them (exit 2-5: a usage or collection error, an interruption, nothing collected) or did
    not import the client from the copy, with the session's output.
    """
    name = chosen.name if chosen else "the unchanged client"
    with tempfile.TemporaryDirectory(prefix="cmg-mutant-") as tmp:
        folder = build(chosen, Path(tmp) / "site")
        probe = Path(tmp) / "probe.txt"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(folder), *filter(None, [env.get("PYTHONPATH")])])
        env[_PROBE_OUT] = str(probe)
        # An outer xdist worker's variables would make the inner session think it is a worker.
        for var in [n for n in env if n.startswith(("PYTEST_XDIST", "PYTEST_CURRENT_TEST"))]:
            del env[var]
        env.pop("PYTEST_ADDOPTS", None)  # CI's --junitxml would be overwritten by each mutant
        argv = [
            sys.executable,
            "-P",  # no repository root first on sys.path: the copy must win (checked below)
            "-m",
            "pytest",
            *scenarios,
            *options,
            "-p",
            PROBE,
            "-p",
            "no:cacheprovider",
            "-q",
            "--no-header",
        ]
        started = time.perf_counter()
        proc = subprocess.run(
            argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
        seconds = time.perf_counter() - started
        output = proc.stdout + proc.stderr
        if proc.returncode not in (0, 1):
            msg = f"{name}: the inner pytest exited {proc.returncode}, not 0 or 1:\n{output}"
            raise HarnessError(msg)
        failed, passed, skipped = _read_probe(chosen, folder, probe, output)
    if proc.returncode == 1 and not failed:
        msg = f"{name}: the inner pytest exited 1 but no item failed:\n{output}"
        raise HarnessError(msg)
    if not failed and not passed:
        msg = f"{name}: no scenario item ran (all skipped):\n{output}"
        raise HarnessError(msg)
    return Outcome(proc.returncode, failed, passed, skipped, seconds, output)


def _read_probe(
    chosen: Mutant | None, folder: Path, probe: Path, output: str
) -> tuple[list[str], list[str], int]:
    """The items that failed, those that passed, and how many were skipped, by the probe; after
    checking that every pytest_cmg module came from ``folder`` and the mutated one was imported.
    """
    if not probe.exists():
        msg = f"the probe plugin did not run (no {probe.name}):\n{output}"
        raise HarnessError(msg)
    loaded: dict[str, str] = {}
    outcomes: dict[str, str] = {}
    for line in probe.read_text(encoding="utf-8").splitlines():
        kind, _, rest = line.partition("\t")
        if kind == "module":
            module, _, path = rest.partition("\t")
            loaded[module] = path
        elif outcomes.get(rest) != "failed":  # a failed phase (setup, call, teardown) wins
            outcomes[rest] = kind
    root = folder.resolve()
    elsewhere = {
        module: path
        for module, path in loaded.items()
        if path != "None" and not Path(path).resolve().is_relative_to(root)
    }
    if elsewhere or "pytest_cmg" not in loaded:
        msg = (
            f"pytest_cmg was not imported from the mutated copy {root}; from elsewhere: "
            f"{elsewhere or 'pytest_cmg never imported'}\n{output}"
        )
        raise HarnessError(msg)
    if chosen is not None and chosen.module not in loaded:
        msg = f"{chosen.name}: its module {chosen.module} was never imported\n{output}"
        raise HarnessError(msg)
    failed = [node for node, outcome in outcomes.items() if outcome == "failed"]
    passed = [node for node, outcome in outcomes.items() if outcome == "passed"]
    skipped = sum(outcome == "skipped" for outcome in outcomes.values())
    return failed, passed, skipped


#: The full matrix leaves out the benchmark items: they judge throughput against a baseline, and
#: on a shared 2-core machine under load they fail on the unchanged client too (seen: three of
#: them "killed" mutants that cannot change a download's speed), which would read as kills.
MATRIX_OPTIONS = ("-m", "not benchmark")


def matrix(
    paths: tuple[str, ...] | list[str] = ("scenarios",), *, echo: bool = False
) -> tuple[Outcome, dict[str, list[str]]]:
    """Every mutant against ``paths``: the unchanged client's outcome, and per mutant the items
    that fail with it but not without it (empty: it survived)."""
    baseline = run_scenarios(None, paths, options=MATRIX_OPTIONS)
    if echo:
        print(f"unchanged client: {len(baseline.failed)} failed, {len(baseline.passed)} passed")
        for node in baseline.failed:
            print(f"  FAILS UNMUTATED: {node}")
    kills: dict[str, list[str]] = {}
    for each in MUTANTS:
        outcome = run_scenarios(each, paths, options=MATRIX_OPTIONS)
        kills[each.name] = new = [n for n in outcome.failed if n not in baseline.failed]
        if echo:
            verdict = "killed" if new else "SURVIVED"
            print(f"{each.name}: {verdict}, {len(new)} item(s) fail ({outcome.seconds:.0f} s)")
            for node in new:
                print(f"  {node}")
            sys.stdout.flush()
    return baseline, kills


def _main(argv: list[str]) -> int:
    if argv[:1] == ["--matrix"]:
        _, kills = matrix(argv[1:] or ["scenarios"], echo=True)
        return 0 if all(kills.values()) else 1
    if not argv:
        print(__doc__)
        return 2
    chosen = None if argv[0] == "none" else mutant(argv[0])
    paths = argv[1:] or list(KILLERS.get(argv[0], ()))
    outcome = run_scenarios(chosen, paths)
    print(f"{argv[0]}: exit {outcome.exit_code} in {outcome.seconds:.1f} s")
    for node in outcome.failed:
        print(f"  failed: {node}")
    print(f"  {len(outcome.passed)} passed, {outcome.skipped} skipped")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
