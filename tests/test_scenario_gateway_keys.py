"""The scenario keys of the gateway's fidelity switches: CMG settings, on-premises DPs, client
certificate and Azure AD variants, measured egress.

The first part is pure (files written into ``tmp_path``, every expected line computed from the
text written); the last tests build worlds on the session's harness (real Azurite and the HTTPS
fake CMG) and check what the gateway was given.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import textwrap
from typing import TYPE_CHECKING

import pytest
from cryptography import x509

from pytest_cmg._errors import ScenarioError, ScenarioProblem
from pytest_cmg._gateway.tls import CLIENT_CA_NAME, PARTNER_CA_NAME
from pytest_cmg._protocol.manifest import ContentManifest, ManifestFile
from pytest_cmg._scenario.content import generate_package
from pytest_cmg._scenario.expectations import check_expectations
from pytest_cmg._scenario.load import load_scenario, load_scenarios
from pytest_cmg._scenario.model import DistributionPointSpec, Scenario
from pytest_cmg._scenario.runner import run_scenario
from pytest_cmg._scenario.world import CLIENT_ID, build_world

if TYPE_CHECKING:
    from pathlib import Path

    from pytest_cmg._gateway.tokens import AzureADDirectory

BASE = """\
scenario: upgrade
seed: 3
packages:
  - id: PS100012
    type: os_upgrade
    files: 2
    size: 64KiB
  - id: PS100013
    type: driver
    files: 3
    size: 24KiB
task_sequence:
  id: PS100020
  name: Windows 11 in-place upgrade
  steps:
    - name: Upgrade the operating system
      action: upgrade_os
      package: PS100012
    - name: Apply drivers
      action: apply_driver_package
      package: PS100013
expect:
  outcome: success
"""


def write(folder: Path, text: str, name: str = "s.cmg.yaml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def line_of(path: Path, needle: str) -> int:
    lines = path.read_text(encoding="utf-8").splitlines()
    return next(i for i, line in enumerate(lines, 1) if needle in line)


def problems(path: Path) -> list[ScenarioProblem]:
    with pytest.raises(ScenarioError) as info:
        load_scenarios(path)
    return info.value.problems


def one(path: Path) -> ScenarioProblem:
    found = problems(path)
    assert len(found) == 1, [str(p) for p in found]
    return found[0]


# --------------------------------------------------------------------------------------------
# reading the keys
# --------------------------------------------------------------------------------------------


def test_defaults_change_nothing(tmp_path: Path) -> None:
    scenario = load_scenario(write(tmp_path, BASE))
    cmg = scenario.cmg
    assert (cmg.prefer_cloud_sources, cmg.classic_cloud_dp, cmg.crl_check, cmg.measure_egress) == (
        False,
        False,
        False,
        False,
    )
    assert cmg.certificate_trust_list == ()
    assert scenario.trust_list == ()
    assert scenario.crl_reachable is True
    assert (scenario.auth, scenario.certificate, scenario.tenant) == ("token", "valid", "enabled")
    assert scenario.distribution_points == ()
    assert scenario.expect.egress_bytes is None


def test_every_key_is_carried_through(tmp_path: Path) -> None:
    text = BASE.replace(
        "task_sequence:",
        """\
cmg:
  site_version: 2103
  prefer_cloud_sources: true
  classic_cloud_dp: true
  crl_check: true
  crl_reachable: false
  certificate_trust_list: [site, partner, site]
  measure_egress: true
client:
  auth: certificate
  certificate: partner_ca
distribution_points:
  - {fqdn: dp01.contoso.com, packages: [PS100012]}
  - fqdn: DP02.fabrikam.com
    locality: subnet
    https: true
    packages: [PS100013, PS100012, PS100013]
