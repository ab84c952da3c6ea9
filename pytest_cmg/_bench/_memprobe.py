"""Peak memory of the download core, measured in a fresh process.

The benchmark driver holds every workload's bytes (for the hashlib ceiling), so its own resident
size says nothing about the core. This child imports the core, notes its resident size, downloads
the manifest given on stdin (``{"manifest": XML, "dest": folder, "workers": N}``) and prints one
JSON line: its ``VmHWM`` (the whole process's resident high-water mark, interpreter included),
the resident size before the download, and the download's seconds.

Not ``ru_maxrss``: on Linux it survives ``exec``, so a child of the driver starts with the
driver's resident size (hundreds of MiB of workload bytes) as its "peak". ``VmHWM`` belongs to
the address space, which ``exec`` replaces.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def _status_mib(field: str) -> float:
    """A ``/proc/self/status`` size field (``VmRSS``, ``VmHWM``) in MiB."""
    try:
        status = Path("/proc/self/status").read_text(encoding="ascii")
    except OSError:
        return float("nan")  # not Linux: the runner reports no memory figure
    for line in status.splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024  # the kernel prints kB
    return float("nan")


def main() -> int:
    from .._client.download import DownloadCore
    from .._protocol.manifest import ContentManifest

    job = json.loads(sys.stdin.read())
    manifest = ContentManifest.from_xml(job["manifest"])
    baseline = _status_mib("VmRSS")
    core = DownloadCore(workers=int(job["workers"]))
    started = time.perf_counter()
    try:
        core.download(manifest, Path(job["dest"]))
    finally:
        core.close()
    seconds = time.perf_counter() - started
    peak = _status_mib("VmHWM")
    print(json.dumps({"peak_mib": peak, "baseline_mib": baseline, "seconds": seconds}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
