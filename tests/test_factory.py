"""One place builds clients (issue 11, item 5): ``pytest_cmg._client.factory``.

The plugin's ``cmg_client``, the scenario runner, the ``client`` command and the tests assemble
an engine (connection, cache, log, download core, storage CA, provider) through
``build_engine``; a second spelling would drift (a new part wired into one path and not the
others), so it is looked for here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pytest_cmg._client.factory import AUTH_KINDS, build_engine, connection_for

ROOT = Path(__file__).resolve().parents[1]
#: A call, not a mention in a docstring's ``TaskSequenceEngine(provider=...)``.
CONSTRUCTED = re.compile(r"(?<![`\w.])TaskSequenceEngine\(")


def test_only_the_factory_constructs_an_engine() -> None:
    found = []
    for path in sorted([*ROOT.glob("pytest_cmg/**/*.py"), *ROOT.glob("tests/**/*.py")]):
        if path.name == "factory.py" or path == Path(__file__):
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if CONSTRUCTED.search(line) and "``" not in line:
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert found == [], "build the engine with pytest_cmg._client.factory.build_engine"


class _Gateway:
    url = "https://cmg.test"
    ca_pem = Path("/ca.pem")
    site_code = "PS1"
    role_id = "72057594037927939"

    def issue_token(self, client_id: str) -> str:
        return f"token-of-{client_id}"

    def issue_client_certificate(self, client_id: str) -> object:
        return type("Pair", (), {"cert": Path(f"/{client_id}.crt"), "key": Path("/k.pem")})()

    def issue_aad_token(self, client_id: str) -> str:
        return f"aad-of-{client_id}"


@pytest.mark.parametrize("auth", AUTH_KINDS)
def test_connection_for_carries_exactly_the_credentials_of_its_kind(auth: str) -> None:
    connection = connection_for(_Gateway(), "GUID:a", auth)  # type: ignore[arg-type]
    held = {
        "token": connection.token,
        "certificate": connection.client_cert,
        "azure_ad": connection.aad_token,
    }
    assert [kind for kind, value in held.items() if value] == [auth]
    assert (connection.cmg_url, connection.site_code, connection.client_id) == (
        "https://cmg.test",
        "PS1",
        "GUID:a",
    )


def test_connection_for_refuses_an_unknown_kind() -> None:
    with pytest.raises(ValueError, match="auth='kerberos' is not a way to authenticate"):
        connection_for(_Gateway(), "GUID:a", "kerberos")  # type: ignore[arg-type]


def test_build_engine_puts_log_and_cache_under_the_folder(tmp_path: Path) -> None:
    engine = build_engine(connection_for(_Gateway(), "GUID:a"), tmp_path, cache_mb=7)  # type: ignore[arg-type]
    try:
        assert engine.log.path == tmp_path / "smsts.log"
        # C:\Windows\ccmcache, with the folder as the system drive C: (winpath).
        assert engine.cache.root == tmp_path / "Windows" / "ccmcache"
        assert engine.system_drive == tmp_path
        assert engine.cache.size_mb == 7
    finally:
        engine.close()
