"""The scenario language's words: the choices it offers and the records of a scenario's parts.

A package, a distribution point, a task-sequence step, the cache seed, the markers, ``expect``, a
benchmark, gateway and storage faults and restarts; :mod:`.language` assembles them into
``SCENARIO``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._client.sequence import STEP_ACTIONS, ContentDestination, RestartTo, Setup
from .._gateway.faults import PACKAGE_HASH_FAULTS
from .._net.faults import VOCABULARY, FaultWord, ValueType
from .._protocol.paths import Endpoint
from .limits import MAX_PACKAGE_BYTES, MAX_PACKAGE_FILES
from .spec import (
    Bool,
    Choice,
    Count,
    Duration,
    Field,
    Int,
    ListOf,
    MapOf,
    Marker,
    Number,
    Record,
    Regex,
    Size,
    Spec,
    Str,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

#: Task sequence variables, name to value (the sequence's own, or what a run must end with).
VARIABLES = MapOf(
    key=Str(pattern=r"[A-Za-z_][A-Za-z0-9_]*", example="OSDLanguage"),
    value=Str(example="it-IT"),
)
PACKAGE_ID = Str(
    pattern=r"[A-Z0-9]{3}[0-9A-F]{5}",
    example="PS100012",
    doc="A package ID in the product's form: site code and five hex digits.",
)
PACKAGE_TYPES = ("package", "os_upgrade", "driver", "application")
LOCALES = ("en_US", "it_IT", "ja_JP")
OUTCOMES = ("success", "failure")
#: What a scenario may need of the client beyond its world (``requires``), and why a run with
#: another downloader (``--cmg-download-program``) does not apply to it: the conformance mode
#: reads this, never a failure, to call an item not applicable.
APPLICABILITY = {
    "builtin_download": (
        "asserts what the built-in download core does on its own (its log lines, retries and "
        "their waits, resumed byte counts, storage request or byte counts, virtual time, "
        "throughput), which a conforming alternate content provider may legitimately do "
        "differently"
    ),
    "site_gates": (
        "tests the site-version gates at a site before 2203, and an alternate content provider "
        "is offered the CMG only from site 2203 (SMSTSAllowTokenAuthURLForACP)"
    ),
    "acp_variables": (
        "sets the alternate content provider's own task sequence variables "
        "(SMSTSDownloadProgram, SMSTSDownloadAbortCode, SMSTSAllowTokenAuthURLForACP), which "
        "--cmg-download-program would replace"
    ),
}
#: ``expect`` keys a scenario may name in ``builtin_expect``: what they count or match is how the
#: built-in core went about the download (its log lines, tries, waits, requests, bytes), which a
#: conforming alternate content provider may do differently while delivering the same content.
#: Never ``outcome``, ``exit_code``, ``cache``, ``ts_cache``, ``absent_log`` or
#: ``absent_gateway_log``: what the task sequence ends with, and that no secret is logged, hold
#: whoever downloads.
BUILTIN_EXPECT = (
    "log",
    "gateway_log",
    "requests",
    "storage_requests",
    "storage_bytes",
    "retries",
    "elapsed",
    "egress_bytes",
    "downloaded",
)
AUTH_METHODS = ("token", "certificate", "azure_ad")
#: The client certificate a ``client.auth: certificate`` client presents (``client.certificate``).
CERTIFICATES = (
    "valid",
    "partner_ca",
    "revoked",
    "expired",
    "not_yet_valid",
    "untrusted_ca",
    "no_client_auth",
)
#: The state of the Azure AD tenant of an ``azure_ad`` client (``client.tenant``).
TENANT_STATES = ("enabled", "disabled", "not_onboarded")
#: The client CAs uploaded to the CMG, as a certificate trust list names them
#: (``cmg.certificate_trust_list``): the site's own PKI and a partner's.
TRUST_ROOTS = ("site", "partner")
#: A host name with at least one dot (an intranet DP's FQDN); no scheme, port or path.
FQDN_PATTERN = r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)+"
#: Where an on-premises DP is relative to the client's boundary group (``Locality``).
DP_LOCALITIES = ("local", "remote", "subnet")
#: What a ``set`` path or ``matrix`` key looks like: ``client.auth``, ``packages[1].locale``,
#: ``packages[PS100013].size``, ``task_sequence.variables.OSDLanguage``.
SET_PATH = Str(
    pattern=r"[a-z_]+(\.[A-Za-z_][A-Za-z0-9_]*|\[[A-Za-z0-9]+\])*",
    example="client.auth",
)
CASE_ID = Str(pattern=r"[A-Za-z0-9_.+-]+", example="token-2107")
#: Cases times matrix combinations a file may produce.
MAX_CASES = 256
#: What a benchmark scenario's download rate is compared with (``benchmark.baseline``).
BASELINES = ("hashlib", "raw")
#: Rounds a benchmark scenario may ask for: each is a whole download of its packages.
MAX_ROUNDS = 9

_COUNT = "an exact count, or {at_least: n, at_most: m}"

PACKAGE = Record(
    required_unless="ref",
    fields={
        "id": Field(PACKAGE_ID, required=True),
        "version": Field(Int(minimum=1), default=1, doc="Content version."),
        "name": Field(Str(), default="", example="Windows 11 24H2 upgrade"),
        "type": Field(
            Choice(choices=PACKAGE_TYPES),
            default="package",
            doc=(
                "What content to generate: `os_upgrade` (install.wim takes 90 % of the bytes, "
                "plus setup files), `driver` (many small .sys/.inf/.cat files in folders), "
                "`application` (.msi/.cab/.mst) or `package` (plain files)."
            ),
        ),
        "on_cloud_dp": Field(
            Bool(),
            default=True,
            doc="Whether this version is distributed to the content-enabled CMG.",
        ),
        "files": Field(
            Int(minimum=1),
            default=1,
            doc=f"Number of generated files, at most {MAX_PACKAGE_FILES:,}.",
            example="12",
        ),
        "size": Field(
            Size(
                maximum=MAX_PACKAGE_BYTES,
                limit=(
                    "Azurite keeps uploaded content in memory: split the content into several "
                    "packages, or test the protocol with a smaller size"
                ),
            ),
            required=True,
            doc="Total generated size, e.g. 8MiB.",
        ),
        "locale": Field(
            Choice(choices=LOCALES),
            default="en_US",
            doc="Faker locale for file names (it_IT and ja_JP names are not ASCII).",
            example="ja_JP",
        ),
        "ref": Field(
            Str(example="catalog/os-upgrade-win11"),
            default=None,
            doc=(
                "Take this package from a catalog file (`catalog/x`: your fixtures folder, then "
                "the shipped catalog; or `./x.yaml` next to this file); keys given here override "
                "the catalog's."
            ),
        ),
    },
)

DISTRIBUTION_POINT = Record(
    doc="An on-premises distribution point of the site and the packages it holds.",
    fields={
        "fqdn": Field(
            Str(pattern=FQDN_PATTERN, example="dp01.contoso.com"),
            required=True,
            doc="The DP's intranet FQDN, as its location record names it.",
            example="dp01.contoso.com",
        ),
        "locality": Field(
            Choice(choices=DP_LOCALITIES),
            default="local",
            doc=(
                "Where the DP is for the client's boundary group (the record's `Locality`): "
                "`local`, `remote` or `subnet`."
            ),
        ),
        "https": Field(
            Bool(),
            default=False,
            doc="Whether the DP is set up for HTTPS (`https://` URLs, `SSLState` 1).",
        ),
        "packages": Field(
            ListOf(item=PACKAGE_ID, min_items=1),
            required=True,
            doc=(
                "The declared packages whose declared version this DP holds; a package may be "
                "on it and not on the cloud DP (`on_cloud_dp: false`)."
            ),
            example="[PS100012]",
        ),
    },
)

STEP = Record(
    fields={
        "name": Field(
            Str(nonempty=True, example="Upgrade the operating system"),
            required=True,
            example="Upgrade the operating system",
        ),
        "action": Field(Choice(choices=STEP_ACTIONS), required=True),
        "package": Field(PACKAGE_ID, default=None),
        "packages": Field(
            ListOf(item=PACKAGE_ID, min_items=1),
            default=None,
            doc=(
                "download_package_content only, instead of `package`: several packages, "
                "downloaded in this order (the product's step takes a list)."
            ),
            example="[PS100013, PS100014]",
        ),
        "condition": Field(
            Record(
                doc=(
                    "Run the step only when this holds: give `variable` and one of `equals`, "
                    "`not_equals` or `exists: true`."
                ),
                fields={
                    "variable": Field(Str(), required=True, example="OSDLanguage"),
                    "equals": Field(Str(), default=None, example="it-IT"),
                    "not_equals": Field(Str(), default=None, example="ja-JP"),
                    "exists": Field(Bool(), default=None),
                },
            ),
            default=None,
            example="{variable: OSDLanguage, equals: it-IT}",
        ),
        # Download Package Content's options (Microsoft Learn: Task sequence steps;
        # docs/emulation.md, "Task sequence content locations").
        "destination": Field(
            Choice(choices=ContentDestination.ALL),
            default=None,
            doc=(
                "download_package_content only: where the package goes: `ts_cache` (the task "
                "sequence working directory, kept to the end of the run), `client_cache` "
                "(ccmcache; in Windows PE the working directory) or `custom` (`path`). Default: "
                "where any step's content goes."
            ),
        ),
        "path": Field(
            Str(example="C:\\Drivers"),
            default=None,
            doc=(
                "With `destination: custom`: the folder (below the emulated system drive) the "
                "package lands in, as `<path>/<PackageID>`; it sets "
                "_SMSTSLastContentDownloadLocation."
            ),
        ),
        "variable": Field(
            Str(pattern=r"[A-Za-z_][A-Za-z0-9_]*", example="DRIVERS"),
            default=None,
            doc=(
                "download_package_content only: `<variable>01` gets the first package's "
                "location, `<variable>02` the second's, and so on."
            ),
        ),
        "setup": Field(
            Record(
                doc=(
                    "upgrade_os only: Windows Setup takes the machine after the step, restarts "
                    "it `restarts` times, then ends with `result`: `success` resumes the "
                    "sequence through SetupComplete.cmd, `rollback` through SetupRollback.cmd "
                    "with _SMSTSSetupRollback=TRUE and the step failing with `code`. Every "
                    'boot then runs as a process of its own (docs/emulation.md, "Restarts").'
                ),
                fields={
                    "restarts": Field(Int(minimum=1, maximum=10), default=2),
                    "result": Field(Choice(choices=Setup.RESULTS), default="success"),
                    "code": Field(
                        Str(pattern=r"0x[0-9A-Fa-f]{8}", example="0xC1900101"),
                        default="0x00000000",
                        doc="Setup's exit code, set in _SMSTSOSUpgradeActionReturnCode.",
                    ),
                },
            ),
            default=None,
            fill=False,
            example="{restarts: 2, result: rollback, code: 0xC1900101}",
        ),
        # Restart Computer's "Specify what to run after restart" (Microsoft Learn: Task
        # sequence steps, "Restart Computer"; docs/emulation.md, "Restarts").
        "restart_to": Field(
            Choice(choices=RestartTo.ALL),
            default=None,
            doc=(
                "restart_computer only: what the computer restarts to: `os` (the currently "
                "installed default operating system; the default) or `winpe` (the boot image "
                "assigned to this task sequence: needs `boot_image: true`). The next boot runs "
                "in Windows PE or not accordingly (_SMSTSInWinPE). From boot media or PXE, `os` "
                "before an upgrade_os step ran fails the step (no operating system yet)."
            ),
        ),
    }
)

CACHE_SEED = Record(
    doc="One client cache entry made before the run.",
    fields={
        "package": Field(PACKAGE_ID, required=True, doc="A declared package."),
        "version": Field(
            Int(minimum=1),
            required=True,
            doc="The content version of the entry (the declared one: a cache hit).",
            example="2",
        ),
    },
)

MARKER = Marker(
    known={
        "xfail": Record(
            doc="Expected to fail: reason, and strict (an unexpected pass fails).",
            fields={
                "reason": Field(Str(), default=None, example="known gap"),
                "strict": Field(Bool(), default=None),
                "run": Field(Bool(), default=None),
            },
        ),
        "skip": Record(
            doc="Skipped, with a reason.",
            fields={"reason": Field(Str(), default=None, example="not on this site")},
        ),
        "skipif": Record(
            doc="Skipped when the condition (a Python expression, as in pytest) is true.",
            fields={
                "condition": Field(Str(), required=True, example="sys.platform == 'win32'"),
                "reason": Field(Str(), required=True, example="no TIOCOUTQ"),
            },
        ),
    },
)
MARKERS = ListOf(
    item=MARKER,
    doc=(
        "pytest markers for the items of this file: a name (`slow`, `benchmark`), or "
        "`{xfail: {reason: ..., strict: true}}`, `{skip: {reason: ...}}`, "
        "`{skipif: {condition: ..., reason: ...}}`, `{name: [args]}`. Names must be registered "
        "(pytest's `markers` ini, or the plugin's `slow` and `benchmark`)."
    ),
)

REQUEST_COUNT = Count(doc=_COUNT)

EXPECT = Record(
    doc="What must hold after the run; each failed expectation is reported at its line.",
    fields={
        "outcome": Field(Choice(choices=OUTCOMES), required=True),
        "exit_code": Field(
            Str(pattern=r"0x[0-9A-Fa-f]{8}", example="0x80040102"),
            default=None,
            doc="The task sequence's exit code.",
            example='"0x80040102"',
        ),
        "cache": Field(
            ListOf(item=Str(pattern=r"[A-Z0-9]{3}[0-9A-F]{5}\.\d+", example="PS100012.1")),
            default=None,
            doc="Exactly these verified entries are in the cache.",
        ),
        "downloaded": Field(
            ListOf(item=PACKAGE_ID),
            default=None,
            doc="Exactly these packages were read from storage (proves on-demand behaviour).",
        ),
        "requests": Field(
            Record(
                doc="Gateway request counts by endpoint.",
                fields={name: Field(REQUEST_COUNT, default=None) for name in Endpoint.ALL},
            ),
            default=None,
            doc=(
                f"Gateway request counts by endpoint ({', '.join(Endpoint.ALL)}): a number, or "
                "{at_least: n, at_most: m}."
            ),
            example="{location: 2, manifest: {at_least: 2}}",
        ),
        "log": Field(
            ListOf(item=Regex()),
            default=None,
            doc=(
                "Python regular expressions (`re.search`) that must each match a smsts.log line "
                "(`component: message`); escape `.`, `(`, `[` to match them literally."
            ),
        ),
        "gateway_log": Field(
            ListOf(item=Regex(example='"Issued manifest for PS100012\\\\.1"')),
            default=None,
            doc="Regular expressions that must each match a gateway (CMGService) log line.",
        ),
        "absent_log": Field(
            ListOf(item=Regex(example='"sig="')),
            default=None,
            doc="Regular expressions that must match no smsts.log line (e.g. `sig=`).",
        ),
        "absent_gateway_log": Field(
            ListOf(item=Regex(example='"Refused"')),
            default=None,
            doc="Regular expressions that must match no gateway log line.",
        ),
        "storage_bytes": Field(
            MapOf(key=PACKAGE_ID, value=Count(unit=Size())),
            default=None,
            doc=(
                "Content bytes storage served per package: bodies of 200 and 206 answers, "
                "bytes fetched again after a cut included; a size, or {at_least: ..., "
                "at_most: ...}. `0` proves a package was never read."
            ),
            example="{PS100012: 24MiB, PS100013: 0}",
        ),
        "storage_requests": Field(
            Count(),
            default=None,
            doc=f"Requests storage received, all packages together: {_COUNT}.",
        ),
        "egress_bytes": Field(
            Count(unit=Size()),
            default=None,
            doc=(
                "Outbound bytes the CMG's accounting counted by the end of the run "
                "(`FakeCMG.egress_bytes`): the bytes storage served for its SAS URLs with "
                "`cmg.measure_egress`, else the sizes of the manifests it issued; a size, or "
                "{at_least: ..., at_most: ...}."
            ),
            example="{at_least: 1MiB, at_most: 2MiB}",
        ),
        "retries": Field(
            Count(),
            default=None,
            doc=(
                "Waits before a retry: download-core backoffs and task sequence retries "
                f"(SMSTSDownloadRetryCount): {_COUNT}."
            ),
            example="{at_least: 1, at_most: 3}",
        ),
        "restarts": Field(
            Count(),
            default=None,
            doc=(
                "Restarts of the computer in the run: Restart Computer steps, Windows Setup's "
                f"restarts and power cuts (each a new boot process): {_COUNT}."
            ),
            example="2",
        ),
        "elapsed": Field(
            Count(unit=Duration(), low="min", high="max"),
            default=None,
            doc=(
                "Virtual time at the end of the run (retry waits, storage stalls and throttling, "
                "clock jumps): a duration, or {min: ..., max: ...}."
            ),
            example="{max: 60s}",
        ),
        "ts_cache": Field(
            ListOf(item=Str(pattern=r"[A-Z0-9]{3}[0-9A-F]{5}\.\d+", example="PS100012.1")),
            default=None,
            doc=(
                "Exactly these entries were in the task sequence cache when the task sequence "
                "ended, before it was emptied: content `SMSTSPersistContent` or a "
                "download_package_content step kept for the run."
            ),
        ),
        "variables": Field(
            VARIABLES,
            default=None,
            doc=(
                "Task sequence variables when the sequence ended, each with exactly this value "
                "as the client holds it (paths in the Windows form, `C:\\...`); `\"\"` says "
                "the variable is not set (in the product an empty variable is an unset one)."
            ),
            example='{_SMSTSOSUpgradeActionReturnCode: "3247440400", _SMSTSSetupRollback: "TRUE"}',
        ),
        "throughput": Field(
            MapOf(key=PACKAGE_ID, value=Count(unit=Number(), exact=False)),
            default=None,
            doc=(
                "With `benchmark` only: per package, its verified download rate (its bytes over "
                "the seconds the engine spent downloading, verifying and committing it) divided "
                "by the `benchmark.baseline` rate on the same bytes, measured right after the "
                "run in the same process; the median over `benchmark.rounds`. "
                "{at_least: r} and/or {at_most: r}: a measured ratio is never exact."
            ),
            example="{PS100012: {at_least: 0.3}}",
        ),
    },
)

BENCHMARK = Record(
    doc=(
        "Makes the scenario a benchmark of the whole download chain (location, manifest, SAS, "
        "download core, cache): the client reaches storage directly, not through the fault "
        "proxy (a Python proxy would be the bottleneck measured), and the items get the "
        "`benchmark` marker. Each package read from storage is then timed against a baseline "
        "on the same bytes (`expect.throughput`); the figures (MB/s, files/s, ratio) are shown "
        "in the terminal summary and written as `--junitxml` properties, pass or fail. Storage "
        "faults, `expect.storage_bytes`, `expect.storage_requests` and `cmg.measure_egress` "
        "need a proxy in the path and are refused; gateway faults are allowed."
    ),
    fields={
        "baseline": Field(
            Choice(choices=BASELINES),
            default="hashlib",
            doc=(
                "What the download rate is divided by: `hashlib` (one core's SHA-256 over as "
                "many bytes from memory, in 1 MiB updates: the ceiling of a client that "
                "verifies what it reads) or `raw` (plain keep-alive HTTP GETs of the package's "
                "blobs straight from storage, bodies discarded, on as many connections as the "
                "download core uses: storage's own ceiling, the fair one where per-request cost "
                "dominates, as with many small files)."
            ),
            example="raw",
        ),
        "rounds": Field(
            Int(minimum=1, maximum=MAX_ROUNDS),
            default=1,
            doc=(
                "Downloads measured. The first run is the one every expectation checks; each "
                "further round runs the task sequence again on a fresh client cache (same "
                "world; the timeline is not replayed), each followed by its own baseline. The "
                "ratio judged is the median of the rounds' ratios."
            ),
            example="3",
        ),
    },
)

GATEWAY_FAULT = Record(
    doc="A scripted gateway fault (`FakeCMG.fail`).",
    fields={
        "endpoint": Field(
            Choice(choices=Endpoint.ALL),
            default=None,
            doc="The endpoint whose requests it hits; none: any endpoint.",
        ),
        "request": Field(
            Int(minimum=1),
            default=None,
            doc=(
                "The 1-based request number to that endpoint, counted from the start of the run; "
                "none: the next request(s) after the fault is armed."
            ),
        ),
        "times": Field(Int(minimum=1), default=1, doc="How many requests it fires on."),
        "status": Field(
            Int(minimum=400, maximum=599), default=None, doc="Answer this status instead."
        ),
        "reason": Field(Str(), default=None, doc="Status text (default: the standard one)."),
        "retry_after": Field(
            Str(), default=None, doc="`Retry-After` header with the status (seconds or a date)."
        ),
        "delay": Field(
            Duration(maximum=10.0),
            default=None,
            doc="Wait before answering (real time, in the gateway's thread; at most 10 s).",
        ),
        "drop": Field(Bool(), default=False, doc="Close the connection without an answer."),
        "truncate": Field(Size(), default=None, doc="Send only this many body bytes, then close."),
        "wrong_hash": Field(
            Bool(), default=False, doc="Manifest only: corrupt the first file's SHA-256."
        ),
        "sas_ttl": Field(
            Duration(negative=True),
            default=None,
            doc="Manifest only: SAS URLs expire this long after issue (negative: already expired).",
            example="-60s",
        ),
        "package_hash": Field(
            Choice(choices=PACKAGE_HASH_FAULTS),
            default=None,
            doc=(
                "Location only: `wrong` makes the location reply carry a package hash that is "
                "not the content's, while the manifest stays consistent with itself (every file "
                "hash matches its bytes, and its own Hash attribute is the content's). A client "
                "must check the hash from the location reply: 0x80091007."
            ),
            example="wrong",
        ),
    },
)

#: How each type of value of the fault vocabulary (:data:`~.._net.faults.VOCABULARY`) is
#: written in a scenario.
_VALUE_SPECS: dict[ValueType, Callable[[], Spec]] = {
    "offset": Size,
    "rate": Size,
    "seconds": Duration,
    "status": lambda: Int(minimum=200, maximum=599),
    "text": Str,
    "flag": Bool,
}


def storage_fault_fields(words: Iterable[FaultWord] = VOCABULARY) -> dict[str, Field]:
    """The keys of a ``storage`` entry that ask for faults: each word's, then its args', in the
    vocabulary's order. A flag defaults to false, any other value to not given."""
    fields: dict[str, Field] = {}
    for word in words:
        typed = [(word.key, word.type, word.doc, word.example)]
        typed += [(arg.key, arg.type, arg.doc, arg.example) for arg in word.args]
        for key, kind, doc, example in typed:
            default = False if kind == "flag" else None
            fields[key] = Field(_VALUE_SPECS[kind](), default=default, doc=doc, example=example)
    return fields


