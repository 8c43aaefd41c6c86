"""Deployment files, checked with the real tools where this machine has them.

For real: `promtool check config` / `check rules` / `test rules` on the shipped Prometheus
files; a real Unmask server on loopback scraped by a real Prometheus (Debian's package,
installed here if missing), queried over Prometheus's HTTP API; every Grafana panel query
evaluated by that Prometheus; the Dockerfile's entrypoint arguments parsed by the real
CLI and its torch-index choice run in its own shell. The CPU image itself is built and
run by test_docker_image.py.

Statically: the Dockerfile's layer order and defaults (the GPU variant, which no test
builds), .dockerignore, docker-compose.yml and the Kubernetes manifests parse and agree
on ports, probe paths, names and labels.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from unmask.engine.models.make_random import make_random_checkpoint

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
PROM_DIR = DEPLOY / "prometheus"
DASHBOARD_DIR = DEPLOY / "grafana" / "dashboards"
K8S = DEPLOY / "k8s"
BUNDLED_MODEL = REPO / "models" / "unmask-tiny"
CONTAINER_PORT = 8000
SCRAPE_SECONDS = 1

pytestmark = pytest.mark.timeout(180)


# --------------------------------------------------------------------------- helpers
def _load_yaml_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, b""


def _post_json(url: str, body: dict, timeout: float = 60.0) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def _wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------- Dockerfile
def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in (REPO / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    return instructions


def _final_stage() -> list[tuple[str, str]]:
    instructions = _dockerfile_instructions()
    last_from = max(i for i, (kw, _) in enumerate(instructions) if kw == "FROM")
    return instructions[last_from:]


def _exec_form(args: str) -> list[str]:
    return json.loads(args)


def test_dockerfile_entrypoint_arguments_are_accepted_by_the_real_cli():
    from unmask.server.cli import build_parser

    (entry,) = [_exec_form(a) for kw, a in _final_stage() if kw == "ENTRYPOINT"]
    args = build_parser().parse_args(entry[1:] + ["/models/llada", "--cache", "dual"])
    assert (args.host, args.port, args.model_dir, args.cache) == ("0.0.0.0", CONTAINER_PORT, "/models/llada", "dual")
    bare = build_parser().parse_args(entry[1:])
    assert bare.model_dir is None, "with no argument the image must serve the bundled model"


def test_dockerfile_installs_the_locked_dependencies_before_copying_the_source():
    stage = _final_stage()
    lock = next(i for i, (kw, a) in enumerate(stage) if kw == "COPY" and a.split()[0] == "requirements.lock")
    install = next(i for i, (kw, a) in enumerate(stage) if kw == "RUN" and "pip install -r /tmp/requirements.lock" in a)
    source = next(i for i, (kw, a) in enumerate(stage) if kw == "COPY" and a.split()[0].rstrip("/") == "unmask")
    assert lock < install < source


def test_dockerfile_picks_its_base_by_build_argument_and_defaults_to_the_gpu_variant():
    """The GPU variant is not built by the tests (its CUDA base needs a registry), so its defaults are read here.

    One FROM: Docker's legacy builder builds every stage of a file, so per-variant stages
    would make a CPU build pull the CUDA base.
    """
    instructions = _dockerfile_instructions()
    assert [a for kw, a in instructions if kw == "FROM"] == ["${BASE_IMAGE}"]
    args = dict(a.partition("=")[::2] for kw, a in instructions if kw == "ARG")
    assert re.fullmatch(r"nvidia/cuda:[\w.]+-runtime-[\w.]+", args["BASE_IMAGE"]), "GPU base should be a CUDA runtime image"
    assert args["VARIANT"] == "gpu"


def _locked_install_command(variant: str, torch_index_url: str = "") -> list[str]:
    """The arguments the Dockerfile's locked-dependency RUN passes to pip, from its own shell."""
    (run,) = [a for kw, a in _final_stage() if kw == "RUN" and "pip install -r /tmp/requirements.lock" in a]
    stubs = "pip() { printf '%s\\n' \"$@\"; }; rm() { :; }; "
    env = {"PATH": os.environ["PATH"], "VARIANT": variant, "TORCH_INDEX_URL": torch_index_url}
    result = subprocess.run(["bash", "-c", stubs + run], env=env, capture_output=True, text=True, check=True)
    return result.stdout.splitlines()


