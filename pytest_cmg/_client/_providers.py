"""The alternate content provider's turn for a located package (``acp.py``): which provider,
the locations it is offered, its run, and the check of what it delivered.
Functions of :class:`~pytest_cmg._client.engine.TaskSequenceEngine` (its methods).
"""

from __future__ import annotations

import shutil
import time
from typing import TYPE_CHECKING

from .._errors import ContentError
from .._protocol.manifest import ManifestFile, package_hash
from .._protocol.winpath import windows_text
from .acp import (
    ABORT_CODE,
    ALLOW_TOKEN_AUTH,
    DOWNLOAD_PROGRAM,
    E_ABORT,
    TOKEN_AUTH_FOR_ACP_SINCE,
    FolderContent,
    ProgramProvider,
    ProviderLocation,
    ProviderRequest,
    parse_abort_code,
    read_folder,
)
from .cmg import offered_location
from .sequence import _LEFT_SHOWN, PackageTransfer, ProviderRun, _true

if TYPE_CHECKING:
    from pathlib import Path

    from .._protocol.location import ContentLocationReply
    from .acp import ContentProvider
    from .cache import CacheEntry, ClientCache
    from .sequence import _Outcome

if TYPE_CHECKING:
    from .engine import TaskSequenceEngine


#: Task sequence variables of the content locations (Microsoft Learn: Task sequence variables).
#: The smsts.log component of an alternate content provider's own output (emulation: the
#: product publishes no such line; docs/emulation.md).
PROGRAM_OUTPUT = "DownloadProgram"


def _content_provider(self: TaskSequenceEngine) -> tuple[ContentProvider, str] | None:
    """The provider to hand content to, and its name for the log, if any.

    ``SMSTSDownloadProgram`` (what the task sequence says) wins over the engine's Python
    ``provider``. A program string that cannot be split is logged and the built-in download
    used, as for a program that cannot run.
    """
    program = self.variables.get(DOWNLOAD_PROGRAM, "").strip()
    if not program:
        if self.provider is None:
            return None
        return self.provider, type(self.provider).__qualname__
    try:
        runner = ProgramProvider(
            program,
            timeout=self.download_program_timeout,
            # Its command line and output name the folder it was given on disk: written in
            # the client's form, as a Windows program's would read (winpath.windows_text).
            on_event=lambda line: self.log.info("TSManager", windows_text(line, self.system_drive)),
            # Into smsts.log (emulation, docs/emulation.md): what the program prints is
            # then read as the product's own lines are, so a leaked secret is seen.
            on_output=lambda line: self.log.info(
                PROGRAM_OUTPUT, windows_text(line, self.system_drive)
            ),
        )
    except ValueError as error:
        self.log.error("TSManager", f"{error}: using the built-in download")
        return None
    return runner, program


def _abort_code(self: TaskSequenceEngine) -> int | None:
    value = self.variables.get(ABORT_CODE, "").strip()
    if not value:
        return None
    try:
        return parse_abort_code(value)
    except ValueError as error:
        self.log.error("TSManager", f"{error}; no exit code aborts the download")
        return None


def _offered(self: TaskSequenceEngine, reply: ContentLocationReply) -> tuple[ProviderLocation, ...]:
    """The location records offered to a provider, in reply order.

    A token-authentication source (the CMG: a record with an access token) is offered only
    when ``SMSTSAllowTokenAuthURLForACP`` is true and the site is 2203 or later; it then
    carries what is needed to fetch its manifest (the token's fields and signature, the
    gateway's CA, the client's CCM token).
    """
    if not _true(self.variables, ALLOW_TOKEN_AUTH):
        withheld = f"{ALLOW_TOKEN_AUTH} is not true"
    elif self.site_version < TOKEN_AUTH_FOR_ACP_SINCE:
        withheld = (
            f"{ALLOW_TOKEN_AUTH} applies from site version {TOKEN_AUTH_FOR_ACP_SINCE}; this "
            f"site is {self.site_version}"
        )
    else:
        withheld = ""
    offered: list[ProviderLocation] = []
    for record in reply.records:
        token = record.access_token
        if token is not None and withheld:
            self.log.info(
                "TSManager",
                "Not offering the token-authentication source "
                f"'{record.server_remote_name}' to the alternate content provider: "
                f"{withheld}",
            )
            continue
        offered.append(offered_location(self.client, record))
    return tuple(offered)


