"""A fake CMG in a process of its own, for ``bench --scaling``'s gateway table.

The gateway is measured in its own interpreter so that its requests per second are the
gateway's, not a share of one GIL with the fifty client threads that load it (on two CPUs the
two processes still share the machine; the table reports both processes' CPU).

``python -m pytest_cmg._bench._gatewayproc`` reads one JSON line on stdin::

    {"endpoint": {"url", "account_name", "account_key", "backend"}, "container": "...",
     "client_ids": ["GUID:...", ...], "workdir": "/tmp/..."}

starts :class:`~pytest_cmg._gateway.server.FakeCMG` on 127.0.0.1 (an OS-picked port) in front of
that container as its cloud DP, prints one JSON line (``url``, ``ca_pem``, ``site_code``,
``role_id``, ``tokens``: a CCM token per client ID, ``pid``), and serves until its stdin reaches
end of file (the bench closed it, or died), then stops and exits 0. A failure to start prints
``{"error": "..."}`` and exits 1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

__all__ = ["main"]


def main() -> int:
    from .._gateway.server import FakeCMG
    from .._storage.azurite import BlobEndpoint
    from .._storage.clouddp import CloudDP

    try:
        job = json.loads(sys.stdin.readline())
        endpoint = BlobEndpoint(**job["endpoint"])
        workdir = Path(job["workdir"])
        workdir.mkdir(parents=True, exist_ok=True)
        cmg = FakeCMG(workdir=workdir)
        cmg.start()
    except Exception as exc:  # reported to the bench, which names the fix
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
        return 1
    dp = CloudDP(endpoint, job["container"])
    try:
        cmg.configure(cloud_dp=dp)
        line = {
            "url": cmg.url,
            "ca_pem": str(cmg.ca_pem),
            "site_code": cmg.site_code,
            "role_id": cmg.role_id,
            "tokens": {client_id: cmg.issue_token(client_id) for client_id in job["client_ids"]},
            "pid": _pid(),
        }
        print(json.dumps(line), flush=True)
        # Serve until the bench closes our stdin: no signal handling, no orphan if it dies.
        sys.stdin.read()
        cmg.check()  # a handler's own failure while serving is the bench's failure
    except Exception as exc:  # reported to the bench, which names the fix
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
        return 1
    finally:
        cmg.stop()
        dp.close()
    return 0


def _pid() -> int:
    import os

    return os.getpid()


if __name__ == "__main__":
    sys.exit(main())
