"""Running a tool whose output is read as text: one spelling of how a child is started."""

from __future__ import annotations

import subprocess
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from pathlib import Path

__all__ = ["spawn_text"]


def spawn_text(
    command: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: Path | None = None,
    line_buffered: bool = False,
    preexec_fn: Callable[[], None] | None = None,
) -> subprocess.Popen[str]:
    """Start ``command`` with no stdin and its stdout and stderr merged into one text pipe.

    UTF-8 with undecodable bytes replaced: the output is only ever shown to a person (a
    failure's last lines) or searched for a known line, and a tool's stray byte must not turn
    into an exception in the reader. ``line_buffered`` for a reader that follows the output
    as it comes (a service's start line); ``preexec_fn`` runs in the child before exec.
    """
    return subprocess.Popen(
        list(command),
        cwd=cwd,
        env=dict(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        encoding="utf-8",
        errors="replace",
        bufsize=1 if line_buffered else -1,
        # The caller's, run before exec while no other thread of the child exists yet.
        preexec_fn=preexec_fn,  # noqa: PLW1509
    )
