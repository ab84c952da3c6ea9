"""The alternate content provider (ACP): a downloader the task sequence hands each package to.

The product's seam (Microsoft Learn: Task sequence variables): when the task sequence variable
``SMSTSDownloadProgram`` names a program, the task sequence runs it for each package as
``<program> <ini file> <PackageID> <destination folder>``; an exit code equal to
``SMSTSDownloadAbortCode`` fails the download with no other method tried, any other non-zero
exit falls back to the built-in download. From site 2203, ``SMSTSAllowTokenAuthURLForACP=true``
offers token-authentication sources (the CMG) to the program; otherwise they are left out.

What is public stops there. The INI's content is not public: :func:`render_ini` is our design
(docs/emulation.md, "Alternate content provider"), as are the timeout, the HRESULT of an abort
and the Python interface. A Python downloader implements :class:`ContentProvider` and plugs in
without a subprocess (``TaskSequenceEngine(provider=...)``); the program of
``SMSTSDownloadProgram`` is itself one implementation, :class:`ProgramProvider`, so the engine
has one path for both and verifies what either delivered in the same way (``engine.py``).

The INI holds secrets (the content access token's signature, the client's CCM token): it is
created owner-only (``O_CREAT | O_EXCL``, mode 0600) in a private temporary folder (0700), never
logged, and deleted with its folder when the program ends, on every path (exit, timeout,
exception, interrupt).
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Protocol, runtime_checkable

from .._errors import InvalidValueError, PytestCmgError
from .._protocol.location import CALG_SHA_256
from .._util.tree import walk_entries

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "ABORT_CODE",
    "ALLOW_TOKEN_AUTH",
    "DEFAULT_TIMEOUT",
    "DOWNLOAD_PROGRAM",
    "E_ABORT",
    "INI_NAME",
    "OUTPUT_MAX_LINE",
    "OUTPUT_MAX_LINES",
    "TOKEN_AUTH_FOR_ACP_SINCE",
    "ContentProvider",
    "FolderContent",
    "ProgramProvider",
    "ProviderLocation",
    "ProviderRequest",
    "ProviderTimeout",
    "ProviderToken",
    "locate_program",
    "parse_abort_code",
    "read_folder",
    "render_ini",
]

#: The task sequence variables of the ACP (Microsoft Learn: Task sequence variables).
DOWNLOAD_PROGRAM = "SMSTSDownloadProgram"
ABORT_CODE = "SMSTSDownloadAbortCode"
ALLOW_TOKEN_AUTH = "SMSTSAllowTokenAuthURLForACP"
#: The site version from which token-authentication sources may be offered to the ACP.
TOKEN_AUTH_FOR_ACP_SINCE = 2203
#: Seconds a program may run before its process group is killed (emulation: the product
#: publishes none). An hour covers a multi-gigabyte package over a slow link.
DEFAULT_TIMEOUT = 3600.0
#: The INI's file name: the one a vendor's ACP log shows (``X:\\Windows\\TEMP\\SMSTSDownload.INI``).
INI_NAME = "SMSTSDownload.INI"
#: E_ABORT: what a download stopped by SMSTSDownloadAbortCode fails with (emulation: no code is
#: published for it).
E_ABORT = 0x80004004
#: The longest wait between two checks of a running program (seconds).
_POLL_MAX = 0.05
#: A program's output passed on to the log: lines, and characters per line (emulation bounds).
OUTPUT_MAX_LINES = 10_000
OUTPUT_MAX_LINE = 4096
#: How long the output's reader may still run after the program's group was killed (seconds).
_OUTPUT_DRAIN = 5.0


@dataclass(frozen=True)
class ProviderToken:
    """What a token-authenticating provider needs to fetch the manifest through the CMG.

    ``GET manifest_url`` with the header ``signature_header: signature``, trusting ``ca_file``
    for the gateway, answers the content manifest (docs/emulation.md, "Content manifest
    schema"), whose files carry their SAS URLs. ``client_token`` is the client's CCM token
    (``Authorization: Bearer``), when the engine holds one (token and Azure AD clients).
    """

    tid: str
    iss: str
    alg: str
    st: str
    et: str
    signature: str = field(repr=False)
    signature_header: str
    manifest_url: str
    ca_file: Path
    client_token: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class ProviderLocation:
    """One location record offered to the provider, in the order of the location reply."""

    url: str
    #: ``CLOUD`` for the CMG, ``SERVER`` for an on-premises DP (the reply's ``DPType``).
    dp_type: str
    #: ``LOCAL``, ``SUBNET`` or ``REMOTE`` (the reply's ``Locality``).
    locality: str
    #: The reply's ``ServerRemoteName``.
    server: str
    version: int
    #: Set for a token-authentication source (the CMG): how to authenticate to it.
    token: ProviderToken | None = None

    @property
    def token_auth(self) -> bool:
        return self.token is not None


@dataclass(frozen=True)
class ProviderRequest:
    """One package for a provider: what the INI says, as a typed object.

    The provider writes the package's files, and nothing else, into ``destination`` (an empty
    folder that exists), each at its relative path. After it returns 0 the engine hashes the
    folder from disk and compares the package hash with ``package_hash``.
    """

    package_id: str
    version: int
    #: The package hash from the location reply (upper-case hex), the trust anchor.
    package_hash: str
    destination: Path
    locations: tuple[ProviderLocation, ...]
    site_code: str
    client_id: str
    site_version: int
    #: ``SMSTSDownloadAbortCode`` when it is set: returning it fails the download.
    abort_code: int | None = None
    #: The CA that storage's HTTPS certificate chains to, when it is a private one.
    storage_ca_file: Path | None = None
    hash_algorithm: int = CALG_SHA_256


@runtime_checkable
class ContentProvider(Protocol):
    """A downloader the engine hands each package to before its built-in download.

    ``fetch`` writes the package into ``request.destination`` and returns an exit code, with
    the meaning of an ACP's: 0 is done (the engine then verifies the folder: a wrong, missing
    or extra file fails the package with 0x80091007), ``request.abort_code`` fails the download
    with no other method tried, anything else (or an exception) falls back to the built-in
    download.
    """

    def fetch(self, request: ProviderRequest) -> int:
        """Download ``request``'s package into ``request.destination``; return an exit code."""
        ...


