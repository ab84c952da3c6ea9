"""The scenario language: its definition (``SCENARIO``), and loading a file into a :class:`Scenario`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import yaml

from .._client.cache import DEFAULT_CACHE_MB
from .._client.engine import STEP_ACTIONS, Condition, Step, TaskSequence
from .._errors import ScenarioError, ScenarioProblem
from .._protocol.settings import (
    SITE_VERSIONS,
    ClientSettings,
    CmgSettings,
    DeploymentSettings,
    DownloadMode,
    LaunchContext,
)
from .spec import Bool, Choice, Field, Int, ListOf, MapOf, Number, Record, Size, Str, Validation

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["SCENARIO", "PackageSpec", "Scenario", "load_scenario"]

PACKAGE_ID = Str(
    pattern=r"[A-Z0-9]{3}[0-9A-F]{5}",
    example="PS100012",
    doc="A package ID in the product's form: site code and five hex digits.",
)
PACKAGE_TYPES = ("package", "os_upgrade", "driver", "application")
LOCALES = ("en_US", "it_IT", "ja_JP")
OUTCOMES = ("success", "failure")
AUTH_METHODS = ("token", "certificate")

SCENARIO = Record(
    doc="One scenario: a world (site, CMG, packages), a client, a task sequence and expectations.",
    fields={
        "scenario": Field(Str(), required=True, doc="The test name shown by pytest."),
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
                            "CMG setting 'Allow CMG to function as a cloud distribution point and serve "
                            "content from Azure storage'."
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
                            "(CCM_Proxy_ServerAuth) or a PKI client certificate over mutual TLS "
                            "(CCM_Proxy_MutualAuth)."
                        ),
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
                            "Client setting 'Allow access to cloud distribution point' (sends UseAzure)."
                        ),
                    ),
                    "cache_size": Field(
                        Size(),
                        default=DEFAULT_CACHE_MB * 1024 * 1024,
                        doc="Client cache size (default 5120MiB).",
                    ),
                },
            ),
        ),
        "packages": Field(
            ListOf(
                doc=(
                    "Packages (and their content versions) referenced by the task sequence; "
                    "content is generated from the seed."
                ),
                min_items=1,
                item=Record(
                    fields={
                        "id": Field(PACKAGE_ID, required=True),
                        "version": Field(Int(minimum=1), default=1, doc="Content version."),
                        "name": Field(Str(), default=""),
                        "type": Field(Choice(choices=PACKAGE_TYPES), default="package"),
                        "on_cloud_dp": Field(
                            Bool(),
                            default=True,
                            doc=("Whether this version is distributed to the content-enabled CMG."),
                        ),
                        "files": Field(Int(minimum=1), default=1, doc="Number of generated files."),
                        "size": Field(
                            Size(), required=True, doc="Total generated size, e.g. 8MiB."
                        ),
                        "locale": Field(
                            Choice(choices=LOCALES),
                            default="en_US",
                            doc="Faker locale for file names.",
                        ),
                    },
                ),
            ),
            required=True,
        ),
        "task_sequence": Field(
            Record(
                doc="The task sequence and its deployment's options.",
                fields={
                    "id": Field(PACKAGE_ID, required=True),
                    "name": Field(Str(), required=True),
                    "launch": Field(
                        Choice(choices=LaunchContext.ALL), default=LaunchContext.SOFTWARE_CENTER
                    ),
                    "variables": Field(
                        MapOf(
                            key=Str(pattern=r"[A-Za-z_][A-Za-z0-9_]*", example="OSDLanguage"),
                            value=Str(),
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
                            "Deployment › User Experience: 'Allow task sequence to run for client on the "
                            "Internet'."
                        ),
                    ),
                    "download": Field(
                        Choice(choices=DownloadMode.ALL),
                        default=DownloadMode.ON_DEMAND,
                        doc="Deployment › Distribution Points download option.",
                    ),
                    "steps": Field(
                        ListOf(
                            doc="The steps, in order; a step with a package needs that package's content.",
                            min_items=1,
                            item=Record(
                                fields={
                                    "name": Field(Str(), required=True),
                                    "action": Field(Choice(choices=STEP_ACTIONS), required=True),
                                    "package": Field(PACKAGE_ID, default=None),
                                    "condition": Field(
                                        Record(
                                            doc=(
                                                "Run the step only when this holds: give "
                                                "`variable` and one of `equals`, `not_equals` "
                                                "or `exists: true`."
                                            ),
                                            fields={
                                                "variable": Field(Str(), required=True),
                                                "equals": Field(Str(), default=None),
                                                "not_equals": Field(Str(), default=None),
                                                "exists": Field(Bool(), default=None),
                                            },
                                        ),
                                        default=None,
                                    ),
                                }
                            ),
                        ),
                        required=True,
                    ),
                },
            ),
            required=True,
        ),
        "expect": Field(
            Record(
                doc="What must hold after the run; each failed expectation is reported at its line.",
                fields={
                    "outcome": Field(Choice(choices=OUTCOMES), required=True),
                    "exit_code": Field(
                        Str(pattern=r"0x[0-9A-Fa-f]{8}", example="0x80040102"),
                        default=None,
                        doc="The task sequence's exit code.",
                    ),
                    "cache": Field(
                        ListOf(
                            item=Str(pattern=r"[A-Z0-9]{3}[0-9A-F]{5}\.\d+", example="PS100012.1")
                        ),
                        default=None,
                        doc="Exactly these verified entries are in the cache.",
                    ),
                    "downloaded": Field(
                        ListOf(item=PACKAGE_ID),
                        default=None,
                        doc=(
                            "Exactly these packages were read from storage (proves on-demand behaviour)."
                        ),
                    ),
                    "requests": Field(
                        Record(
                            doc="Gateway request counts by endpoint (location, manifest).",
                            fields={
                                "location": Field(Int(minimum=0), default=None),
                                "manifest": Field(Int(minimum=0), default=None),
                            },
                        ),
                        default=None,
                        doc="Gateway request counts by endpoint.",
                    ),
                    "log": Field(
                        ListOf(item=Str()),
                        default=None,
                        doc="Regular expressions that must each match a smsts.log line.",
                    ),
                    "gateway_log": Field(
                        ListOf(item=Str()),
                        default=None,
                        doc="Regular expressions that must each match a gateway log line.",
                    ),
                },
            ),
            required=True,
        ),
    },
)


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
class Scenario:
    """A validated scenario file."""

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

    def line(self, where: str) -> int:
        """The file line of a dotted path such as ``expect.outcome``."""
        return Validation(self.path, lines=self.lines).line(where)


def load_scenario(path: Path) -> Scenario:
    """Load and validate a scenario file; :class:`ScenarioError` lists every problem in it."""
    try:
        node = yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        raise ScenarioError(
            [ScenarioProblem(path, line, f"not valid YAML: {exc.problem}")]
        ) from exc
    if node is None:
        raise ScenarioError([ScenarioProblem(path, 1, "the file is empty")])
    v = Validation(path)
    data = SCENARIO.check(node, "", v)
    if isinstance(data, dict):
        _cross_check(data, v)
    if v.problems:
        raise ScenarioError(sorted(v.problems, key=lambda p: p.line))
    ts = data["task_sequence"]
    packages = tuple(PackageSpec(**p) for p in data["packages"])
    sequence = TaskSequence(
        package_id=ts["id"],
        name=ts["name"],
        steps=tuple(
            Step(s["name"], s["action"], s["package"], _conditions(s["condition"]))
            for s in ts["steps"]
        ),
        package_versions={p.id: p.version for p in packages},
        boot_image=ts["boot_image"],
        variables=dict(ts["variables"] or {}),
    )
    return Scenario(
        path=path,
        name=data["scenario"],
        description=data["description"],
        seed=data["seed"],
        site_code=data["site"]["code"],
        cmg=CmgSettings(
            content_enabled=data["cmg"]["content_enabled"],
            site_version=data["cmg"]["site_version"],
            egress_threshold_gb=data["cmg"]["egress_threshold_gb"],
            stop_when_critical=data["cmg"]["stop_when_critical"],
        ),
        client=ClientSettings(
            enable_cmg=data["client"]["enable_cmg"],
            allow_cloud_dp=data["client"]["allow_cloud_dp"],
        ),
        cache_size=data["client"]["cache_size"],
        auth=data["client"]["auth"],
        packages=packages,
        task_sequence=sequence,
        launch=ts["launch"],
        deployment=DeploymentSettings(
            allow_internet=ts["allow_internet"], download_mode=ts["download"]
        ),
        expect=data["expect"],
        lines=v.lines,
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
        v.problems.append(ScenarioProblem(v.path, v.line(where), rule, hint))

    def records(value: Any) -> list[tuple[int, dict[str, Any]]]:  # noqa: ANN401
        return [(i, r) for i, r in enumerate(value or []) if isinstance(r, dict)]

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
        if files is not None and size is not None and files > size:
            problem(
                f"packages[{index}].files",
                f"{files} files cannot share {size} bytes",
                "give each file at least one byte",
            )
    if not complete:
        return
    known = ", ".join(declared) or "none"
    sequence: dict[str, Any] = data.get("task_sequence") or {}
    for index, step in records(sequence.get("steps")):
        condition = step.get("condition")
        if isinstance(condition, dict):
            given = [k for k in ("equals", "not_equals", "exists") if condition.get(k) is not None]
            if len(given) != 1:
                problem(
                    f"task_sequence.steps[{index}].condition",
                    "a condition needs exactly one of equals, not_equals, exists",
                    f"given: {', '.join(given) or 'none'}",
                )
        if step.get("package") is not None and step["package"] not in declared:
            problem(
                f"task_sequence.steps[{index}].package",
                f"step references package {step['package']}, which is not declared",
                f"declared packages: {known}",
            )
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
        elif declared[package_id] is not None and declared[package_id] != int(version):
            problem(
                f"expect.cache[{index}]",
                f"cache entry {key} is not the declared version {declared[package_id]}",
            )
    for index, package_id in enumerate(expect.get("downloaded") or []):
        if package_id is not None and package_id not in declared:
            problem(
                f"expect.downloaded[{index}]",
                f"downloaded names undeclared package {package_id}",
                f"declared packages: {known}",
            )
    if expect.get("outcome") == "success" and expect.get("exit_code") not in (None, "0x00000000"):
        problem("expect.exit_code", "a successful outcome has exit code 0x00000000")
