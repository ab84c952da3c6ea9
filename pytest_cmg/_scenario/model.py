"""The scenario language: its definition (``SCENARIO``), and loading a file into :class:`Scenario`.

A file may include shared worlds and take packages from catalogs (``include``, ``ref``: see
:mod:`.assemble`), and may be parametrised (``matrix``, ``cases``): :func:`load_scenarios` gives
one :class:`Scenario` per case, each validated on its own, every problem reported at its file and
line.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, get_args

from .._client.cache import DEFAULT_CACHE_MB
from .._client.sequence import (
    DOWNLOAD_PACKAGE_CONTENT,
    STEP_ACTIONS,
    Condition,
    ContentDestination,
    Setup,
    Step,
    TaskSequence,
    custom_path_parts,
)
from .._errors import ScenarioError, ScenarioProblem
from .._gateway.faults import PACKAGE_HASH_FAULTS
from .._net.faults import FaultKind
from .._protocol.paths import Endpoint
from .._protocol.settings import (
    NO_NEW_CLASSIC_CLOUD_DP_SINCE,
    SITE_VERSIONS,
    ClientSettings,
    CmgSettings,
    DeploymentSettings,
    DownloadMode,
    LaunchContext,
)
from .assemble import Assembler, CasePlan, compose_file, find_fixtures, plan_cases
from .content import package_file_names
from .limits import (
    MAX_CASE_VALUES,
    MAX_FILE_BYTES,
    MAX_PACKAGE_BYTES,
    MAX_PACKAGE_FILES,
    MAX_SCENARIO_BYTES,
    OS_UPGRADE_MAIN_SHARE,
    SHOWN_CHARS,
    clip,
    human_size,
    largest_file,
    nearest,
    shown,
)
from .spec import (
    Anything,
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
    Str,
    Validation,
)

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

__all__ = [
    "APPLICABILITY",
    "BASELINES",
    "BUILTIN_EXPECT",
    "CATALOG_PACKAGE",
    "FRAGMENT",
    "SCENARIO",
    "SCENARIO_WITH_INCLUDE",
    "BenchmarkSpec",
    "DistributionPointSpec",
    "MarkerUse",
    "PackageSpec",
    "Scenario",
    "TimelineEvent",
    "load_scenario",
    "load_scenarios",
]

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
        "name": Field(Str(), required=True, example="Upgrade the operating system"),
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
            Str(),
            default=None,
            doc=(
                "Only requests for blobs whose name contains this (a file name such as "
                "`install.wim`, or `PS100012.3/` for a whole package); `request` then counts "
                "those requests only. Files download in parallel, so a global request number "
                "may land on any of them: name the file to hit one."
            ),
            example="install.wim",
        ),
        "reset_after": Field(Size(), default=None, doc="TCP reset after this many body bytes."),
        "close_after": Field(Size(), default=None, doc="Clean close after this many body bytes."),
        "stall_after": Field(
            Size(), default=None, doc="Stop sending after this many body bytes (see stall_for)."
        ),
        "stall_for": Field(
            Duration(),
            default=None,
            doc="How long a stall lasts, on virtual time (passes at once, counts in elapsed).",
        ),
        "throttle": Field(
            Size(),
            default=None,
            doc="Bytes per second the body is paced at, on virtual time.",
            example="1MiB",
        ),
        "delay": Field(Duration(), default=None, doc="Wait (virtual) before the answer's head."),
        "flip_byte": Field(
            Size(), default=None, doc="Flip the body byte at this offset (0-based)."
        ),
        "close_before_headers": Field(
            Bool(), default=False, doc="Close the connection without a single answer byte."
        ),
        "respond": Field(
            Int(minimum=200, maximum=599),
            default=None,
            doc="Answer this status instead of forwarding the request.",
            example="503",
        ),
        "retry_after": Field(Str(), default=None, doc="`Retry-After` header of `respond`."),
        "error_code": Field(
            Str(),
            default=None,
            doc="`x-ms-error-code` header of `respond`, e.g. ServerBusy.",
            example="ServerBusy",
        ),
        "ignore_range": Field(
            Bool(), default=False, doc="Forward without `Range`: storage answers 200, full body."
        ),
    },
)

RESTART = Record(
    doc=(
        "Restart the computer, as a power cut: the boot process is killed by its pid, and the "
        "next boot resumes the step it was running. With `file` and `after_bytes`: once "
        "storage has sent that many bytes of a blob whose name contains `file` (the download "
        "then resumes from its journal)."
    ),
    fields={
        "file": Field(Str(), default=None, example="install.wim"),
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

CASE = Record(
    fields={
        "id": Field(CASE_ID, required=True, doc="The item ID suffix: `scenario[id]`."),
        "description": Field(Str(), default="", doc="What this case shows."),
        "set": Field(
            MapOf(key=SET_PATH, value=Anything()),
            default=None,
            doc="Values to change, by path (`client.auth`, `packages[PS100013].locale`).",
            example="{client.auth: certificate, cmg.site_version: 2010}",
        ),
        "expect": Field(
            EXPECT.relaxed(),
            default=None,
            fill=False,
            doc="Expectations of this case, merged over the file's `expect`.",
            example='{outcome: failure, exit_code: "0x80040102"}',
        ),
        "markers": Field(MARKERS, default=None, doc="Markers of this case's items only."),
    }
)

SCENARIO = Record(
    doc="One scenario: a world (site, CMG, packages), a client, a task sequence and expectations.",
    fields={
        "scenario": Field(
            Str(),
            required=True,
            doc="The test name shown by pytest.",
            example="in-place upgrade downloads each package on demand",
        ),
        "description": Field(Str(), default="", doc="Free text: the story this scenario tells."),
        "seed": Field(Int(minimum=0), default=0, doc="Seed for generated content."),
        "site": Field(
            Record(
                doc="The primary site the CMG belongs to.",
                fields={
                    "code": Field(
                        Str(pattern=r"[A-Z0-9]{3}", example="PS1"),
                        default="PS1",
                        doc="The primary site code.",
                    ),
                },
            ),
        ),
        "cmg": Field(
            Record(
                doc="The content-enabled CMG's settings.",
                fields={
                    "content_enabled": Field(
                        Bool(),
                        default=True,
                        doc=(
                            "CMG setting 'Allow CMG to function as a cloud distribution point and "
                            "serve content from Azure storage'."
                        ),
                    ),
                    "site_version": Field(
                        Int(choices=SITE_VERSIONS),
                        default=2107,
                        doc=(
                            "The site's version (YYMM). Before 1802 no task sequence runs over a "
                            "CMG; before 1910 cloud sources are not offered to on-demand "
                            "deployments."
                        ),
                        example="1910",
                    ),
                    "egress_threshold_gb": Field(
                        Number(),
                        default=10000.0,
                        doc="14-day outbound data transfer threshold in GB; critical at 90 %.",
                    ),
                    "stop_when_critical": Field(
                        Bool(),
                        default=False,
                        doc="Stop the CMG service when the critical egress threshold is exceeded.",
                    ),
                    "prefer_cloud_sources": Field(
                        Bool(),
                        default=False,
                        doc=(
                            "Boundary group option 'Prefer cloud based sources over on-premises "
                            "sources': the cloud record comes first in location replies instead "
                            "of last (see `distribution_points`)."
                        ),
                    ),
                    "classic_cloud_dp": Field(
                        Bool(),
                        default=False,
                        doc=(
                            "Content comes from a classic cloud distribution point "
                            "(`clouddp.contoso.test`, its own service) instead of the CMG; it "
                            "serves content whatever `content_enabled` says and its egress "
                            "threshold only alerts. None can be created from 2107 on: a site "
                            "version of 2107 or later is a collection error."
                        ),
                    ),
                    "crl_check": Field(
                        Bool(),
                        default=False,
                        doc=(
                            "CMG setting 'Verify client certificate revocation': a presented "
                            "client certificate is checked against its issuer's CRL; revoked is "
                            "`403 Client certificate revoked`, no readable CRL is refused too "
                            "(fail closed)."
                        ),
                    ),
                    "crl_reachable": Field(
                        Bool(),
                        default=True,
                        doc=(
                            "Whether the CRL distribution points answer; `false` withdraws every "
                            "CRL, so with `crl_check` every certificate is refused (`403 Client "
                            "certificate is untrusted or invalid`)."
                        ),
                        example="false",
                    ),
                    "certificate_trust_list": Field(
                        ListOf(item=Choice(choices=TRUST_ROOTS)),
                        default=None,
                        doc=(
                            "The site's certificate trust list: which uploaded client roots "
                            "it accepts, `site` (the site's PKI, which issues `valid` "
                            "certificates) and `partner` (a partner CA, which issues "
                            "`partner_ca` ones). Not given or `[]`: no CTL, every uploaded "
                            "root is accepted."
                        ),
                        example="[site]",
                    ),
                    "measure_egress": Field(
                        Bool(),
                        default=False,
                        doc=(
                            "Count egress from the bytes storage actually served for the "
                            "gateway's SAS URLs (a counting proxy) instead of the sizes of the "
                            "manifests issued; see `expect.egress_bytes`. HTTPS storage cannot "
                            "be measured and is counted by manifest size."
                        ),
                    ),
                },
            ),
        ),
        "client": Field(
            Record(
                doc="The internet client: its client settings and cache.",
                fields={
                    "auth": Field(
                        Choice(choices=AUTH_METHODS),
                        default="token",
                        doc=(
                            "How the client authenticates to the CMG: a site-issued token "
                            "(CCM_Proxy_ServerAuth), a PKI client certificate over mutual TLS "
                            "(CCM_Proxy_MutualAuth), or an Azure AD device token exchanged at "
                            "CCM_STS for a CCM token, then the token path."
                        ),
                        example="azure_ad",
                    ),
                    "enable_cmg": Field(
                        Bool(),
                        default=True,
                        doc="Client setting 'Enable clients to use a cloud management gateway'.",
                    ),
                    "allow_cloud_dp": Field(
                        Bool(),
                        default=True,
                        doc=(
                            "Client setting 'Allow access to cloud distribution point' (sends "
                            "UseAzure)."
                        ),
                    ),
                    "cache_size": Field(
                        Size(),
                        default=DEFAULT_CACHE_MB * 1024 * 1024,
                        doc="Client cache size (default 5120MiB).",
                    ),
                    "restart_takes": Field(
                        Duration(),
                        default=120.0,
                        doc=(
                            "Virtual time one restart of the computer takes (the machine is "
                            "down: tokens may expire meanwhile)."
                        ),
                        example="9h",
                    ),
                    "cache": Field(
                        ListOf(item=CACHE_SEED),
                        default=None,
                        doc=(
                            "Entries in the client cache before the run: each a real, verified "
                            "cache entry of a declared package at `version`, with that "
                            "version's content (generated from the seed like the package: same "
                            "type, files, size and locale; another version has other names "
                            "and bytes), committed through the client cache. Another version "
                            "than the declared one must not be reused: the run fetches the "
                            "declared one. The entries stay unless evicted, so list them in "
                            "`expect.cache`."
                        ),
                        example="[{package: PS100012, version: 2}]",
                    ),
                    "certificate": Field(
                        Choice(choices=CERTIFICATES),
                        default="valid",
                        doc=(
                            "With `auth: certificate`, the certificate the client presents: "
                            "`valid` (from the site's client CA), `partner_ca` (from the "
                            "partner CA, also uploaded to the CMG: see "
                            "`cmg.certificate_trust_list`), `revoked` (valid, then revoked: "
                            "refused with `cmg.crl_check`), `expired`, `not_yet_valid`, "
                            "`untrusted_ca` (a CA the CMG does not know) and `no_client_auth` "
                            "(server authentication usage only); the last four fail the TLS "
                            "handshake."
                        ),
                        example="revoked",
                    ),
                    "tenant": Field(
                        Choice(choices=TENANT_STATES),
                        default="enabled",
                        doc=(
                            "With `auth: azure_ad`, the client's Azure AD tenant: `enabled` "
                            "(onboarded to the site), `disabled` (onboarded, then disabled for "
                            "the site) or `not_onboarded` (another tenant). The last two are "
                            "refused at CCM_STS with `401 CMGService_Invalid_Token`."
                        ),
                        example="disabled",
                    ),
                },
            ),
        ),
        "packages": Field(
            ListOf(
                doc=(
                    "Packages (and their content versions) referenced by the task sequence; "
                    "content is generated from the seed. Packages of included worlds are merged "
                    "by `id`."
                ),
                min_items=1,
                item=PACKAGE,
            ),
            required=True,
            example="[{id: PS100012, type: os_upgrade, files: 4, size: 24MiB}]",
        ),
        "distribution_points": Field(
            ListOf(
                doc=(
                    "On-premises distribution points: the management point lists each one that "
                    "holds a package in its location reply, before the cloud source (after it "
                    "with `cmg.prefer_cloud_sources`). The internet client cannot reach them and "
                    "skips them without a connection attempt; with no cloud source left the "
                    "step fails with 0x80040102 ('No static content server.')."
                ),
                item=DISTRIBUTION_POINT,
            ),
            default=None,
            example="[{fqdn: dp01.contoso.com, locality: local, https: true, packages: [PS100012]}]",
        ),
        "task_sequence": Field(
            Record(
                doc="The task sequence and its deployment's options.",
                fields={
                    "id": Field(PACKAGE_ID, required=True, example="PS100020"),
                    "name": Field(Str(), required=True, example="Windows 11 in-place upgrade"),
                    "launch": Field(
                        Choice(choices=LaunchContext.ALL), default=LaunchContext.SOFTWARE_CENTER
                    ),
                    "variables": Field(
                        MapOf(
                            key=Str(pattern=r"[A-Za-z_][A-Za-z0-9_]*", example="OSDLanguage"),
                            value=Str(example="it-IT"),
                        ),
                        default=None,
                        doc=(
                            "Task sequence variables before the first step, e.g. "
                            "SMSTSDownloadRetryCount (default 2) or your own for step conditions."
                        ),
                    ),
                    "boot_image": Field(
                        Bool(),
                        default=False,
                        doc=(
                            "Whether the task sequence references a boot image (an OS "
                            "deployment); over a CMG it can start from Software Center since 2006."
                        ),
                    ),
                    "allow_internet": Field(
                        Bool(),
                        default=True,
                        doc=(
                            "Deployment › User Experience: 'Allow task sequence to run for client "
                            "on the Internet'."
                        ),
                    ),
                    "download": Field(
                        Choice(choices=DownloadMode.ALL),
                        default=DownloadMode.ON_DEMAND,
                        doc="Deployment › Distribution Points download option.",
                    ),
                    "steps": Field(
                        ListOf(
                            doc=(
                                "The steps, in order; a step with a package needs that "
                                "package's content."
                            ),
                            min_items=1,
                            item=STEP,
                        ),
                        required=True,
                        example=(
                            "[{name: Upgrade the operating system, action: upgrade_os, "
                            "package: PS100012}]"
                        ),
                    ),
                },
            ),
            required=True,
            example=(
                "{id: PS100020, name: Windows 11 in-place upgrade, steps: [{name: Upgrade, "
                "action: upgrade_os, package: PS100012}]}"
            ),
        ),
        "expect": Field(EXPECT, required=True, example="{outcome: success, cache: [PS100012.1]}"),
        "faults": Field(
            ListOf(item=FAULT),
            default=None,
            doc=(
                "The timeline: gateway and storage faults, CMG service stop/start and clock "
                "jumps, armed before the run, before a step, or at a virtual time."
            ),
            example=(
                "[{gateway: {endpoint: manifest, request: 1, status: 503, retry_after: '5'}}, "
                "{clock: 9h, before_step: Apply drivers}]"
            ),
        ),
        "benchmark": Field(
            BENCHMARK, default=None, fill=False, example="{baseline: hashlib, rounds: 3}"
        ),
        "markers": Field(MARKERS, default=None, example="[slow, {xfail: {reason: known gap}}]"),
        "requires": Field(
            ListOf(item=Choice(choices=tuple(APPLICABILITY))),
            default=None,
            doc=(
                "What the scenario needs of the client beyond its world; with "
                "`--cmg-download-program` (conformance mode) a scenario that requires any of "
                "these is not applicable, with the term's reason. "
                + "; ".join(f"`{name}`: {why}" for name, why in APPLICABILITY.items())
                + "."
            ),
            example="[builtin_download]",
        ),
        "builtin_expect": Field(
            ListOf(item=Choice(choices=BUILTIN_EXPECT)),
            default=None,
            doc=(
                "`expect` keys that judge how the built-in download core went about the "
                "download (its log lines, tries, waits, requests, bytes); with "
                "`--cmg-download-program` they are not judged, and the report lists them, while "
                "every other expectation still must hold. For a scenario whose whole story is "
                "the core's, use `requires: [builtin_download]` instead."
            ),
            example="[retries, elapsed, log]",
        ),
        "matrix": Field(
            MapOf(key=SET_PATH, value=ListOf(item=Anything(scalar=True), min_items=1)),
            default=None,
            doc=(
                "One item per combination of these values (keys are `set` paths), named "
                "`scenario[v1-v2]` in the order written."
            ),
            example="{client.auth: [token, certificate], cmg.site_version: [1910, 2107]}",
        ),
        "cases": Field(
            ListOf(item=CASE, min_items=1),
            default=None,
            doc=(
                "Explicit cases: each sets values and may override expectations; one item per "
                "case (times the matrix, if both are given)."
            ),
            example=(
                "[{id: site-1906, set: {cmg.site_version: 1906}, expect: {outcome: failure}}]"
            ),
        ),
        "include": Field(
            ListOf(item=Str(example="worlds/ipu-world")),
            default=None,
            doc=(
                "Shared world files merged under this one, in order: `./` or `../` paths are "
                "relative to this file, others are looked up in your fixtures folder, then in the "
                "worlds shipped with pytest-cmg; `.yaml` may be left off. "
                "This file's keys override included ones; packages merge by `id`."
            ),
            example="[worlds/ipu-world]",
        ),
    },
)

#: A package given again over an included one: only its id (or a ref) is required.
PARTIAL_PACKAGE = dataclasses.replace(PACKAGE.relaxed(keep=("id",)), required_unless="ref")


def _partial_packages(record: Record) -> Record:
    """``record`` whose packages may be partial, as in a file merged over included ones."""
    fields = dict(record.fields)
    packages = fields["packages"]
    assert isinstance(packages.spec, ListOf)
    spec = dataclasses.replace(packages.spec, item=PARTIAL_PACKAGE)
    fields["packages"] = dataclasses.replace(packages, spec=spec)
    return dataclasses.replace(record, fields=fields)


#: What a shared world (an included file) may hold: a scenario's keys, none required, and
#: packages that may only change some keys of an included world's.
FRAGMENT = _partial_packages(
    SCENARIO.relaxed(
        drop=(
            "scenario",
            "description",
            "matrix",
            "cases",
            "markers",
            "requires",
            "builtin_expect",
        )
    )
)
#: A scenario with an ``include`` as a schema sees it: it may take every key but its name from
#: the worlds it includes (collection checks the assembled file against ``SCENARIO``).
SCENARIO_WITH_INCLUDE = _partial_packages(SCENARIO.relaxed(keep=("scenario",)))
#: A catalog entry (``ref``): one package's keys, none required.
CATALOG_PACKAGE = PACKAGE.relaxed(drop=("ref",))


@dataclass(frozen=True)
class PackageSpec:
    id: str
    version: int
    name: str
    type: str
    on_cloud_dp: bool
    files: int
    size: int
    locale: str


@dataclass(frozen=True)
class DistributionPointSpec:
    """An on-premises DP of the scenario's site: the packages (declared versions) it holds."""

    fqdn: str
    #: The record's ``Locality``, as the product writes it: ``LOCAL``, ``REMOTE`` or ``SUBNET``.
    locality: str
    https: bool
    packages: tuple[str, ...]


