"""The deployment files: Dockerfile, docker-compose.yml, deploy/ (Prometheus, Grafana, Kubernetes)
and the GitHub workflow. No Docker engine or cluster is needed: the files are parsed and checked
against each other and against the code (ports, paths, probes, metric names); `docker compose
config` and `kubectl kustomize` run where those clients exist. The image's command and health check
run for real against a server started with the image's settings."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lib.config import REPO_ROOT

DOCKERFILE = REPO_ROOT / "Dockerfile"
COMPOSE = REPO_ROOT / "docker-compose.yml"
K8S = REPO_ROOT / "deploy" / "k8s"
DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "dashboards" / "ml-service.json"
WORKFLOW = REPO_ROOT / ".github" / "workflows" / "ci.yml"

# what the service exports at GET /metrics (the dashboard must use these names, and only these)
METRICS = {
    "ml_service_requests_total",
    "ml_service_request_failures_total",
    "ml_service_prompt_tokens_total",
    "ml_service_generation_tokens_total",
    "ml_service_e2e_request_latency_seconds",
    "ml_service_request_queue_time_seconds",
    "ml_service_time_to_first_token_seconds",
    "ml_service_inter_token_latency_seconds",
    "ml_service_batch_size",
    "ml_service_num_requests_running",
    "ml_service_num_requests_waiting",
    "ml_service_model_info",
}


# ---- Dockerfile ----------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # comments may also sit between continuation lines
        if line.endswith("\\"):
            current += line[:-1].strip() + " "
            continue
        current += line
        instruction, _, args = current.partition(" ")
        out.append((instruction.upper(), args.strip()))
        current = ""
    return out


def stages() -> dict[str, dict]:
    """Stage name -> {"from": base, "lines": [(INSTRUCTION, args), ...]}; plus "" for global ARGs."""
    result: dict[str, dict] = {"": {"from": None, "lines": []}}
    current = ""
    for instruction, args in dockerfile_instructions(DOCKERFILE.read_text()):
        if instruction == "FROM":
            m = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", args, flags=re.IGNORECASE)
            assert m, f"every stage is named: FROM {args}"
            current = m.group(2)
            result[current] = {"from": m.group(1), "lines": []}
        else:
            result[current]["lines"].append((instruction, args))
    return result


def args_of(stage: dict, instruction: str) -> list[str]:
    return [a for i, a in stage["lines"] if i == instruction]


def env_of(stage: dict) -> dict[str, str]:
    env = {}
    for args in args_of(stage, "ENV"):
        for token in shlex.split(args):
            key, _, value = token.partition("=")
            env[key] = value
    return env


def arg_defaults() -> dict[str, str]:
    return dict(a.partition("=")[::2] for a in args_of(stages()[""], "ARG"))


def image_port() -> int:
    (expose,) = args_of(stages()["runtime"], "EXPOSE")
    return int(expose)


def final_stage_name() -> str:
    return list(stages())[-1]


def test_dockerfile_is_multi_stage_with_a_lean_runtime():
    s = stages()
    assert final_stage_name() == "runtime"
    assert {"base-gpu", "base-cpu", "base", "builder", "runtime"} <= set(s)
    assert s["builder"]["from"] == s["runtime"]["from"] == "base"
    copies = args_of(s["runtime"], "COPY")
    assert "--from=builder /opt/venv /opt/venv" in copies
    # runtime has no compilers or pip installs of its own; the builder installs no dev tools
    assert not [a for a in args_of(s["runtime"], "RUN") if "pip install" in a]
    builder_runs = " ".join(args_of(s["builder"], "RUN"))
    assert "pip install" in builder_runs
    assert "[dev]" not in builder_runs and "deepspeed" not in builder_runs.lower()


def test_dockerfile_has_a_cuda_runtime_base_and_a_cpu_flavor():
    s, defaults = stages(), arg_defaults()
    assert s["base-gpu"]["from"] == "${CUDA_IMAGE}"
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-(cudnn-)?runtime-ubuntu[\d.]+", defaults["CUDA_IMAGE"])
    assert s["base-cpu"]["from"] == "${PYTHON_IMAGE}" and "slim" in defaults["PYTHON_IMAGE"]
    assert s["base"]["from"] == "base-${FLAVOR}" and defaults["FLAVOR"] == "gpu"
    assert env_of(s["base-gpu"])["ML_SERVICE_DEVICE"] == "cuda"
    assert env_of(s["base-cpu"])["ML_SERVICE_DEVICE"] == "cpu"
    # the CPU flavor takes torch from the CPU wheel index, so the image stays small
    torch_install = next(a for a in args_of(s["builder"], "RUN") if '"torch==' in a)
    assert "whl/cpu" in torch_install and '"$FLAVOR" = cpu' in torch_install


def test_dockerfile_runs_as_a_non_root_user_and_serves_on_all_interfaces():
    runtime = stages()["runtime"]
    (user,) = args_of(runtime, "USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, (
        "numeric and non-root (Kubernetes runAsNonRoot checks it)"
    )
    assert any(f"--uid {uid}" in a for a in args_of(runtime, "RUN"))
    env = env_of(runtime)
    assert env["ML_SERVICE_HOST"] == "0.0.0.0"
    assert int(env["ML_SERVICE_PORT"]) == image_port() == 8000
    assert env["ML_SERVICE_CHECKPOINT"] == "/app/models/default"
    assert args_of(runtime, "WORKDIR") == ["/app"]
    assert json.loads(args_of(runtime, "CMD")[0]) == ["python", "serve.py"]


def test_dockerfile_embeds_the_default_model_and_copies_only_what_exists():
    s = stages()
    assert "models/default ./models/default" in args_of(s["runtime"], "COPY")
    ignored = ignore_patterns()
    for stage in s.values():
        for args in args_of(stage, "COPY"):
            if args.startswith("--from="):
                continue
            *sources, _ = args.split()
            for src in sources:
                assert (REPO_ROOT / src).exists(), src
                assert not any(src == p or src.startswith(p + "/") for p in ignored), src


def test_dockerfile_healthcheck_probes_health():
    (health,) = args_of(stages()["runtime"], "HEALTHCHECK")
    assert "/health" in health and "CMD" in health
    assert "--start-period=" in health  # loading the model is not a failure


def ignore_patterns() -> list[str]:
    lines = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_dockerignore_keeps_the_context_small():
    patterns = ignore_patterns()
    for needed in (".git", ".venv", "runs", "wandb", ".cache", "**/__pycache__", ".pytest_cache"):
        assert needed in patterns, needed
    for kept in ("lib", "ml_service", "models", "serve.py", "pyproject.toml", "README.md"):
        assert kept not in patterns, kept


@pytest.mark.slow
def test_image_command_and_health_check_work_with_the_image_settings(monkeypatch):
    """`python serve.py` with the image's ENV (/app mapped to this checkout) serves, and the
    HEALTHCHECK command passes against it and fails once it is gone."""
    from tests.test_server import running_server

    env = env_of(stages()["runtime"])
    for key, value in env.items():
        if key.startswith("ML_SERVICE_"):
            monkeypatch.setenv(key, value.replace("/app", str(REPO_ROOT), 1))
    monkeypatch.setenv("ML_SERVICE_DEVICE", "cpu")
    (health,) = args_of(stages()["runtime"], "HEALTHCHECK")
    command = health.split(" CMD ", 1)[1]
    shell_env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}

    def healthcheck(port: str) -> int:
        run = subprocess.run(
            ["sh", "-c", command], env={**shell_env, "ML_SERVICE_PORT": port}, timeout=30
        )
        return run.returncode

    with running_server([]) as proc:
        port = proc.url.rsplit(":", 1)[1]
        assert healthcheck(port) == 0
    assert healthcheck(port) != 0


# ---- docker-compose.yml --------------------------------------------------------------------


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def gpu_devices(service: dict) -> list[dict]:
    return service["deploy"]["resources"]["reservations"]["devices"]


def bind_mounts(service: dict) -> dict[str, str]:
    """host path -> container path, for the ./relative bind mounts."""
    mounts = {}
    for volume in service.get("volumes", []):
        src, dst, *_ = volume.split(":")
        if src.startswith("."):
            mounts[src] = dst
    return mounts


def test_compose_api_reserves_an_nvidia_gpu_and_mounts_checkpoints():
    c = compose()
    api = c["services"]["api"]
    assert "profiles" not in api, "`docker compose up` starts the API"
    (device,) = gpu_devices(api)
    assert device == {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    assert "checkpoints:/checkpoints" in api["volumes"] and "checkpoints" in c["volumes"]
    assert api["build"]["context"] == "." and api["build"]["args"]["FLAVOR"] == "gpu"
    assert any(p.endswith(f":{image_port()}") for p in api["ports"])
    env = api["environment"]
    for key in ("ML_SERVICE_DEVICE", "ML_SERVICE_DTYPE", "ML_SERVICE_CHECKPOINT"):
        assert key in env, key
    assert env["ML_SERVICE_DEVICE"].endswith(":-cuda}")
    # the default checkpoint is the one embedded in the image
    assert env["ML_SERVICE_CHECKPOINT"].endswith(
        ":-" + env_of(stages()["runtime"])["ML_SERVICE_CHECKPOINT"] + "}"
    )


def test_compose_train_profile_runs_train_distributed_on_every_gpu():
    train = compose()["services"]["train"]
    assert train["profiles"] == ["train"]
    assert "/app/train_distributed.py" in train["entrypoint"] and "torchrun" in train["entrypoint"]
    assert (REPO_ROOT / "train_distributed.py").exists()
    assert "checkpoints:/checkpoints" in train["volumes"] and train["working_dir"] == "/checkpoints"
    (device,) = gpu_devices(train)
    assert device == {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}
    assert "--resume=auto" in train["command"]


def test_compose_monitoring_profile_mounts_files_that_exist():
    services = compose()["services"]
    prometheus, grafana = services["prometheus"], services["grafana"]
    assert prometheus["profiles"] == grafana["profiles"] == ["monitoring"]
    mounts = {**bind_mounts(prometheus), **bind_mounts(grafana)}
    for host in mounts:
        assert (REPO_ROOT / host).exists(), host
    assert bind_mounts(prometheus) == {"./deploy/prometheus.yml": "/etc/prometheus/prometheus.yml"}
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    dashboards_in_container = mounts["./deploy/grafana/dashboards"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards_in_container}/{DASHBOARD.name}"
    provider = yaml.safe_load(
        (REPO_ROOT / "deploy/grafana/provisioning/dashboards/ml-service.yml").read_text()
    )
    assert provider["providers"][0]["options"]["path"] == dashboards_in_container


def compose_command() -> list[str] | None:
    """`docker compose` (v2), or a v2 `docker-compose` binary; None when neither is there."""
    candidates = [["docker", "compose"], ["docker-compose"]]
    for cmd in candidates:
        if not shutil.which(cmd[0]):
            continue
        try:
            version = subprocess.run([*cmd, "version"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if version.returncode == 0 and re.search(r"v?2\.\d+", version.stdout):
            return cmd
    return None


def test_docker_compose_config_accepts_every_profile():
    cmd = compose_command()
    if cmd is None:
        pytest.skip(
            "no Docker Compose v2 client here (CI's image job runs `docker compose config`)"
        )
    run = subprocess.run(
        [*cmd, "--profile", "train", "--profile", "monitoring", "config", "--quiet"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr


# ---- Prometheus and Grafana ----------------------------------------------------------------


def test_prometheus_scrapes_the_api_metrics():
    config = yaml.safe_load((REPO_ROOT / "deploy/prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "ml-service"]
    assert job["metrics_path"] == "/metrics"
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    assert targets == [f"api:{image_port()}"]  # the compose service, on the container port
    assert "api" in compose()["services"]


def test_grafana_datasource_is_the_compose_prometheus():
    (source,) = yaml.safe_load(
        (REPO_ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text()
    )["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    assert "9090" in compose()["services"]["prometheus"]["ports"][0]
    uids = {p["datasource"]["uid"] for p in dashboard_panels() if "datasource" in p}
    assert uids == {source["uid"]}


def dashboard_panels() -> list[dict]:
    return json.loads(DASHBOARD.read_text())["panels"]


def dashboard_metric_names() -> set[str]:
    exprs = " ".join(t["expr"] for p in dashboard_panels() for t in p.get("targets", []))
    names = set(re.findall(r"\bml_service_\w+", exprs))
    return {re.sub(r"_(bucket|sum|count)$", "", n) for n in names}


def test_dashboard_shows_every_metric_and_no_unknown_one():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    assert dashboard_metric_names() == METRICS
    panels = dashboard_panels()
    assert len({p["id"] for p in panels}) == len(panels)
    for p in panels:
        pos = p["gridPos"]
        assert pos["x"] + pos["w"] <= 24, p["title"]
    for p in panels:
        for t in p.get("targets", []):
            assert t["expr"].count("(") == t["expr"].count(")"), t["expr"]


def test_dashboard_names_match_what_the_service_exports(client):
    """Against the live /metrics, where the service has one (skipped until it does)."""
    r = client.get("/metrics")
    if r.status_code == 404:
        pytest.skip("this service has no /metrics endpoint yet")
    assert r.status_code == 200
    families = set(re.findall(r"^# TYPE (\S+) ", r.text, flags=re.MULTILINE))
    for name in dashboard_metric_names():
        # a counter's family drops "_total" in some client libraries
        assert name in families or name.removesuffix("_total") in families, name


# ---- Kubernetes ----------------------------------------------------------------------------


def k8s_objects() -> dict[str, dict]:
    objects = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["kind"] not in objects, f"one {doc['kind']} only"
            objects[doc["kind"]] = doc
    return objects


def api_container() -> dict:
    (container,) = k8s_objects()["Deployment"]["spec"]["template"]["spec"]["containers"]
    return container


def container_port(port: int | str) -> int:
    if isinstance(port, int):
        return port
    (match,) = [p["containerPort"] for p in api_container()["ports"] if p["name"] == port]
    return match


def test_deployment_probes_ready_and_health_on_the_container_port():
    c = api_container()
    (port,) = c["ports"]
    assert port["containerPort"] == image_port()
    probes = {name: c[name]["httpGet"] for name in ("readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["path"] == "/ready"
    assert probes["livenessProbe"]["path"] == "/health"
    if "startupProbe" in c:
        assert c["startupProbe"]["httpGet"]["path"] == "/health"
        probes["startupProbe"] = c["startupProbe"]["httpGet"]
    for probe in probes.values():
        assert container_port(probe["port"]) == image_port()
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["ML_SERVICE_HOST"] == "0.0.0.0" and int(env["ML_SERVICE_PORT"]) == image_port()
    assert env["ML_SERVICE_DEVICE"] == "cuda"


def test_deployment_requests_a_gpu_and_runs_as_the_image_user():
    d = k8s_objects()["Deployment"]
    resources = api_container()["resources"]
    assert int(resources["limits"]["nvidia.com/gpu"]) >= 1
    # extended resources: a request, when given, must equal the limit
    assert (
        resources["requests"].get("nvidia.com/gpu", resources["limits"]["nvidia.com/gpu"])
        == (resources["limits"]["nvidia.com/gpu"])
    )
    assert "cpu" in resources["requests"], "the HPA's CPU utilisation is relative to the request"
    pod = d["spec"]["template"]["spec"]
    (user,) = args_of(stages()["runtime"], "USER")
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == user.split(":")[0]
    assert "replicas" not in d["spec"], "the HPA owns the replica count"
    annotations = d["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == image_port()
    assert annotations["prometheus.io/path"] == "/metrics"


def test_service_and_budget_select_the_deployment_pods():
    objects = k8s_objects()
    d = objects["Deployment"]
    pod_labels = d["spec"]["template"]["metadata"]["labels"]
    assert d["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    service = objects["Service"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert container_port(port["targetPort"]) == image_port()
    pdb = objects["PodDisruptionBudget"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_hpa_scales_the_deployment():
    objects = k8s_objects()
    hpa = objects["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == (
        "Deployment",
        objects["Deployment"]["metadata"]["name"],
    )
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    assert any(m["type"] == "Resource" for m in hpa["spec"]["metrics"])


def test_kustomization_lists_every_manifest_and_the_image():
    k = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(k["resources"]) == files
    image = api_container()["image"]
    assert image.split(":")[0] in {i["name"] for i in k["images"]}


def test_kubectl_kustomize_renders_the_manifests():
    if not shutil.which("kubectl"):
        pytest.skip("no kubectl here")
    run = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    kinds = {doc["kind"] for doc in yaml.safe_load_all(run.stdout)}
    assert kinds == {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}


# ---- CI/CD ---------------------------------------------------------------------------------


def workflow_steps() -> dict[str, list[dict]]:
    workflow = yaml.safe_load(WORKFLOW.read_text())
    assert workflow.get("on", workflow.get(True)), "the workflow has triggers"  # YAML 1.1: on=True
    return {name: job["steps"] for name, job in workflow["jobs"].items()}


def runs(steps: list[dict]) -> str:
    return "\n".join(s.get("run", "") for s in steps)


def test_workflow_mirrors_ci_run():
    ci_run = (REPO_ROOT / ".ci" / "run").read_text()
    assert "make test" in ci_run and "make lint" in ci_run
    workflow = yaml.safe_load(WORKFLOW.read_text())
    test_job = workflow["jobs"]["test"]
    assert "bash .ci/run" in runs(test_job["steps"])
    assert test_job["env"]["CI"] == "true"  # the browser test fails rather than skips there
    assert "bookworm" in test_job["container"]  # Debian: `make test` installs chromium with apt


def test_workflow_builds_the_image_and_runs_its_health_check():
    steps = workflow_steps()
    image = runs(steps["image"])
    assert "docker build" in image and "docker run" in image
    assert ".State.Health.Status" in image and "healthy" in image
    assert "docker compose" in image and "config" in image
    assert "docker build" in runs(steps["image-gpu"])


def test_workflow_scripts_are_valid_bash():
    for job, steps in workflow_steps().items():
        for step in steps:
            if "run" in step:
                check = subprocess.run(["bash", "-n"], input=step["run"], text=True)
                assert check.returncode == 0, f"{job}: {step.get('name')}"


def test_make_test_installs_chromium_first():
    makefile = (REPO_ROOT / "Makefile").read_text()
    (test_rule,) = re.findall(r"^test:([^#\n]*)", makefile, flags=re.MULTILINE)
    assert "browser" in test_rule.split()
    (browser_recipe,) = re.findall(r"^browser:.*?(?=^\S)", makefile, flags=re.MULTILINE | re.DOTALL)
    assert "apt-get install" in browser_recipe and "chromium" in browser_recipe
    assert "command -v chromium" in browser_recipe  # only when missing


def test_orchestrators_wait_longer_than_the_shutdown_grace():
    """SIGKILL must come after the server has let in-flight requests finish, and has answered
    those it ended when the grace ran out (uvicorn waits SHUTDOWN_MARGIN_S more for them)."""
    from ml_service.runner import SHUTDOWN_MARGIN_S

    pod = k8s_objects()["Deployment"]["spec"]["template"]["spec"]
    env = {e["name"]: e["value"] for e in api_container()["env"]}
    grace = float(env["ML_SERVICE_SHUTDOWN_GRACE_S"])
    assert pod["terminationGracePeriodSeconds"] > grace + SHUTDOWN_MARGIN_S
    api = compose()["services"]["api"]
    grace = api["environment"]["ML_SERVICE_SHUTDOWN_GRACE_S"]  # "${VAR:-30}"
    default = float(grace.rsplit("-", 1)[1].rstrip("}"))
    assert float(api["stop_grace_period"].rstrip("s")) > default + SHUTDOWN_MARGIN_S