STORAGE_FAULT = Record(
    doc="A scripted storage fault, injected by the fault proxy in front of Azurite.",
    fields={
        "request": Field(
            Int(minimum=1),
            default=None,
            doc=(
                "The 1-based number of the storage request (all blobs, in arrival order, from "
                "the start of the run); none: the next request(s) after the fault is armed."
            ),
        ),
        "times": Field(Int(minimum=1), default=1, doc="How many requests it hits."),
        "file": Field(
            Str(nonempty=True, example="install.wim"),
            default=None,
            doc=(
                "Only requests for blobs whose name contains this (a file name such as "
                "`install.wim`, or `PS100012.3/` for a whole package); `request` then counts "
                "those requests only. Files download in parallel, so a global request number "
                "may land on any of them: name the file to hit one."
            ),
            example="install.wim",
        ),
        **storage_fault_fields(),
    },
)

RESTART = Record(
    doc=(
        "Restart the computer, as a power cut: the boot process is killed by its pid, and the "
        "next boot resumes the step it was running. With `file` and `after_bytes`: once "
        "storage has sent that many bytes of a blob whose name contains `file` (the download "
        "then resumes from its journal, byte-exactly for that file; other files on their way "
        "resume from their last full receive buffer, docs/emulation.md \"Restarts\")."
    ),
    fields={
        "file": Field(Str(nonempty=True, example="install.wim"), default=None, example="install.wim"),
        "after_bytes": Field(Size(), default=None, example="4MiB"),
    },
)