@dataclass(frozen=True)
class BenchmarkSpec:
    """A benchmark scenario's settings (``benchmark``): its baseline and how many rounds."""

    baseline: str = "hashlib"
    rounds: int = 1


@dataclass(frozen=True)
class MarkerUse:
    """A marker to put on the items, and where the file asked for it."""

    name: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    where: str


@dataclass(frozen=True)
class TimelineEvent:
    """One ``faults`` entry: what happens and when (before the run, before a step, at a time)."""

    where: str
    kind: str
    params: dict[str, Any]
    before_step: int | None = None
    at: float | None = None
    #: ``optional: true``: the run may end without it happening.
    optional: bool = False

    def describe(self) -> str:
        if self.kind in ("gateway", "storage"):
            given = {k: v for k, v in self.params.items() if v not in (None, False)}
            what = f"{self.kind} " + ", ".join(f"{k}={v}" for k, v in given.items())
        elif self.kind == "service":
            what = f"service {self.params['service']}"
        elif self.kind == "restart":
            what = "restart"
            if self.params.get("file") is not None:
                what += f" after {self.params['after_bytes']} bytes of {self.params['file']}"
        else:
            what = f"clock +{self.params['clock']:g}s"
        if self.before_step is not None:
            return f"{what} (before step {self.before_step})"
        if self.at is not None:
            return f"{what} (at {self.at:g}s)"
        return what