class ProviderTimeout(PytestCmgError, TimeoutError):
    """A program did not exit in time; its process group was killed.

    Also a ``TimeoutError``, its only base before it joined the one exception tree.
    """


def parse_abort_code(value: str) -> int:
    """``SMSTSDownloadAbortCode``'s value: decimal (``7``) or hexadecimal (``0x80004004``).

    Raises ``ValueError`` naming the value and the forms accepted.
    """
    text = value.strip()
    try:
        if text[:2].lower() == "0x":
            return int(text[2:], 16)
        return int(text, 10)
    except ValueError:
        msg = (
            f"{ABORT_CODE}={value!r} is not an exit code: give a decimal (7) or hexadecimal "
            "(0x80004004) integer"
        )
        raise InvalidValueError(msg) from None


# --- the INI ---------------------------------------------------------------------------------


def render_ini(request: ProviderRequest) -> str:
    """The INI for ``request`` (configparser syntax; our design, docs/emulation.md).

    Sections ``[Package]``, ``[Client]`` and ``[Location1]``..``[LocationN]`` in reply order; a
    token-authentication location adds the access token, the signature and its header, the
    manifest URL, the CA to trust and the client token. Values are single lines written as is:
    read them with interpolation off (``%`` occurs in URLs). ``ValueError`` when a value holds a
    line break or NUL, which no INI reader could take back.
    """
    sections: list[tuple[str, list[tuple[str, str]]]] = [
        (
            "Package",
            [
                ("PackageID", request.package_id),
                ("Version", str(request.version)),
                ("HashAlgorithm", str(request.hash_algorithm)),
                ("Hash", request.package_hash),
                ("Destination", str(request.destination)),
                ("Locations", str(len(request.locations))),
            ],
        ),
        (
            "Client",
            [
                ("SiteCode", request.site_code),
                ("ClientID", request.client_id),
                ("SiteVersion", str(request.site_version)),
                ("AbortCode", "" if request.abort_code is None else str(request.abort_code)),
                ("StorageCAFile", str(request.storage_ca_file or "")),
            ],
        ),
    ]
    for number, location in enumerate(request.locations, start=1):
        keys = [
            ("URL", location.url),
            ("Type", location.dp_type),
            ("Locality", location.locality),
            ("Server", location.server),
            ("Version", str(location.version)),
            ("TokenAuth", "true" if location.token_auth else "false"),
        ]
        token = location.token
        if token is not None:
            keys += [
                ("ManifestURL", token.manifest_url),
                ("TokenTid", token.tid),
                ("TokenIss", token.iss),
                ("TokenAlg", token.alg),
                ("TokenSt", token.st),
                ("TokenEt", token.et),
                ("SignatureHeader", token.signature_header),
                ("Signature", token.signature),
                ("ClientToken", token.client_token or ""),
                ("CAFile", str(token.ca_file)),
            ]
        sections.append((f"Location{number}", keys))
    lines = [
        f"; {INI_NAME} for {DOWNLOAD_PROGRAM} (pytest-cmg). Holds secrets: owner-only, deleted "
        "when the program ends.",
    ]
    for name, keys in sections:
        lines += ["", f"[{name}]"]
        for key, value in keys:
            if any(c in value for c in "\r\n\x00"):
                msg = (
                    f"{INI_NAME} [{name}] {key}: the value holds a line break or NUL, which an "
                    "INI cannot carry; the location reply or settings that gave it are unusable"
                )
                raise InvalidValueError(msg)
            lines.append(f"{key} = {value}")
    return "\n".join(lines) + "\n"