task_sequence:""",
    ).replace("  outcome: success", "  outcome: success\n  egress_bytes: {at_least: 64KiB, at_most: 1MiB}")
    scenario = load_scenario(write(tmp_path, text))
    cmg = scenario.cmg
    assert (cmg.site_version, cmg.prefer_cloud_sources, cmg.classic_cloud_dp) == (2103, True, True)
    assert (cmg.crl_check, cmg.measure_egress, scenario.crl_reachable) == (True, True, False)
    assert scenario.trust_list == ("site", "partner")  # given twice, listed once
    assert (scenario.auth, scenario.certificate) == ("certificate", "partner_ca")
    assert scenario.distribution_points == (
        DistributionPointSpec("dp01.contoso.com", "LOCAL", False, ("PS100012",)),
        DistributionPointSpec("DP02.fabrikam.com", "SUBNET", True, ("PS100013", "PS100012")),
    )
    bounds = scenario.expect.egress_bytes
    assert (bounds.at_least, bounds.at_most) == (64 * 1024, 1024 * 1024)


def test_azure_ad_client_with_its_tenant(tmp_path: Path) -> None:
    text = BASE.replace("task_sequence:", "client:\n  auth: azure_ad\n  tenant: not_onboarded\ntask_sequence:")
    scenario = load_scenario(write(tmp_path, text))
    assert (scenario.auth, scenario.tenant) == ("azure_ad", "not_onboarded")


# --------------------------------------------------------------------------------------------
# mistakes, each at its line
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("site", ["", "  site_version: 2107\n", "  site_version: 2309\n"])
def test_a_classic_cloud_dp_on_2107_or_later_is_a_collection_problem(tmp_path: Path, site: str) -> None:
    text = BASE.replace("task_sequence:", f"cmg:\n{site}  classic_cloud_dp: true\ntask_sequence:")
    path = write(tmp_path, text)
    problem = one(path)
    version = site.split(":")[1].strip() if site else "2107"
    assert problem.line == line_of(path, "classic_cloud_dp: true")
    assert problem.rule == (
        f"a classic cloud distribution point cannot be created on a site of version {version}: "
        "from 2107 on, content comes from a content-enabled CMG only"
    )
    assert problem.hint == "use classic_cloud_dp: false, or a site_version before 2107 (e.g. 2103)"


def test_the_2107_rule_names_the_case_that_breaks_it(tmp_path: Path) -> None:
    text = BASE.replace("task_sequence:", "cmg:\n  classic_cloud_dp: true\n  site_version: 2010\ntask_sequence:")
    text += "matrix:\n  cmg.site_version: [2010, 2103, 2107]\n"
    path = write(tmp_path, text)
    problem = one(path)
    assert problem.rule.startswith("a classic cloud distribution point cannot be created on a site of version 2107")
    assert problem.hint.endswith("; in case 2107")
    # The other cases load on their own once the breaking value is gone.
    path.write_text(text.replace("[2010, 2103, 2107]", "[2010, 2103]"), encoding="utf-8")
    assert [s.cmg.site_version for s in load_scenarios(path)] == [2010, 2103]


@pytest.mark.parametrize(
    ("section", "typo", "near"),
    [
        ("cmg", "prefer_cloud_source: true", "prefer_cloud_sources"),
        ("cmg", "crl_checks: true", "crl_check"),
        ("cmg", "certificate_trustlist: [site]", "certificate_trust_list"),
        ("cmg", "measure_egres: true", "measure_egress"),
        ("client", "certficate: revoked", "certificate"),
        ("client", "tennant: disabled", "tenant"),
    ],
)
def test_misspelled_keys_get_the_nearest_one(tmp_path: Path, section: str, typo: str, near: str) -> None:
    path = write(tmp_path, BASE.replace("task_sequence:", f"{section}:\n  {typo}\ntask_sequence:"))
    problem = one(path)
    assert problem.line == line_of(path, typo)
    assert problem.rule == f"unknown key {typo.split(':', maxsplit=1)[0]!r} in {section}"
    assert problem.hint.startswith(f"did you mean {near!r}? allowed keys: ")


@pytest.mark.parametrize(
    ("setting", "fragment", "hint"),
    [
        ("cmg:\n  certificate_trust_list: [site, partners]", "certificate_trust_list[1] 'partners' is not one of site, partner", "did you mean 'partner'?"),
        ("client:\n  auth: azuread", "client.auth 'azuread' is not one of token, certificate, azure_ad", "did you mean 'azure_ad'?"),
        ("client:\n  auth: certificate\n  certificate: revokd", "client.certificate 'revokd' is not one of valid, partner_ca, revoked", "did you mean 'revoked'?"),
        ("client:\n  auth: azure_ad\n  tenant: disable", "client.tenant 'disable' is not one of enabled, disabled, not_onboarded", "did you mean 'disabled'?"),
    ],
)
def test_bad_values_name_the_choices(tmp_path: Path, setting: str, fragment: str, hint: str) -> None:
    path = write(tmp_path, BASE.replace("task_sequence:", f"{setting}\ntask_sequence:"))
    problem = one(path)
    assert fragment in problem.rule
    assert problem.hint == hint
    assert problem.line == line_of(path, setting.splitlines()[-1].strip())


@pytest.mark.parametrize(
    ("client", "key", "rule"),
    [
        ("auth: token\n  certificate: revoked", "certificate", "client.certificate: revoked needs client.auth: certificate (the client uses token)"),
        ("auth: azure_ad\n  certificate: expired", "certificate", "client.certificate: expired needs client.auth: certificate (the client uses azure_ad)"),
        ("auth: certificate\n  tenant: disabled", "tenant", "client.tenant: disabled needs client.auth: azure_ad (the client uses certificate)"),
    ],
)
def test_a_client_variant_needs_its_auth(tmp_path: Path, client: str, key: str, rule: str) -> None:
    path = write(tmp_path, BASE.replace("task_sequence:", f"client:\n  {client}\ntask_sequence:"))
    problem = one(path)
    assert problem.rule == rule
    assert problem.line == line_of(path, f"{key}:")


def test_the_default_variants_go_with_any_auth(tmp_path: Path) -> None:
    text = BASE.replace("task_sequence:", "client:\n  certificate: valid\n  tenant: enabled\ntask_sequence:")
    text += "matrix:\n  client.auth: [token, certificate, azure_ad]\n"
    assert len(load_scenarios(write(tmp_path, text))) == 3


DPS = BASE.replace(
    "task_sequence:",
    """\
