"""The scenario language's definition: ``SCENARIO``, a ``case``, and the forms an included world
(``FRAGMENT``), a scenario with ``include`` and a catalog entry take.

docs/scenarios.md and docs/scenario.schema.json are generated from these records
(:mod:`.reference`, :mod:`.schema`); their parts are in :mod:`.vocabulary`.
"""

from __future__ import annotations

import dataclasses

from .._client.cache import DEFAULT_CACHE_MB
from .._protocol.settings import SITE_VERSIONS, DownloadMode, LaunchContext
from .spec import (
    Anything,
    Bool,
    Choice,
    Duration,
    Field,
    Int,
    ListOf,
    MapOf,
    Number,
    Record,
    Size,
    Str,
)
from .vocabulary import (
    APPLICABILITY,
    AUTH_METHODS,
    BENCHMARK,
    BUILTIN_EXPECT,
    CACHE_SEED,
    CASE_ID,
    CERTIFICATES,
    DISTRIBUTION_POINT,
    EXPECT,
    FAULT,
    MARKERS,
    PACKAGE,
    PACKAGE_ID,
    SET_PATH,
    STEP,
    TENANT_STATES,
    TRUST_ROOTS,
    VARIABLES,
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
            Str(nonempty=True, example="on-demand upgrade over the CMG"),
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
                    "name": Field(
                        Str(nonempty=True, example="Windows 11 in-place upgrade"),
                        required=True,
                        example="Windows 11 in-place upgrade",
                    ),
                    "launch": Field(
                        Choice(choices=LaunchContext.ALL), default=LaunchContext.SOFTWARE_CENTER
                    ),
                    "variables": Field(
                        VARIABLES,
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