@dataclass(frozen=True)
class Scenario:
    """A validated scenario (one case of a parametrised file)."""

    path: Path
    name: str
    description: str
    seed: int
    site_code: str
    cmg: CmgSettings
    client: ClientSettings
    cache_size: int
    auth: str
    packages: tuple[PackageSpec, ...]
    task_sequence: TaskSequence
    launch: str
    deployment: DeploymentSettings
    expect: dict[str, Any]
    lines: dict[str, int] = field(default_factory=dict)
    #: Paths whose line is in another file (an included world, a catalog entry).
    files: dict[str, Path] = field(default_factory=dict)
    case_id: str | None = None
    #: Where the item is declared: ``scenario``, ``cases[1]`` or ``matrix``.
    item_where: str = "scenario"
    markers: tuple[MarkerUse, ...] = ()
    timeline: tuple[TimelineEvent, ...] = ()
    #: For each case value: the path it set and where the file gives it.
    case_values: tuple[tuple[str, str, str], ...] = ()
    #: On-premises DPs listed in location replies (``distribution_points``).
    distribution_points: tuple[DistributionPointSpec, ...] = ()
    #: The roots the site's certificate trust list names (``site``, ``partner``); empty: no CTL.
    #: The runner turns them into the gateway's CA names (``CmgSettings.certificate_trust_list``).
    trust_list: tuple[str, ...] = ()
    #: Whether the CRL distribution points can be read (``cmg.crl_reachable``).
    crl_reachable: bool = True
    #: The client certificate's kind (``client.certificate``), for ``auth: certificate``.
    certificate: str = "valid"
    #: The Azure AD tenant's state (``client.tenant``), for ``auth: azure_ad``.
    tenant: str = "enabled"
    #: Set when the scenario is a benchmark (``benchmark``): storage is reached directly.
    benchmark: BenchmarkSpec | None = None
    #: Client cache entries made before the run (``client.cache``): each a declared package
    #: at another (or the same) content version.
    cache_seed: tuple[PackageSpec, ...] = ()
    #: What it needs of the client (``requires``: keys of :data:`APPLICABILITY`), in file order.
    requires: tuple[str, ...] = ()
    #: ``expect`` keys not judged with another downloader (``builtin_expect``), in file order.
    builtin_expect: tuple[str, ...] = ()
    #: Virtual seconds one restart of the computer takes (``client.restart_takes``).
    restart_takes: float = 120.0

    @property
    def restarts(self) -> bool:
        """Whether the computer restarts in the run: then every boot is a process of its own."""
        return self.task_sequence.restarts or any(e.kind == "restart" for e in self.timeline)

    @property
    def item_name(self) -> str:
        """The pytest item name: ``name`` or ``name[case]``."""
        return self.name if self.case_id is None else f"{self.name}[{self.case_id}]"

    def line(self, where: str) -> int:
        """The file line of a dotted path such as ``expect.outcome``."""
        return self.location(where)[1]

    def location(self, where: str) -> tuple[Path, int]:
        """The file and line of a dotted path (an included file's, if it came from one)."""
        return Validation(self.path, lines=self.lines, files=self.files).location(where)


