"""ContentLocationRequest and ContentLocationReply (docs/emulation.md, Product reference: "CCM
messages and the content location").

Element and attribute names follow the public samples. The cloud ``LocationRecord`` has no public
sample; its shape here is our emulation design (docs/emulation.md, "Cloud location record").
On-premises distribution points (:class:`OnPremDP`) give records shaped like the public on-prem
sample: ``DPType`` ``SERVER``, an ``SMS_DP_SMSPKG$`` URL with its ``SMS_DP_SMSSIG$`` signature,
``Windows Trust="1"`` and ``Locality`` ``LOCAL``/``REMOTE``/``SUBNET``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlencode
from xml.etree import ElementTree as ET

from .._errors import InvalidValueError
from .xml import parse_untrusted

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = [
    "CALG_SHA_256",
    "ON_PREM_LOCALITIES",
    "AccessToken",
    "ContentLocationReply",
    "ContentLocationRequest",
    "LocationRecord",
    "ManifestQuery",
    "OnPremDP",
    "is_content_id",
]

#: Package IDs (``PS100012``) and content IDs (``Content_<guid>``, ``UID:Content_<guid>``) use
#: these characters only; anything else cannot name content and is answered "no location".
_CONTENT_ID = re.compile(r"[A-Za-z0-9_.:{}-]{1,128}")


#: ``<Package Version>``: a decimal integer as the product writes it. ``int()`` alone would
#: also take " 7", "7_0" and non-ASCII digits, which no client sends.
_VERSION = re.compile(r"-?[0-9]{1,10}")
#: A ContentLocationRequest is five elements four levels deep (more with boundary groups);
#: anything far past that is refused while parsing rather than built into a tree.
_REQUEST_MAX_ELEMENTS = 1024
_REQUEST_MAX_DEPTH = 8


def is_content_id(value: str) -> bool:
    """Whether ``value`` could name a package or content (never trusted to reach storage)."""
    return _CONTENT_ID.fullmatch(value) is not None


#: CryptoAPI ALG_ID of SHA-256 (0x800C), the only hash algorithm the emulation uses.
CALG_SHA_256 = 32780
#: OID of sha256WithRSAEncryption, the ``alg`` parameter of the manifest request.
SHA256_RSA_OID = "1.2.840.113549.1.1.11"


@dataclass(frozen=True)
class ContentLocationRequest:
    """What the client asks ``MP_LocationManager``: where can I get this package version?"""

    package_id: str
    version: int
    site_code: str
    use_azure: bool = True
    use_internet_dp: bool = True
    location_type: str = "SMSPackage"

    def to_xml(self) -> str:
        root = ET.Element(
            "ContentLocationRequest",
            SchemaVersion="1.00",
            BGRVersion="1",
            ClientInOperation="PT0M",
            ExcludeFileList="",
        )
        ET.SubElement(
            root,
            "Package",
            ID=self.package_id,
            Version=str(self.version),
            DeploymentFlags="9223372036855313105",
        )
        ET.SubElement(root, "AssignedSite", SiteCode=self.site_code)
        info = ET.SubElement(
            root,
            "ClientLocationInfo",
            LocationType=self.location_type,
            DistributeOnDemand="0",
            UseAzure="1" if self.use_azure else "0",
            AllowWUMU="0",
            UseProtected="0",
            AllowCaching="0",
            BranchDPFlags="0",
            UseInternetDP="1" if self.use_internet_dp else "0",
            AllowHTTP="1",
            AllowSMB="0",
            AllowMulticast="0",
            AllowSuperPeer="0",
            DPTokenAuth="1",
        )
        ET.SubElement(info, "BoundaryGroups", BoundaryGroupListRetrieveTime="", IsOnVPN="0")
        return ET.tostring(root, encoding="unicode")

    @classmethod
    def from_xml(cls, text: str) -> ContentLocationRequest:
        """Parse a request; ``ValueError`` (and nothing else) names the missing element or
        attribute, or the bound of :func:`~pytest_cmg._protocol.xml.parse_untrusted` broken."""
        root = parse_untrusted(
            text,
            root="ContentLocationRequest",
            max_elements=_REQUEST_MAX_ELEMENTS,
            max_depth=_REQUEST_MAX_DEPTH,
        )
        package = _require(root, "Package")
        site = _require(root, "AssignedSite")
        info = _require(root, "ClientLocationInfo")
        raw_version = _attr(package, "Version")
        if _VERSION.fullmatch(raw_version) is None:
            msg = (
                f"<Package Version> is not an integer: {raw_version[:32]!r} (write at most 10 "
                "ASCII digits, after an optional '-')"
            )
            raise InvalidValueError(msg)
        version = int(raw_version)
        return cls(
            package_id=_attr(package, "ID"),
            version=version,
            site_code=_attr(site, "SiteCode"),
            use_azure=info.get("UseAzure", "0") == "1",
            use_internet_dp=info.get("UseInternetDP", "0") == "1",
            location_type=info.get("LocationType", "SMSPackage"),
        )


@dataclass(frozen=True)
class AccessToken:
    """The MP-issued content access token that travels with a cloud location record.

    Its fields become the ``tid iss alg st et`` parameters of the manifest request; ``signature``
    travels in the ``X-Cmg-Token-Signature`` header (emulation design, docs/emulation.md).
    """

    tid: str
    iss: str
    alg: str
    st: str
    et: str
    signature: str

    def params(self) -> dict[str, str]:
        """``tid iss alg st et`` by name: the manifest request's parameters and the location
        reply's ``AccessToken`` attributes, everything but the signature."""
        return {"tid": self.tid, "iss": self.iss, "alg": self.alg, "st": self.st, "et": self.et}