distribution_points:
  - fqdn: dp01.contoso.com
    packages: [PS100012, PS100099]
  - fqdn: DP01.contoso.com
    locality: nearby
    packages: [PS100013]
task_sequence:""",
)


def test_distribution_point_problems_are_reported_at_their_lines(tmp_path: Path) -> None:
    path = write(tmp_path, DPS)
    found = {p.rule: p for p in problems(path)}
    undeclared = found["distribution point dp01.contoso.com holds package PS100099, which is not declared"]
    assert undeclared.line == line_of(path, "packages: [PS100012, PS100099]")
    assert undeclared.hint == "declared packages: PS100012, PS100013"
    twice = found["distribution point DP01.contoso.com is listed twice"]
    assert twice.line == line_of(path, "- fqdn: DP01.contoso.com")
    assert twice.hint.startswith("first at distribution_points[0]")
    locality = found["distribution_points[1].locality 'nearby' is not one of local, remote, subnet"]
    assert locality.line == line_of(path, "locality: nearby")
    assert len(found) == 3


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        ("- {fqdn: dp01.contoso.com}", "distribution_points[0] is missing the required key 'packages'"),
        ("- {fqdn: dp01.contoso.com, packages: []}", "distribution_points[0].packages needs at least 1 item(s)"),
        ("- {fqdn: 'http://dp01.contoso.com', packages: [PS100012]}", "distribution_points[0].fqdn 'http://dp01.contoso.com' must match"),
        ("- {fqdn: dp01, packages: [PS100012]}", "distribution_points[0].fqdn 'dp01' must match"),
        ("- {fqdn: dp01.contoso.com, packages: [PS100012], site: x}", "unknown key 'site' in distribution_points[0]"),
    ],
)
def test_bad_distribution_points(tmp_path: Path, entry: str, fragment: str) -> None:
    path = write(tmp_path, BASE.replace("task_sequence:", f"distribution_points:\n  {entry}\ntask_sequence:"))
    problem = one(path)
    assert fragment in problem.rule
    assert problem.line == line_of(path, entry)


def test_a_case_may_add_a_distribution_point_and_its_packages_are_checked(tmp_path: Path) -> None:
    text = BASE + """\