def load_scenario(path: Path, *, fixtures: Path | None = None) -> Scenario:
    """Load and validate a scenario file that has a single case.

    :class:`ScenarioError` lists every problem in it; a parametrised file is a problem here too
    (use :func:`load_scenarios`).
    """
    scenarios = load_scenarios(path, fixtures=fixtures)
    if len(scenarios) != 1:
        where = scenarios[0].item_where
        ids = ", ".join(s.case_id or "" for s in scenarios)
        raise ScenarioError(
            [
                ScenarioProblem(
                    path,
                    scenarios[0].line(where),
                    clip(f"this file is parametrised into {len(scenarios)} cases ({ids})"),
                    "load it with load_scenarios, or run one case by its item ID",
                )
            ]
        )
    return scenarios[0]


def load_scenarios(path: Path, *, fixtures: Path | None = None) -> list[Scenario]:
    """Load and validate a scenario file: one :class:`Scenario` per case, in the file's order.

    Includes are resolved (``./`` and ``../`` relative to the naming file, other paths to
    ``fixtures``, by default the nearest ``fixtures`` folder above the file), then the file is
    validated as written, then each case with its values set. :class:`ScenarioError` lists every
    problem of the file and of what it includes, each at its own file and line.
    """
    v = Validation(path)
    root = compose_file(path, v, empty_is_problem=True)
    if root is None:
        raise ScenarioError(_sorted(v.problems, path))
    assembler = Assembler(
        v, fragment=FRAGMENT, catalog=CATALOG_PACKAGE, fixtures=fixtures, find=find_fixtures
    )
    merged = assembler.assemble(root)
    # Included files were checked on their own while assembling, with paths as they read in
    # that file; the merged check finds the same mistakes again under merged paths.
    assembled = len(v.problems)
    data = SCENARIO.check(merged, "", v)
    if isinstance(data, dict):
        _cross_check(data, v)
    seen = {(p.path, p.line) for p in v.problems[:assembled]}
    v.problems[assembled:] = [
        p for p in v.problems[assembled:] if p.path == path or (p.path, p.line) not in seen
    ]
    plans = plan_cases(merged, SCENARIO, v, max_cases=MAX_CASES)
    if len(plans) * v.composed > MAX_CASE_VALUES:
        # Each item is validated and built from the whole tree: bound the product, not only
        # each factor, or 256 cases of a 10,000-value file would take minutes to collect.
        file, line = v.location("matrix" if "matrix" in v.lines else "cases")
        v.problems.append(
            v.make(
                file,
                line,
                f"this file makes {len(plans)} items of {v.composed:,} YAML values each; all "
                f"items together may hold at most {MAX_CASE_VALUES:,}",
                "each item is validated on its own: give fewer cases, or move the long lists "
                "out of the parametrised file",
            )
        )
        raise ScenarioError(_sorted(v.problems, path))
    if not plans:
        if v.problems:
            raise ScenarioError(_sorted(v.problems, path))
        return [_build(path, data, v, None)]
    reported = {(p.path, p.line) for p in v.problems}
    extra: dict[tuple[Path, int, str, str], list[str]] = {}
    built: list[Scenario] = []
    for plan in plans:
        cv = Validation(path, included_from=v.included_from)
        tree = plan.apply(merged, cv)
        case_data = SCENARIO.check(tree, "", cv) if tree is not None else None
        if isinstance(case_data, dict):
            _cross_check(case_data, cv)
        for p in cv.problems:
            if (p.path, p.line) not in reported:
                extra.setdefault((p.path, p.line, p.rule, p.hint), []).append(plan.id)
        if not cv.problems and isinstance(case_data, dict):
            built.append(_build(path, case_data, cv, plan))
    for (file, line, rule, hint), ids in extra.items():
        which = clip(f"in case{'s' if len(ids) > 1 else ''} {', '.join(ids)}")
        v.problems.append(ScenarioProblem(file, line, rule, f"{hint}; {which}" if hint else which))
    if v.problems:
        raise ScenarioError(_sorted(v.problems, path))
    return built


