#!/usr/bin/env python3
"""A minimal alternate content provider (ACP) for pytest-cmg: Python 3.11+, standard library only.

The task sequence runs it (``SMSTSDownloadProgram``) as::

    python3 acp.py [--retries N] [--backoff SECONDS] [--cache DIR] <ini> <PackageID> <destination>

It reads the INI, takes the token-authentication location (the CMG), fetches the package's
manifest with the content access token's signature, checks that the manifest is the content the
task sequence asked for (package, version, and the package hash from the INI), downloads every
file from its SAS URL, checks each file's size and SHA-256, and moves each checked file into the
destination. README.md beside this file has the contract and what this example leaves out.

Exit codes:
    0  done: the package's files, and nothing else, are in the destination
    1  the download failed (network, storage, a file that never matched its SHA-256, tries
       used up); the destination holds no partial file
    2  usage: bad arguments, or an INI that cannot be read
    3  no token-authentication (CMG) location was offered
    4  the CMG offers other content than the INI asks for (another package, version or package
       hash); nothing was downloaded
Any non-zero code makes the task sequence fall back to its built-in download, unless it equals
SMSTSDownloadAbortCode: choose an abort code this program never exits with.
"""

from __future__ import annotations

import argparse
import configparser
import hashlib
import http.client
import random
import shutil
import ssl
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from contextlib import contextmanager
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

USER_AGENT = "pytest-cmg-example-acp/1"
SHA_256 = "32780"  # CALG_SHA_256: the only HashAlgorithm this ACP knows
TRANSIENT = {408, 429, 500, 502, 503, 504}  # statuses worth another try
MAX_WAIT = 60.0  # the longest Retry-After honoured, in seconds
TIMEOUT = 60.0  # seconds for any one socket operation
MAX_MANIFEST = 16 << 20  # bytes
CHUNK = 1 << 16
PARTIAL = ".acp-partial"  # folder in the destination where files are written before they check
T = TypeVar("T")


class Failure(Exception):
    """Ends the run with exit code ``code``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class Retry(Exception):
    """A transient failure of ``what``; ``wait`` is the server's Retry-After, if it gave one."""

    def __init__(self, what: str, why: str, wait: float | None = None) -> None:
        super().__init__(f"{what}: {why}")
        self.wait = wait


class Expired(Exception):
    """Storage answered 403: the SAS URLs have lapsed, a fresh manifest carries new ones."""


@dataclass
class Item:
    """One file of the manifest."""

    relpath: str
    size: int
    sha256: str
    url: str


def log(message: str) -> None:
    """One line on stderr. Never give it a SAS URL's query or an INI value of the CMG."""
    print(f"acp: {message}", file=sys.stderr, flush=True)


def where(url: str) -> str:
    """A URL fit for a log: without its query, which holds the SAS signature."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def retry_after(value: str | None) -> float | None:
    """Retry-After (seconds or an HTTP date) as seconds from now, at most ``MAX_WAIT``."""
    if not value:
        return None
    try:
        seconds = (
            float(value)
            if value.strip().isdigit()
            else (parsedate_to_datetime(value).timestamp() - time.time())
        )
    except (TypeError, ValueError):
        return None
    return min(max(seconds, 0.0), MAX_WAIT)


@contextmanager
def get(
    url: str, headers: dict[str, str], tls: ssl.SSLContext
) -> Iterator[http.client.HTTPResponse]:
    """GET ``url``: the response, whatever its status. Connection failures are :class:`Retry`.

    http.client rather than urllib: no proxy from the environment, no redirect followed to
    another host with the signature, and every status seen as it is.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Failure(1, f"{where(url)}: not an http or https URL")
    connection = (
        http.client.HTTPSConnection(parts.hostname, parts.port, timeout=TIMEOUT, context=tls)
        if parts.scheme == "https"
        else http.client.HTTPConnection(parts.hostname, parts.port, timeout=TIMEOUT)
    )
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        try:
            connection.request("GET", target, headers={"User-Agent": USER_AGENT, **headers})
            answer = connection.getresponse()
        except (OSError, http.client.HTTPException) as error:
            raise Retry(where(url), type(error).__name__) from None
        yield answer
    finally:
        connection.close()


def transient(answer: http.client.HTTPResponse, what: str) -> None:
    """Raise :class:`Retry` for a status worth another try, with the server's Retry-After."""
    if answer.status in TRANSIENT:
        wait = retry_after(answer.getheader("Retry-After"))
        raise Retry(what, f"HTTP {answer.status}", wait)


def with_retries(what: str, attempt: Callable[[], T], options: argparse.Namespace) -> T:
    """``attempt()``, tried again after each :class:`Retry`, ``options.retries`` times at most."""
    tries = options.retries + 1
    for number in range(1, tries + 1):
        try:
            return attempt()
        except Retry as error:
            if number >= tries:
                raise Failure(1, f"{error}; gave up after {number} tries") from None
            wait = error.wait
            if wait is None:  # exponential backoff with jitter
                wait = options.backoff * 2 ** (number - 1) * random.uniform(0.5, 1.0)
            log(f"{error}; trying again in {wait:.2f} s")
            time.sleep(wait)
    raise Failure(1, f"{what}: no try was made (--retries {options.retries})")


