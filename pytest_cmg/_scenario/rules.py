"""The scenario's cross-field rules: what the language's records cannot say field by field.

References must name declared packages, IDs must be unique, faults must fit the files and
settings they act on. :func:`cross_check` records each problem on the :class:`.Validation`.
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING, Any

from .._client.sequence import (
    DOWNLOAD_PACKAGE_CONTENT,
    RESTART_COMPUTER,
    ContentDestination,
    RestartTo,
    custom_path_parts,
)
from .._net.faults import VOCABULARY
from .._protocol.paths import Endpoint
from .._protocol.settings import NO_NEW_CLASSIC_CLOUD_DP_SINCE, CmgSettings
from .content import package_file_names
from .limits import (
    MAX_FILE_BYTES,
    MAX_PACKAGE_FILES,
    MAX_SCENARIO_BYTES,
    OS_UPGRADE_MAIN_SHARE,
    SHOWN_CHARS,
    human_size,
    largest_file,
    nearest,
    shown,
    split_sizes,
)
from .model import PackageSpec

if TYPE_CHECKING:
    from collections.abc import Callable

    from .spec import Validation


def cross_check(data: dict[str, Any], v: Validation) -> None:
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
        _check_restart_options(step, f"task_sequence.steps[{index}]", sequence, problem)
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
    """Each storage fault's and mid-download restart's ``file`` against the blob names of the
    packages on the cloud DP, and a restart's ``after_bytes`` against the sizes of those files.

    A ``file`` that names no blob makes a fault that can never fire, and a restart after as many
    bytes as the file has, or more, would never cut the power; found here, before any content
    is generated, from the file names and sizes alone (:func:`~.content.package_file_names`,
    :func:`~.limits.split_sizes`, as :func:`~.content.generate_package` draws them).
    """
    faults = [
        (index, kind, event[kind]["file"])
        for index, event in enumerate(data.get("faults") or [])
        if isinstance(event, dict)
        for kind in ("storage", "restart")
        if isinstance(event.get(kind), dict) and isinstance(event[kind].get("file"), str)
    ]
    seed = data.get("seed")
    if not faults or seed is None:
        return
    blobs: list[str] = []
    #: Blob name -> its size in bytes, where the package's size is known.
    sizes: dict[str, int] = {}
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
        names = [prefix + name for name in package_file_names(spec, seed)]
        blobs += names
        if isinstance(package.get("size"), int) and package["size"] >= spec.files:
            share = OS_UPGRADE_MAIN_SHARE if spec.type == "os_upgrade" else None
            sizes.update(zip(names, split_sizes(package["size"], spec.files, share), strict=True))
    for index, kind, file in faults:
        if any(file in blob for blob in blobs):
            if kind == "restart":
                _check_restart_bytes(data["faults"][index]["restart"], index, file, sizes, problem)
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
            f"faults[{index}].{kind}.file",
            f"{'storage fault' if kind == 'storage' else 'restart'} file {shown(file)} names no "
            "blob of the packages on the cloud DP "
            f"({len(blobs)} file(s)): it must be part of a blob name <PackageID>.<version>/<path>",
            f"{hint}file names come from the seed, the package's type, file count and locale",
        )


def _check_restart_bytes(
    restart: dict[str, Any],
    index: int,
    file: str,
    sizes: dict[str, int],
    problem: Callable[..., None],
) -> None:
    """A mid-download restart's ``after_bytes`` against the smallest file its ``file`` names:
    storage must send that many bytes of it, and more, before the power can be cut."""
    after = restart.get("after_bytes")
    named = [size for blob, size in sizes.items() if file in blob]
    if not isinstance(after, int) or not named or after < min(named):
        return
    smallest = min(named)
    problem(
        f"faults[{index}].restart.after_bytes",
        f"the power is cut after {human_size(after)} of {shown(file)}, but that file has "
        f"{human_size(smallest)} ({smallest} bytes): the download ends before the cut",
        f"give after_bytes below {smallest}, or name a larger file",
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


def _check_restart_options(
    step: dict[str, Any], where: str, sequence: dict[str, Any], problem: Callable[..., None]
) -> None:
    """Restart Computer's ``restart_to``: the rules of :class:`Step` and
    :class:`TaskSequence`, at their lines."""
    restart_to = step.get("restart_to")
    if restart_to is None:
        return
    if step.get("action") != RESTART_COMPUTER:
        problem(
            f"{where}.restart_to",
            f"restart_to belongs to {RESTART_COMPUTER} steps",
            f"remove it, or make the step's action {RESTART_COMPUTER}",
        )
    elif restart_to == RestartTo.WINPE and sequence.get("boot_image") is not True:
        problem(
            f"{where}.restart_to",
            "restart_to: winpe restarts to the boot image assigned to this task sequence, "
            "and it has none (task_sequence.boot_image is not true)",
            "set task_sequence.boot_image: true, or restart_to: os",
        )


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
        _check_storage_fault(storage, f"{where}.storage", problem)


def _check_storage_fault(storage: dict[str, Any], where: str, problem: Callable[..., None]) -> None:
    """A ``storage`` entry against the fault proxy's vocabulary (``VOCABULARY``), spelled once:
    it asks for a fault, each fault's values go together, and the proxy can act on them."""
    if not any(word.asked(storage) for word in VOCABULARY):
        keys = ", ".join(word.key for word in VOCABULARY)
        problem(where, "this storage fault does nothing", f"give one of {keys}")
    for word in VOCABULARY:
        asked = word.asked(storage)
        complete = True
        for arg in word.args:
            if storage.get(arg.key) is None:
                if asked and arg.required:
                    complete = False
                    problem(f"{where}.{word.key}", f"{word.key} and {arg.key} go together")
            elif not asked:
                rule = (
                    f"{word.key} and {arg.key} go together"
                    if arg.required
                    else f"{arg.key} goes with {word.key}"
                )
                problem(f"{where}.{arg.key}", rule)
        if asked and complete:
            try:
                word.build(storage)
            except ValueError as error:
                # The proxy's own check (a rate of 0, a header value with a line break): at
                # collection, at its line, rather than as a crash in the middle of the run.
                problem(f"{where}.{word.key}", str(error), "give a value the fault can act on")
