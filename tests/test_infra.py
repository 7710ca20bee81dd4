"""Deployment files: Prometheus rules and scrape config, Grafana, docker-compose.yml, Dockerfile and
infra/k8s. Structural checks always run (names, wiring, probes, limits, metric names that exist);
promtool, `docker compose config` and kubeconform add their own checks where they are installed."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import yaml

from emofleet.cli import build_parser
from emofleet.sinks.clickhouse import connect
from emofleet.sinks.migrations import migrate
from emofleet.core.config import ClickHouseSettings, Settings, to_env
from emofleet.core.metrics import GpuCollector, Metrics

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS = ROOT / "infra" / "prometheus"
GRAFANA = ROOT / "infra" / "grafana"
K8S = ROOT / "infra" / "k8s"
METRIC = re.compile(r"\bemofleet_[a-z0-9_]+")
SETTINGS_ENV = set(to_env(Settings()))
REQUIRED_ALERTS = {"EmofleetConsumerLagHigh", "EmofleetDeadLetterRateHigh", "EmofleetErrorRateHigh",
                   "EmofleetConsumerStuck", "EmofleetPollLoopStalled", "EmofleetGpuMemoryHigh",
                   "EmofleetSinkInsertFailures"}


def exposed_metric_names() -> set[str]:
    """Every series name a processor or sink can expose (from the one metrics module)."""
    names: set[str] = set()
    families = [f for service in ("processor", "sink") for f in Metrics(service).registry.collect()]
    families += list(GpuCollector("cuda", _FakeCuda()).collect())
    for family in families:
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names |= {f"{family.name}_bucket", f"{family.name}_sum", f"{family.name}_count"}
        else:
            names.add(family.name)
    return names


class _FakeCuda:
    def is_available(self) -> bool: return True
    def is_initialized(self) -> bool: return True
    def current_device(self) -> int: return 0
    def mem_get_info(self, _i: int) -> tuple[int, int]: return 1, 2
    def memory_allocated(self, _i: int) -> int: return 1
    def memory_reserved(self, _i: int) -> int: return 1
    def utilization(self, _i: int) -> int: return 50


def unknown_metrics(expression: str, known: set[str]) -> set[str]:
    return set(METRIC.findall(expression)) - known


def run_tool(*command: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------- Prometheus


def test_alert_rules_cover_the_failure_modes_and_use_real_metrics() -> None:
    known = exposed_metric_names()
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    names = [rule["alert"] for rule in alerts]
    assert len(names) == len(set(names)) and REQUIRED_ALERTS <= set(names)
    for rule in alerts:
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        assert METRIC.search(rule["expr"]) or "up{" in rule["expr"], rule["alert"]
        assert not unknown_metrics(rule["expr"], known), (rule["alert"], unknown_metrics(rule["expr"], known))

    if promtool := shutil.which("promtool"):
        for command in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts_test.yml"]):
            result = run_tool(promtool, *command, cwd=PROMETHEUS)
            assert result.returncode == 0, result.stdout + result.stderr


def test_scrape_configs_point_at_every_emofleet_process() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert all((PROMETHEUS / path).is_file() for path in config["rule_files"])
    jobs = {job["job_name"]: [t for c in job["static_configs"] for t in c["targets"]]
            for job in config["scrape_configs"]}
    emofleet_services = {name for name, s in compose.items() if s.get("image", "").startswith("emofleet")
                         and name != "topics"}
    scraped = {target.split(":")[0] for job, targets in jobs.items() if job.startswith("emofleet-")
               for target in targets}
    assert scraped == emofleet_services
    for job, targets in jobs.items():
        if job.startswith("emofleet-"):
            assert all(t.endswith(":9400") for t in targets), job
            command = {"emofleet-processor": "process", "emofleet-sink": "sink",
                       "emofleet-aggregator": "aggregate", "emofleet-gateway": "serve"}[job]
            assert all(compose[t.split(":")[0]]["command"][0] == command for t in targets), job
    k8s = yaml.safe_load((PROMETHEUS / "prometheus-k8s.yml").read_text())
    relabels = k8s["scrape_configs"][0]["relabel_configs"]
    assert any(r.get("target_label") == "job" and r["replacement"] == "emofleet-$1" for r in relabels)

    if promtool := shutil.which("promtool"):
        for name in ("prometheus.yml", "prometheus-k8s.yml"):
            result = run_tool(promtool, "check", "config", name, cwd=PROMETHEUS)
            output = result.stdout + result.stderr
            if name == "prometheus-k8s.yml" and "kubernetes_sd_configs not found" in output:
                continue  # a distribution build of promtool without Kubernetes service discovery (Debian's)
            assert result.returncode == 0, output


# ---------------------------------------------------------------- Grafana


def test_dashboard_queries_real_metrics_and_the_clickhouse_panel_runs(tmp_path: Path) -> None:
    known = exposed_metric_names()
    sources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "datasources.yml").read_text())
    uids = {source["uid"]: source["type"] for source in sources["datasources"]}
    assert uids == {"prometheus": "prometheus", "clickhouse": "grafana-clickhouse-datasource"}
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "dashboards.yml").read_text())
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["grafana"]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in compose["volumes"] if m.startswith("./")}
    assert mounts[providers["providers"][0]["options"]["path"]] == "./infra/grafana/dashboards"
    assert "grafana-clickhouse-datasource" in compose["environment"]["GF_INSTALL_PLUGINS"]

    dashboard = json.loads((GRAFANA / "dashboards" / "emofleet.json").read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert dashboard["uid"] and len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    covered: set[str] = set()
    sql = []
    for panel in panels:
        assert panel["datasource"]["uid"] in uids, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == panel["datasource"]["uid"]
            if uids[target["datasource"]["uid"]] == "prometheus":
                assert not unknown_metrics(target["expr"], known), (panel["title"], target["expr"])
                covered |= set(METRIC.findall(target["expr"]))
            else:
                sql.append(target["rawSql"])
    for family in ("messages_in_total", "dead_letters_total", "consumer_lag_messages", "stage_seconds_bucket",
                   "end_to_end_seconds_bucket", "gpu_memory_used_bytes", "sink_inserted_rows_total",
                   "sink_insert_failures_total", "cache_hits_total", "in_flight_messages", "model_load_seconds"):
        assert f"emofleet_{family}" in covered, family
    assert any("emotion_events" in q and "label" in q for q in sql), "an emotion distribution panel"

    client = connect(ClickHouseSettings(), f"chdb://{tmp_path / 'chdb'}")
    try:
        migrate(client, "emofleet")
        for query in sql:  # Grafana's macros replaced by what they expand to
            query = re.sub(r"\$__timeFilter\((\w+)\)", r"\1 >= now() - INTERVAL 1 DAY", query)
            client.query(query)
    finally:
        client.close()


# ---------------------------------------------------------------- docker-compose.yml and Dockerfile


def _env_names(environment: dict[str, Any] | list[str]) -> set[str]:
    return set(environment) if isinstance(environment, dict) else {e.split("=", 1)[0] for e in environment}


def test_compose_stack_is_complete_and_wired() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    processors = sorted(name for name in services if name.startswith("processor-"))
    assert {"kafka", "redis", "clickhouse", "prometheus", "grafana", "sink", "aggregator", "topics"} <= set(services)
    assert len(processors) >= 1

    for name, service in services.items():  # pinned third-party images, our own image built from the Dockerfile
        image = service["image"]
        assert ":" in image and not image.endswith(":latest") or image == "emofleet:latest", name
        if name != "topics":
            assert service["healthcheck"]["test"], f"{name} has a healthcheck"
            assert service.get("restart") == "unless-stopped", name
    assert services["kafka"]["image"].startswith("apache/kafka:")
    kafka_env = services["kafka"]["environment"]
    assert "controller" in kafka_env["KAFKA_PROCESS_ROLES"] and "broker" in kafka_env["KAFKA_PROCESS_ROLES"]
    assert not any("ZOOKEEPER" in key for key in kafka_env), "KRaft, no ZooKeeper"
    assert "PLAINTEXT://kafka:9092" in kafka_env["KAFKA_ADVERTISED_LISTENERS"]

    commands = set(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    for name, service in services.items():
        if not service["image"].startswith("emofleet"):
            continue
        environment = service["environment"]
        unknown = {key for key in _env_names(environment) if key.startswith("EMOFLEET_")} - SETTINGS_ENV
        assert not unknown, f"{name}: {unknown} are not settings"
        assert environment["EMOFLEET_KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
        assert environment["EMOFLEET_CACHE_REDIS_URL"].startswith("redis://redis:6379/")
        command = service["command"][0]
        # `emofleet aggregate` is the aggregator's command (streams/aggregator.py) once the CLI has it
        assert command in commands or command == "aggregate", f"{name}: unknown command {command}"
        assert {d for d in service.get("depends_on", {})} <= set(services)
        if name != "topics":
            assert environment["EMOFLEET_OBSERVABILITY_METRICS_PORT"] == "9400"
            assert any(str(p).endswith(":9400") for p in service["ports"]), f"{name} publishes its metrics port"
            assert service["stop_grace_period"] == "60s"
            assert "healthz" in " ".join(service["healthcheck"]["test"])
    assert services["topics"]["command"] == ["topics", "create"]

    device_ids = []
    for name in processors:
        service = services[name]
        assert service["command"] == ["process"]
        assert service["environment"]["EMOFLEET_MODEL_DEVICE"] == "cuda"
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
        device_ids += device["device_ids"]
        assert service["depends_on"]["topics"]["condition"] == "service_completed_successfully"
    assert len(device_ids) == len(set(device_ids)) == len(processors), "one GPU per processor"

    sink = services["sink"]["environment"]
    clickhouse = services["clickhouse"]
    assert sink["EMOFLEET_CLICKHOUSE_DSN"] == "http://clickhouse:8123"
    assert sink["EMOFLEET_CLICKHOUSE_PASSWORD"] == clickhouse["environment"]["CLICKHOUSE_PASSWORD"]
    assert sink["EMOFLEET_CLICKHOUSE_USERNAME"] == clickhouse["environment"]["CLICKHOUSE_USER"]
    assert "${CLICKHOUSE_PASSWORD:?" in sink["EMOFLEET_CLICKHOUSE_PASSWORD"], "no password in the file"
    assert services["sink"]["depends_on"]["clickhouse"]["condition"] == "service_healthy"
    assert {"29092:29092"} <= set(services["kafka"]["ports"])

    gateway = services["gateway"]  # API and metrics on one port; uploads on a volume the processors read
    assert gateway["command"] == ["serve"] and gateway["environment"]["EMOFLEET_GATEWAY_PORT"] == "9400"
    assert gateway["environment"]["EMOFLEET_GATEWAY_HOST"] == "0.0.0.0" and "8000:9400" in gateway["ports"]
    assert "${GATEWAY_API_KEYS:?" in gateway["environment"]["EMOFLEET_GATEWAY_API_KEYS"], "no key in the file"
    uploads = gateway["environment"]["EMOFLEET_GATEWAY_UPLOADS"]
    assert f"uploads:{uploads}" in gateway["volumes"] and uploads in gateway["environment"]["EMOFLEET_AUDIO_FILE_ROOTS"]
    for name in processors:
        assert f"uploads:{uploads}:ro" in services[name]["volumes"], name
        assert uploads in services[name]["environment"]["EMOFLEET_AUDIO_FILE_ROOTS"].split(":"), name
    assert gateway["environment"]["EMOFLEET_CLICKHOUSE_PASSWORD"] == sink["EMOFLEET_CLICKHOUSE_PASSWORD"]
    assert "9090:9090" in services["prometheus"]["ports"] and "3000:3000" in services["grafana"]["ports"]

    named = {v.split(":")[0] for s in services.values() for v in s.get("volumes", []) if not v.startswith((".", "$"))}
    assert named == set(compose["volumes"]), "every named volume declared"
    for s in services.values():
        for volume in s.get("volumes", []):
            if volume.startswith("./"):
                assert (ROOT / volume.split(":")[0]).exists(), volume

    if (docker := shutil.which("docker")) and run_tool(docker, "compose", "version", cwd=ROOT).returncode == 0:
        result = subprocess.run([docker, "compose", "config", "--quiet"], cwd=ROOT, capture_output=True, text=True,
                                timeout=120, env={"CLICKHOUSE_PASSWORD": "x", "GRAFANA_ADMIN_PASSWORD": "x",
                                                  "PATH": "/usr/bin:/bin:/usr/local/bin"})
        assert result.returncode == 0, result.stderr


def test_dockerfile_builds_the_pinned_torch_and_runs_the_cli() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch,) = [p for p in pins if p.startswith("torch==")]
    assert f"ARG TORCH_VERSION={torch.removeprefix('torch==')}" in dockerfile
    assert 'ENTRYPOINT ["emofleet"]' in dockerfile and "EXPOSE 9400" in dockerfile
    assert "EMOFLEET_OBSERVABILITY_METRICS_PORT=9400" in dockerfile and "USER emofleet" in dockerfile
    for directory in re.findall(r"^COPY (\S+) \./\1$", dockerfile, re.MULTILINE):
        assert (ROOT / directory).is_dir(), directory
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".env" in ignored and ".emofleet" in ignored


# ---------------------------------------------------------------- Kubernetes


def k8s_documents() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(kustomization["resources"]) == files, "kustomization lists every manifest"
    return [doc for name in files for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


def test_kubernetes_manifests_are_consistent() -> None:
    documents = k8s_documents()
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for doc in documents:
        assert doc["apiVersion"] and doc["metadata"]["name"]
        by_kind.setdefault(doc["kind"], []).append(doc)
    (config,) = by_kind["ConfigMap"]
    settings = config["data"]
    assert set(settings) <= SETTINGS_ENV, set(settings) - SETTINGS_ENV
    partitions = int(settings["EMOFLEET_KAFKA_PARTITIONS"])
    revoke_grace = float(settings.get("EMOFLEET_BATCH_REVOKE_GRACE_SECONDS", Settings().batch.revoke_grace_seconds))
    deployments = {d["metadata"]["name"]: d for d in by_kind["Deployment"]}
    assert set(deployments) == {"emofleet-processor", "emofleet-sink", "emofleet-aggregator", "emofleet-gateway"}
    serving_port = {"emofleet-gateway": "http"}  # the gateway serves /metrics, /healthz, /readyz on its API port

    for name, deployment in deployments.items():
        spec = deployment["spec"]
        template = spec["template"]
        labels = template["metadata"]["labels"]
        assert spec["selector"]["matchLabels"].items() <= labels.items(), name
        pod = template["spec"]
        # shutdown = worker finishes its batch (revoke grace) + producer flush (revoke grace) + commit
        assert pod["terminationGracePeriodSeconds"] > 2 * revoke_grace + 10, name
        annotations = template["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert pod["securityContext"]["runAsNonRoot"] is True
        (container,) = pod["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        env = {v["name"]: v.get("value") for v in container.get("env", [])}
        port_name = serving_port.get(name, "metrics")
        port = int(env.get("EMOFLEET_GATEWAY_PORT") or settings["EMOFLEET_OBSERVABILITY_METRICS_PORT"])
        assert ports[port_name] == int(annotations["prometheus.io/port"]) == port, name
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port_name}, name
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port_name}, name
        resources = container["resources"]
        assert resources["requests"]["cpu"] and resources["requests"]["memory"] and resources["limits"]["memory"], name
        assert container["envFrom"][0]["configMapRef"]["name"] == config["metadata"]["name"]
        for variable in container.get("env", []):
            assert variable["name"] in SETTINGS_ENV, variable["name"]
            if "valueFrom" in variable:
                assert variable["valueFrom"]["secretKeyRef"]["name"] == "emofleet-secrets"
        mounts = {m["name"] for m in container.get("volumeMounts", [])}
        assert mounts <= {v["name"] for v in pod.get("volumes", [])}, name

    processor = deployments["emofleet-processor"]["spec"]["template"]["spec"]["containers"][0]
    assert processor["args"] == ["process"]
    gpu = processor["resources"]
    assert gpu["requests"]["nvidia.com/gpu"] == gpu["limits"]["nvidia.com/gpu"] == 1
    assert deployments["emofleet-processor"]["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0

    def selects(selector: dict[str, str], kind: str = "Deployment") -> list[str]:
        return [d["metadata"]["name"] for d in by_kind[kind]
                if selector.items() <= (d["spec"]["template"]["metadata"]["labels"] if kind == "Deployment"
                                        else d["metadata"]["labels"]).items()]

    for service in by_kind["Service"]:
        name = service["metadata"]["name"]
        assert len(selects(service["spec"]["selector"])) == 1, name
        assert name in deployments
        assert {p["targetPort"] for p in service["spec"]["ports"]} == {serving_port.get(name, "metrics")}
        assert "metrics" in {p["name"] for p in service["spec"]["ports"]}, f"{name}: scraped by the ServiceMonitor"
    pdbs = by_kind["PodDisruptionBudget"]
    assert any(selects(p["spec"]["selector"]["matchLabels"]) == ["emofleet-processor"] for p in pdbs)
    assert all(len(selects(p["spec"]["selector"]["matchLabels"])) == 1 for p in pdbs)

    (scaled,) = by_kind["ScaledObject"]
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == "emofleet-processor"
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] <= partitions, "capped at the partition count"
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleUp"]["stabilizationWindowSeconds"] > 0
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= behavior["scaleUp"]["stabilizationWindowSeconds"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "kafka"
    assert trigger["metadata"]["topic"] == settings["EMOFLEET_KAFKA_AUDIO_TOPIC"]
    assert trigger["metadata"]["consumerGroup"] == settings["EMOFLEET_KAFKA_PROCESSOR_GROUP"]
    assert trigger["metadata"]["bootstrapServers"] == settings["EMOFLEET_KAFKA_BOOTSTRAP_SERVERS"]
    assert trigger["metadata"]["allowIdleConsumers"] == "false"

    (autoscaler,) = by_kind["HorizontalPodAutoscaler"]  # the gateway scales on CPU
    assert autoscaler["apiVersion"] == "autoscaling/v2"
    assert autoscaler["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                                    "name": "emofleet-gateway"}
    assert 2 <= autoscaler["spec"]["minReplicas"] < autoscaler["spec"]["maxReplicas"]
    (cpu,) = autoscaler["spec"]["metrics"]
    assert cpu["resource"]["name"] == "cpu" and 0 < cpu["resource"]["target"]["averageUtilization"] < 100
    assert "replicas" not in autoscaler["spec"] and deployments["emofleet-gateway"]["spec"]["replicas"] >= 2
    gateway = deployments["emofleet-gateway"]["spec"]["template"]["spec"]["containers"][0]
    assert gateway["args"] == ["serve"] and gateway["resources"]["requests"]["cpu"], "the HPA needs a CPU request"
    gateway_env = {v["name"]: v for v in gateway["env"]}
    assert gateway_env["EMOFLEET_GATEWAY_API_KEYS"]["valueFrom"]["secretKeyRef"]["key"] == "gateway-api-keys"
    assert gateway_env["EMOFLEET_GATEWAY_UPLOADS"]["value"].startswith("s3://")
    assert gateway_env["EMOFLEET_GATEWAY_HOST"]["value"] == "0.0.0.0"
    assert any(selects(p["spec"]["selector"]["matchLabels"]) == ["emofleet-gateway"] for p in pdbs)

    (monitor,) = by_kind["ServiceMonitor"]
    monitored = selects(monitor["spec"]["selector"]["matchLabels"], kind="Service")
    assert sorted(monitored) == sorted(deployments), "every component is scraped"
    assert {e["port"] for e in monitor["spec"]["endpoints"]} == {"metrics"}

    if kubeconform := shutil.which("kubeconform"):
        files = [str(p) for p in sorted(K8S.glob("*.yaml")) if p.name != "kustomization.yaml"]
        result = run_tool(kubeconform, "-strict", "-ignore-missing-schemas", "-summary", *files, cwd=K8S)
        assert result.returncode == 0, result.stdout + result.stderr