def test_dockerfile_takes_torch_from_the_variants_index_unless_one_is_given():
    locked = ["install", "-r", "/tmp/requirements.lock"]
    assert _locked_install_command("gpu") == locked, "PyPI's torch is the CUDA build"
    assert _locked_install_command("cpu") == locked + ["--extra-index-url", "https://download.pytorch.org/whl/cpu"]
    cu128 = "https://download.pytorch.org/whl/cu128"
    assert _locked_install_command("gpu", cu128) == locked + ["--extra-index-url", cu128]


def _glob_regex(pattern: str) -> str:
    """A .dockerignore pattern as a regex: `**` spans directories, `*` and `?` stay within one."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return out


def _dockerignore_excludes(path: str) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a parent directory matches its files."""
    patterns = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")]
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _glob_regex(pattern.lstrip("!").rstrip("/"))
        if any(re.fullmatch(regex, p) for p in prefixes):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_checkout_leftovers_out_of_the_build_context():
    for path in (".venv/bin/python", ".git/config", "tests/test_deploy.py", "unmask/__pycache__/x.pyc",
                 "benchmarks/x.py", "training/x.py", "deploy/k8s/deployment.yaml", "test-artifacts/run.log",
                 "build/lib/unmask/__init__.py", "unmask.egg-info/PKG-INFO"):
        assert _dockerignore_excludes(path), f".dockerignore lets {path} into the build context"


