"""Run an ACP as the task sequence would, and record what it did (for tests/test_acp_zoo.py).

    python observe.py <record> <acp.py> [acp options] <ini> <PackageID> <destination>

Runs ``<acp.py> [acp options] <ini> <PackageID> <destination>`` as ``__main__`` in this Python
process (one interpreter start per run, not two: the zoo runs hundreds), with its output
captured, and appends one JSON line to ``<record>``: the PackageID, the exit code, the wall time in
seconds, which secrets its output held (the INI's ``Signature`` and ``ClientToken`` of each
token-authentication location, a SAS signature ``sig=``), and the files in the destination when
it exited (``relpath: [size, sha256]``), which is what a fallback download would find there.
Its output then goes to stderr, secrets masked, and its exit code is passed on.
"""

from __future__ import annotations

import configparser
import contextlib
import hashlib
import io
import json
import re
import runpy
import sys
import time
import traceback
from pathlib import Path

SAS_SIGNATURE = re.compile(r"[?&]sig=[^&\s\"']+")


def read_ini(ini_path: Path) -> tuple[str, dict[str, str]]:
    """The package version the INI asks for, and its secrets by name."""
    ini = configparser.ConfigParser(interpolation=None)
    ini.read(ini_path, encoding="utf-8")
    found = {}
    for name in ini.sections():
        section = ini[name]
        if section.get("TokenAuth") == "true":
            for key in ("Signature", "ClientToken"):
                if section.get(key):
                    found[f"{name}.{key}"] = section[key]
    return ini.get("Package", "Version", fallback=""), found


def snapshot(folder: Path) -> dict[str, list[object]]:
    files: dict[str, list[object]] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            files[path.relative_to(folder).as_posix()] = [
                len(data),
                hashlib.sha256(data).hexdigest(),
            ]
    return files


def main() -> int:
    record, program, *args = sys.argv[1:]
    ini_path, package_id, destination = (Path(args[-3]), args[-2], Path(args[-1]))
    version, hidden = read_ini(ini_path)
    captured = io.StringIO()
    sys.argv = [program, *args]
    started = time.monotonic()
    with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
        try:
            runpy.run_path(program, run_name="__main__")
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
        except BaseException:  # what the interpreter would do: a traceback, exit code 1
            traceback.print_exc()
            code = 1
    seconds = time.monotonic() - started
    output = captured.getvalue()
    leaked = [name for name, value in hidden.items() if value in output]
    if SAS_SIGNATURE.search(output):
        leaked.append("SAS sig=")
    for value in hidden.values():
        output = output.replace(value, "<secret>")
    output = SAS_SIGNATURE.sub("&sig=<secret>", output)
    entry = {
        "package": package_id,
        "version": version,
        "exit": code,
        "seconds": round(seconds, 3),
        "leaked": leaked,
        "destination": snapshot(destination),
        "output": output[-4000:],
    }
    with Path(record).open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry) + "\n")
    sys.stderr.write(output)
    return code


if __name__ == "__main__":
    sys.exit(main())
