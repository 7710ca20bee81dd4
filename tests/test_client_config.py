"""Kafka and Schema Registry client properties pass through (env, properties file, the hand-off to child
processes), secrets stay masked, and the aggregator (faust/aiokafka) gets the equivalents or refuses; the
aggregator's logs obey --log-format json and the masking."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest
from confluent_kafka import Consumer
from confluent_kafka.admin import AdminClient

from emofleet.schemas.codec import SchemaError, make_codec
from emofleet.streams.aiokafka_config import (
    Oidc, OidcTokenProvider, aiokafka_options, broker_credentials, ssl_context,
)
from emofleet.core.config import (
    ConfigError, KafkaSettings, Properties, Secret, Settings, describe, from_env, is_secret_property, to_env,
)
from emofleet.streams.consumer import consumer_config
from emofleet.core.logs import RedactingFormatter, secret_values
from emofleet.streams.topics import TopicSpec, ensure_topics

from waiting import wait_for

SECRET = "hunter2-Zq9x-never-log-me"


def test_properties_come_from_a_file_and_variables_and_survive_the_hand_off_to_children(tmp_path: Path) -> None:
    kafka_file, registry_file = tmp_path / "client.properties", tmp_path / "registry.properties"
    kafka_file.write_text("# comment\n! also a comment\n\nssl.ca.location = /from-file.pem\n"
                          "socket.keepalive.enable=true\nsasl.oauthbearer.client.secret: s3:cr=et\n")
    registry_file.write_text("ssl.ca.location=/registry-ca.pem\n")
    env = {"EMOFLEET_KAFKA_CONFIG_FILE": str(kafka_file),
           "EMOFLEET_KAFKA_CONFIG__SSL_CA_LOCATION": "/from-env.pem",  # the variable beats the file
           "EMOFLEET_KAFKA_CONFIG__CLIENT_ID": "emofleet-eu-1",
           "EMOFLEET_KAFKA_REGISTRY_CONFIG_FILE": str(registry_file),
           "EMOFLEET_KAFKA_REGISTRY_CONFIG__BASIC_AUTH_USER_INFO": "svc:pw"}
    kafka = from_env(env).kafka

    assert kafka.client_config() == {
        "bootstrap.servers": "127.0.0.1:9092", "security.protocol": "PLAINTEXT", "ssl.ca.location": "/from-env.pem",
        "socket.keepalive.enable": "true", "sasl.oauthbearer.client.secret": "s3:cr=et", "client.id": "emofleet-eu-1"}
    assert dict(kafka.registry_config) == {"ssl.ca.location": "/registry-ca.pem", "basic.auth.user.info": "svc:pw"}
    handed_off = to_env(from_env(env))
    assert from_env(handed_off).kafka == kafka, "a child process sees the very same properties"
    kafka_file.unlink()
    assert from_env(env | handed_off).kafka == kafka, "the child needs neither the file nor the variables"


def test_names_kept_verbatim_from_a_file_and_mapped_from_variables(tmp_path: Path) -> None:
    (tmp_path / "p").write_text("odd_name.with_underscores=1\n")
    env = {"EMOFLEET_KAFKA_CONFIG_FILE": str(tmp_path / "p"), "EMOFLEET_KAFKA_CONFIG__ODD_NAME": "2"}
    assert dict(from_env(env).kafka.config) == {"odd_name.with_underscores": "1", "odd.name": "2"}


@pytest.mark.parametrize(("env", "says"), [
    ({"EMOFLEET_KAFKA_CONFIG_FILE": "/no/such/client.properties"}, "EMOFLEET_KAFKA_CONFIG_FILE=/no/such/client"),
    ({"EMOFLEET_KAFKA_CONFIG__BOOTSTRAP_SERVERS": "b:9092"}, "set EMOFLEET_KAFKA_BOOTSTRAP_SERVERS instead"),
    ({"EMOFLEET_KAFKA_CONFIG__SASL_PASSWORD": SECRET}, "set EMOFLEET_KAFKA_SASL_PASSWORD instead"),
    ({"EMOFLEET_KAFKA_REGISTRY_CONFIG__URL": "http://r"}, "set EMOFLEET_KAFKA_SCHEMA_REGISTRY_URL instead"),
    ({"EMOFLEET_KAFKA_CONFIG": f'{{"sasl.oauthbearer.client.secret": "{SECRET}"'}, "EMOFLEET_KAFKA_CONFIG is not"),
])
def test_bad_property_input_is_one_clear_error_without_the_secret(env: dict[str, str], says: str) -> None:
    with pytest.raises(ConfigError, match=says) as raised:
        from_env(env)
    assert SECRET not in str(raised.value)


def test_a_properties_file_line_without_a_value_names_the_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "p").write_text("client.id=a\nssl.ca.location\n")
    with pytest.raises(ConfigError, match=r"EMOFLEET_KAFKA_CONFIG_FILE=.*/p line 2: expected one name=value"):
        from_env({"EMOFLEET_KAFKA_CONFIG_FILE": str(tmp_path / "p")})


def test_secret_properties_are_masked_in_config_output_and_log_lines() -> None:
    secret_names = ["ssl.key.password", "sasl.oauthbearer.client.secret", "basic.auth.user.info", "sasl.jaas.config",
                    "ssl.keystore.password", "bearer.auth.token", "bearer.auth.client.secret", "ssl.key.pem",
                    "sasl.oauthbearer.config", "sasl.oauthbearer.assertion.private.key.passphrase"]
    plain_names = ["ssl.key.location", "ssl.ca.pem", "ssl.certificate.pem", "sasl.oauthbearer.token.endpoint.url",
                   "client.id", "sasl.oauthbearer.client.id", "basic.auth.credentials.source"]
    assert [n for n in secret_names if not is_secret_property(n)] == []
    assert [n for n in plain_names if is_secret_property(n)] == []

    kafka = KafkaSettings(config=Properties.of([("ssl.key.password", SECRET), ("client.id", "c")]),
                          registry_config=Properties.of([("basic.auth.user.info", f"svc:{SECRET}-r")]))
    shown = describe(Settings(kafka=kafka))["kafka"]
    assert shown["config"] == {"ssl.key.password": "***", "client.id": "c"}
    assert shown["registry_config"] == {"basic.auth.user.info": "***"}
    assert SECRET not in repr(kafka)
    masking = RedactingFormatter(logging.Formatter("%(message)s"), secret_values(Settings(kafka=kafka)))
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "connecting with %s and %s", (SECRET, f"svc:{SECRET}-r"),
                               None)
    assert masking.format(record) == "connecting with *** and ***"


def test_kafka_properties_reach_the_librdkafka_clients(settings: Settings) -> None:
    kafka = replace(settings.kafka, config=Properties.of([("client.id", "emofleet-test-client")]))
    ensure_topics(AdminClient(kafka.client_config()), [TopicSpec(kafka.audio_topic, 1, 1)])
    consumer = Consumer(consumer_config(kafka, kafka.processor_group))
    try:
        consumer.subscribe([kafka.audio_topic])
        wait_for(lambda: consumer.poll(0.2) or consumer.assignment(), "the consumer to join its group")
        assert consumer.memberid().startswith("emofleet-test-client-"), "the broker names members by client.id"
    finally:
        consumer.close()


def test_registry_properties_reach_the_schema_registry_client() -> None:
    seen: list[dict[str, str]] = []

    def not_found(request: BaseHTTPRequestHandler) -> tuple[int, dict[str, Any]]:
        seen.append({"path": request.path, "authorization": request.headers.get("Authorization", "")})
        return 404, {"error_code": 40403, "message": "Schema not found"}

    with http_server(not_found) as url:
        codec = make_codec(url, Properties.of([("basic.auth.user.info", "svc:pw")]))
        with pytest.raises(SchemaError) as raised:
            codec.decode("audio_reference", b"\x00\x00\x00\x00\x07\x02", topic="t")
    assert raised.value.reason == "unknown_schema"
    assert seen and seen[0]["path"].startswith("/schemas/ids/7")
    assert seen[0]["authorization"] == "Basic " + base64.b64encode(b"svc:pw").decode()


# ---------------------------------------------------------------------------------------- the aggregator


def test_aggregator_client_options_translate_the_supported_properties(tmp_path: Path) -> None:
    ca, cert, key = _certificate(tmp_path, key_password="kpw")
    kafka = KafkaSettings(security_protocol="sasl_ssl", sasl_mechanism="SCRAM-SHA-512", sasl_username="svc",
                          sasl_password=Secret("pw"), config=Properties.of([
                              ("client.id", "agg-1"), ("ssl.ca.location", str(ca)),
                              ("ssl.certificate.location", str(cert)), ("ssl.key.location", str(key)),
                              ("ssl.key.password", "kpw"), ("ssl.endpoint.identification.algorithm", "none")]))
    options = aiokafka_options(kafka)
    assert (options.security_protocol, options.sasl_mechanism, options.client_id) == ("SASL_SSL", "SCRAM-SHA-512",
                                                                                      "agg-1")
    credentials = broker_credentials(options)
    assert (credentials.username, credentials.password, credentials.mechanism.value) == ("svc", "pw", "SCRAM-SHA-512")
    context = credentials.ssl_context
    assert context.cert_store_stats()["x509_ca"] == 1 and not context.check_hostname
    assert ssl_context(options.tls).verify_mode.name == "CERT_REQUIRED"

    wrong_password = replace(options.tls, key_password=Secret("nope"))
    with pytest.raises(ConfigError, match="ssl.key.password: cannot load the client certificate"):
        ssl_context(wrong_password)
    with pytest.raises(ConfigError, match="ssl.ca.location / ssl.ca.pem: cannot load"):
        ssl_context(replace(options.tls, ca_location=str(tmp_path / "missing.pem")))


@pytest.mark.parametrize(("kafka", "says"), [
    (KafkaSettings(config=Properties.of([("linger.ms", "5")])),
     "Kafka client property linger.ms .* is not supported by the aggregator's Kafka client \\(aiokafka\\); remove"),
    (KafkaSettings(security_protocol="SASL_SSL", sasl_mechanism="OAUTHBEARER"),
     "OAUTHBEARER in the aggregator \\(aiokafka\\) needs sasl.oauthbearer.method=oidc"),
    (KafkaSettings(security_protocol="SASL_PLAINTEXT", sasl_mechanism="AWS_MSK_IAM"),
     "EMOFLEET_KAFKA_SASL_MECHANISM='AWS_MSK_IAM' is not supported"),
    (KafkaSettings(security_protocol="TLS"), "EMOFLEET_KAFKA_SECURITY_PROTOCOL='TLS': use one of"),
    (KafkaSettings(config=Properties.of([("enable.ssl.certificate.verification", "maybe")])),
     "enable.ssl.certificate.verification='maybe': use true or false"),
])
def test_aggregator_refuses_what_aiokafka_cannot_do(kafka: KafkaSettings, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        aiokafka_options(kafka)


def test_aggregator_gets_oauthbearer_tokens_from_the_oidc_endpoint() -> None:
    requests: list[dict[str, Any]] = []
    lifetimes = iter([0, 3600])  # the first token is already due for renewal

    def issue(request: BaseHTTPRequestHandler) -> tuple[int, dict[str, Any]]:
        body = request.rfile.read(int(request.headers["Content-Length"])).decode()
        requests.append({"form": parse_qs(body), "authorization": request.headers["Authorization"]})
        return 200, {"access_token": f"token-{len(requests)}", "token_type": "bearer", "expires_in": next(lifetimes)}

    with http_server(issue) as url:
        kafka = KafkaSettings(security_protocol="SASL_SSL", sasl_mechanism="OAUTHBEARER", config=Properties.of([
            ("sasl.oauthbearer.method", "oidc"), ("sasl.oauthbearer.token.endpoint.url", f"{url}/token"),
            ("sasl.oauthbearer.client.id", "agg"), ("sasl.oauthbearer.client.secret", SECRET),
            ("sasl.oauthbearer.scope", "kafka")]))
        options = aiokafka_options(kafka)
        assert options.oidc == Oidc(f"{url}/token", "agg", Secret(SECRET), "kafka")
        provider = broker_credentials(options).oauth_cb
        assert isinstance(provider, OidcTokenProvider)
        tokens = [asyncio.run(provider.token()) for _ in range(3)]
    assert tokens == ["token-1", "token-2", "token-2"], "renewed when due, then reused"
    assert requests[0]["form"] == {"grant_type": ["client_credentials"], "scope": ["kafka"]}
    assert requests[0]["authorization"] == "Basic " + base64.b64encode(f"agg:{SECRET}".encode()).decode()


def test_aggregator_refuses_an_unsupported_property_at_start_with_one_error_line(settings: Settings) -> None:
    env = os.environ | to_env(settings) | {"EMOFLEET_KAFKA_CONFIG": json.dumps({"linger.ms": "5"})}
    done = subprocess.run([sys.executable, "-m", "emofleet.cli", "aggregate"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode != 0
    (error,) = [line for line in done.stderr.splitlines() if line.startswith("emofleet: error:")]
    assert "property linger.ms" in error and "not supported by the aggregator's Kafka client (aiokafka)" in error


@pytest.mark.slow
def test_aggregator_logs_are_json_lines_without_secrets(settings: Settings) -> None:
    settings = replace(settings, aggregate=replace(settings.aggregate, app_id=f"{settings.kafka.results_topic}-agg"))
    env = os.environ | to_env(settings) | {
        "EMOFLEET_OBSERVABILITY_LOG_FORMAT": "json", "EMOFLEET_CLICKHOUSE_PASSWORD": SECRET,
        "EMOFLEET_KAFKA_CONFIG__CLIENT_ID": "emofleet-agg-json", "EMOFLEET_KAFKA_CONFIG__SSL_KEY_PASSWORD": SECRET,
        "EMOFLEET_KAFKA_REGISTRY_CONFIG__BASIC_AUTH_USER_INFO": f"svc:{SECRET}"}
    del env["EMOFLEET_KAFKA_CONFIG"], env["EMOFLEET_KAFKA_REGISTRY_CONFIG"]  # from the variables above instead
    worker = subprocess.Popen([sys.executable, "-m", "emofleet.cli", "aggregate"], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = _lines_of(worker)
    seen: list[str] = []
    try:
        while not seen or "[^Worker]: Ready" not in seen[-1]:
            line = lines.get(timeout=120)
            assert line is not None, f"the aggregator exited early:\n{''.join(seen[-20:])}"
            seen.append(line)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(60) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    seen += [line for line in iter(lines.get, None)]

    text = "".join(seen)
    assert SECRET not in text
    stray = [line for line in seen if line.strip() and not line.startswith("{")]
    assert stray == [], f"every line is JSON: {stray[:5]}"
    records = [json.loads(line) for line in seen if line.strip()]
    startup = next(r for r in records if r["msg"].startswith("starting aggregator with settings"))
    shown = json.loads(startup["msg"].removeprefix("starting aggregator with settings "))
    assert shown["kafka"]["config"] == {"client.id": "emofleet-agg-json", "ssl.key.password": "***"}
    loggers = {r["logger"].split(".")[0] for r in records}
    assert {"emofleet", "faust", "aiokafka"} <= loggers, "faust's and aiokafka's lines go through the same handler"
    # On the embedded broker the worker is a static member (no LeaveGroup: tests/test_tansu_group.py), which
    # Tansu names after its instance id; client.id reaching aiokafka is asserted in the options test above.
    static = not settings.kafka.leave_group_on_close
    member = f"member_id {settings.aggregate.app_id}@" if static else "member_id emofleet-agg-json-"
    assert any(member in r["msg"] for r in records), f"no '{member}' in the aggregator's log"
    assert any(r["msg"] == "[^Worker]: Stopping..." for r in records)


# ---------------------------------------------------------------------------------------- helpers


def _lines_of(process: subprocess.Popen) -> queue.Queue[str | None]:
    """The process's output lines as they come, then None at its end."""
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in process.stdout:  # type: ignore[union-attr]
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


@contextmanager
def http_server(respond: Callable[[BaseHTTPRequestHandler], tuple[int, dict[str, Any]]]) -> Iterator[str]:
    """A local HTTP server answering every request with ``respond(request)`` as JSON; yields its URL."""

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            status, body = respond(self)
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _answer

        def log_message(self, *_args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _certificate(directory: Path, key_password: str) -> tuple[Path, Path, Path]:
    """A self-signed certificate (its own CA) and its key, encrypted with ``key_password``."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-days", "1", "-subj", "/CN=emofleet-test",
                    "-keyout", str(key), "-out", str(cert), "-passout", f"pass:{key_password}"],
                   check=True, capture_output=True, timeout=60)
    return cert, cert, key
