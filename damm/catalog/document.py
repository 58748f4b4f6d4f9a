"""The signed catalog a device uses to find another front door of its gateway.

Modelled on The Update Framework: the catalog is a payload signed by a key the device pinned at
enrollment, with an expiry (a frozen catalog cannot be replayed forever), a version (an older
catalog cannot be replayed at all) and announcements of the next signing keys (rotation without
re-enrolling). The signature covers the payload bytes, not these Structs, so the payload is
carried as opaque bytes in `SignedCatalog` and decoded only after the signature verifies.

Decoding checks shapes, types, lengths and ranges; the character-level rules (patterns below) are
applied by `damm.catalog.canonical.check_catalog` — see the note above the type aliases for why.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from damm.errors import Code, DammError

# "host:port" where host is a DNS name, an IPv4 address or a bracketed IPv6 address. The pattern is
# strict because the endpoint ends up in a wg-quick file, which runs shell hooks: nothing that
# could carry a newline or a second key may pass.
_HOST = r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?)"
_PORT = r"(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3})"
ENDPOINT_PATTERN = rf"^{_HOST}:{_PORT}$"
IDENTIFIER_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
COUNTRY_PATTERN = r"^[A-Z]{2}$"
# Standard base64 of 32 bytes (WireGuard and Ed25519 public keys alike).
KEY32_B64_PATTERN = r"^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$"
KEY_ID_PATTERN = r"^[0-9a-f]{16}$"

# Only cheap constraints (lengths, ranges) are checked while decoding: a 1,000-gateway catalog has
# ~12,000 strings and running a regex over each would cost the client more than the signature
# check. The character-level rules (`check_catalog`) run where it is cheap to run them all (the
# signer, before signing) and, on the client, on the one gateway and front door it is about to use.
Identifier = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
Endpoint = Annotated[str, msgspec.Meta(min_length=3, max_length=262)]
Key32B64 = Annotated[str, msgspec.Meta(min_length=44, max_length=44)]
KeyId = Annotated[str, msgspec.Meta(pattern=KEY_ID_PATTERN)]
CountryCode = Annotated[str, msgspec.Meta(min_length=2, max_length=2)]
UnixSeconds = Annotated[int, msgspec.Meta(ge=0)]
Priority = Annotated[int, msgspec.Meta(ge=0, le=65535)]
Version = Annotated[int, msgspec.Meta(ge=0)]
Signature = Annotated[bytes, msgspec.Meta(min_length=64, max_length=64)]


# gc=False on the payload Structs: a decoded catalog is ~5,000 objects, and letting the cycle
# collector track them cost the device ~15% of its verify time. It is safe because these Structs
# are frozen and hold only str, int and tuples built before them, so no cycle can pass through one.


class CatalogFrontDoor(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    """One address a device can reach its gateway at; lower priority is tried first."""

    id: Identifier
    endpoint: Endpoint
    # Only "udp" is usable by WireGuard today; clients skip transports they do not know, so a
    # later transport can be added to catalogs without breaking them.
    transport: Annotated[str, msgspec.Meta(min_length=1, max_length=16)] = "udp"
    priority: Priority = 0


class CatalogGateway(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    id: Identifier
    region: Identifier
    public_key: Key32B64
    front_doors: tuple[CatalogFrontDoor, ...] = ()
    egress_countries: tuple[CountryCode, ...] = ()


class KeyAnnouncement(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    """A signing key the current key vouches for; devices pin it on sight (rotation)."""

    key_id: KeyId
    public_key: Key32B64
    not_before: UnixSeconds = 0


class Catalog(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    """Strict (unknown fields refused) like every payload Struct: a field this client does not
    understand might change what the catalog means, so it refuses rather than guesses."""

    region: Identifier
    version: Version
    issued_at: UnixSeconds  # unix seconds
    expires_at: UnixSeconds  # unix seconds
    gateways: tuple[CatalogGateway, ...] = ()
    next_keys: tuple[KeyAnnouncement, ...] = ()


class SignedCatalog(msgspec.Struct, frozen=True):
    """The wire envelope. Lenient about unknown fields (unlike the payload) so a later server can
    add, say, a second signature without breaking clients that only check the first."""

    payload: bytes  # canonical encoding of Catalog (see damm.catalog.canonical)
    key_id: KeyId
    signature: Signature

    def __repr__(self) -> str:
        return (
            f"SignedCatalog(key_id={self.key_id!r}, payload=<{len(self.payload)} bytes>, "
            f"signature={self.signature.hex()[:16]}…)"
        )


_signed_encoder = msgspec.msgpack.Encoder()
_signed_decoder = msgspec.msgpack.Decoder(SignedCatalog)


def encode_signed(signed: SignedCatalog) -> bytes:
    # msgpack carries the payload as raw bytes: no base64 inflation on a ~100 KiB body.
    return _signed_encoder.encode(signed)


def decode_signed(data: bytes) -> SignedCatalog:
    try:
        return _signed_decoder.decode(data)
    # msgspec (0.19-0.22) raises a bare UnicodeDecodeError, a ValueError and not a DecodeError,
    # for a string that is not valid UTF-8; found by the byte-flipping test.
    except (msgspec.DecodeError, ValueError) as exc:
        raise DammError(Code.MALFORMED_REQUEST, f"signed catalog: {exc}") from None
