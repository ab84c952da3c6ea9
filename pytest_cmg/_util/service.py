"""``with service:``: start on entry, stop on exit, for every service with start() and stop().

The fault proxy, the storage backends, the gateway and the benchmark's parts (its runner, the
download program's gateway, the meter of a timed run, the clock of a child's exit) each wrote
the same two methods; they inherit them here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from types import TracebackType
    from typing import Self

__all__ = ["Service"]


class Service(ABC):
    """A service used as a context manager: the block runs between start() and stop()."""

    @abstractmethod
    def start(self) -> object:
        """Start serving (what it returns is the service's own business)."""

    @abstractmethod
    def stop(self) -> None:
        """Stop serving and free what start() took."""

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