#: The manifest request's query parameters, in the order clients send them.
MANIFEST_PARAMS = ("pid", "cid", "tid", "iss", "alg", "st", "et")
#: No real parameter comes near this (a GUID, an OID, a timestamp); longer is refused unread.
_MAX_PARAM = 256
#: The longest raw query read: the seven parameters at their longest, each character a 4-byte
#: UTF-8 one written as four %XX escapes (7 x 256 x 12), with room for names and unknown ones.
_MAX_QUERY = 32 * 1024
#: C0 and C1 controls, DEL and lone surrogates: no real parameter holds one, and a newline or a
#: NUL in a signed field is how one field's text could pass for another's.
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
#: A "%" not followed by two hex digits (RFC 3986 section 2.1): parse_qsl keeps it as text,
#: another reader might not, so the query is refused rather than read one way of two.
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_MAX_FIELDS = 64


@dataclass(frozen=True)
class ManifestQuery:
    """The query of ``getcontentxmlsecure``: the package, its content and the access token's
    fields (their signature travels in a header). Parsed here once for the gateway and the
    property tests, so the client and the server agree on one reading of it."""

    pid: str
    cid: str
    tid: str
    iss: str
    alg: str
    st: str
    et: str

    @classmethod
    def parse(cls, query: str) -> ManifestQuery:
        """Read a raw query string; :class:`ValueError` names the first rule it breaks.

        Every parameter must appear exactly once and be non-empty: a repeated one would let two
        readers (a proxy, the service) see different values. Unknown parameters are ignored, as
        the WCF service behind the real path ignores them. Values hold no control characters
        and the query is at most 32 KiB, 64 fields; nothing but ``ValueError`` is raised.
        """
        if len(query) > _MAX_QUERY:
            msg = f"query of {len(query)} characters is longer than the {_MAX_QUERY} read"
            raise InvalidValueError(msg)
        escape = _BAD_ESCAPE.search(query)
        if escape is not None:
            msg = (
                f"query has a '%' at character {escape.start()} not followed by two hex digits; "
                "percent-encode a literal '%' as %25"
            )
            raise InvalidValueError(msg)
        try:
            pairs = parse_qsl(
                query, keep_blank_values=True, errors="strict", max_num_fields=_MAX_FIELDS
            )
        except UnicodeDecodeError as exc:
            msg = f"query is not UTF-8 once percent-decoded (byte {exc.start} of a value)"
            raise InvalidValueError(msg) from exc
        except ValueError as exc:
            # Past max_num_fields: a query of thousands of parameters is refused before any of
            # them is looked at.
            msg = f"query has more than {_MAX_FIELDS} fields ({exc})"
            raise InvalidValueError(msg) from exc
        values: dict[str, str] = {}
        for name, value in pairs:
            if name not in MANIFEST_PARAMS:
                continue
            if name in values:
                msg = f"parameter {name!r} appears more than once"
                raise InvalidValueError(msg)
            if len(value) > _MAX_PARAM:
                msg = f"parameter {name!r} is longer than {_MAX_PARAM} characters"
                raise InvalidValueError(msg)
            bad = _UNPRINTABLE.search(value)
            if bad is not None:
                msg = (
                    f"parameter {name!r} holds U+{ord(bad.group()):04X} (a control character or "
                    f"lone surrogate) at character {bad.start()}; send only printable text"
                )
                raise InvalidValueError(msg)
            values[name] = value
        missing = [name for name in MANIFEST_PARAMS if not values.get(name)]
        if missing:
            msg = f"missing parameter(s) {', '.join(missing)}"
            raise InvalidValueError(msg)
        if not is_content_id(values["pid"]):
            msg = "pid is not a valid package ID"
            raise InvalidValueError(msg)
        return cls(**values)

    def encode(self) -> str:
        """The query string, parameters in :data:`MANIFEST_PARAMS` order."""
        return urlencode({name: getattr(self, name) for name in MANIFEST_PARAMS})


