"""What a production install and the container files promise: `pip install .` ships every backend the code
imports, docker-compose.yml validates and builds the image, the model cache lives on a volume."""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterable
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from emofleet.infra.check_imports import CHECKS, MODULES, failures

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("emofleet", "streams", "processors", "schemas", "sinks", "infra")
OPTIONAL = {"testcontainers"}  # the `containers` extra (infra/backends.py), not in the image
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def third_party_imports() -> set[str]:
    """Top-level names of every non-stdlib module the package's code imports, at any depth."""
    names: set[str] = set()
    for directory in SOURCE_DIRS:
        for path in (ROOT / directory).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "emofleet"}


def runtime_distributions(requirements: Iterable[str]) -> set[str]:
    """Distributions that installing ``requirements`` brings in (extras followed only where requested)."""
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [Requirement(text) for text in requirements]
    while todo:
        requirement = todo.pop()
        key = (canonicalize_name(requirement.name), frozenset(requirement.extras))
        if key in seen:
            continue
        seen.add(key)
        for text in metadata.requires(requirement.name) or []:
            dependency = Requirement(text)
            if dependency.marker is None or any(dependency.marker.evaluate({"extra": extra})
                                                for extra in requirement.extras or {""}):
                todo.append(dependency)
    return {name for name, _ in seen}


def test_every_third_party_import_is_in_the_install_check() -> None:
    checked = {module.split(".")[0] for module in MODULES}
    missing = third_party_imports() - OPTIONAL - checked
    assert not missing, f"add {sorted(missing)} to infra/check_imports.py MODULES (and pyproject dependencies)"


def test_main_dependencies_ship_every_checked_module() -> None:
    shipped = runtime_distributions(PROJECT["dependencies"])
    owners = metadata.packages_distributions()
    missing = {module for module in MODULES
               if not {canonicalize_name(d) for d in owners.get(module.split(".")[0], [])} & shipped}
    assert not missing, f"{sorted(missing)} come only with an extra (e.g. test): add them to [project] dependencies"
    assert "boto3" in runtime_distributions(["moto[server]"]), "how a test-only install hid boto3 before"


def test_install_check_names_what_is_missing() -> None:
    problems = failures({"json": "stdlib", "no_such_backend_xyz": "s3:// references"},
                        {"lz4": lambda: "cannot read lz4", "fine": lambda: None})
    assert len(problems) == 2
    assert problems[0].startswith("no_such_backend_xyz (s3:// references): ModuleNotFoundError")
    assert problems[1] == "lz4: cannot read lz4"
    assert set(CHECKS) and not failures({}, CHECKS), "the real checks pass in the dev environment"


def test_ci_and_image_run_the_install_check() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.index("infra/dev.sh check-install") < ci.index("bash infra/dev.sh test -q")
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "RUN pip install . && python -P infra/check_imports.py" in dockerfile
    assert re.search(r"^COPY .*infra/check_imports\.py .*\./infra/$", dockerfile, re.MULTILINE)


# ---------------------------------------------------------------- docker-compose.yml


def compose(*args: str, env_file: str) -> subprocess.CompletedProcess:
    tool = shutil.which("docker-compose")
    assert tool, "Debian's docker-compose (1.29) validates the file offline: `bash infra/dev.sh setup` installs it"
    return subprocess.run([tool, "--env-file", env_file, "-f", "docker-compose.yml", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env={"PATH": os.environ["PATH"]})


def test_compose_file_validates_and_builds_the_emofleet_image(tmp_path: Path) -> None:
    checked = compose("config", "-q", env_file=".env.example")
    assert checked.returncode == 0, checked.stderr
    resolved = yaml.safe_load(compose("config", env_file=".env.example").stdout)["services"]
    ours = {name: s for name, s in resolved.items() if s["image"] == "emofleet:latest"}
    assert {"topics", "sink", "aggregator", "processor-0", "gateway"} <= set(ours)
    assert all(Path(s["build"]["context"]) == ROOT for s in ours.values()), "`up --build` builds, never pulls"

    (tmp_path / "empty.env").write_text("")
    unset = compose("config", "-q", env_file=str(tmp_path / "empty.env"))  # the required passwords are named
    assert unset.returncode != 0 and "set CLICKHOUSE_PASSWORD" in unset.stderr


def test_the_model_cache_lives_on_the_data_volume() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    image_env = dict(re.findall(r"^\s+(\w+)=(\S+?)(?: \\)?$", dockerfile, re.MULTILINE))
    data = image_env["EMOFLEET_DATA_DIR"]
    assert 'VOLUME ["/data"]' in dockerfile and data == "/data"
    for variable in ("MODELSCOPE_CACHE", "HF_HOME"):
        assert image_env[variable].startswith(f"{data}/"), variable

    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    for name in (n for n in services if n.startswith("processor-")):
        mounts = {v.split(":")[1]: v.split(":")[0] for v in services[name]["volumes"]}
        assert not mounts[data].startswith((".", "/", "$")), f"{name}: /data is a named volume"

    processor = yaml.safe_load_all((ROOT / "infra" / "k8s" / "processor.yaml").read_text())
    pod = next(d for d in processor if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    assert {"name": "data", "mountPath": data} in pod["containers"][0]["volumeMounts"]


def test_the_installed_hubs_honour_the_cache_variables(tmp_path: Path) -> None:
    # modelscope's snapshot_download (processors/model.py) delegates to modelscope_hub and its config
    probe = ("from modelscope_hub import get_default_config; from huggingface_hub import constants;"
             "print(get_default_config().cache_dir); print(constants.HF_HUB_CACHE)")
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path / "home"),
           "MODELSCOPE_CACHE": str(tmp_path / "ms"), "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    modelscope_dir, hf_dir = result.stdout.split()
    assert Path(modelscope_dir) == tmp_path / "ms" and Path(hf_dir).is_relative_to(tmp_path / "hf")