cases:
  - id: cloud-only
  - id: on-prem-too
    set:
      distribution_points: [{fqdn: dp01.contoso.com, packages: [PS100012]}]
      cmg.prefer_cloud_sources: true
  - id: dangling
    set:
      distribution_points: [{fqdn: dp01.contoso.com, packages: [PS1000FF]}]
"""
    path = write(tmp_path, text)
    problem = one(path)
    assert problem.rule == "distribution point dp01.contoso.com holds package PS1000FF, which is not declared"
    assert problem.hint == "declared packages: PS100012, PS100013; in case dangling"
    path.write_text(text.split("  - id: dangling")[0], encoding="utf-8")
    cloud, both = load_scenarios(path)
    assert cloud.distribution_points == () and not cloud.cmg.prefer_cloud_sources
    assert [d.fqdn for d in both.distribution_points] == ["dp01.contoso.com"]
    assert both.cmg.prefer_cloud_sources


# --------------------------------------------------------------------------------------------
# worlds on the harness
# --------------------------------------------------------------------------------------------


def _scenario(tmp_path: Path, extra: str, *, name: str = "w.cmg.yaml") -> Scenario:
    return load_scenario(write(tmp_path, BASE.replace("task_sequence:", f"{extra}\ntask_sequence:"), name))


def test_a_world_lists_on_prem_dps_with_the_generated_content_hash(cmg_harness: object, tmp_path: Path) -> None:
    text = BASE.replace("    size: 24KiB", "    size: 24KiB\n    on_cloud_dp: false").replace(
        "task_sequence:",
        "cmg:\n  prefer_cloud_sources: true\n  certificate_trust_list: [partner]\n"
        "distribution_points:\n  - {fqdn: dp01.contoso.com, locality: remote, https: true, packages: [PS100013, PS100012]}\n"
        "task_sequence:",
    )
    scenario = load_scenario(write(tmp_path, text, "dp.cmg.yaml"))
    world = build_world(scenario, cmg_harness)  # type: ignore[arg-type]
    try:
        gateway = world.gateway
        assert gateway.settings.prefer_cloud_sources
        assert gateway.settings.certificate_trust_list == (PARTNER_CA_NAME,)
        assert set(world.manifests) == {"PS100012"}  # PS100013 is on the intranet DP only
        assert world.dp.versions("PS100013") == []
        (dp,) = gateway.on_prem_dps
        assert (dp.fqdn, dp.locality, dp.https) == ("dp01.contoso.com", "REMOTE", True)
        drivers = next(p for p in scenario.packages if p.id == "PS100013")
        files = generate_package(drivers, scenario.seed)
        expected = ContentManifest(
            "PS100013",
            1,
            tuple(ManifestFile(f.relpath, len(f.data), hashlib.sha256(f.data).hexdigest()) for f in files),  # type: ignore[arg-type]
        )
        assert dp.content == {("PS100013", 1): expected.hash, ("PS100012", 1): world.manifests["PS100012"].hash}
    finally:
        world.dp.delete()


def test_client_certificates_of_each_kind(cmg_harness: object, tmp_path: Path) -> None:
    scenario = _scenario(tmp_path, "client:\n  auth: certificate")
    world = build_world(scenario, cmg_harness)  # type: ignore[arg-type]
    now = dt.datetime.now(dt.UTC)
    try:
        seen = {}
        for kind in ("valid", "partner_ca", "revoked", "expired", "not_yet_valid", "untrusted_ca", "no_client_auth"):
            world.certificate = kind
            connection = world.connection(CLIENT_ID, "certificate")
            assert connection.token is None and connection.aad_token is None
            assert connection.client_key is not None and connection.client_key.is_file()
            seen[kind] = x509.load_pem_x509_certificate(connection.client_cert.read_bytes())  # type: ignore[union-attr]
        issuer = {k: c.issuer.rfc4514_string() for k, c in seen.items()}
        assert issuer["valid"] == issuer["revoked"] == issuer["expired"] == f"CN={CLIENT_CA_NAME}"
        assert issuer["partner_ca"] == f"CN={PARTNER_CA_NAME}"
        assert issuer["untrusted_ca"] == "CN=rogue CA"
        assert seen["expired"].not_valid_after_utc < now < seen["valid"].not_valid_after_utc
        assert seen["not_yet_valid"].not_valid_before_utc > now
        usage = seen["no_client_auth"].extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH not in usage
        # Only the revoked one is on its CA's published revocation list.
        client_ca = world.gateway.tls.client_ca
        revoked = set(client_ca.revoked)
        assert seen["revoked"].serial_number in revoked
        assert seen["valid"].serial_number not in revoked
        crl = x509.load_der_x509_crl(world.gateway.tls.crl_path(client_ca).read_bytes())
        assert crl.get_revoked_certificate_by_serial_number(seen["revoked"].serial_number) is not None
    finally:
        world.dp.delete()


def test_azure_ad_tokens_and_tenant_states(cmg_harness: object, tmp_path: Path) -> None:
    scenario = _scenario(tmp_path, "client:\n  auth: azure_ad")
    world = build_world(scenario, cmg_harness)  # type: ignore[arg-type]
    try:
        gateway = world.gateway
        tenant_id = gateway.tenant.tenant_id
        directory: AzureADDirectory = gateway.azure_ad
        enabled = world.connection(CLIENT_ID, "azure_ad")
        assert enabled.aad_token and enabled.token is None and enabled.client_cert is None
        claims = directory.verify(enabled.aad_token)
        assert claims["tid"] == tenant_id and directory.client_of(claims) == CLIENT_ID
        world.tenant = "not_onboarded"
        stranger = world.connection(CLIENT_ID, "azure_ad")
        with pytest.raises(Exception, match="IDX10205"):
            directory.verify(stranger.aad_token)  # type: ignore[arg-type]
        assert tenant_id not in directory.disabled
        world.tenant = "disabled"
        disabled = world.connection(CLIENT_ID, "azure_ad")
        assert tenant_id in directory.disabled
        with pytest.raises(Exception, match="is disabled for this site"):
            directory.verify(disabled.aad_token)  # type: ignore[arg-type]
    finally:
        world.dp.delete()
    # The next world starts with the tenant enabled again.
    again = build_world(scenario, cmg_harness)  # type: ignore[arg-type]
    try:
        assert again.gateway.tenant.tenant_id not in again.gateway.azure_ad.disabled
    finally:
        again.dp.delete()


def test_unreachable_crls_last_until_the_next_world(cmg_harness: object, tmp_path: Path) -> None:
    offline = _scenario(tmp_path, "cmg:\n  crl_check: true\n  crl_reachable: false", name="off.cmg.yaml")
    online = _scenario(tmp_path, "cmg:\n  crl_check: true", name="on.cmg.yaml")
    world = build_world(offline, cmg_harness)  # type: ignore[arg-type]
    tls = world.gateway.tls
    paths = [tls.crl_path(ca) for ca in tls.uploaded_roots]
    try:
        assert len(paths) == 2
        assert not any(p.exists() for p in paths)
    finally:
        world.dp.delete()
    world = build_world(online, cmg_harness)  # type: ignore[arg-type]
    try:
        assert all(p.is_file() for p in paths)
    finally:
        world.dp.delete()


def test_egress_bytes_that_do_not_hold_say_how_they_were_counted(cmg_harness: object, tmp_path: Path) -> None:
    text = BASE.replace("task_sequence:", "cmg:\n  measure_egress: true\ntask_sequence:").replace(
        "  outcome: success", "  outcome: success\n  egress_bytes: 1KiB"
    )
    path = write(tmp_path, text)
    scenario = load_scenario(path)
    run = run_scenario(scenario, cmg_harness, tmp_path / "work")  # type: ignore[arg-type]
    # Measured: exactly the bytes storage served, both packages once.
    assert run.egress_bytes == (64 + 24) * 1024
    (failure,) = check_expectations(scenario, run)
    assert failure.expectation == "expect.egress_bytes"
    assert failure.line == line_of(path, "egress_bytes: 1KiB")
    assert "expected: exactly 1KiB (1024 bytes) of egress" in failure.detail
    assert "actual:   88KiB (90112 bytes) (measured)" in failure.detail