# --- the manifest --------------------------------------------------------------------------


def fetch_manifest(cmg: configparser.SectionProxy, options: argparse.Namespace) -> ET.Element:
    """GET the manifest through the CMG, with the access token's signature, trusting CAFile."""
    tls = ssl.create_default_context(cafile=cmg["CAFile"])
    headers = {cmg["SignatureHeader"]: cmg["Signature"]}
    what = "manifest"

    def attempt() -> bytes:
        with get(cmg["ManifestURL"], headers, tls) as answer:
            transient(answer, what)
            if answer.status != 200:
                raise Failure(1, f"{what}: HTTP {answer.status} {answer.reason}")
            try:
                body = answer.read(MAX_MANIFEST + 1)
            except (OSError, http.client.HTTPException) as error:
                raise Retry(what, type(error).__name__) from None
            # read(n) returns a body the server cut short without complaint: count it.
            length = answer.getheader("Content-Length", "")
            if length.isdigit() and len(body) < int(length) <= MAX_MANIFEST:
                raise Retry(what, f"{len(body)} of {length} bytes")
            return body

    body = with_retries(what, attempt, options)
    if len(body) > MAX_MANIFEST or b"<!DOCTYPE" in body:
        raise Failure(4, "manifest: too large, or with a DOCTYPE")
    try:
        # Expat does not fetch external entities, and a DOCTYPE (entity definitions) was refused.
        return ET.fromstring(body)  # noqa: S314
    except ET.ParseError:
        raise Failure(4, "manifest: not well-formed XML") from None


def files_of(root: ET.Element) -> list[Item]:
    """The manifest's files, with safe relative paths."""
    items = []
    for node in root.iterfind("File"):
        relpath, size, sha256 = node.get("RelPath", ""), node.get("Size", ""), node.get("Hash", "")
        parts = relpath.split("/")
        unsafe = relpath.startswith("/") or "\\" in relpath or ":" in relpath
        if unsafe or any(p in ("", ".", "..") for p in parts) or parts[0] == PARTIAL:
            raise Failure(4, f"manifest: unsafe file path {relpath!r}")
        if not size.isdigit() or len(sha256) != 64:
            raise Failure(4, f"manifest: {relpath}: no size or SHA-256")
        items.append(Item(relpath, int(size), sha256.lower(), node.get("Url", "")))
    return items


def check(root: ET.Element, items: list[Item], package: configparser.SectionProxy) -> None:
    """Is the manifest the content the task sequence asked for? Ask before fetching a byte.

    Its package and version, and the package hash of its file list against the INI's ``Hash``:
    the location reply's, the trust anchor. The manifest's own ``Hash`` attribute proves nothing.
    """
    asked = f"{package['PackageID']}.{package['Version']}"
    served = f"{root.get('PackageID')}.{root.get('Version')}"
    if root.tag != "ContentManifest" or served != asked:
        raise Failure(4, f"the CMG serves {served}, the task sequence asks for {asked}")
    if root.get("HashAlgorithm") != SHA_256 or package["HashAlgorithm"] != SHA_256:
        raise Failure(4, "manifest: the hash algorithm is not SHA-256 (32780)")
    if package_hash(items) != package["Hash"].upper():
        raise Failure(4, "the manifest's files do not match the package hash in the INI")


def package_hash(items: list[Item]) -> str:
    """SHA-256 over ``relpath TAB size TAB sha256 LF`` lines sorted by their UTF-8 relpath."""
    digest = hashlib.sha256()
    for item in sorted(items, key=lambda i: i.relpath.encode()):
        digest.update(f"{item.relpath}\t{item.size}\t{item.sha256}\n".encode())
    return digest.hexdigest().upper()


# --- the files -----------------------------------------------------------------------------


def fetch_file(item: Item, partial: Path, tls: ssl.SSLContext) -> None:
    """One try: GET the file into ``partial``, resuming from what it holds; then check it."""
    have = partial.stat().st_size if partial.exists() else 0
    headers = {"Range": f"bytes={have}-"} if 0 < have < item.size else {}
    with get(item.url, headers, tls) as answer:
        if answer.status == 403:
            raise Expired
        transient(answer, item.relpath)
        resumed = answer.status == 206 and (
            answer.getheader("Content-Range", "").startswith(f"bytes {have}-")
        )
        if answer.status != 200 and not resumed:
            raise Failure(1, f"{item.relpath}: HTTP {answer.status} {answer.reason}")
        try:
            # A 200 is the whole file, whatever was asked: start again from byte 0.
            with partial.open("ab" if resumed else "wb") as out:
                while chunk := answer.read(CHUNK):
                    out.write(chunk)
        except (OSError, http.client.HTTPException) as error:
            raise Retry(item.relpath, type(error).__name__) from None
    size = partial.stat().st_size
    if size < item.size:  # the connection closed early: resume on the next try
        raise Retry(item.relpath, f"{size} of {item.size} bytes")
    with partial.open("rb") as done:
        sha256 = hashlib.file_digest(done, "sha256").hexdigest()
    if size != item.size or sha256 != item.sha256:
        partial.unlink()  # wrong bytes somewhere: start again from byte 0
        raise Retry(item.relpath, "the bytes do not match the manifest's SHA-256")


