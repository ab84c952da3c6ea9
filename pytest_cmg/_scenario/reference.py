"""Render the scenario key reference (docs/scenarios.md) from the spec that validates files.

Run ``python -m pytest_cmg._scenario.reference > docs/scenarios.md``; a test fails when the
committed file differs, so the reference cannot fall behind the language. Every key has an
example: the field's own, or one made from its spec (a test checks each one validates).
"""

from __future__ import annotations

from . import limits
from .language import SCENARIO
from .limits import human_size
from .spec import Choice, Field, ListOf, Record, Spec

__all__ = ["example_of", "reference_rows", "render_reference"]

_INTRO = """# Scenario file reference

Generated from the scenario language's own definition (`pytest_cmg/_scenario/language.py`) by
`python -m pytest_cmg._scenario.reference`; do not edit by hand. The same definition generates
the JSON Schema `docs/scenario.schema.json` (`python -m pytest_cmg._scenario.schema`), for
editors: `# yaml-language-server: $schema=../../docs/scenario.schema.json` on a file's first line.

A scenario file is YAML named `*.cmg.yaml` (option `--cmg-scenario-pattern`). Every key below is
checked at collection: an unknown key, a wrong type or a dangling reference is reported with the
file and line, all problems of a file (and of the files it includes) at once. The annotated
example is `scenarios/ipu/on-demand-token-software-center.cmg.yaml`; `docs/tutorial.md` walks
through writing one.

| key | required | default | value | meaning | example |
|---|---|---|---|---|---|
"""

_RULES = """
## Rules

**Values.** Sizes are bytes or `64MiB`, `512KiB`, `1.5GiB`, `10MB`; durations are seconds or
`90s`, `5m`, `1h30m`, `250ms`. `key:` left empty means "not given" where the key has no default.

@LIMITS@

**Log expectations** (`log`, `gateway_log`, `absent_log`, `absent_gateway_log`) are Python regular
expressions searched in each line (`re.search`); smsts.log lines read `component: message`.
Escape `.`, `(`, `)`, `[`, `]` to match them literally. A pattern that does not compile is a
collection error at its line.

**Counts** (`requests.*`, `storage_requests`, `retries`, `storage_bytes.*`) are exact values or
`{at_least: n, at_most: m}` with either bound; `elapsed` takes `{min: ..., max: ...}`.

**Includes.** `include: [worlds/ipu-world]` merges shared world files under the scenario, in
order. A path starting with `./` or `../` is relative to the file that names it. Any other path
is looked up in folders, in this order: the user's fixtures folders (each `--cmg-fixtures`, in
the order given, else each line of ini `cmg_fixtures`, else the nearest `fixtures` folder above
the scenario), then the worlds and catalogs shipped inside pytest-cmg (`pytest_cmg/shipped`:
`worlds/ipu-world`, `worlds/small-ipu-world`, `catalog/os-upgrade-win11`,
`catalog/drivers-contoso-ja`, `catalog/language-pack-it`, `catalog/office-app`; they come with
`pip install pytest-cmg`). The
first folder that has the file wins: a file of yours shadows a shipped one of the same name,
also where a shipped world refs it, and a later release that ships a new name never changes
what your include means. A name found in none is a collection error at its line that lists
every folder searched, the nearest name and the shipped ones. `.yaml` may be left off.

Later files override earlier ones and the scenario overrides them all: mappings merge key by
key, lists are replaced, except `packages`, which merge by `id` (a package given again changes
only the keys it gives). A world
may include others; cycles are errors. A world holds any scenario key except `scenario`,
`description`, `markers`, `matrix` and `cases`, none required. Problems in a world are reported
at its own line, with the line that included it. Name shared files `*.yaml`, not `*.cmg.yaml`, so
they are not collected as scenarios.

**Catalogs.** `packages: [{ref: catalog/os-upgrade-win11, version: 4}]` takes one package from a
catalog file (same path rules; the file holds one package's keys), then applies the keys given
next to `ref`.

**Cases.** `matrix` makes one item per combination of its values; `cases` one item per case;
both together make every case times every combination. Item IDs are the values (or case IDs)
joined with `-`, in the order written: `file.cmg.yaml::name[token-1910]`, the same on every
xdist worker. Paths in `matrix` and `cases[].set` name any key below `scenario` except
`description`, `include`, `matrix`, `cases` and `markers`; list items by index (`packages[1]`)
or by package ID (`packages[PS100013]`). The file without its cases must itself be valid; each
case is then validated with its values set, and a problem only one case has names that case.

**Timeline.** `faults` entries are armed before the run, or `before_step` (by step name), or
`at` a virtual time. Gateway faults count requests per endpoint and storage faults count every
storage request, from the start of the run. Time is virtual: it moves on retry waits, storage
stalls, throttling and delays, and `clock` jumps; `clock` moves the site's clock (token
lifetimes) but not storage's, so SAS expiry is scripted with `gateway.sas_ttl`. Gateway `delay`
is real time (at most 10 s).

**Every entry must happen.** An entry that never happened fails the scenario at its own line,
as a failed expectation (`expectation faults[2] failed`), with the reason: a `before_step` or
`at` entry that was never armed (its step never started, virtual time never reached it); a
gateway fault that hit no request (its endpoint was not asked again, or not that often); a
storage fault that hit no request, or whose `reset_after`, `close_after`, `stall_after` or
`flip_byte` offset no body it hit ever reached. A fault that does nothing proves nothing, and
the scenario would pass on the happy path it meant to disturb. `optional: true` on the entry
allows the run to end without it. A storage fault's `file` is checked at collection: it must be
part of a blob name, `<PackageID>.<version>/<path>`, of a package on the cloud DP (file names
are generated from the seed, the package's type, file count and locale); the nearest names are
suggested.

**Client cache.** `client.cache` entries are made before the run with the client cache's own
staging, hashing and commit, so they are verified entries like downloaded ones: their content is
generated as the package's at that version. They stay unless evicted, and `expect.cache` lists
them like any entry.

**Markers.** `slow` and `benchmark` are registered by the plugin; other names must be registered
in the `markers` ini option (`skip`, `skipif`, `xfail` are pytest's own).

**Benchmarks.** A file with `benchmark` times the whole chain, and its items carry the
`benchmark` marker without asking. A rate is judged only as a ratio to a baseline timed in the
same process right after the run (`hashlib` or `raw`, `expect.throughput: {<package>: {at_least:
r}}`), never as MB/s: a shared machine's load moves both sides. The client reaches storage
directly, so what needs the fault proxy (storage faults, `storage_bytes`, `storage_requests`,
`cmg.measure_egress`) is a collection error at its line; gateway faults are allowed. The
figures appear under "pytest-cmg scenario throughput" in the terminal summary and as
`throughput[<package>].<figure>` properties in `--junitxml`, whether the item passes or not.
`scenarios/benchmarks/` has one per workload shape.
"""


