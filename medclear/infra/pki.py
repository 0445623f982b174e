"""The local stack's small certificate authority and the roles at the gRPC boundary.

With MEDCLEAR_TLS (on by default), `medclear up` makes a CA (ECDSA P-256) under
`<state_dir>/pki/`, one server certificate for 127.0.0.1 / localhost, and one client
certificate per role. A client certificate's common name is `<role>:<identity>`. Every
gRPC server requires a client certificate from this CA, and one table
(`ROLES_OF_METHOD`, then `ROLES_OF_SERVICE`) says who may call what:

- terminal: the POS service;
- window: the card registry;
- window, analyst or operator: GetPerson;
- service (medclear's own processes): the HSM's checks (PINs, MACs, cryptograms);
- operator: the HSM's key administration (generate, list, export, import, form keys);
- any role: health checks and reflection.

`RoleInterceptor` refuses anything else with PERMISSION_DENIED and says who may not call
what. The simulated fleet shares one certificate per role. A real deployment issues one
per terminal, and the gateway should then bind the certificate's identity to the
request's terminal id (not done).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Awaitable, Callable
from enum import StrEnum
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from medclear.infra import status
from medclear.infra.kafka_access import BROKER, CN_PREFIX

CERT_VALIDITY_DAYS = 825


class Role(StrEnum):
    TERMINAL = "terminal"  # POS terminals: swipes, reversals, refunds, balance
    WINDOW = "window"  # service windows and the 12333 hotline: card registry
    OPERATOR = "operator"  # HSM key administration
    ANALYST = "analyst"  # read-only lookups (reconciliation later)
    SERVICE = "service"  # medclear's own processes calling the HSM


ANY_ROLE = frozenset(Role)
ROLES_OF_SERVICE: dict[str, frozenset[Role]] = {
    "medclear.v1.PosService": frozenset({Role.TERMINAL}),
    "medclear.v1.CardRegistryService": frozenset({Role.WINDOW}),
    "grpc.health.v1.Health": ANY_ROLE,
    "grpc.reflection.v1alpha.ServerReflection": ANY_ROLE,
    "grpc.reflection.v1.ServerReflection": ANY_ROLE,
}
ROLES_OF_METHOD: dict[str, frozenset[Role]] = {
    "/medclear.v1.CardRegistryService/GetPerson": frozenset(
        {Role.WINDOW, Role.ANALYST, Role.OPERATOR}
    ),
    **{
        f"/medclear.v1.HsmService/{m}": frozenset({Role.SERVICE})
        for m in (
            "VerifyPin",
            "CheckPinBlock",
            "TranslatePin",
            "SetPin",
            "SetPins",
            "GenerateMac",
            "VerifyMac",
            "VerifyCardCryptogram",
            "Digest",
        )
    },
    **{
        f"/medclear.v1.HsmService/{m}": frozenset({Role.OPERATOR})
        for m in ("GenerateKey", "ListKeys", "ExportKey", "ImportKey", "FormKey", "ExportCardKey")
    },
}


def roles_for(method: str) -> frozenset[Role]:
    """Who may call a full method name; nobody if it is not listed."""
    if method in ROLES_OF_METHOD:
        return ROLES_OF_METHOD[method]
    service = method.strip("/").split("/")[0]
    return ROLES_OF_SERVICE.get(service, frozenset())


# ---------------------------------------------------------------------------- files


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CERT_VALIDITY_DAYS))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The stack's CA, made on first use."""
    if not (directory / "ca.pem").exists():
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = _cert("medclear local CA", ca_key, None, ca_key, ca=True)
        _write(directory / "ca.key", _key_pem(ca_key), private=True)
        _write(directory / "ca.pem", ca.public_bytes(serialization.Encoding.PEM))
    ca = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TypeError(f"{directory / 'ca.key'} is not an EC key")
    return ca, key


def _issue(directory: Path, name: str, subject: str, ca_dir: Path, server: bool = False) -> None:
    """`<name>.pem` and `<name>.key` under `directory`, signed by the CA of `ca_dir`;
    nothing if the certificate is there already."""
    if (directory / f"{name}.pem").exists() and (directory / f"{name}.key").exists():
        return
    ca, ca_key = _load_ca(ca_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _cert(subject, key, ca, ca_key, server=server)
    _write(directory / f"{name}.key", _key_pem(key), private=True)
    _write(directory / f"{name}.pem", cert.public_bytes(serialization.Encoding.PEM))


def ensure_pki(directory: Path) -> None:
    """CA, server certificate and one client certificate per role; each made once."""
    _issue(directory, "server", "localhost", directory, server=True)
    for role in Role:
        _issue(directory, role.value, f"{role.value}:local", directory)


KAFKA_DIR = "kafka"  # under the PKI directory: the Kafka principals' certificates


def ensure_kafka_pki(directory: Path, principals: list[str]) -> Path:
    """The Kafka side of the stack's CA, under `directory`/kafka: the CA certificate, one
    client certificate per principal (CN=medclear-<principal>), and the brokers' own
    (CN=medclear-broker, for 127.0.0.1 and localhost) with its key beside it in one PEM
    file, the broker's keystore. Each made once; returns the Kafka directory."""
    kafka = directory / KAFKA_DIR
    _load_ca(directory)
    _write(kafka / "ca.pem", (directory / "ca.pem").read_bytes())
    _issue(kafka, BROKER, CN_PREFIX + BROKER, directory, server=True)
    keystore = (kafka / f"{BROKER}.key").read_bytes() + (kafka / f"{BROKER}.pem").read_bytes()
    _write(kafka / f"{BROKER}.keystore.pem", keystore, private=True)
    for principal in principals:
        _issue(kafka, principal, CN_PREFIX + principal, directory)
    return kafka


def server_credentials(directory: Path) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials(
        [((directory / "server.key").read_bytes(), (directory / "server.pem").read_bytes())],
        root_certificates=(directory / "ca.pem").read_bytes(),
        require_client_auth=True,
    )


def channel_credentials(directory: Path, role: Role) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=(directory / "ca.pem").read_bytes(),
        private_key=(directory / f"{role.value}.key").read_bytes(),
        certificate_chain=(directory / f"{role.value}.pem").read_bytes(),
    )


def caller_role(context: Any) -> Role | None:
    names = context.auth_context().get("x509_common_name") or []
    for raw in names:
        role = raw.decode(errors="replace").split(":", 1)[0]
        if role in Role.__members__.values():
            return Role(role)
    return None


class RoleInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Wraps every unary handler with the role check of its method."""

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: Any
    ) -> Any:
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        allowed = roles_for(details.method)
        inner = handler.unary_unary

        async def checked(request: Any, context: Any) -> Any:
            role = caller_role(context)
            if role is None or role not in allowed:
                who = role.value if role else "a caller without a medclear role"
                await status.abort(
                    context,
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"{who} may not call {details.method}",
                    status.Reason.ROLE_NOT_ALLOWED,
                    metadata={"method": details.method, "role": role.value if role else ""},
                )
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            checked,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