@dataclass(frozen=True)
class LocationRecord:
    """One content source in a reply."""

    url: str
    server_remote_name: str
    dp_type: str
    locality: str
    version: int
    access_token: AccessToken | None = None
    #: ``<URL Signature=...>``: where an on-prem DP serves the content's signature (.tar).
    signature_url: str = ""
    #: ``<Capabilities><Property Name="SSLState">``: 1 for an HTTPS source, 0 for HTTP.
    ssl_state: int = 1
    #: ``<Windows Trust>``: 1 for a DP in a trusted forest (on-prem), 0 for the cloud.
    windows_trust: bool = False
    ad_site: str = ""

    @property
    def is_cloud(self) -> bool:
        return self.dp_type == "CLOUD"


#: Localities an on-prem DP can have relative to the client (LocationServices.log in the support
#: article "Configure peer cache").
ON_PREM_LOCALITIES = ("LOCAL", "REMOTE", "SUBNET")


@dataclass(frozen=True)
class OnPremDP:
    """An on-premises distribution point of the site and the content versions it holds.

    ``content`` maps ``(package ID, version)`` to the package hash. Its URLs name an intranet
    host, which a client on the internet cannot reach.
    """

    fqdn: str
    locality: str = "LOCAL"
    https: bool = False
    ad_site: str = "Default-First-Site-Name"
    content: Mapping[tuple[str, int], str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.locality not in ON_PREM_LOCALITIES:
            msg = (
                f"on-prem DP {self.fqdn}: locality {self.locality!r} is not one of "
                f"{', '.join(ON_PREM_LOCALITIES)}"
            )
            raise InvalidValueError(msg)

    def holds(self, package_id: str, version: int) -> bool:
        return (package_id, version) in self.content

    def record_for(self, package_id: str, version: int) -> LocationRecord:
        scheme = "https" if self.https else "http"
        return LocationRecord(
            url=f"{scheme}://{self.fqdn}/SMS_DP_SMSPKG$/{package_id}",
            signature_url=f"{scheme}://{self.fqdn}/SMS_DP_SMSSIG$/{package_id}.{version}.tar",
            server_remote_name=self.fqdn,
            dp_type="SERVER",
            locality=self.locality,
            version=version,
            ssl_state=1 if self.https else 0,
            windows_trust=True,
            ad_site=self.ad_site,
        )


@dataclass(frozen=True)
class ContentLocationReply:
    """The MP's answer. An empty ``records`` list means ``SiteLocality="FALLBACK"``: no source."""

    site_code: str
    package_hash: str = ""
    records: tuple[LocationRecord, ...] = field(default_factory=tuple)

    def to_xml(self) -> str:
        if not self.records:
            return self._empty_xml()
        root = ET.Element(
            "ContentLocationReply",
            SchemaVersion="1.00",
            ContentFlags="200960",
            HashAlgorithm=str(CALG_SHA_256),
            AlgorithmPreference="4",
            Hash=self.package_hash,
            ExcludeFileListHash="",
            RelatedContentID="",
        )
        info = ET.SubElement(root, "ContentInfo", PackageFlags="32")
        hashes = ET.SubElement(info, "ContentHashValues")
        ET.SubElement(
            hashes,
            "Hash",
            Algorithm=str(CALG_SHA_256),
            HashString=self.package_hash,
            HashPreference="4",
        )
        site = ET.SubElement(ET.SubElement(root, "Sites"), "Site")
        ET.SubElement(
            site,
            "MPSite",
            SiteCode=self.site_code,
            MasterSiteCode=self.site_code,
            SiteLocality="LOCAL",
            IISPreferedPort="80",
            IISSSLPreferedPort="443",
        )
        records = ET.SubElement(site, "LocationRecords")
        for record in self.records:
            node = ET.SubElement(records, "LocationRecord")
            ET.SubElement(node, "URL", Name=record.url, Signature=record.signature_url)
            if record.ad_site:
                ET.SubElement(node, "ADSite", Name=record.ad_site)
            ET.SubElement(node, "Metric", Value="")
            ET.SubElement(node, "Version").text = str(record.version)
            caps = ET.SubElement(node, "Capabilities", SchemaVersion="1.0")
            ET.SubElement(caps, "Property", Name="SSLState", Value=str(record.ssl_state))
            ET.SubElement(node, "ServerRemoteName").text = record.server_remote_name
            ET.SubElement(node, "DPType").text = record.dp_type
            ET.SubElement(node, "Windows", Trust="1" if record.windows_trust else "0")
            ET.SubElement(node, "Locality").text = record.locality
            if record.access_token is not None:
                token = record.access_token
                ET.SubElement(node, "AccessToken", token.params(), Signature=token.signature)
        ET.SubElement(root, "RelatedContentIDs")
        return ET.tostring(root, encoding="unicode")

    def _empty_xml(self) -> str:
        # The shape a client receives through the CMG when nothing holds the content (the smsts.log
        # in GitHub issue MSEndpointMgr/ModernDriverManagement#69).
        root = ET.Element("ContentLocationReply", SchemaVersion="1.00", BGRVersion="1")
        groups = ET.SubElement(
            root, "BoundaryGroups", BoundaryGroupListRetrieveTime="", IsOnVPN="0"
        )
        ET.SubElement(groups, "DOINCServers")
        ET.SubElement(root, "ContentInfo")
        site = ET.SubElement(ET.SubElement(root, "Sites"), "Site")
        ET.SubElement(
            site,
            "MPSite",
            SiteCode=self.site_code,
            MasterSiteCode=self.site_code,
            SiteLocality="FALLBACK",
        )
        ET.SubElement(site, "LocationRecords")
        ET.SubElement(root, "RelatedContentIDs")
        return ET.tostring(root, encoding="unicode")

    @classmethod
    def from_xml(cls, text: str) -> ContentLocationReply:
        root = parse_untrusted(text, root="ContentLocationReply")
        mp_site = root.find("Sites/Site/MPSite")
        site_code = mp_site.get("SiteCode", "") if mp_site is not None else ""
        records = []
        for node in root.iterfind("Sites/Site/LocationRecords/LocationRecord"):
            url = _require(node, "URL")
            token_node = node.find("AccessToken")
            token = None
            if token_node is not None:
                token = AccessToken(
                    tid=_attr(token_node, "tid"),
                    iss=_attr(token_node, "iss"),
                    alg=_attr(token_node, "alg"),
                    st=_attr(token_node, "st"),
                    et=_attr(token_node, "et"),
                    signature=_attr(token_node, "Signature"),
                )
            ssl = node.find("Capabilities/Property[@Name='SSLState']")
            windows = node.find("Windows")
            ad_site = node.find("ADSite")
            records.append(
                LocationRecord(
                    url=_attr(url, "Name"),
                    server_remote_name=node.findtext("ServerRemoteName", ""),
                    dp_type=node.findtext("DPType", ""),
                    locality=node.findtext("Locality", ""),
                    version=int(node.findtext("Version", "0") or 0),
                    access_token=token,
                    signature_url=url.get("Signature", ""),
                    ssl_state=int(ssl.get("Value", "0") or 0) if ssl is not None else 0,
                    windows_trust=windows is not None and windows.get("Trust") == "1",
                    ad_site=ad_site.get("Name", "") if ad_site is not None else "",
                )
            )
        return cls(site_code=site_code, package_hash=root.get("Hash", ""), records=tuple(records))


def _require(parent: ET.Element, tag: str) -> ET.Element:
    node = parent.find(tag)
    if node is None:
        msg = f"<{parent.tag}> has no <{tag}> element"
        raise InvalidValueError(msg)
    return node


def _attr(node: ET.Element, name: str) -> str:
    value = node.get(name)
    if value is None:
        msg = f"<{node.tag}> has no {name} attribute"
        raise InvalidValueError(msg)
    return value