_LIMITS = """**Limits.** Each is a collection error at its file and line, never a traceback. A scenario,
world or catalog file is UTF-8 (a byte that is not is reported at its line and column) and at
most {file_limit}, judged from its size before it is read; with everything it includes it holds
at most {values:,} YAML values (an alias counts what it names, at each use), nested at most
{nesting} deep. A package has at most {files:,} files and {package}; no generated file may exceed
{file} (an `os_upgrade` package's install.wim takes 90 % of it, so such a package is at most
{os_upgrade}); a scenario's packages total at most {scenario}: Azurite keeps uploaded content in
memory, and the client cache keeps it again on disk. Other sizes are at most 2^53 bytes,
durations at most {days:.0f}d. A value quoted in a message is cut to {shown} characters. A
package over {in_memory} is generated into a temporary folder, removed once it is uploaded; the
bytes are the same wherever they are generated.
"""


def _limits() -> str:
    """The limits paragraph of the rules, from the limits themselves (:mod:`.limits`)."""
    return _LIMITS.format(
        file_limit=human_size(limits.MAX_SCENARIO_FILE_BYTES),
        values=limits.MAX_VALUES,
        nesting=limits.MAX_NESTING,
        files=limits.MAX_PACKAGE_FILES,
        package=human_size(limits.MAX_PACKAGE_BYTES),
        file=human_size(limits.MAX_FILE_BYTES),
        os_upgrade=human_size(int(limits.MAX_FILE_BYTES / limits.OS_UPGRADE_MAIN_SHARE)),
        scenario=human_size(limits.MAX_SCENARIO_BYTES),
        days=limits.MAX_DURATION_SECONDS / 86400,
        shown=limits.SHOWN_CHARS,
        in_memory=human_size(limits.IN_MEMORY_PACKAGE_BYTES),
    ).rstrip("\n")


def _default(item: Field) -> str:
    if item.required:
        return ""
    if isinstance(item.default, bool):
        return str(item.default).lower()
    if item.default is None or isinstance(item.default, dict):
        return ""
    return f"`{item.default}`" if item.default != "" else '`""`'


def example_of(item: Field) -> str:
    """The YAML example of a field's value: its own, or one made from its spec."""
    return item.example or item.spec.sample()


def reference_rows(record: Record, prefix: str = "") -> list[tuple[str, Field]]:
    """Every documented key (dotted, ``[]`` for list items) with its field, in file order."""
    rows: list[tuple[str, Field]] = []
    for name, item in record.fields.items():
        key = f"{prefix}{name}"
        rows.append((key, item))
        spec: Spec = item.spec
        if key == "cases[].expect":
            continue  # the keys of expect, documented once
        if isinstance(spec, Record):
            rows.extend(reference_rows(spec, f"{key}."))
        elif isinstance(spec, ListOf) and isinstance(spec.item, Record):
            rows.extend(reference_rows(spec.item, f"{key}[]."))
    return rows


def _row(key: str, item: Field) -> str:
    spec = item.spec
    if isinstance(spec, Choice):
        value = " \\| ".join(f"`{c}`" for c in spec.choices)
    elif isinstance(spec, Record):
        value = "mapping"
    elif isinstance(spec, ListOf):
        value = "list" if isinstance(spec.item, Record) else f"list of {spec.item.describe()}"
    else:
        value = spec.describe().replace("|", "\\|")
    doc = (item.doc or spec.doc).replace("|", "\\|")
    if key == "cases[].expect":
        doc += " Same keys as `expect`, none required."
    name = key.rsplit(".", 1)[-1].removesuffix("[]")
    example = f"`{name}: {example_of(item)}`".replace("|", "\\|")
    required = "yes" if item.required else ""
    return f"| `{key}` | {required} | {_default(item)} | {value} | {doc} | {example} |"


def render_reference() -> str:
    rows = [_row(key, item) for key, item in reference_rows(SCENARIO)]
    return _INTRO + "\n".join(rows) + "\n" + _RULES.replace("@LIMITS@", _limits())


if __name__ == "__main__":
    print(render_reference(), end="")