def download(
    items: list[Item],
    destination: Path,
    renew: Callable[[], dict[str, str]],
    tls: ssl.SSLContext,
    options: argparse.Namespace,
) -> None:
    """Every file into ``destination``, each moved to its name only once it checked."""
    staging = destination / PARTIAL
    staging.mkdir()
    renewed = False
    try:
        for number, item in enumerate(items):
            part = staging / str(number)
            while True:
                try:
                    with_retries(item.relpath, partial(fetch_file, item, part, tls), options)
                    break
                except Expired:
                    if renewed:  # one fresh manifest per package, not a loop
                        raise Failure(1, f"{item.relpath}: storage refused a renewed SAS") from None
                    log(f"{item.relpath}: storage answered 403; renewing the SAS URLs")
                    urls, renewed = renew(), True
                    for each in items:
                        each.url = urls[each.relpath]
            target = destination.joinpath(*item.relpath.split("/"))
            target.parent.mkdir(parents=True, exist_ok=True)
            part.replace(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # on every path: no partial file stays


# --- the cache (optional) ------------------------------------------------------------------


def from_cache(cache: Path, key: str, destination: Path) -> bool:
    """Copy a package kept by an earlier run into ``destination``; False if there is none.

    Copied beside, then moved in by one rename per top-level entry. An entry is trusted: its key
    is the package hash, and it was published only after its files checked.
    """
    entry = cache / key
    if not entry.is_dir():
        return False
    staging = destination / PARTIAL
    try:
        shutil.copytree(entry, staging)
        for child in staging.iterdir():
            child.rename(destination / child.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return True


def to_cache(cache: Path, key: str, destination: Path) -> None:
    """Keep a copy of a checked package, published by one rename."""
    cache.mkdir(parents=True, exist_ok=True)
    incoming = Path(tempfile.mkdtemp(prefix=".incoming-", dir=cache))
    try:
        shutil.copytree(destination, incoming, dirs_exist_ok=True)
        incoming.rename(cache / key)
    except OSError:
        shutil.rmtree(incoming, ignore_errors=True)  # another run kept it first: fine


# --- main ----------------------------------------------------------------------------------


def run(options: argparse.Namespace) -> int:
    ini = configparser.ConfigParser(interpolation=None)  # URLs hold '%'
    try:
        with options.ini.open(encoding="utf-8") as handle:
            ini.read_file(handle)
        package = ini["Package"]
        locations = [ini[f"Location{n}"] for n in range(1, int(package["Locations"]) + 1)]
    except (OSError, UnicodeError, ValueError, KeyError, configparser.Error) as error:
        # Not the error's text: a parser's message may quote a line, and lines hold secrets.
        raise Failure(2, f"cannot read the INI ({type(error).__name__})") from None
    if package["PackageID"] != options.package_id:
        raise Failure(2, "the PackageID argument is not the INI's")
    key = package["Hash"].upper()  # the cache is keyed by content, never by name alone
    if options.cache and from_cache(options.cache, key, options.destination):
        log(f"{options.package_id}: copied from the cache")
        return 0
    cmg = next((loc for loc in locations if loc.get("TokenAuth") == "true"), None)
    if cmg is None:
        raise Failure(3, "no token-authentication location offered (SMSTSAllowTokenAuthURLForACP)")
    log(f"{options.package_id}.{package['Version']}: manifest from {where(cmg['ManifestURL'])}")

    def renew() -> dict[str, str]:
        root = fetch_manifest(cmg, options)
        items = files_of(root)
        check(root, items, package)
        return {item.relpath: item.url for item in items}

    root = fetch_manifest(cmg, options)
    items = files_of(root)
    storage_ca = ini["Client"].get("StorageCAFile", "")
    tls = ssl.create_default_context(cafile=storage_ca or None)
    check(root, items, package)
    download(items, options.destination, renew, tls, options)
    log(f"{options.package_id}: {len(items)} file(s), {sum(i.size for i in items)} bytes")
    if options.cache:
        to_cache(options.cache, key, options.destination)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A minimal alternate content provider.")
    parser.add_argument("--retries", type=int, default=4, help="tries after the first (4)")
    parser.add_argument("--backoff", type=float, default=1.0, help="first wait, doubled (1 s)")
    parser.add_argument("--cache", type=Path, help="keep checked packages in this folder")
    parser.add_argument("ini", type=Path)
    parser.add_argument("package_id")
    parser.add_argument("destination", type=Path)
    options = parser.parse_args(argv)  # exits 2 on bad arguments
    try:
        return run(options)
    except Failure as failure:
        log(f"{options.package_id}: {failure}")
        return failure.code


if __name__ == "__main__":
    sys.exit(main())