def _provide(
    self: TaskSequenceEngine,
    provider: ContentProvider,
    name: str,
    package_id: str,
    version: int,
    reply: ContentLocationReply,
    store: ClientCache,
) -> CacheEntry | None:
    """Hand the content to ``provider``; the verified, committed entry, or ``None`` to fall
    back to the built-in download.

    The provider writes into a folder of its own in the store's staging area (hidden, so
    no eviction takes it meanwhile); after it returns 0 the folder is hashed from disk and
    its package hash checked against the location reply before it is committed, by one
    rename, where the built-in download would have put the content. The folder is removed
    on every other path, so nothing unverified reaches a cache or outlives the call.
    """
    key = f"{package_id}.{version}"
    ts = "TSManager"
    folder = store.provider_folder(package_id, version)
    started = time.perf_counter()
    try:
        # A folder left by a process killed during an earlier provider run is not trusted.
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        request = ProviderRequest(
            package_id=package_id,
            version=version,
            package_hash=reply.package_hash.upper(),
            destination=folder,
            locations=self._offered(reply),
            site_code=self.client.connection.site_code,
            client_id=self.client.connection.client_id,
            site_version=self.site_version,
            abort_code=self._abort_code(),
            storage_ca_file=self.storage_ca_file,
        )
        self.log.info(
            ts,
            f"Downloading content {key} with the alternate content provider {name} "
            f"({len(request.locations)} location(s) offered) into {self.windows(folder)}",
        )

        def ended(code: int | None, outcome: _Outcome) -> None:
            left: tuple[str, ...] = ()
            # Exit 0 hands the folder over (verified next); any other end must leave it empty.
            if outcome in ("fell back", "aborted"):
                left = _left_in(folder)
                if left:
                    self.log.warning(
                        ts,
                        f"The alternate content provider left {_count(left)} in "
                        f"{self.windows(folder)} "
                        f"for content {key}: {', '.join(left)}; removing them",
                    )
            self.provider_runs.append(
                ProviderRun(package_id, version, name, code, outcome, left, began, time.monotonic())
            )

        began = time.monotonic()
        try:
            code = provider.fetch(request)
        except Exception as error:  # any failure of a provider is a fallback, as a non-zero exit
            self.log.error(
                ts,
                f"The alternate content provider failed for content {key} "
                f"({type(error).__name__}: {error}); falling back to the built-in download",
            )
            ended(None, "fell back")
            return None
        if not isinstance(code, int):
            self.log.error(
                ts,
                f"The alternate content provider returned {code!r} for content {key}, not "
                "an exit code; falling back to the built-in download",
            )
            ended(None, "fell back")
            return None
        if request.abort_code is not None and code == request.abort_code:
            ended(code, "aborted")
            self.log.error(
                ts,
                f"The alternate content provider exited with {code}, the abort code "
                f"({ABORT_CODE}): the download of {key} failed and no other download "
                "method is tried",
            )
            self._download_failed(package_id, version, E_ABORT)
            raise ContentError(
                E_ABORT,
                f"{key}: the alternate content provider {name} exited with {code}, which "
                f"{ABORT_CODE} makes an abort; no other download method is tried",
            )
        if code != 0:
            self.log.error(
                ts,
                f"The alternate content provider exited with {code} for content {key}; "
                "falling back to the built-in download",
            )
            ended(code, "fell back")
            return None
        self.log.info(ts, f"The alternate content provider exited with 0: verifying content {key}")
        content = read_folder(folder)
        try:
            self._verify_provided(name, package_id, version, folder, content, reply)
        except ContentError:
            ended(0, "refused")
            raise
        ended(0, "delivered")
        total = content.size
        self._make_room(store, package_id, version, total)
        entry = self._publish(store, folder, package_id, version)
        # A prefix an earlier try of the built-in download kept for resuming is not needed.
        store.discard_staging(package_id, version)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    self._committed(entry, store, total)
    self.transfers.append(
        PackageTransfer(
            package_id,
            version,
            len(content.files),
            total,
            time.perf_counter() - started,
            from_cache=False,
            provider=name,
        )
    )
    return entry


def _verify_provided(
    self: TaskSequenceEngine,
    name: str,
    package_id: str,
    version: int,
    folder: Path,
    content: FolderContent,
    reply: ContentLocationReply,
) -> None:
    """The package hash of what a provider wrote, from the bytes on disk, against the reply.

    The package hash covers every file's relative path, size and SHA-256, so a wrong byte,
    a wrong size, a missing or an extra file each change it; links and special files are
    never content. Failures are the built-in download's: 0x80091007 with its log lines.
    """
    key = f"{package_id}.{version}"
    expected = reply.package_hash.upper()
    computed = package_hash(
        [ManifestFile(rel, size, sha) for rel, (size, sha) in content.files.items()]
    )
    if self._hashes_match(reply, computed) and not content.refused:
        self._hash_verified(key)
        return
    listed = sorted(content.files.items(), key=lambda item: item[0].encode("utf-8"))
    shown = ", ".join(f"{rel} ({size} bytes)" for rel, (size, _) in listed[:5])
    if len(listed) > 5:
        shown += f" and {len(listed) - 5} more"
    refused = (
        f"; not files (links, special files or names that are not UTF-8): "
        f"{', '.join(content.refused[:5])}"
        if content.refused
        else ""
    )
    raise self._hash_mismatch(
        package_id,
        version,
        f"{key}: the alternate content provider {name} exited with 0, but the "
        f"{len(listed)} file(s) in {self.windows(folder)} ({shown or 'none'}) give package hash "
        f"{computed}, not the location reply's {expected}{refused}: a file is wrong, "
        "missing or extra. A provider must write exactly the package's files, byte for "
        "byte, and nothing else, into the destination folder",
    )


def _left_in(folder: Path) -> tuple[str, ...]:
    """Files (any entry but a folder) under ``folder``, relative, sorted; at most _LEFT_SHOWN."""
    found: list[str] = []
    try:
        for path in sorted(folder.rglob("*")):
            if not path.is_dir() or path.is_symlink():
                found.append(path.relative_to(folder).as_posix())
                if len(found) == _LEFT_SHOWN:
                    break
    except OSError:
        pass  # what was listed before the folder went away is still what it held
    return tuple(found)


def _count(left: tuple[str, ...]) -> str:
    more = "+" if len(left) == _LEFT_SHOWN else ""
    return f"{len(left)}{more} file(s)"