# --- the program ------------------------------------------------------------------------------


class ProgramProvider:
    """``SMSTSDownloadProgram``: runs ``<program> <ini> <PackageID> <destination>``.

    ``program`` is split like a POSIX shell would (``shlex``), so ``python3 /path/acp.py`` and
    quoted paths work. The program runs in a new session (its own process group), with the
    engine's environment and working directory, stdin from ``/dev/null``. When it exits,
    whatever it left running in its process group is killed (no straggler may write into the
    folder after the engine verified it); after ``timeout`` seconds the whole group is killed
    and :class:`ProviderTimeout` raised.

    ``on_event`` receives the log lines (the command line, the exit code, the timeout); never
    the INI's content. ``on_output`` receives the program's stdout and stderr, merged, one line
    at a time (at most :data:`OUTPUT_MAX_LINES` lines of :data:`OUTPUT_MAX_LINE` characters,
    then one line saying what was cut: a program that floods its output must not fill the
    engine's log); without it, the output goes to the engine's stderr (file descriptor 2,
    never the engine's stdout, which may carry a JSON summary). ``temp_dir`` is where the
    private folder of the INI is made (the system's temporary folder by default).
    """

    def __init__(
        self,
        program: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        temp_dir: Path | None = None,
        on_event: Callable[[str], None] | None = None,
        on_output: Callable[[str], None] | None = None,
    ) -> None:
        try:
            argv = shlex.split(program)
        except ValueError as error:
            msg = (
                f"{DOWNLOAD_PROGRAM}={program!r} cannot be split into arguments ({error}); "
                "quote it as a POSIX shell would"
            )
            raise InvalidValueError(msg) from None
        if not argv:
            msg = f"{DOWNLOAD_PROGRAM} is empty: name the program to run"
            raise InvalidValueError(msg)
        if timeout <= 0:
            msg = f"ProgramProvider timeout must be positive seconds, got {timeout!r}"
            raise InvalidValueError(msg)
        self.program = program
        self.argv = tuple(argv)
        self.timeout = timeout
        self.temp_dir = temp_dir
        self.on_event = on_event or (lambda line: None)
        self.on_output = on_output

    def __repr__(self) -> str:
        return f"ProgramProvider({self.program!r}, timeout={self.timeout!r})"

    def fetch(self, request: ProviderRequest) -> int:
        folder = Path(tempfile.mkdtemp(prefix="pytest-cmg-acp-", dir=self.temp_dir))
        ini = folder / INI_NAME
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(ini, flags, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
                handle.write(render_ini(request))
            argv = [*self.argv, str(ini), request.package_id, str(request.destination)]
            self.on_event(f"Executing command line: {shlex.join(argv)}")
            return self._run(argv)
        finally:
            # Every path: the INI's secrets must not outlive the program. The folder goes too,
            # with anything the program put in it.
            with suppress(FileNotFoundError):
                ini.unlink()
            shutil.rmtree(folder, ignore_errors=True)

    def _run(self, argv: list[str]) -> int:
        captured = self.on_output is not None
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if captured else 2,
            stderr=subprocess.STDOUT if captured else 2,
            start_new_session=True,
            close_fds=True,
        )
        reader: threading.Thread | None = None
        if process.stdout is not None and self.on_output is not None:
            # A thread, not reads in the wait loop below: a program blocked on a full pipe would
            # otherwise never exit, and the loop never learn it should read.
            reader = threading.Thread(
                target=_pass_lines,
                args=(process.stdout, self.on_output),
                name=f"acp-output-{process.pid}",
                daemon=True,
            )
            reader.start()
        timed_out = False
        try:
            deadline = time.monotonic() + self.timeout
            pause = 0.001
            # waitid(WNOWAIT) sees the exit without reaping: the leader stays a zombie, so its
            # PID (the group's ID) cannot be reused before the group is killed below.
            while os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    timed_out = True
                    break
                time.sleep(min(pause, remaining))
                pause = min(pause * 2, _POLL_MAX)
        finally:
            # Every path (exit, timeout, an exception or interrupt here): nothing the program
            # started may go on writing into the destination the engine is about to verify.
            with suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            code = process.wait()
            if reader is not None:
                # The group is dead, so the pipe's last writer is gone and the reader ends at
                # EOF; a grandchild that left the group may hold the pipe open, hence the bound.
                reader.join(_OUTPUT_DRAIN)
            if process.stdout is not None:
                process.stdout.close()
        if timed_out:
            self.on_event(
                f"The alternate content provider did not exit within {self.timeout:g} seconds: "
                f"killed its process group ({process.pid})"
            )
            msg = (
                f"{self.argv[0]} did not exit within {self.timeout:g} s ({DOWNLOAD_PROGRAM}); "
                "its process group was killed"
            )
            raise ProviderTimeout(msg)
        if code < 0:
            self.on_event(f"Process was ended by signal {-code}")
        else:
            self.on_event(f"Process completed with exit code {code}")
        return code


