"""``protocol = ldap`` (client mode): the RFC 2830 StartTLS extended operation, in BER."""

from __future__ import annotations

from tunnel.protocols.tap import Ctx, ProtocolError, remote_of

OID_STARTTLS = b"1.3.6.1.4.1.1466.20037"
# LDAPMessage { messageID 1, extendedReq [APPLICATION 23] { requestName [0] OID } }:
# SEQUENCE, INTEGER 1, APPLICATION 23 (constructed), context [0] primitive; no requestValue
LDAP_STARTTLS = (
    bytes(
        [
            0x30,
            5 + 2 + len(OID_STARTTLS),
            0x02,
            0x01,
            0x01,
            0x77,
            2 + len(OID_STARTTLS),
            0x80,
            len(OID_STARTTLS),
        ]
    )
    + OID_STARTTLS
)
LDAP_LONG_LENGTH = 0x84  # what WinLDAP sends: four length octets follow
LDAP_MAX_RESPONSE = 128


async def ldap_client_middle(ctx: Ctx) -> None:
    remote = remote_of(ctx)
    ctx.log(7, "Sending LDAP Start TLS request")
    remote.write(LDAP_STARTTLS)
    ctx.log(7, "Receiving LDAP response tag")
    if (await remote.read_exact(1))[0] != 0x30:
        raise ProtocolError("LDAP response is not UNIVERSAL SEQUENCE")
    ctx.log(7, "Receiving LDAP response length")
    size = (await remote.read_exact(1))[0]
    if size == LDAP_LONG_LENGTH:
        size = int.from_bytes(await remote.read_exact(4), "big")
    if size > LDAP_MAX_RESPONSE:
        raise ProtocolError(f"LDAP response too long ({size} byte(s))")
    ctx.log(7, f"Receiving LDAP response value ({size} byte(s))")
    # stunnel decodes a zeroed fixed buffer: what the server left out reads as 0
    body = (await remote.read_exact(size)).ljust(LDAP_MAX_RESPONSE + 8, b"\0")
    ctx.log(7, "Decoding LDAP response value")
    if body[0] != 0x02:
        raise ProtocolError("LDAP response has an incorrect message ID type")
    if body[1] != 0x01:
        raise ProtocolError("LDAP response has an unexpected message ID length")
    if body[2] != 0x01:
        raise ProtocolError("LDAP response has an unexpected message ID value")
    if body[3] != 0x78:  # [APPLICATION 24] ExtendedResponse
        raise ProtocolError("LDAP response protocol op is not ExtendedResponse")
    at = 5 + (4 if body[4] == LDAP_LONG_LENGTH else 0)  # its length is not checked
    if body[at] != 0x0A:
        raise ProtocolError("LDAP response has an unexpected result code type")
    if body[at + 1] != 0x01:
        raise ProtocolError("LDAP response has an unexpected result code length")
    if body[at + 2] != 0x00:
        raise ProtocolError(f"LDAP response has indicated an error ({body[at + 2]})")
    ctx.log(6, "LDAP Start TLS successfully negotiated")
