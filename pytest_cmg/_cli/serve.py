"""``python -m pytest_cmg serve``: the world of a scenario, served until a signal."""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import time
from typing import TYPE_CHECKING, Any

from .._errors import PytestCmgError

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Iterator
    from types import FrameType

    from .._harness import Harness
    from .._scenario.model import Scenario
    from .._scenario.world import World

from .common import CONTRACT_VERSION, read_scenario

__all__ = ["serve"]


class _Stop(BaseException):
    """Raised in the main thread by serve's SIGINT/SIGTERM handler to leave start-up or serving.

    Control flow that never leaves ``_serve`` (so it is not one of _errors.py's user-facing
    errors). A BaseException, as KeyboardInterrupt is, so that no ``except Exception`` on the
    way (the storage SDK's, the scenario runner's) takes it for a failure and carries on.
    """


class _StopSignal:
    """serve's SIGINT/SIGTERM handler.

    The first signal cancels distribution (:attr:`cancel`: the upload threads stop between files)
    and, while the main thread is inside :meth:`interruptible`, raises :class:`_Stop` there:
    Azurite's start, content generation and a wait on an upload are all left at once, which
    setting a flag could not do (the old handler did only that, and serve went on distributing
    100,000 files for 90 s). Elsewhere (printing the JSON line, tearing down) it is only
    recorded. Later signals are ignored: teardown is under way and takes under 5 s, and cutting
    it short would leave Azurite to the kernel's parent-death signal.

    The handler touches no lock but the cancel event's, which nothing ever waits on (see
    ``Harness.cancel``): a handler that set an event the main thread waits on could deadlock
    when the signal lands while that thread holds the event's lock.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        #: Called on the first signal, once there is something to cancel (``Harness.cancel``).
        self.cancel: Callable[[], None] | None = None
        self._armed = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            return
        self.signum = signum
        if self.cancel is not None:
            self.cancel()
        if self._armed:
            raise _Stop

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "no signal"

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """A block a signal leaves at once (by :class:`_Stop`); one already received raises."""
        if self.signum is not None:
            raise _Stop
        self._armed = True
        try:
            yield
        finally:
            self._armed = False


def serve(args: argparse.Namespace) -> int:
    """Exit codes: 0 stopped by SIGINT/SIGTERM after the JSON line was printed (the server ran
    as asked); 128 + the signal's number (130 SIGINT, 143 SIGTERM) stopped before it, during
    start-up or distribution (no server ever ran: a supervisor waiting for the line learns why
    none came, and shells read it as "ended by that signal"); 1 start-up failed, or the gateway
    met an error while serving; 2 bad usage or an unusable scenario file.
    """
    stopper = _StopSignal()
    # First of all, so that a signal at any moment of start-up tears down what was started.
    previous = {sig: signal.signal(sig, stopper) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _serve_until_stopped(args, stopper)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _serve_until_stopped(args: argparse.Namespace, stopper: _StopSignal) -> int:
    from .._harness import Harness
    from .._scenario.world import CLIENT_ID, build_world

    if args.azurite == "external" and not args.connection_string:
        print("--azurite=external needs --connection-string", file=sys.stderr)
        return 2
    if args.storage_https and args.azurite != "process":
        print("--storage-https needs --azurite=process", file=sys.stderr)
        return 2
    harness = Harness(
        args.azurite, connection_string=args.connection_string, storage_https=args.storage_https
    )
    stopper.cancel = harness.cancel
    world: World | None = None
    served = False
    try:
        try:
            with stopper.interruptible():
                scenario = read_scenario(args.scenario, "serve", args.case)
                if scenario is None:
                    return 2
                world = build_world(scenario, harness)
                line = _contract_line(scenario, world, harness, args.client_id or CLIENT_ID)
            # Not interruptible: a client must never read half a line. A signal meanwhile is
            # recorded, and the next block raises at once.
            print(json.dumps(line), flush=True)
            served = True
            with stopper.interruptible():
                while True:
                    time.sleep(3600)
        except _Stop:
            pass
        if not served:
            code = 128 + (stopper.signum or 0)
            print(
                f"pytest-cmg serve: stopped by {stopper.name} during start-up, before the JSON "
                f"line: nothing was served, and what had started (Azurite, the gateway) is stopped "
                f"(exit {code})",
                file=sys.stderr,
            )
            if world is not None:
                world.dp.delete()
            return code
        assert world is not None
        world.gateway.check()
        world.dp.delete()
    except PytestCmgError as error:
        print(f"pytest-cmg serve: {error}", file=sys.stderr)
        return 1
    finally:
        harness.stop()
    return 0


def _contract_line(
    scenario: Scenario, world: World, harness: Harness, client_id: str
) -> dict[str, Any]:
    """serve's JSON line (README, "Standalone server"; CONTRACT_VERSION)."""
    token_connection = world.connection(client_id, "token")
    cert_connection = world.connection(client_id, "certificate")
    aad_connection = world.connection(client_id, "azure_ad")
    gateway = world.gateway
    line: dict[str, Any] = {
        "contract": CONTRACT_VERSION,
        "scenario": scenario.name,
        "cmg_url": gateway.url,
        "cmg_hostname": gateway.hostname,
        "ca_cert": str(gateway.ca_pem),
        "site_code": gateway.site_code,
        "mp_role_id": gateway.role_id,
        "client_id": client_id,
        "token": token_connection.token,
        "client_cert": str(cert_connection.client_cert),
        "client_key": str(cert_connection.client_key),
        "aad_token": aad_connection.aad_token,
        "tenant_id": gateway.tenant.tenant_id,
        "blob_endpoint": world.dp.endpoint.url,
        "container": world.dp.container,
        "azurite_pid": harness.backend_pid,
        "packages": [
            {
                "id": package.id,
                "version": package.version,
                "hash": world.manifests[package.id].hash,
                "files": len(world.manifests[package.id].files),
                "size": world.manifests[package.id].total_size,
            }
            for package in scenario.packages
            if package.id in world.manifests
        ],
    }
    if world.storage_ca_cert is not None:
        line["storage_ca_cert"] = str(world.storage_ca_cert)
    return line