def _sorted(problems: list[ScenarioProblem], path: Path) -> list[ScenarioProblem]:
    """Unique problems, the file's own first (by line), then each included file's."""
    unique = list(dict.fromkeys(problems))
    return sorted(unique, key=lambda p: (p.path != path, str(p.path), p.line))


def _build(path: Path, data: dict[str, Any], v: Validation, plan: CasePlan | None) -> Scenario:
    ts = data["task_sequence"]
    cmg = data["cmg"]
    packages = tuple(
        PackageSpec(**{k: p[k] for k in PackageSpec.__dataclass_fields__}) for p in data["packages"]
    )
    sequence = TaskSequence(
        package_id=ts["id"],
        name=ts["name"],
        steps=tuple(
            Step(
                s["name"],
                s["action"],
                s["package"] or (s["packages"] or [None])[0],
                _conditions(s["condition"]),
                destination=s["destination"],
                path=s["path"],
                variable=s["variable"],
                extra_packages=tuple((s["packages"] or [])[1:]),
                setup=(
                    Setup(
                        s["setup"]["restarts"],
                        s["setup"]["result"],
                        int(s["setup"]["code"], 16),
                    )
                    if s["setup"] is not None
                    else None
                ),
            )
            for s in ts["steps"]
        ),
        package_versions={p.id: p.version for p in packages},
        boot_image=ts["boot_image"],
        variables=dict(ts["variables"] or {}),
    )
    markers = [
        MarkerUse(m[0], m[1], m[2], f"markers[{i}]")
        for i, m in enumerate(data["markers"] or [])
        if m is not None
    ]
    if plan is not None:
        markers += [
            MarkerUse(m[0], m[1], m[2], where) for where, m in plan.markers(data) if m is not None
        ]
    benchmark = data["benchmark"]
    if benchmark is not None and not any(m.name == "benchmark" for m in markers):
        # What ``-m benchmark`` / ``-m "not benchmark"`` select on, without the file saying it.
        markers.append(MarkerUse("benchmark", (), {}, "benchmark"))
    steps = {s["name"]: i for i, s in reversed(list(enumerate(ts["steps"])))}
    timeline = tuple(
        TimelineEvent(
            where=f"faults[{i}]",
            kind=next(k for k in TIMELINE_KINDS if f[k] is not None),
            params=(
                f["gateway"]
                if f["gateway"] is not None
                else f["storage"]
                if f["storage"] is not None
                else f["restart"]
                if f["restart"] is not None
                else {"service": f["service"], "clock": f["clock"]}
            ),
            before_step=steps.get(f["before_step"]) if f["before_step"] is not None else None,
            at=f["at"],
            optional=bool(f["optional"]),
        )
        for i, f in enumerate(data["faults"] or [])
    )
    return Scenario(
        path=path,
        name=data["scenario"],
        description=data["description"],
        seed=data["seed"],
        site_code=data["site"]["code"],
        cmg=CmgSettings(
            content_enabled=cmg["content_enabled"],
            site_version=cmg["site_version"],
            egress_threshold_gb=cmg["egress_threshold_gb"],
            stop_when_critical=cmg["stop_when_critical"],
            prefer_cloud_sources=cmg["prefer_cloud_sources"],
            classic_cloud_dp=cmg["classic_cloud_dp"],
            crl_check=cmg["crl_check"],
            measure_egress=cmg["measure_egress"],
        ),
        client=ClientSettings(
            enable_cmg=data["client"]["enable_cmg"],
            allow_cloud_dp=data["client"]["allow_cloud_dp"],
        ),
        cache_size=data["client"]["cache_size"],
        restart_takes=data["client"]["restart_takes"],
        auth=data["client"]["auth"],
        packages=packages,
        task_sequence=sequence,
        launch=ts["launch"],
        deployment=DeploymentSettings(
            allow_internet=ts["allow_internet"], download_mode=ts["download"]
        ),
        expect=data["expect"],
        lines=v.lines,
        files=v.files,
        case_id=plan.id if plan else None,
        item_where=plan.where if plan else "scenario",
        markers=tuple(markers),
        timeline=timeline,
        case_values=plan.values if plan else (),
        distribution_points=tuple(
            DistributionPointSpec(
                fqdn=dp["fqdn"],
                locality=dp["locality"].upper(),
                https=dp["https"],
                packages=tuple(dict.fromkeys(dp["packages"])),
            )
            for dp in data["distribution_points"] or []
        ),
        trust_list=tuple(dict.fromkeys(cmg["certificate_trust_list"] or [])),
        crl_reachable=cmg["crl_reachable"],
        certificate=data["client"]["certificate"],
        tenant=data["client"]["tenant"],
        benchmark=(
            BenchmarkSpec(baseline=benchmark["baseline"], rounds=benchmark["rounds"])
            if benchmark is not None
            else None
        ),
        cache_seed=tuple(
            dataclasses.replace(
                next(p for p in packages if p.id == seeded["package"]), version=seeded["version"]
            )
            for seeded in data["client"]["cache"] or []
        ),
        requires=tuple(dict.fromkeys(r for r in data["requires"] or [] if r is not None)),
        builtin_expect=tuple(
            dict.fromkeys(k for k in data["builtin_expect"] or [] if k is not None)
        ),
    )


