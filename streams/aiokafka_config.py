"""The aggregator's Kafka settings for faust's client, aiokafka (which is not librdkafka).

:func:`aiokafka_options` translates the Kafka settings and those librdkafka pass-through properties
(``EMOFLEET_KAFKA_CONFIG__*``, ``EMOFLEET_KAFKA_CONFIG_FILE``) that have an aiokafka equivalent, and refuses
every other property: ignoring, say, a CA file would connect differently from the processors, or not at all.
:func:`broker_credentials` turns the options into faust's ``broker_credentials`` (reading the TLS files).
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode
from urllib.request import Request, urlopen

from aiokafka.abc import AbstractTokenProvider

from emofleet.core.config import ConfigError, KafkaSettings, Secret

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER", "GSSAPI")
SUPPORTED_PROPERTIES = (
    "client.id", "ssl.ca.location", "ssl.ca.pem", "ssl.certificate.location", "ssl.key.location", "ssl.key.password",
    "enable.ssl.certificate.verification", "ssl.endpoint.identification.algorithm", "sasl.kerberos.service.name",
    "sasl.oauthbearer.method", "sasl.oauthbearer.token.endpoint.url", "sasl.oauthbearer.client.id",
    "sasl.oauthbearer.client.secret", "sasl.oauthbearer.scope",
)
_OIDC_TOKEN_REUSE = 0.8  # renew a token after this fraction of its lifetime, as librdkafka does


@dataclass(frozen=True)
class Tls:
    ca_location: str = ""  # a file or a directory of CA certificates; "" = the system's
    ca_pem: str = ""
    certificate_location: str = ""
    key_location: str = ""
    key_password: Secret = Secret("")
    verify_certificate: bool = True
    verify_hostname: bool = True


@dataclass(frozen=True)
class Oidc:
    """OAUTHBEARER tokens by the OIDC client-credentials grant (librdkafka's sasl.oauthbearer.method=oidc)."""

    token_endpoint_url: str
    client_id: str
    client_secret: Secret
    scope: str = ""


@dataclass(frozen=True)
class AiokafkaOptions:
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = ""
    sasl_username: str = ""
    sasl_password: Secret = Secret("")
    kerberos_service_name: str = "kafka"
    client_id: str = ""  # "" = faust's default
    tls: Tls = Tls()
    oidc: Oidc | None = None


def aiokafka_options(kafka: KafkaSettings) -> AiokafkaOptions:
    """The aggregator's client options; ConfigError for anything aiokafka cannot do as librdkafka would."""
    properties = dict(kafka.config)
    _refuse_unsupported(properties)
    protocol = kafka.security_protocol.upper()
    if protocol not in SECURITY_PROTOCOLS:
        raise ConfigError(f"EMOFLEET_KAFKA_SECURITY_PROTOCOL={kafka.security_protocol!r}: use one of "
                          f"{', '.join(SECURITY_PROTOCOLS)}")
    mechanism = (kafka.sasl_mechanism or "PLAIN").upper() if protocol.startswith("SASL") else ""
    if mechanism and mechanism not in SASL_MECHANISMS:
        raise ConfigError(f"EMOFLEET_KAFKA_SASL_MECHANISM={kafka.sasl_mechanism!r} is not supported by the "
                          f"aggregator's Kafka client (aiokafka): use one of {', '.join(SASL_MECHANISMS)}")
    return AiokafkaOptions(
        security_protocol=protocol,
        sasl_mechanism=mechanism,
        sasl_username=kafka.sasl_username,
        sasl_password=kafka.sasl_password,
        kerberos_service_name=properties.get("sasl.kerberos.service.name", "kafka"),
        client_id=properties.get("client.id", ""),
        tls=_tls(properties),
        oidc=_oidc(properties) if mechanism == "OAUTHBEARER" else None,
    )


def _refuse_unsupported(properties: dict[str, str]) -> None:
    for name in properties:
        if name not in SUPPORTED_PROPERTIES:
            raise ConfigError(
                f"Kafka client property {name} (EMOFLEET_KAFKA_CONFIG__* / EMOFLEET_KAFKA_CONFIG_FILE) is not "
                "supported by the aggregator's Kafka client (aiokafka); remove it from the aggregator's "
                f"environment (it supports {', '.join(SUPPORTED_PROPERTIES)})")


def _tls(properties: dict[str, str]) -> Tls:
    algorithm = properties.get("ssl.endpoint.identification.algorithm", "https").lower()
    if algorithm not in {"https", "none"}:
        raise ConfigError(f"ssl.endpoint.identification.algorithm={algorithm!r}: use https or none")
    return Tls(
        ca_location=properties.get("ssl.ca.location", ""),
        ca_pem=properties.get("ssl.ca.pem", ""),
        certificate_location=properties.get("ssl.certificate.location", ""),
        key_location=properties.get("ssl.key.location", ""),
        key_password=Secret(properties.get("ssl.key.password", "")),
        verify_certificate=_flag(properties, "enable.ssl.certificate.verification", default=True),
        verify_hostname=algorithm == "https",
    )


def _flag(properties: dict[str, str], name: str, *, default: bool) -> bool:
    value = properties.get(name, str(default)).lower()
    if value not in {"true", "false"}:
        raise ConfigError(f"{name}={value!r}: use true or false")
    return value == "true"


def _oidc(properties: dict[str, str]) -> Oidc:
    required = ("sasl.oauthbearer.token.endpoint.url", "sasl.oauthbearer.client.id", "sasl.oauthbearer.client.secret")
    if properties.get("sasl.oauthbearer.method", "").lower() != "oidc" or not all(properties.get(n) for n in required):
        raise ConfigError("SASL OAUTHBEARER in the aggregator (aiokafka) needs sasl.oauthbearer.method=oidc and "
                          f"{', '.join(required)}: set them (EMOFLEET_KAFKA_CONFIG__SASL_OAUTHBEARER_METHOD=oidc, ...)")
    return Oidc(token_endpoint_url=properties["sasl.oauthbearer.token.endpoint.url"],
                client_id=properties["sasl.oauthbearer.client.id"],
                client_secret=Secret(properties["sasl.oauthbearer.client.secret"]),
                scope=properties.get("sasl.oauthbearer.scope", ""))


# ------------------------------------------------------------------------------ edges: files, HTTP, faust


def broker_credentials(options: AiokafkaOptions) -> Any:
    """faust's ``broker_credentials`` for these options (None for PLAINTEXT)."""
    import faust

    if options.security_protocol == "PLAINTEXT":
        return None
    context = ssl_context(options.tls) if options.security_protocol in {"SSL", "SASL_SSL"} else None
    if options.security_protocol == "SSL":
        return faust.SSLCredentials(context)
    if options.oidc:
        return faust.OAuthCredentials(oauth_cb=OidcTokenProvider(options.oidc), ssl_context=context)
    if options.sasl_mechanism == "GSSAPI":
        return faust.GSSAPICredentials(kerberos_service_name=options.kerberos_service_name, ssl_context=context)
    return faust.SASLCredentials(username=options.sasl_username, password=str(options.sasl_password),
                                 mechanism=options.sasl_mechanism, ssl_context=context)


def ssl_context(tls: Tls) -> ssl.SSLContext:
    """The TLS context for ``tls``; a file that cannot be loaded is a ConfigError naming its property."""
    ca = Path(tls.ca_location) if tls.ca_location else None
    try:
        context = ssl.create_default_context(cafile=str(ca) if ca and not ca.is_dir() else None,
                                             capath=str(ca) if ca and ca.is_dir() else None,
                                             cadata=tls.ca_pem or None)
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(f"ssl.ca.location / ssl.ca.pem: cannot load the CA certificates ({error}); fix it") from None
    if tls.certificate_location:
        try:
            context.load_cert_chain(tls.certificate_location, tls.key_location or None,
                                    password=str(tls.key_password) or None)
        except (OSError, ssl.SSLError) as error:
            raise ConfigError(f"ssl.certificate.location / ssl.key.location / ssl.key.password: cannot load the "
                              f"client certificate ({error}); fix them") from None
    if not tls.verify_hostname or not tls.verify_certificate:
        context.check_hostname = False
    if not tls.verify_certificate:
        context.verify_mode = ssl.CERT_NONE
    return context


class OidcTokenProvider(AbstractTokenProvider):
    """aiokafka's token provider for OAUTHBEARER: one token per lifetime from the OIDC token endpoint."""

    def __init__(self, oidc: Oidc) -> None:
        self._oidc = oidc
        self._token = ""
        self._renew_at = 0.0

    async def token(self) -> str:
        if time.monotonic() >= self._renew_at:
            token, lifetime = await asyncio.to_thread(fetch_oidc_token, self._oidc)
            self._token, self._renew_at = token, time.monotonic() + _OIDC_TOKEN_REUSE * lifetime
        return self._token


def fetch_oidc_token(oidc: Oidc, timeout: float = 30.0) -> tuple[str, float]:
    """(access token, lifetime in seconds) by the client-credentials grant, with HTTP basic client auth."""
    form = {"grant_type": "client_credentials"} | ({"scope": oidc.scope} if oidc.scope else {})
    basic = base64.b64encode(f"{oidc.client_id}:{oidc.client_secret}".encode()).decode()
    request = Request(oidc.token_endpoint_url, data=urlencode(form).encode(), method="POST",
                      headers={"Authorization": f"Basic {basic}", "Accept": "application/json",
                               "Content-Type": "application/x-www-form-urlencoded"})
    with urlopen(request, timeout=timeout) as response:  # noqa: S310 (the endpoint is configuration)
        answer = json.load(response)
    return answer["access_token"], float(answer.get("expires_in", 3600))
