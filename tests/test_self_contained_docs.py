"""The package's docstrings and comments, docs/ and the README cite only what a reader has.

A reader of this repository, or of the installed package, has its own documents (README.md,
docs/*.md) and public sources, which are cited by name ("Microsoft Learn: Task sequence
variables"). They do not have the team's research notes (protocol.md, performance.md, the
../shared folder) nor the tracker IDs of those notes' source tables, "(S24)". The facts that
mattered are summarised, with their public sources, in docs/emulation.md ("Product reference").
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Text files that document the package: its sources and data, docs/ and the README.
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".json", ".toml", ".txt"}

#: (pattern, why it is wrong, what to cite instead)
RULES = [
    (
        re.compile(r"\b(?:protocol|performance)\.md\b"),
        "cites a research note that is not in the repository",
        "docs/emulation.md (Product reference, or the choice's own section) or the public "
        "source by name",
    ),
    (
        re.compile(r"\.\./shared\b|\bshared/docs\b"),
        "points outside the repository",
        "a document of the repository or the public source by name",
    ),
    (
        # A source-table ID in parentheses: "(S24)", "(S9: ...)", "(azure-ccmsetup.md, S9)".
        re.compile(r"\([^()]*(?<![\w-])S\d+\b[^()]*\)"),
        "cites a tracker ID that means nothing to a reader",
        "the public source by name (e.g. Microsoft Learn: Task sequence variables)",
    ),
    (
        # docs/reliability.md numbers its rows; letter IDs (A1, C4, D3) are the research note's.
        re.compile(r"\breliability\.md,? (?:section )?[A-Z]\d"),
        "cites a row ID docs/reliability.md does not have (its rows are numbered)",
        "docs/reliability.md row <n>, or the docs/emulation.md section",
    ),
]
_MD_NAME = re.compile(r"(?<![\w./-])((?:[\w.-]+/)*[\w.-]+\.md)\b")


def _files() -> list[Path]:
    found = [ROOT / "README.md"]
    for folder in ("pytest_cmg", "docs"):
        found += [
            p
            for p in sorted((ROOT / folder).rglob("*"))
            if p.is_file() and p.suffix in SUFFIXES and "__pycache__" not in p.parts
        ]
    return found


def _repository_documents() -> set[str]:
    skip = {".git", ".venv", "build", "node_modules", ".pytest_cache"}
    return {p.name for p in ROOT.rglob("*.md") if not skip & set(p.relative_to(ROOT).parts)}


def _problems() -> list[str]:
    documents = _repository_documents()
    problems = []
    for path in _files():
        relative = path.relative_to(ROOT).as_posix()
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for pattern, why, fix in RULES:
                match = pattern.search(line)
                if match:
                    problems.append(f"{relative}:{number}: {match.group(0)!r} {why}; cite {fix}")
            for match in _MD_NAME.finditer(line):
                name = match.group(1)
                if Path(name).name in {"protocol.md", "performance.md"}:
                    continue  # the first rule has said it
                if Path(name).name not in documents and not (path.parent / name).exists():
                    problems.append(
                        f"{relative}:{number}: {name!r} is not a document of the repository; "
                        "cite a repository document or the public source by name"
                    )
    return problems


def test_docs_and_docstrings_cite_only_what_the_repository_or_the_public_has() -> None:
    problems = _problems()
    files = sorted({p.split(":", 1)[0] for p in problems})
    assert not problems, (
        f"{len(problems)} citation(s) a reader cannot follow, in {len(files)} file(s) "
        f"({', '.join(files)}):\n" + "\n".join(problems)
    )


def test_the_rules_catch_what_they_are_for() -> None:
    """Each rule on a line it must catch and one it must let through."""
    caught = [
        "Lifetimes follow protocol.md section 2.",
        "performance.md's method",
        "(the team's measurements in `shared/docs`)",
        "see ../shared/docs/x",
        "in the public smsts.log samples (S24), and",
        "(azure-ccmsetup.md, S9)",
        "(S9: otherwise the CMG does not answer)",
        "(reliability.md C4)",
    ]
    passed = [
        "PS100012 and (PS100013) are package IDs",
        "docs/emulation.md, Product reference (Microsoft Learn: Task sequence variables)",
        "docs/reliability.md row 31",
        "S3 is not in parentheses",
    ]
    for line in caught:
        assert any(p.search(line) for p, _, _ in RULES), line
    for line in passed:
        assert not any(p.search(line) for p, _, _ in RULES), line
    assert _MD_NAME.findall("see task-sequence-variables.md and docs/emulation.md") == [
        "task-sequence-variables.md",
        "docs/emulation.md",
    ]