def _conditions(spec: dict[str, Any] | None) -> tuple[Condition, ...]:
    if spec is None:
        return ()
    if spec.get("exists"):
        return (Condition(spec["variable"], "exists"),)
    if spec.get("not_equals") is not None:
        return (Condition(spec["variable"], "not_equals", spec["not_equals"]),)
    return (Condition(spec["variable"], "equals", spec.get("equals") or ""),)


def _cross_check(data: dict[str, Any], v: Validation) -> None:
    """Rules that span sections: references must name declared packages, IDs must be unique.

    Runs even when other problems were found, so a file's problems are all reported at once;
    a value that failed its own check is ``None`` here and is skipped, and references are only
    judged when every declaration could be read (else they would be reported as dangling).
    """

    def problem(where: str, rule: str, hint: str = "") -> None:
        file, line = v.location(where)
        v.problems.append(v.make(file, line, rule, hint))

    def records(value: Any) -> list[tuple[int, dict[str, Any]]]:  # noqa: ANN401
        return [(i, r) for i, r in enumerate(value or []) if isinstance(r, dict)]

    sequence: dict[str, Any] = data.get("task_sequence") or {}
    steps = records(sequence.get("steps"))
    names = [str(s["name"]) for _, s in steps if s.get("name") is not None]
    for index, event in records(data.get("faults")):
        _check_fault(event, f"faults[{index}]", names, problem)

    _check_settings(data, problem)
    _check_benchmark(data, problem)
    points = records(data.get("distribution_points"))
    fqdns: dict[str, int] = {}
    for index, point in points:
        fqdn = point.get("fqdn")
        if fqdn is None:
            continue
        if fqdn.lower() in fqdns:
            problem(
                f"distribution_points[{index}].fqdn",
                f"distribution point {fqdn} is listed twice",
                f"first at distribution_points[{fqdns[fqdn.lower()]}]; give it every package once",
            )
        else:
            fqdns[fqdn.lower()] = index

    packages = records(data.get("packages"))
    declared: dict[str, int | None] = {}
    complete = isinstance(data.get("packages"), list) and len(packages) == len(data["packages"])
    for index, package in packages:
        package_id = package.get("id")
        if package_id is None:
            complete = False
            continue
        if package_id in declared:
            problem(f"packages[{index}].id", f"package {package_id} is declared twice")
        else:
            declared[package_id] = package.get("version")
        files, size = package.get("files"), package.get("size")
        if files is not None and files > MAX_PACKAGE_FILES:
            # Here, not in the spec, so the value's description stays "an integer >= 1".
            problem(
                f"packages[{index}].files",
                f"package {package_id}: {shown(files)} files, more than the "
                f"{MAX_PACKAGE_FILES:,} a package may have",
                "each file is one upload and one download: a few hundred make the point",
            )
        elif files is not None and size is not None and files > size:
            problem(
                f"packages[{index}].files",
                f"{files} files cannot share {size} bytes",
                "give each file at least one byte",
            )
        elif files is not None and size is not None:
            _check_largest_file(package, f"packages[{index}]", problem)
    sizes = [p["size"] for _, p in packages if isinstance(p.get("size"), int)]
    if sum(sizes) > MAX_SCENARIO_BYTES:
        problem(
            "packages",
            f"the packages total {human_size(sum(sizes))}, more than the "
            f"{human_size(MAX_SCENARIO_BYTES)} a scenario may generate",
            "Azurite keeps every uploaded package in memory and the client cache as much on "
            "disk: split the scenario, or make the packages smaller",
        )
    if not complete:
        return
    _check_fault_files(data, [p for _, p in packages], problem)
    known = ", ".join(declared) or "none"
    for index, step in steps:
        condition = step.get("condition")
        if isinstance(condition, dict):
            given = [k for k in ("equals", "not_equals", "exists") if condition.get(k) is not None]
            if len(given) != 1:
                problem(
                    f"task_sequence.steps[{index}].condition",
                    "a condition needs exactly one of equals, not_equals, exists",
                    f"given: {', '.join(given) or 'none'}",
                )
        _check_content_options(step, f"task_sequence.steps[{index}]", problem)
        if step.get("package") is not None and step["package"] not in declared:
            problem(
                f"task_sequence.steps[{index}].package",
                f"step references package {step['package']}, which is not declared",
                f"declared packages: {known}",
            )
        listed = step.get("packages") or []
        for slot, package_id in enumerate(listed):
            if package_id is not None and package_id not in declared:
                problem(
                    f"task_sequence.steps[{index}].packages[{slot}]",
                    f"step references package {package_id}, which is not declared",
                    f"declared packages: {known}",
                )
            elif package_id in listed[:slot]:
                problem(
                    f"task_sequence.steps[{index}].packages[{slot}]",
                    f"package {package_id} is listed twice in the step",
                )
    for index, point in points:
        for slot, package_id in enumerate(point.get("packages") or []):
            if package_id is not None and package_id not in declared:
                problem(
                    f"distribution_points[{index}].packages[{slot}]",
                    f"distribution point {point.get('fqdn')} holds package {package_id}, "
                    "which is not declared",
                    f"declared packages: {known}",
                )
    seeded = _check_cache_seed(data, packages, declared, problem)
    expect: dict[str, Any] = data.get("expect") or {}
    for index, key in enumerate(expect.get("cache") or []):
        if key is None:
            continue
        package_id, _, version = key.rpartition(".")
        if package_id not in declared:
            problem(
                f"expect.cache[{index}]",
                f"cache entry {key} names an undeclared package",
                f"declared packages: {known}",
            )
        elif (
            declared[package_id] is not None
            and declared[package_id] != int(version)
            and key not in seeded
        ):
            problem(
                f"expect.cache[{index}]",
                f"cache entry {key} is not the declared version {declared[package_id]}, nor "
                "an entry of client.cache",
                f"expect {package_id}.{declared[package_id]}, or seed {key} with client.cache",
            )
    for index, package_id in enumerate(expect.get("downloaded") or []):
        if package_id is not None and package_id not in declared:
            problem(
                f"expect.downloaded[{index}]",
                f"downloaded names undeclared package {package_id}",
                f"declared packages: {known}",
            )
    for key in ("storage_bytes", "throughput"):
        for package_id in expect.get(key) or {}:
            if package_id not in declared:
                problem(
                    f"expect.{key}.{package_id}",
                    f"{key} names undeclared package {package_id}",
                    f"declared packages: {known}",
                )
    if expect.get("outcome") == "success" and expect.get("exit_code") not in (None, "0x00000000"):
        problem("expect.exit_code", "a successful outcome has exit code 0x00000000")