# --------------------------------------------------------------------------- compose
def _compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def _host_path(spec: str) -> str:
    """'${VAR:-default}' -> 'default' (what compose uses when VAR is unset)."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", spec)


def _prometheus_target() -> str:
    cfg = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == "unmask"]
    (target,) = job["static_configs"][0]["targets"]
    return target


def test_compose_prometheus_scrapes_the_unmask_service_on_its_container_port():
    compose = _compose()
    host, port = _prometheus_target().split(":")
    assert host == "unmask" and host in compose["services"]
    assert int(port) == CONTAINER_PORT
    assert f"8000:{CONTAINER_PORT}" in compose["services"]["unmask"]["ports"]
    assert _load_yaml_docs(PROM_DIR / "prometheus.yml")[0]["scrape_configs"][0].get("metrics_path", "/metrics") == "/metrics"


def test_compose_unmask_reserves_a_gpu_and_the_cpu_service_stands_in_under_the_same_name():
    services = _compose()["services"]
    gpu = services["unmask"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert gpu["build"]["args"]["VARIANT"] == "gpu" and "profiles" not in gpu
    cpu = services["unmask-cpu"]
    assert cpu["build"]["args"]["VARIANT"] == "cpu"
    assert not cpu["build"]["args"]["BASE_IMAGE"].startswith("nvidia/cuda"), "the CPU image needs no CUDA base"
    assert cpu["profiles"] == ["cpu"]
    assert "deploy" not in cpu
    assert "unmask" in cpu["networks"]["default"]["aliases"], "Prometheus scrapes `unmask`; the CPU service must answer to it"
    assert cpu["ports"] == gpu["ports"]


def test_compose_bind_mounts_exist_and_match_what_the_services_read():
    services = _compose()["services"]
    for name, service in services.items():
        for volume in service.get("volumes", []):
            src = _host_path(volume.split(":")[0])
            if src.startswith("."):
                assert (REPO / src).exists(), f"{name} mounts {src}, which is not in the repository"
    prom = services["prometheus"]
    config_arg = next(a for a in prom["command"] if a.startswith("--config.file="))
    config_path = config_arg.split("=", 1)[1]
    mounts = {v.split(":")[1]: _host_path(v.split(":")[0]) for v in prom["volumes"]}
    mounted_dir = mounts[str(Path(config_path).parent)]
    assert (REPO / mounted_dir / Path(config_path).name).is_file()

    grafana = services["grafana"]
    gmounts = {v.split(":")[1]: _host_path(v.split(":")[0]) for v in grafana["volumes"]}
    assert gmounts["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/unmask.yml").read_text())["providers"][0]
    assert gmounts[provider["options"]["path"]] == "./deploy/grafana/dashboards"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (REPO / gmounts[str(Path(home).parent)] / Path(home).name).is_file()
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    prom_port = prom["ports"][0].split(":")[-1]
    assert datasource["url"] == f"http://prometheus:{prom_port}"


def test_compose_file_validates_against_the_compose_specification():
    pytest.importorskip("check_jsonschema", reason="check-jsonschema (a test dependency) is not installed")
    result = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(REPO / "docker-compose.yml")],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------- Grafana dashboard
def _dashboards() -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(DASHBOARD_DIR.glob("*.json"))]


def _panels(dashboard: dict) -> list[dict]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def _panel_exprs() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for d in _dashboards() for p in _panels(d) for t in p.get("targets", []) if t.get("expr")]


def _variable_queries() -> list[str]:
    out = []
    for d in _dashboards():
        for var in d["templating"]["list"]:
            if var["type"] == "query":
                query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
                out.append(query)
    return out


METRIC_NAME = re.compile(r"\bunmask_[a-zA-Z0-9_]+")


def _queried_metric_names() -> set[str]:
    return {m for _, expr in _panel_exprs() for m in METRIC_NAME.findall(expr)} | {
        m for q in _variable_queries() for m in METRIC_NAME.findall(q)
    }


def _grafana_to_promql(expr: str, rate_interval: str = "10s") -> str:
    """What Grafana sends for `expr` with every variable at its All value."""
    expr = expr.replace("$__rate_interval", rate_interval)
    return re.sub(r"\$\{?(\w+)\}?", ".*", expr)


def test_dashboard_panels_are_laid_out_on_the_grid_without_overlap():
    for dashboard in _dashboards():
        ids = [p["id"] for p in _panels(dashboard)]
        assert len(ids) == len(set(ids)), "panel ids must be unique"
        cells = set()
        for panel in _panels(dashboard):
            g = panel["gridPos"]
            assert 0 <= g["x"] and g["x"] + g["w"] <= 24, panel["title"]
            for x in range(g["x"], g["x"] + g["w"]):
                for y in range(g["y"], g["y"] + g["h"]):
                    assert (x, y) not in cells, f"panel {panel['title']!r} overlaps another"
                    cells.add((x, y))


def test_dashboard_queries_use_only_defined_variables_and_the_datasource_variable():
    builtins = {"__rate_interval", "__interval", "__range"}
    for dashboard in _dashboards():
        defined = {v["name"] for v in dashboard["templating"]["list"]}
        assert {"datasource", "model", "cache", "unmask"} <= defined, "model and policy variables are required"
        for panel in _panels(dashboard):
            if panel["type"] == "row":
                continue
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            for target in panel["targets"]:
                used = set(re.findall(r"\$\{?(\w+)\}?", target["expr"]))
                assert used <= defined | builtins, f"{panel['title']}: undefined variables {used - defined - builtins}"
        ds_var = next(v for v in dashboard["templating"]["list"] if v["name"] == "datasource")
        provisioned = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
        assert ds_var["current"]["value"] == provisioned["uid"]


def test_dashboard_covers_the_panels_the_issue_asks_for():
    titles = " | ".join(p["title"].lower() for d in _dashboards() for p in _panels(d))
    for needed in ("request rate", "errors", "latency", "time to first token", "tokens / s", "tokens committed per step",
                   "steps per block", "batch size", "active tokens", "running and waiting", "kv pool"):
        assert needed in titles, f"no panel about {needed!r}"
    exprs = " ".join(e for _, e in _panel_exprs())
    assert "histogram_quantile" in exprs


# --------------------------------------------------------------------------- Kubernetes
def _k8s() -> dict[str, dict]:
    docs = {}
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in _load_yaml_docs(path):
            if "kind" in doc and "apiVersion" in doc and doc["kind"] != "Kustomization":
                docs[doc["kind"]] = doc
    return docs


def _container() -> dict:
    (container,) = _k8s()["Deployment"]["spec"]["template"]["spec"]["containers"]
    return container


def _resolve_port(port, container: dict) -> int:
    if isinstance(port, int):
        return port
    (match,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return match


def test_k8s_manifests_parse_and_kustomization_lists_them():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file(), resource
    kinds = {d["kind"] for r in kustomization["resources"] for d in _load_yaml_docs(K8S / r)}
    assert kinds == {"Deployment", "Service", "HorizontalPodAutoscaler", "ServiceMonitor"}
    (image,) = kustomization["images"]
    assert _container()["image"].split(":")[0] == image["name"]


def test_k8s_container_port_matches_the_image_and_the_service_targets_it():
    docs, container = _k8s(), _container()
    assert _resolve_port("http", container) == CONTAINER_PORT
    service = docs["Service"]
    (port,) = service["spec"]["ports"]
    assert _resolve_port(port["targetPort"], container) == CONTAINER_PORT
    pod_labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert docs["Deployment"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_k8s_probes_hit_health_on_the_container_port():
    container = _container()
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/health", probe
        assert _resolve_port(get["port"], container) == CONTAINER_PORT, probe


def test_k8s_pod_drains_gracefully_on_a_gpu_as_the_image_user():
    docs, container = _k8s(), _container()
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    sleep = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] >= sleep + 60, "the drain after preStop needs time"
    assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
    users = [a for kw, a in _final_stage() if kw == "USER"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == users[-1].split(":")[0]


def test_k8s_servicemonitor_selects_the_service_and_scrapes_metrics():
    docs = _k8s()
    monitor, service = docs["ServiceMonitor"], docs["Service"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"


def test_k8s_autoscalers_target_the_deployment_on_the_waiting_metric():
    docs = _k8s()
    hpa, deployment = docs["HorizontalPodAutoscaler"], docs["Deployment"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] == "unmask_requests_waiting"
    adapter = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    (rule,) = adapter["rules"]["custom"]
    assert METRIC_NAME.findall(rule["seriesQuery"]) == ["unmask_requests_waiting"]
    assert rule["name"]["as"] == metric["pods"]["metric"]["name"]
    scaled = docs["ScaledObject"]
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert METRIC_NAME.findall(scaled["spec"]["triggers"][0]["metadata"]["query"]) == ["unmask_requests_waiting"]


_K8S_MODELS = {("apps/v1", "Deployment"): "V1Deployment", ("v1", "Service"): "V1Service",
               ("autoscaling/v2", "HorizontalPodAutoscaler"): "V2HorizontalPodAutoscaler"}
_SCALARS = {"str": str, "int": int, "bool": bool, "float": (int, float), "datetime": str, "date": str, "object": object}


def _k8s_schema_errors(value, type_name: str, path: str) -> list[str]:
    """Every field of `value` against the Kubernetes OpenAPI models of the official Python client:
    unknown (misspelt or misplaced) fields and wrong scalar types are errors."""
    import kubernetes.client as models

    if type_name.startswith("List["):
        if not isinstance(value, list):
            return [f"{path}: expected a list"]
        return [e for i, item in enumerate(value) for e in _k8s_schema_errors(item, type_name[5:-1], f"{path}[{i}]")]
    if type_name.startswith("Dict["):
        if not isinstance(value, dict):
            return [f"{path}: expected a mapping"]
        inner = type_name[type_name.index(",") + 1 : -1].strip()
        if path.endswith((".limits", ".requests")):
            inner = "object"  # resource quantities: 1, 0.5 and "8Gi" are all valid
        return [e for key, item in value.items() for e in _k8s_schema_errors(item, inner, f"{path}.{key}")]
    if type_name in _SCALARS:
        ok = isinstance(value, _SCALARS[type_name]) and not (type_name == "int" and isinstance(value, bool))
        return [] if ok else [f"{path}: expected {type_name}, got {value!r}"]
    model = getattr(models, type_name)
    if not isinstance(value, dict):
        return [f"{path}: expected an object ({type_name})"]
    fields = {json_name: attr for attr, json_name in model.attribute_map.items()}
    errors = []
    for key, item in value.items():
        if key not in fields:
            errors.append(f"{path}.{key}: not a field of {type_name}")
        else:
            errors.extend(_k8s_schema_errors(item, model.openapi_types[fields[key]], f"{path}.{key}"))
    return errors


def test_k8s_core_manifests_match_the_kubernetes_api_schema():
    pytest.importorskip("kubernetes", reason="the kubernetes Python client (a test dependency) is not installed")
    checked = 0
    for path in sorted(K8S.glob("*.yaml")):
        for doc in _load_yaml_docs(path):
            model = _K8S_MODELS.get((doc.get("apiVersion"), doc.get("kind")))
            if model:
                errors = _k8s_schema_errors(doc, model, f"{path.name}:{doc['kind']}")
                assert not errors, "\n".join(errors)
                checked += 1
    assert checked == 3


def test_k8s_schema_check_catches_a_misspelt_field():
    pytest.importorskip("kubernetes", reason="the kubernetes Python client (a test dependency) is not installed")
    deployment = _k8s()["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    pod["terminationGracePeriodSecond"] = pod.pop("terminationGracePeriodSeconds")
    pod["containers"][0]["livenessProbe"]["periodSeconds"] = "10"
    errors = _k8s_schema_errors(deployment, "V1Deployment", "d")
    assert any("terminationGracePeriodSecond: not a field" in e for e in errors)
    assert any("periodSeconds: expected int" in e for e in errors)


# --------------------------------------------------------------------------- real Prometheus + server
@pytest.fixture(scope="module")
def prometheus_tools() -> dict[str, str]:
    """Debian's prometheus package (prometheus + promtool), installed if missing."""
    if not (shutil.which("promtool") and shutil.which("prometheus")):
        if not shutil.which("apt-get"):
            pytest.skip("prometheus/promtool are not installed and apt-get is unavailable (Debian package: prometheus)")
        if os.geteuid() != 0:
            pytest.skip("prometheus/promtool are not installed and installing them needs root (apt-get install prometheus)")
        # RUNLEVEL=1 keeps the package's init script from starting a system-wide Prometheus.
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", RUNLEVEL="1")
        install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "prometheus"]
        if subprocess.run(install, env=env, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=300)
            result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
            if result.returncode != 0:
                pytest.skip(f"apt-get install prometheus failed: {result.stderr.strip()[-300:]}")
    return {"promtool": shutil.which("promtool"), "prometheus": shutil.which("prometheus")}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real `unmask serve` on 127.0.0.1 with a free port; the bundled model when present."""
    if (BUNDLED_MODEL / "config.json").is_file():
        model_dir = BUNDLED_MODEL
    else:
        model_dir = make_random_checkpoint(tmp_path_factory.mktemp("deploy-model") / "unmask-random", arch="llada")
    log = tmp_path_factory.mktemp("deploy-server") / "unmask.server.log"
    cmd = [sys.executable, "-m", "unmask.server", "serve", str(model_dir), "--host", "127.0.0.1", "--port", "0",
           "--kv-cache-memory", "64MiB", "--log-level", "warning"]
    with open(log, "w") as log_file:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=log_file, text=True)
    try:
        line = proc.stdout.readline()  # "Unmask is serving NAME at http://127.0.0.1:PORT/v1 ..." once ready
        match = re.search(r"serving (\S+) at (http://[\d.]+:\d+)/v1", line)
        assert match, f"server did not start: {line!r}\n{log.read_text()[-2000:]}"
        yield {"url": match.group(2), "model": match.group(1), "port": int(match.group(2).rsplit(":", 1)[1])}
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def traffic(server):
    """A few requests of different kinds, so every labelled metric has samples."""
    url, model = server["url"], server["model"]
    sent = 0
    for body in (
        {"model": model, "prompt": "The quick brown fox", "max_tokens": 16, "block_length": 8},
        {"model": model, "prompt": "Hello", "max_tokens": 16, "block_length": 8, "cache": "dual", "unmask": "threshold"},
        {"model": model, "prompt": "What is 12 plus 30?", "max_tokens": 8, "block_length": 8, "cache": "prefix"},
    ):
        status, answer = _post_json(f"{url}/v1/completions", body)
        assert status == 200, answer
        sent += 1
    status, _ = _post_json(f"{url}/v1/chat/completions",
                           {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8})
    assert status == 200
    status, _ = _post_json(f"{url}/v1/completions", {"model": model, "prompt": "x", "max_tokens": -1})
    assert status == 400
    return {"completions_ok": sent}


@pytest.fixture(scope="module")
def metrics_text(server, traffic) -> str:
    status, body = _get(f"{server['url']}/metrics")
    assert status == 200
    return body.decode()


@pytest.fixture(scope="module")
def prometheus(prometheus_tools, server, tmp_path_factory):
    """A real Prometheus on loopback running the shipped config, retargeted at the test server."""
    work = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = f"{SCRAPE_SECONDS}s"
    config["global"]["evaluation_interval"] = f"{SCRAPE_SECONDS}s"
    for job in config["scrape_configs"]:
        for static in job["static_configs"]:
            static["targets"] = [f"127.0.0.1:{server['port']}" for _ in static["targets"]]
    for rules in config.get("rule_files", []):
        shutil.copy(PROM_DIR / rules, work / rules)
    config_path = work / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    port = _free_port()
    cmd = [prometheus_tools["prometheus"], f"--config.file={config_path}", f"--storage.tsdb.path={work / 'data'}",
           f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]
    log = work / "prometheus.log"
    with open(log, "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_for(lambda: proc.poll() is not None or _get(f"{base}/-/ready", 1)[0] == 200, 30, "Prometheus to become ready")
        assert proc.poll() is None, f"prometheus exited: {log.read_text()[-2000:]}"
        yield {"url": base, "config": config_path, "tools": prometheus_tools}
    finally:
        _stop(proc)


def _promql(prom: dict, query: str) -> list[dict]:
    status, body = _get(f"{prom['url']}/api/v1/query?" + urllib.parse.urlencode({"query": query}))
    answer = json.loads(body)
    assert status == 200 and answer["status"] == "success", f"{query}: {answer}"
    return answer["data"]["result"]


def test_promtool_accepts_the_shipped_config_and_rules(prometheus_tools):
    for args in (["check", "config", str(PROM_DIR / "prometheus.yml")],
                 ["check", "rules", str(PROM_DIR / "alerts.yml")]):
        result = subprocess.run([prometheus_tools["promtool"], *args], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_accepts_the_config_retargeted_at_the_test_server(prometheus):
    result = subprocess.run([prometheus["tools"]["promtool"], "check", "config", str(prometheus["config"])],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_pass_their_promtool_unit_tests(prometheus_tools):
    result = subprocess.run([prometheus_tools["promtool"], "test", "rules", "alerts_test.yml"],
                            cwd=PROM_DIR, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _wait_until_scraped(prometheus: dict, traffic: dict) -> None:
    query = 'sum(unmask_http_requests_total{job="unmask", endpoint="/v1/completions", status="200"})'

    def counted():
        result = _promql(prometheus, query)
        return result and float(result[0]["value"][1]) >= traffic["completions_ok"]

    _wait_for(counted, 20, "Prometheus to scrape the request counter")


def test_prometheus_scrapes_the_server_and_promql_returns_the_request_counter(prometheus, traffic):
    _wait_until_scraped(prometheus, traffic)
    (up,) = _promql(prometheus, 'up{job="unmask"}')
    assert up["value"][1] == "1"


def test_every_dashboard_metric_exists_in_the_server_metrics(metrics_text):
    exposed: dict[str, str] = {}
    for family in text_string_to_metric_families(metrics_text):
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}[family.type]
        for suffix in suffixes:
            exposed[family.name + suffix] = family.type
    queried = _queried_metric_names()
    assert queried, "no unmask_ metric found in the dashboards"
    missing = sorted(queried - exposed.keys())
    assert not missing, f"dashboard queries metrics the server does not expose: {missing}"
    hpa_metric = _k8s()["HorizontalPodAutoscaler"]["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert exposed.get(hpa_metric) == "gauge"
    alert_metrics = set(METRIC_NAME.findall((PROM_DIR / "alerts.yml").read_text()))
    assert alert_metrics <= exposed.keys(), f"alerts use unknown metrics: {sorted(alert_metrics - exposed.keys())}"


def test_every_dashboard_query_returns_data_from_the_real_prometheus(prometheus, traffic):
    # Wait until the traffic is scraped, then two more scrapes so rate() has samples after it.
    _wait_until_scraped(prometheus, traffic)
    time.sleep(2.5 * SCRAPE_SECONDS)
    empty = []
    for title, expr in _panel_exprs():
        if not _promql(prometheus, _grafana_to_promql(expr)):
            empty.append(f"{title}: {expr}")
    assert not empty, "panel queries with no data after traffic:\n" + "\n".join(empty)
    for query in _variable_queries():
        match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query)
        assert match, f"unexpected variable query {query}"
        selector, label = _grafana_to_promql(match.group(1)), match.group(2)
        status, body = _get(f"{prometheus['url']}/api/v1/label/{label}/values?" + urllib.parse.urlencode({"match[]": selector}))
        values = json.loads(body)["data"]
        assert status == 200 and values, f"variable query {query} has no values"