TIMELINE_KINDS = ("gateway", "storage", "service", "clock", "restart")

FAULT = Record(
    doc=(
        "One timeline event: exactly one of `gateway`, `storage`, `service`, `clock`, "
        "`restart`; armed before the run, `before_step`, or when virtual time reaches `at`."
    ),
    exactly_one=TIMELINE_KINDS,
    fields={
        "gateway": Field(
            GATEWAY_FAULT, fill=False, example="{endpoint: manifest, request: 1, status: 503}"
        ),
        "storage": Field(STORAGE_FAULT, fill=False, example="{request: 1, reset_after: 300KiB}"),
        "restart": Field(RESTART, fill=False, example="{file: install.wim, after_bytes: 4MiB}"),
        "service": Field(
            Choice(choices=("stop", "start")),
            default=None,
            doc="Stop the CMG service (every request answered 503) or start it again.",
        ),
        "clock": Field(
            Duration(),
            default=None,
            doc=(
                "Move the site's clock (token lifetimes) and the virtual time forward; storage "
                "keeps its own clock, so SAS expiry is scripted with `gateway.sas_ttl`."
            ),
            example="9h",
        ),
        "before_step": Field(
            Str(),
            default=None,
            doc="Fire just before this step (by name) starts.",
            example="Apply drivers",
        ),
        "at": Field(
            Duration(),
            default=None,
            doc="Fire when virtual time reaches this (it moves on waits, stalls, jumps).",
            example="30s",
        ),
        "optional": Field(
            Bool(),
            default=False,
            doc=(
                "The run may end without this entry happening. Without it, an entry that never "
                "happened fails the scenario at its line: a `before_step` or `at` entry never "
                "armed, a gateway fault that hit no request, a storage fault that hit no "
                "request or never reached the body offset it acts at."
            ),
        ),
    },
)