def _check_cache_seed(
    data: dict[str, Any],
    packages: list[tuple[int, dict[str, Any]]],
    declared: dict[str, int | None],
    problem: Callable[..., None],
) -> set[str]:
    """``client.cache``: declared packages, each entry once, all of them within the cache.

    Returns the keys (``PS100012.2``) of the entries the run starts with.
    """
    keys: set[str] = set()
    sizes = {p.get("id"): p.get("size") for _, p in packages}
    total = 0
    client = data.get("client") or {}
    for index, seeded in enumerate(client.get("cache") or []):
        if not isinstance(seeded, dict) or seeded.get("package") is None:
            continue
        package_id, version = seeded["package"], seeded.get("version")
        where = f"client.cache[{index}]"
        if package_id not in declared:
            problem(
                f"{where}.package",
                f"client.cache entry names undeclared package {package_id}",
                f"declared packages: {', '.join(declared) or 'none'}; an entry's content is "
                "generated like its package's",
            )
            continue
        if version is None:
            continue
        key = f"{package_id}.{version}"
        if key in keys:
            problem(f"{where}.version", f"client.cache lists {key} twice", "list each entry once")
            continue
        keys.add(key)
        size = sizes.get(package_id)
        total += size if isinstance(size, int) else 0
    capacity = client.get("cache_size")
    if isinstance(capacity, int) and total > capacity:
        problem(
            "client.cache",
            f"the client.cache entries hold {human_size(total)}, more than the "
            f"{human_size(capacity)} client.cache_size",
            "give a larger cache_size, or fewer entries",
        )
    return keys


def _check_fault_files(
    data: dict[str, Any], packages: list[dict[str, Any]], problem: Callable[..., None]
) -> None:
    """Each storage fault's ``file`` against the blob names of the packages on the cloud DP.

    A ``file`` that names no blob makes a fault that can never fire; found here, before any
    content is generated, from the file names alone (:func:`~.content.package_file_names`).
    """
    faults = [
        (index, event["storage"]["file"])
        for index, event in enumerate(data.get("faults") or [])
        if isinstance(event, dict)
        and isinstance(event.get("storage"), dict)
        and event["storage"].get("file") is not None
    ]
    seed = data.get("seed")
    if not faults or seed is None:
        return
    blobs: list[str] = []
    for package in packages:
        if not package.get("on_cloud_dp", True):
            continue
        keys = ("id", "version", "type", "files", "locale")
        if any(package.get(k) is None for k in keys) or package["files"] > MAX_PACKAGE_FILES:
            return  # already reported; the names cannot be known
        spec = PackageSpec(
            id=package["id"],
            version=package["version"],
            name="",
            type=package["type"],
            on_cloud_dp=True,
            files=package["files"],
            size=0,
            locale=package["locale"],
        )
        prefix = f"{spec.id}.{spec.version}/"
        blobs += [prefix + name for name in package_file_names(spec, seed)]
    for index, file in faults:
        if any(file in blob for blob in blobs):
            continue
        # Suggested as written most often: a base name, a path in the package, a blob name,
        # or a whole package (``PS100012.3/``).
        names = sorted(
            {
                *blobs,
                *(blob.rsplit("/", 1)[-1] for blob in blobs),
                *(blob.split("/", 1)[1] for blob in blobs),
                *(blob.split("/", 1)[0] + "/" for blob in blobs),
            }
        )
        near = (
            difflib.get_close_matches(file, names, n=3, cutoff=0.0)
            if len(file) <= SHOWN_CHARS
            else []
        )
        hint = f"nearest: {', '.join(repr(n) for n in near)}; " if near else ""
        problem(
            f"faults[{index}].storage.file",
            f"storage fault file {shown(file)} names no blob of the packages on the cloud DP "
            f"({len(blobs)} file(s)): it must be part of a blob name <PackageID>.<version>/<path>",
            f"{hint}file names come from the seed, the package's type, file count and locale",
        )


