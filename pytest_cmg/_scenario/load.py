"""Loading a scenario file into :class:`.Scenario`: YAML to model, every problem at its file:line.

A file may include shared worlds and take packages from catalogs (``include``, ``ref``: see
:mod:`.assemble`), and may be parametrised (``matrix``, ``cases``): :func:`load_scenarios` gives
one :class:`Scenario` per case, each validated on its own, every problem reported at its file and
line.

The language is :mod:`.language`, the cross-field rules :mod:`.rules`, the result :mod:`.model`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._client.sequence import Condition, Setup, Step, TaskSequence
from .._errors import ScenarioError, ScenarioProblem
from .._gateway.faults import GatewayFault
from .._net.faults import faults_from
from .._protocol.settings import ClientSettings, CmgSettings, DeploymentSettings
from .assemble import Assembler, CasePlan, compose_file, find_fixtures, plan_cases
from .language import CATALOG_PACKAGE, FRAGMENT, SCENARIO
from .limits import MAX_CASE_VALUES, clip
from .model import (
    BenchmarkSpec,
    ClockJump,
    DistributionPointSpec,
    Expectations,
    GatewayFaultEntry,
    MarkerUse,
    PackageSpec,
    Restart,
    RestartMidDownload,
    Scenario,
    ServiceEvent,
    StorageFaultEntry,
    TimelineEvent,
)
from .rules import cross_check
from .spec import Validation
from .vocabulary import MAX_CASES, TIMELINE_KINDS

if TYPE_CHECKING:
    from collections.abc import Sequence
    from os import PathLike


def load_scenario(path: str | PathLike[str], *, fixtures: Path | Sequence[Path] | None = None) -> Scenario:
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
                    Path(path),
                    scenarios[0].line(where),
                    clip(f"this file is parametrised into {len(scenarios)} cases ({ids})"),
                    "load it with load_scenarios, or run one case by its item ID",
                )
            ]
        )
    return scenarios[0]


def load_scenarios(
    path: str | PathLike[str], *, fixtures: Path | Sequence[Path] | None = None
) -> list[Scenario]:
    """Load and validate a scenario file: one :class:`Scenario` per case, in the file's order.

    Includes are resolved (``./`` and ``../`` relative to the naming file, other paths to
    ``fixtures``, a folder or folders searched in order, by default the nearest ``fixtures``
    folder above the file, and then to the shipped worlds), then the file is
    validated as written, then each case with its values set. :class:`ScenarioError` lists every
    problem of the file and of what it includes, each at its own file and line.
    """
    path = Path(path)
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
        cross_check(data, v)
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
        if tree is not None:
            # The case's own refs, reported as the case's problems.
            tree = dataclasses.replace(assembler, v=cv).refs(tree)
        case_data = SCENARIO.check(tree, "", cv) if tree is not None else None
        if isinstance(case_data, dict):
            cross_check(case_data, cv)
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
                restart_to=s["restart_to"],
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
    timeline = tuple(_event(f, f"faults[{i}]", steps) for i, f in enumerate(data["faults"] or []))
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
        expect=_expectations(data["expect"]),
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


def _event(entry: dict[str, Any], where: str, steps: dict[str, int]) -> TimelineEvent:
    """The typed event of one ``faults`` entry (its kind is the one key of TIMELINE_KINDS given)."""
    when: dict[str, Any] = {
        "where": where,
        "before_step": steps.get(entry["before_step"])
        if entry["before_step"] is not None
        else None,
        "at": entry["at"],
        "optional": bool(entry["optional"]),
    }
    kind = next(k for k in TIMELINE_KINDS if entry[k] is not None)
    if kind in ("gateway", "storage"):
        values: dict[str, Any] = entry[kind]
        # As the file gave them (then defaults), for reports: what a reader looks for.
        settings = tuple((k, v) for k, v in values.items() if v not in (None, False))
        if kind == "storage":
            return StorageFaultEntry(
                **when,
                request=values["request"],
                times=values["times"],
                file=values["file"],
                faults=tuple(faults_from(values)),
                settings=settings,
            )
        given = {k: v for k, v in values.items() if v is not None}
        return GatewayFaultEntry(**when, fault=GatewayFault(**given), settings=settings)
    if kind == "restart":
        restart = entry["restart"]
        if restart["file"] is not None:
            return RestartMidDownload(
                **when, file=restart["file"], after_bytes=restart["after_bytes"]
            )
        return Restart(**when)
    if kind == "service":
        return ServiceEvent(**when, service=entry["service"])
    return ClockJump(**when, seconds=float(entry["clock"]))


def _expectations(expect: dict[str, Any]) -> Expectations:
    """``expect`` as validated by the language, typed (lists become tuples)."""

    def strings(key: str) -> tuple[str, ...] | None:
        return None if expect[key] is None else tuple(expect[key])

    return Expectations(
        outcome=expect["outcome"],
        exit_code=expect["exit_code"],
        cache=strings("cache"),
        downloaded=strings("downloaded"),
        requests={k: v for k, v in (expect["requests"] or {}).items() if v is not None},
        log=strings("log"),
        gateway_log=strings("gateway_log"),
        absent_log=strings("absent_log"),
        absent_gateway_log=strings("absent_gateway_log"),
        storage_bytes=expect["storage_bytes"],
        storage_requests=expect["storage_requests"],
        egress_bytes=expect["egress_bytes"],
        retries=expect["retries"],
        restarts=expect["restarts"],
        elapsed=expect["elapsed"],
        ts_cache=strings("ts_cache"),
        variables=expect["variables"],
        throughput=expect["throughput"],
    )


def _conditions(spec: dict[str, Any] | None) -> tuple[Condition, ...]:
    if spec is None:
        return ()
    if spec.get("exists"):
        return (Condition(spec["variable"], "exists"),)
    if spec.get("not_equals") is not None:
        return (Condition(spec["variable"], "not_equals", spec["not_equals"]),)
    return (Condition(spec["variable"], "equals", spec.get("equals") or ""),)
