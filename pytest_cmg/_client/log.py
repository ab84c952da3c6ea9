"""An smsts.log-style log in CMTrace format, which scenarios match with regular expressions."""

from __future__ import annotations

import os
import re
import threading
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from .._errors import PytestCmgError

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

__all__ = ["LogEntry", "SmstsLog", "SmstsLogFormatError", "cmtrace_line", "wall_clock"]

INFO, WARNING, ERROR = 1, 2, 3

#: One logged line as read back: component, message, level (1-3) and its time, aware UTC.
LogEntry = tuple[str, str, int, datetime]

# One CMTrace record. The message may span lines (a program's output, an exception's text), so
# the record ends at "]LOG]!>" and its attribute block, never at a newline.
_RECORD = re.compile(
    r"<!\[LOG\[(?P<message>.*?)\]LOG\]!><(?P<attrs>[^<>]*)>",
    re.DOTALL,
)
_ATTR = re.compile(r'(\w+)="([^"]*)"')
_TIME = re.compile(r"^(\d{1,2}):(\d{2}):(\d{2})(?:\.(\d{1,7}))?(?:([+-])(\d{1,4}))?$")


class SmstsLogFormatError(PytestCmgError):
    """A file read as smsts.log is not CMTrace text."""


def wall_clock() -> datetime:
    """The default clock of a log: wall time, aware UTC."""
    return datetime.now(UTC)


def cmtrace_line(component: str, message: str, level: int, when: datetime) -> str:
    """One CMTrace line as the product writes it, its time in UTC (bias ``+000``).

    The ``+000`` after the time is the Windows time-zone bias in minutes (UTC = local + bias);
    writing UTC keeps every line comparable whatever machine runs the tests.
    """
    when = when.astimezone(UTC)
    return (
        f'<![LOG[{message}]LOG]!><time="{when:%H:%M:%S}.{when.microsecond // 1000:03d}+000" '
        f'date="{when:%m-%d-%Y}" component="{component}" context="" type="{level}" '
        f'thread="{threading.get_ident() % 100000}" file="">'
    )


class SmstsLog:
    """Appends CMTrace lines to a file and keeps the messages for matching.

    Each line looks like the product's::

        <![LOG[Processing 0 locations.]LOG]!><time="14:03:16.603+000" date="11-22-2026"
        component="TSManager" context="" type="1" thread="1234" file="">

    Every line carries the time of ``clock`` (a callable returning an aware datetime; the wall
    clock by default). A scenario passes its site clock, so the log reads virtual time and a 15 s
    retry delay shows as 15 s between two lines (docs/emulation.md, "Windows form and one clock").

    A file that cannot be written never stops the run, as the product's smsts.log writer keeps
    going when its log fails: a full disk under the cache is often the log's disk too, and the
    engine logs that very failure. Every message is still kept (``messages``), each line is tried
    again (space may come back), and :attr:`write_error` and :attr:`lines_lost` tell what was
    lost, for the caller to report.
    """

    def __init__(self, path: Path, clock: Callable[[], datetime] = wall_clock) -> None:
        self.path = path
        self.clock = clock
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
        line = cmtrace_line(component, message, level, self.clock())
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

    @staticmethod
    def read(path: Path) -> list[LogEntry]:
        """Every record of a CMTrace file, in order: ``(component, message, level, time)``.

        A message may span lines. The time is aware UTC, undoing the bias written after it
        (UTC = local + bias minutes, as Windows counts it). Text between records that is not a
        record (a torn last line after a crash) is refused with its line number, so a log that
        was rebuilt from several boots never silently drops one.
        """
        text = path.read_text(encoding="utf-8", errors="replace")
        entries: list[LogEntry] = []
        position = 0
        for match in _RECORD.finditer(text):
            _refuse_gap(path, text, position, match.start())
            position = match.end()
            attrs = dict(_ATTR.findall(match["attrs"]))
            entries.append(
                (
                    attrs.get("component", ""),
                    match["message"],
                    _level(path, text, match.start(), attrs.get("type", "1")),
                    _when(path, text, match.start(), attrs),
                )
            )
        _refuse_gap(path, text, position, len(text))
        return entries


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _refuse_gap(path: Path, text: str, start: int, end: int) -> None:
    gap = text[start:end]
    if gap.strip():
        where = _line_of(text, start + len(gap) - len(gap.lstrip()))
        message = (
            f"{path}: line {where} is not a CMTrace record (rule: every line is "
            "<![LOG[message]LOG]!><time=... date=... component=...>): "
            f"{gap.strip()[:120]!r}; fix: remove the torn text or read the file as plain text"
        )
        raise SmstsLogFormatError(message)


def _level(path: Path, text: str, offset: int, value: str) -> int:
    if value not in {"0", "1", "2", "3"}:
        message = (
            f"{path}: line {_line_of(text, offset)} has type={value!r} (rule: CMTrace types are "
            "1 information, 2 warning, 3 error); fix: write one of them"
        )
        raise SmstsLogFormatError(message)
    return int(value) or INFO


def _when(path: Path, text: str, offset: int, attrs: dict[str, str]) -> datetime:
    time_match = _TIME.match(attrs.get("time", ""))
    try:
        if time_match is None:
            raise ValueError(attrs.get("time", "no time attribute"))
        hours, minutes, seconds, fraction, sign, bias = time_match.groups()
        month, day, year = (int(part) for part in attrs.get("date", "").split("-"))
        local = datetime(
            year,
            month,
            day,
            int(hours),
            int(minutes),
            int(seconds),
            int((fraction or "0").ljust(6, "0")[:6]),
            tzinfo=UTC,
        )
    except ValueError as error:
        message = (
            f"{path}: line {_line_of(text, offset)} has time={attrs.get('time')!r} "
            f"date={attrs.get('date')!r} ({error}) (rule: time is HH:MM:SS.mmm+bias and date "
            "MM-DD-YYYY); fix: write the time as CMTrace does"
        )
        raise SmstsLogFormatError(message) from None
    minutes_bias = int(bias or "0") * (-1 if sign == "-" else 1)
    return local + timedelta(minutes=minutes_bias)