def _check_largest_file(package: dict[str, Any], where: str, problem: Callable[..., None]) -> None:
    """A package's largest generated file against :data:`~.limits.MAX_FILE_BYTES`."""
    files, size = package["files"], package["size"]
    main = OS_UPGRADE_MAIN_SHARE if package.get("type") == "os_upgrade" else None
    largest = largest_file(size, files, main)
    if largest <= MAX_FILE_BYTES:
        return
    if main is not None and files > 1:
        what = f"its install.wim takes {OS_UPGRADE_MAIN_SHARE:.0%} of it"
        fix = (
            f"an os_upgrade package may be at most "
            f"{human_size(int(MAX_FILE_BYTES / OS_UPGRADE_MAIN_SHARE))}"
        )
    else:
        what = f"{files} file(s) share it evenly"
        need = -(-size // MAX_FILE_BYTES)
        fix = f"give it at least {need} files, or a smaller size"
    problem(
        f"{where}.size",
        f"package {package.get('id') or where}: its largest file would be "
        f"{human_size(largest)} ({what}), more than the {human_size(MAX_FILE_BYTES)} a "
        "generated file may have",
        fix,
    )


def _check_settings(data: dict[str, Any], problem: Callable[..., None]) -> None:
    """Settings that only make sense together: the 2107 gate, client variants and their auth."""
    cmg: dict[str, Any] = data.get("cmg") or {}
    version = cmg.get("site_version")
    if cmg.get("classic_cloud_dp") and version is not None:
        try:
            CmgSettings(site_version=version, classic_cloud_dp=True)
        except ValueError:
            # The rule itself lives in CmgSettings; here it is reported at the file's line.
            problem(
                "cmg.classic_cloud_dp",
                f"a classic cloud distribution point cannot be created on a site of version "
                f"{version}: from {NO_NEW_CLASSIC_CLOUD_DP_SINCE} on, content comes from a "
                "content-enabled CMG only",
                f"use classic_cloud_dp: false, or a site_version before "
                f"{NO_NEW_CLASSIC_CLOUD_DP_SINCE} (e.g. 2103)",
            )
    client: dict[str, Any] = data.get("client") or {}
    auth = client.get("auth")
    if auth is None:
        return
    for key, default, needs in (
        ("certificate", "valid", "certificate"),
        ("tenant", "enabled", "azure_ad"),
    ):
        value = client.get(key)
        if value not in (None, default) and auth != needs:
            problem(
                f"client.{key}",
                f"client.{key}: {value} needs client.auth: {needs} (the client uses {auth})",
                f"set client.auth: {needs}, or leave {key} out",
            )


#: Why a benchmark scenario refuses what needs a proxy between the client and storage.
_NO_PROXY = (
    "a benchmark scenario's client reaches storage directly: {what} needs a Python proxy "
    "between them, which would be the bottleneck the benchmark measures"
)


def _check_benchmark(data: dict[str, Any], problem: Callable[..., None]) -> None:
    """``benchmark`` against what needs the fault proxy, at the line of what needs it."""
    expect: dict[str, Any] = data.get("expect") or {}
    if data.get("benchmark") is None:
        if expect.get("throughput"):
            problem(
                "expect.throughput",
                "expect.throughput needs a benchmark key: the rate is measured against the "
                "benchmark's baseline",
                "add benchmark: {baseline: hashlib}",
            )
        return
    for index, event in enumerate(data.get("faults") or []):
        if isinstance(event, dict) and event.get("storage") is not None:
            problem(
                f"faults[{index}].storage",
                _NO_PROXY.format(what="a storage fault"),
                "move this fault to a scenario without benchmark; gateway faults are allowed",
            )
        if isinstance(event, dict) and event.get("restart") is not None:
            problem(
                f"faults[{index}].restart",
                "a benchmark times one uninterrupted run in this process; a restart runs each "
                "boot as a process of its own",
                "move the restart to a scenario without benchmark",
            )
    for index, step in enumerate((data.get("task_sequence") or {}).get("steps") or []):
        if isinstance(step, dict) and (
            step.get("action") == "restart_computer" or step.get("setup") is not None
        ):
            problem(
                f"task_sequence.steps[{index}]",
                "a benchmark times one uninterrupted run in this process; this step restarts "
                "the computer",
                "move the restarting step to a scenario without benchmark",
            )
    for key in ("storage_bytes", "storage_requests"):
        if expect.get(key) is not None:
            problem(
                f"expect.{key}",
                _NO_PROXY.format(what=f"expect.{key} (counted by the fault proxy)"),
                "expect.downloaded and expect.cache say what was read",
            )
    if (data.get("cmg") or {}).get("measure_egress"):
        problem(
            "cmg.measure_egress",
            _NO_PROXY.format(what="measured egress (a counting proxy)"),
            "leave measure_egress out: egress is then counted by manifest size",
        )


def _check_content_options(step: dict[str, Any], where: str, problem: Callable[..., None]) -> None:
    """A step's content location options: the rules of :class:`Step`, at their lines."""
    destination, path = step.get("destination"), step.get("path")
    content_step = step.get("action") == DOWNLOAD_PACKAGE_CONTENT
    for key in ("destination", "variable", "packages"):
        if step.get(key) is not None and not content_step:
            problem(f"{where}.{key}", f"{key} belongs to {DOWNLOAD_PACKAGE_CONTENT} steps")
    if step.get("setup") is not None and step.get("action") != "upgrade_os":
        problem(f"{where}.setup", "setup belongs to upgrade_os steps (Windows Setup's restarts)")
    if step.get("action") == "restart_computer":
        for key in ("package", "packages"):
            if step.get(key) is not None:
                problem(f"{where}.{key}", "a restart_computer step uses no package")
    if step.get("package") is not None and step.get("packages") is not None:
        problem(f"{where}.packages", "give package or packages, not both")
    if destination == ContentDestination.CUSTOM and path is None:
        problem(f"{where}.destination", "a custom destination needs a path")
    if path is not None and destination != ContentDestination.CUSTOM:
        problem(f"{where}.path", "path goes with destination: custom")
    if path is not None:
        try:
            custom_path_parts(path)
        except ValueError as error:
            problem(f"{where}.path", str(error))


def _check_fault(
    event: dict[str, Any],
    where: str,
    steps: list[str],
    problem: Callable[..., None],
) -> None:
    step = event.get("before_step")
    if step is not None and step not in steps:
        near = nearest(step, steps)
        problem(
            f"{where}.before_step",
            f"before_step names no step: {shown(step)}",
            f"did you mean {near!r}?" if near else f"steps: {', '.join(steps)}",
        )
    if step is not None and event.get("at") is not None:
        problem(f"{where}.at", "a timeline event fires before_step or at a time, not both")
    restart = event.get("restart")
    if isinstance(restart, dict):
        mid_download = restart.get("after_bytes") is not None
        if mid_download != (restart.get("file") is not None):
            problem(
                f"{where}.restart",
                "a restart in the middle of a download names the file and the bytes after "
                "which the power is cut",
                "give both file and after_bytes, or neither (then before_step or at)",
            )
        elif not mid_download and step is None and event.get("at") is None:
            problem(
                f"{where}.restart",
                "a restart needs a moment: before_step, at, or file and after_bytes",
            )
    gateway = event.get("gateway")
    effects: tuple[str, ...]
    if isinstance(gateway, dict):
        effects = ("status", "delay", "drop", "truncate", "wrong_hash", "sas_ttl", "package_hash")
        if not any(gateway.get(k) not in (None, False) for k in effects):
            problem(
                f"{where}.gateway",
                "this gateway fault does nothing",
                f"give one of {', '.join(effects)}",
            )
        for key, endpoint in (
            ("wrong_hash", Endpoint.MANIFEST),
            ("sas_ttl", Endpoint.MANIFEST),
            ("package_hash", Endpoint.LOCATION),
        ):
            if gateway.get(key) not in (None, False) and gateway.get("endpoint") != endpoint:
                problem(f"{where}.gateway.{key}", f"{key} needs endpoint: {endpoint}")
        if gateway.get("retry_after") is not None and gateway.get("status") is None:
            problem(f"{where}.gateway.retry_after", "retry_after goes with a status")
    storage = event.get("storage")
    if isinstance(storage, dict):
        # The fault proxy's vocabulary, spelled once (FaultKind).
        effects = get_args(FaultKind)
        if not any(storage.get(k) not in (None, False) for k in effects):
            problem(
                f"{where}.storage",
                "this storage fault does nothing",
                f"give one of {', '.join(effects)}",
            )
        if (storage.get("stall_after") is None) != (storage.get("stall_for") is None):
            key = "stall_for" if storage.get("stall_after") is None else "stall_after"
            problem(f"{where}.storage.{key}", "stall_after and stall_for go together")
        for key in ("retry_after", "error_code"):
            if storage.get(key) is not None and storage.get("respond") is None:
                problem(f"{where}.storage.{key}", f"{key} goes with respond")
