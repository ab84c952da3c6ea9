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
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._messages: list[tuple[str, str, int]] = []
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, component: str, message: str, level: int = INFO) -> None:
        now = datetime.now(UTC)
        line = (
            f'<![LOG[{message}]LOG]!><time="{now:%H:%M:%S}.{now.microsecond // 1000:03d}+000" '
            f'date="{now:%m-%d-%Y}" component="{component}" context="" type="{level}" '
            f'thread="{threading.get_ident() % 100000}" file="">'
        )
        with self._lock:
            self._messages.append((component, message, level))
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(line + os.linesep)

    def info(self, component: str, message: str) -> None:
        self.write(component, message, INFO)

    def error(self, component: str, message: str) -> None:
        self.write(component, message, ERROR)

    @property
    def messages(self) -> list[str]:
        """Every message logged, in order, as ``component: message``."""
        with self._lock:
            return [f"{component}: {message}" for component, message, _ in self._messages]