def locate_program(first: str, here: Path) -> str:
    """A program's first word as the engine will start it; ``ValueError`` saying the fix.

    A path (``./acp.sh``) is made absolute against ``here`` and must be an executable file; it
    is not resolved: a virtual environment's ``python`` is a link to the base interpreter, and
    run through its target it would lose the environment's packages. Any other word must be
    found on PATH, and is returned as it is.
    """
    if os.sep in first or (os.altsep is not None and os.altsep in first):
        path = Path(os.path.normpath(here / first))
        if not path.is_file() or not os.access(path, os.X_OK):
            msg = (
                f"{path} is not an executable file; create it and make it executable "
                "(chmod +x), or name an interpreter first (python3 /path/acp.py)"
            )
            raise InvalidValueError(msg)
        return str(path)
    if shutil.which(first) is None:
        msg = (
            f"{first!r} is not found on PATH; give a path to the program (./acp.sh) or put its "
            "folder on PATH"
        )
        raise InvalidValueError(msg)
    return first


def _pass_lines(stream: IO[bytes], emit: Callable[[str], None]) -> None:
    """Hand ``stream``'s lines to ``emit`` until EOF, within the output bounds."""
    lines = cut = 0
    with suppress(OSError, ValueError):  # ValueError: the stream was closed after the drain
        for raw in stream:
            if lines >= OUTPUT_MAX_LINES:
                cut += 1  # read on, or the program blocks on a full pipe
                continue
            lines += 1
            text = raw.decode("utf-8", "replace").rstrip("\r\n")
            if len(text) > OUTPUT_MAX_LINE:
                text = (
                    text[:OUTPUT_MAX_LINE] + f"... ({len(text) - OUTPUT_MAX_LINE} characters cut)"
                )
            emit(text)
    if cut:
        emit(f"... {cut} more output line(s) not logged (at most {OUTPUT_MAX_LINES} are)")


# --- what a provider delivered ---------------------------------------------------------------


@dataclass(frozen=True)
class FolderContent:
    """A folder hashed from disk: its regular files and what cannot be content."""

    #: relpath (``/``-separated) -> (size, SHA-256 lower-case hex), computed from the bytes.
    files: dict[str, tuple[int, str]]
    #: Relative paths of links, special files and names that are not UTF-8: never content.
    refused: list[str]

    @property
    def size(self) -> int:
        return sum(size for size, _ in self.files.values())


def read_folder(folder: Path) -> FolderContent:
    """Hash every regular file under ``folder`` from its bytes; links are not followed.

    A file is opened without following a link and hashed from that descriptor, so what is
    hashed is what is there, whatever its name claims.
    """
    files: dict[str, tuple[int, str]] = {}
    refused: list[str] = []
    # A folder whose name is not UTF-8 is not entered: it is refused whole, as one name.
    for entry, relpath in walk_entries(folder, descend=_is_utf8):
        if not _is_utf8(relpath):
            refused.append(relpath.encode("utf-8", "backslashreplace").decode("utf-8"))
            continue
        if not entry.is_file(follow_symlinks=False):
            refused.append(relpath)
            continue
        try:
            # O_NONBLOCK: a FIFO swapped in after the scan must not block the engine.
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
            fd = os.open(entry.path, flags)
        except OSError:
            refused.append(relpath)
            continue
        with os.fdopen(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                refused.append(relpath)
                continue
            digest = hashlib.file_digest(handle, "sha256")
            files[relpath] = (handle.tell(), digest.hexdigest())
    return FolderContent(files, sorted(refused))


def _is_utf8(relpath: str) -> bool:
    """Whether a name can be written as UTF-8 (one read from disk may hold lone surrogates)."""
    try:
        relpath.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
