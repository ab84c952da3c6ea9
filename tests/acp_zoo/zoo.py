"""The zoo: the reference ACP (examples/acp/acp.py), each time with one realistic bug.

A member is the reference's source with one named change: ``(old, new)`` replacements, each of
which must occur exactly once in the reference, so a change to the reference that a member no
longer fits fails loudly (``mutate``) instead of quietly testing nothing. The reference stays
the clean file vendors copy; the bugs live here, in the tests.

Run a member as an ACP (for a task sequence's ``SMSTSDownloadProgram``)::

    python tests/acp_zoo/zoo.py <member> [acp options] <ini> <PackageID> <destination>

tests/test_acp_zoo.py writes each member to a file and runs it as ``python <file>`` through real
task sequences, and checks that every member is caught by at least one situation.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

REFERENCE = Path(__file__).resolve().parents[2] / "examples" / "acp" / "acp.py"


@dataclass(frozen=True)
class Member:
    name: str
    #: The bug, in one line; ``[...]`` names the issue 11 bug it stands for, when it does.
    bug: str
    changes: tuple[tuple[str, str], ...]


MEMBERS = (
    Member(
        "no-hash-check",
        "[the hash is not compared] a file's size is checked, its SHA-256 never",
        (("if size != item.size or sha256 != item.sha256:", "if size != item.size:"),),
    ),
    Member(
        "range-200-appended",
        "[a 200 answer to a range request is used] the full body is appended to the partial file",
        (
            (
                'resumed = answer.status == 206 and (\n            answer.getheader("Content-Range", "")'
                '.startswith(f"bytes {have}-")\n        )',
                "resumed = have > 0  # a range was asked for, so this is the range",
            ),
        ),
    ),
    Member(
        "ignores-retry-after",
        "[Retry-After is ignored] a 503's Retry-After is not read; its own short backoff is used",
        (('wait = retry_after(answer.getheader("Retry-After"))', "wait = None"),),
    ),
    Member(
        "no-sas-renewal",
        "[an expired SAS is not renewed] storage's 403 is final: no fresh manifest is fetched",
        (("        if answer.status == 403:\n            raise Expired\n", ""),),
    ),
    Member(
        "checks-manifest-late",
        "[downloads files of another content version] the manifest is checked against the INI "
        "(version, package hash) only after every file was downloaded",
        (
            (
                "    check(root, items, package)\n"
                "    download(items, options.destination, renew, tls, options)\n",
                "    download(items, options.destination, renew, tls, options)\n"
                "    check(root, items, package)\n",
            ),
        ),
    ),
    Member(
        "cache-keyed-by-package-id",
        "[another content version's cache entry is reused] its --cache is keyed by PackageID only",
        (
            (
                'key = package["Hash"].upper()  # the cache is keyed by content, never by name alone',
                'key = package["PackageID"]',
            ),
        ),
    ),
    Member(
        "logs-sas-url",
        "[the SAS signature is written to the log] each file's full URL is logged on stderr",
        (
            (
                "    with get(item.url, headers, tls) as answer:\n",
                '    log(f"GET {item.url}")\n    with get(item.url, headers, tls) as answer:\n',
            ),
        ),
    ),
    Member(
        "logs-ini-token",
        "[the INI's token is written to the log] the CMG location's INI section is logged",
        (
            (
                "    if cmg is None:\n",
                '    log(f"location: {dict(cmg or {})}")\n    if cmg is None:\n',
            ),
        ),
    ),
    Member(
        "writes-final-name",
        "[bytes are written straight to the final name] no temporary name: a torn file is "
        "visible under the package's name while it downloads",
        (
            (
                "            part = staging / str(number)\n",
                '            part = destination.joinpath(*item.relpath.split("/"))\n'
                "            part.parent.mkdir(parents=True, exist_ok=True)\n",
            ),
        ),
    ),
    Member(
        "one-try-short",
        "[the retry count is off by one] --retries 4 makes 4 tries, not 5",
        (("tries = options.retries + 1", "tries = options.retries"),),
    ),
    Member(
        "manifest-hash-trusted",
        "[the package hash is taken from the manifest] the file list is checked against the "
        "manifest's own Hash attribute instead of the INI's Hash",
        (
            (
                'if package_hash(items) != package["Hash"].upper():',
                'if package_hash(items) != root.get("Hash", "").upper():',
            ),
        ),
    ),
    Member(
        "exit-0-on-failure",
        "[exits 0 after a failure] a failure is logged, then the program exits 0",
        (("        return failure.code\n", "        return 0\n"),),
    ),
    Member(
        "leaves-partial",
        "[leaves a partial file in the destination] the partial folder is removed with rmdir, "
        "which fails on a failure's leftovers",
        (
            (
                "shutil.rmtree(staging, ignore_errors=True)  # on every path: no partial file stays",
                "staging.rmdir()  # empty once every file was moved",
            ),
        ),
    ),
    Member(
        "restarts-after-reset",
        "no resume: a file cut mid-body is fetched again from byte 0",
        (
            (
                'headers = {"Range": f"bytes={have}-"} if 0 < have < item.size else {}',
                "headers = {}",
            ),
        ),
    ),
    Member(
        "resume-skips-a-byte",
        "a resume asks for the range after the next byte it needs (bytes=have+1-)",
        (('{"Range": f"bytes={have}-"}', '{"Range": f"bytes={have + 1}-"}'),),
    ),
    Member(
        "reset-not-retried",
        "a connection cut mid-body is final, only HTTP statuses are retried",
        (
            (
                "            raise Retry(item.relpath, type(error).__name__) from None\n",
                '            raise Failure(1, f"{item.relpath}: {type(error).__name__}") from None\n',
            ),
        ),
    ),
    Member(
        "manifest-not-retried",
        "the manifest request is tried once: a 503 from the CMG is final",
        (("            transient(answer, what)\n", ""),),
    ),
    Member(
        "writes-receipt",
        "[replaces 'download-all honours step conditions', which has no ACP form] a receipt "
        "file is left in the destination after a download",
        (
            (
                "    if options.cache:\n        to_cache(",
                '    (options.destination / "acp-receipt.txt").write_text(key)\n'
                "    if options.cache:\n        to_cache(",
            ),
        ),
    ),
    Member(
        "takes-first-location",
        "takes the first location offered, not the token-authentication one (the CMG)",
        (
            (
                'cmg = next((loc for loc in locations if loc.get("TokenAuth") == "true"), None)',
                "cmg = locations[0] if locations else None",
            ),
        ),
    ),
)


#: Changes that are not bugs under the ACP contract (mutation testing's *equivalent mutants*),
#: kept out of the zoo with the reason: no scenario can or should fail them.
EQUIVALENT = (
    Member(
        "one-try-extra",
        "--retries 4 makes 6 tries, not 5. The contract (README) asks an ACP to ride out transient "
        "failures and to end; it sets no upper bound on tries, so one more is a policy, not a "
        "bug. The off-by-one that is a bug, one try short, is the member one-try-short.",
        (("tries = options.retries + 1", "tries = options.retries + 2"),),
    ),
)


def mutate(source: str, member: Member) -> str:
    """The reference's ``source`` with ``member``'s bug; ValueError if a change does not fit."""
    for old, new in member.changes:
        found = source.count(old)
        if found != 1:
            msg = (
                f"zoo member {member.name}: {old!r} occurs {found} times in the reference ACP, "
                "not once; update the member to the reference"
            )
            raise ValueError(msg)
        source = source.replace(old, new)
    return source


def member(name: str) -> Member:
    for each in MEMBERS:
        if each.name == name:
            return each
    msg = f"no zoo member {name!r}; choose one of {', '.join(m.name for m in MEMBERS)}"
    raise KeyError(msg)


if __name__ == "__main__":
    # python zoo.py <member> [acp arguments]: run the member as the ACP would run.
    chosen = member(sys.argv[1])
    code = compile(
        mutate(REFERENCE.read_text(encoding="utf-8"), chosen), f"acp[{chosen.name}]", "exec"
    )
    sys.argv = [f"acp[{chosen.name}]", *sys.argv[2:]]
    exec(code, {"__name__": "__main__"})
