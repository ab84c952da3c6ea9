"""An smsts.log-style log in CMTrace format, which scenarios match with regular expressions."""

from __future__ import annotations

import os
import threading
from datetime import UTC, datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["SmstsLog"]

INFO, WARNING, ERROR = 1, 2, 3


class SmstsLog:
    """Appends CMTrace lines to a file and keeps the messages for matching.

    Each line looks like the product's::

        <![LOG[Processing 0 locations.]LOG]!><time="14:03:16.603+000" date="11-22-2026"
        component="TSManager" context="" type="1" thread="1234" file="">

    A file that cannot be written never stops the run, as the product's smsts.log writer keeps
    going when its log fails: a full disk under the cache is often the log's disk too, and the
    engine logs that very failure. Every message is still kept (``messages``), each line is tried
    again (space may come back), and :attr:`write_error` and :attr:`lines_lost` tell what was
    lost, for the caller to report.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._messages: list[tuple[str, str, int]] = []
        self._lock = threading.Lock()
        #: The first OSError met making the folder or writing a line; None while none failed.
        self.write_error: OSError | None = None
        #: Lines that did not reach the file.
        self.lines_lost = 0
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            self.write_error = error

    def write(self, component: str, message: str, level: int = INFO) -> None:
        now = datetime.now(UTC)
        line = (
            f'<![LOG[{message}]LOG]!><time="{now:%H:%M:%S}.{now.microsecond // 1000:03d}+000" '
            f'date="{now:%m-%d-%Y}" component="{component}" context="" type="{level}" '
            f'thread="{threading.get_ident() % 100000}" file="">'
        )
        with self._lock:
            self._messages.append((component, message, level))
            try:
                with self.path.open("a", encoding="utf-8") as handle:
                    handle.write(line + os.linesep)
            except OSError as error:
                # ENOSPC usually surfaces at close, when the buffer is flushed: inside this try.
                self.lines_lost += 1
                if self.write_error is None:
                    self.write_error = error

    def info(self, component: str, message: str) -> None:
        self.write(component, message, INFO)

    def warning(self, component: str, message: str) -> None:
        self.write(component, message, WARNING)

    def error(self, component: str, message: str) -> None:
        self.write(component, message, ERROR)

    @property
    def messages(self) -> list[str]:
        """Every message logged, in order, as ``component: message``."""
        with self._lock:
            return [f"{component}: {message}" for component, message, _ in self._messages]
