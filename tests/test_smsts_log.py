"""smsts.log: lines stamped by the log's clock, and read back by a CMTrace parser."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import TYPE_CHECKING

import pytest

from pytest_cmg._client.log import ERROR, INFO, WARNING, SmstsLog, SmstsLogFormatError

if TYPE_CHECKING:
    from pathlib import Path

START = datetime(2026, 11, 22, 23, 59, 50, 250000, tzinfo=UTC)


class Ticking:
    """A clock that only moves when told to."""

    def __init__(self, start: datetime) -> None:
        self.at = start

    def __call__(self) -> datetime:
        return self.at


def test_lines_carry_the_log_clock_and_read_back(tmp_path: Path) -> None:
    clock = Ticking(START)
    log = SmstsLog(tmp_path / "smsts.log", clock=clock)
    log.info("TSManager", "first")
    clock.at += timedelta(seconds=15)  # crosses midnight: the date moves too
    log.warning("TSManager", "second")
    clock.at += timedelta(seconds=1.5)
    log.error("OSDDownloadContent", "third")

    text = (tmp_path / "smsts.log").read_text()
    assert 'time="23:59:50.250+000" date="11-22-2026"' in text
    assert 'time="00:00:05.250+000" date="11-23-2026"' in text

    entries = SmstsLog.read(tmp_path / "smsts.log")
    assert [(c, m, lvl) for c, m, lvl, _ in entries] == [
        ("TSManager", "first", INFO),
        ("TSManager", "second", WARNING),
        ("OSDDownloadContent", "third", ERROR),
    ]
    times = [when for *_, when in entries]
    assert times == [START, START + timedelta(seconds=15), START + timedelta(seconds=16.5)]
    assert (times[1] - times[0]).total_seconds() == 15


def test_a_clock_in_another_zone_is_written_in_utc(tmp_path: Path) -> None:
    pacific = timezone(timedelta(hours=-8))
    log = SmstsLog(tmp_path / "smsts.log", clock=lambda: START.astimezone(pacific))
    log.info("TSManager", "x")
    assert SmstsLog.read(tmp_path / "smsts.log")[0][3] == START


def test_default_clock_is_the_wall_clock(tmp_path: Path) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    SmstsLog(tmp_path / "smsts.log").info("TSManager", "now")
    (_, _, _, when) = SmstsLog.read(tmp_path / "smsts.log")[0]
    assert before <= when <= datetime.now(UTC)


def test_multi_line_messages_and_the_products_bias(tmp_path: Path) -> None:
    # A Pacific machine writes local time and bias +480 (UTC = local + bias minutes).
    path = tmp_path / "smsts.log"
    path.write_text(
        '<![LOG[Command line output:\nline two\r\nline three]LOG]!><time="15:03:16.603+480" '
        'date="11-22-2026" component="InstallSoftware" context="" type="1" thread="1" file="">\n'
        '<![LOG[next]LOG]!><time="15:03:17.6+480" date="11-22-2026" component="TSManager" '
        'context="" type="3" thread="1" file="x.cpp:12">\n'
    )
    entries = SmstsLog.read(path)
    # The product's logs are CRLF text; read back, every line break is "\n".
    assert entries[0][1] == "Command line output:\nline two\nline three"
    assert entries[0][3] == datetime(2026, 11, 22, 23, 3, 16, 603000, tzinfo=UTC)
    assert entries[1][:3] == ("TSManager", "next", ERROR)
    assert entries[1][3] == datetime(2026, 11, 22, 23, 3, 17, 600000, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ('<![LOG[ok]LOG]!><time="1:02:03.000+000" date="1-2-2026" component="a">\ntorn <![LOG[', 2),
        ('garbage\n<![LOG[ok]LOG]!><time="01:02:03.000+000" date="01-02-2026" component="a">', 1),
        ('<![LOG[ok]LOG]!><time="25:02:03.000+000" date="01-02-2026" component="a">', 1),
        ('<![LOG[ok]LOG]!><time="01:02:03.000+000" date="01-02-2026" component="a" type="7">', 1),
    ],
)
def test_text_that_is_not_cmtrace_is_refused_with_its_line(
    tmp_path: Path, text: str, line: int
) -> None:
    path = tmp_path / "smsts.log"
    path.write_text(text)
    with pytest.raises(SmstsLogFormatError, match=rf"smsts\.log: line {line} .*fix:"):
        SmstsLog.read(path)
