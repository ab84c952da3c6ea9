"""The content work of the end of a task sequence: the task sequence cache emptied, a download
a power cut interrupted and nothing finished deleted from staging, and the client cache's
entries released or kept as ``SMSTSPreserveContent`` says. A function of
:class:`~pytest_cmg._client.engine.TaskSequenceEngine` (its method).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .engine import TaskSequenceEngine

#: The task sequence variable that keeps a run's client cache content pinned after it ends.
PRESERVE_CONTENT = "SMSTSPreserveContent"


def _end_content(self: TaskSequenceEngine) -> list[str]:
    """The content work of the end of a run; returns what the task sequence cache held."""
    self.release_content()
    ts, cm = "TSManager", "CacheManager"
    held: list[str] = []
    if self._ts_cache is not None:
        removed = self._ts_cache.clear()
        held = [entry.key for entry in removed]
        for entry in removed:
            self.log.info(
                ts,
                f"Deleting content {entry.key} from the task sequence working directory: "
                "the task sequence has ended",
            )
    # A download a power cut interrupted keeps its journaled prefix in staging for the next
    # boot; if the sequence ended without finishing it (a later failure, a step that no
    # longer ran), nothing will: an unverified byte must not outlive the run.
    for content_id, content_version in sorted(self._sequence_content):
        if self.cache.lookup(content_id, content_version) is None and self.cache.discard_staging(
            content_id, content_version
        ):
            self.log.info(
                cm,
                f"Deleting the partly downloaded content {content_id}.{content_version} that an "
                "interrupted download left: the task sequence has ended",
            )
    for key in sorted(self._downloaded - self._pinned):
        package_id, _, version = key.rpartition(".")
        released = self.cache.lookup(package_id, int(version))
        if released is None:
            continue
        self.cache.expire(released)
        self.log.info(
            cm,
            f"Content {key} is no longer needed by the task sequence: eligible for deletion "
            f"({PRESERVE_CONTENT} is not set)",
        )
    for key in sorted(self._pinned):
        self.log.info(cm, f"Content {key} stays pinned in the cache ({PRESERVE_CONTENT})")
    self._downloaded, self._pinned, self._kept = set(), set(), set()
    return held
