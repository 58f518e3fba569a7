"""launch/: the scale-out scripts are torchrun command lines and nothing more.

Each shell script is run for real with `torchrun`, `srun` and `scontrol` replaced by fakes on PATH
that record what they were called with, so the tests check the exact command a GPU node would run.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"
SCRIPTS = [LAUNCH / "workstation.sh", LAUNCH / "multinode.sh", LAUNCH / "slurm.sbatch"]
SHELL_FILES = SCRIPTS + [LAUNCH / "common.sh", LAUNCH / "mlflow_ui.sh"]
MANIFEST = LAUNCH / "pytorchjob.yaml"
IMAGE_CONFIGS = "/opt/dist-free/configs/"  # where docker/Dockerfile copies configs/
DOCKERFILE = REPO / "docker" / "Dockerfile"
# The trainer's promise: after SIGTERM it saves and exits in well under this many seconds. Every
# grace period between SIGTERM and SIGKILL (torchrun's, Slurm's, Kubernetes') must exceed it.
TRAINER_STOP_S = 30

# A fake torchrun: appends its argv and the environment it saw to $FAKE_LOG as one JSON line.
FAKE_TORCHRUN = f"""#!{sys.executable}
import json, os, sys
seen = ("MLFLOW_TRACKING_URI", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT")
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({{"tool": "torchrun", "argv": sys.argv[1:],
                        "env": {{k: os.environ.get(k) for k in seen}}}}) + "\\n")
"""
# A fake srun: logs its own options, then runs the command after them, as srun does on each node.
FAKE_SRUN = f"""#!{sys.executable}
import json, os, sys
args = sys.argv[1:]
n = next(i for i, a in enumerate(args) if not a.startswith("-"))
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({{"tool": "srun", "argv": args[:n], "command": args[n:]}}) + "\\n")
os.execvp(args[n], args[n:])
"""
# A fake scontrol: `scontrol show hostnames a,b,c` prints one host a line.
FAKE_SCONTROL = f"""#!{sys.executable}
import sys
assert sys.argv[1:3] == ["show", "hostnames"], sys.argv
print("\\n".join(sys.argv[3].split(",")))
"""


@pytest.fixture
def fake_bin(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in [("torchrun", FAKE_TORCHRUN), ("srun", FAKE_SRUN),
                       ("scontrol", FAKE_SCONTROL)]:
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "my config.yaml"  # a space, to catch unquoted expansions
    path.write_text("run:\n  name: t\n")
    return path


def run_script(script, fake_bin, tmp_path, env=None, args=(), cwd=REPO):
    """Run a launch script with fakes first on PATH; return (process, logged calls)."""
    log = tmp_path / "calls.jsonl"
    full_env = {"PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}", "FAKE_LOG": str(log),
                "HOME": str(tmp_path)}
    full_env.update(env or {})
    proc = subprocess.run(["bash", str(script), *args], env=full_env, cwd=cwd,
                          capture_output=True, text=True, timeout=60)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return proc, calls


def torchrun_argv(calls):
    runs = [c for c in calls if c["tool"] == "torchrun"]
    assert len(runs) == 1, calls
    return runs[0]["argv"]


def flag(argv, name):
    """Value of a `--name=value` torchrun flag in argv (None when absent)."""
    values = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
    assert len(values) <= 1, argv
    return values[0] if values else None


def trainer_args(argv):
    """The arguments after `-m dist_free.train` (torchrun's own flags come before)."""
    i = argv.index("-m")
    assert argv[i + 1] == "dist_free.train", argv
    return argv[i + 2:]


# ---- static checks -------------------------------------------------------------------------

@pytest.mark.parametrize("script", SHELL_FILES, ids=lambda p: p.name)
def test_script_parses_with_bash_n(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_is_strict_mode(script):
    assert re.search(r"^set -euo pipefail$", script.read_text(), re.M)


def dev_tool(name: str) -> str:
    """A linter from the dev extra: beside this interpreter (a venv not activated) or on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    assert found, f"{name} missing: pip install -e '.[dev]' brings it"
    return found


def test_scripts_pass_shellcheck():
    proc = subprocess.run([dev_tool("shellcheck"), "-x", *map(str, SHELL_FILES)], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_calls_torchrun_with_the_trainer_module(script):
    text = script.read_text()
    assert re.search(r"\btorchrun\b[^\n]*(\\\n[^\n]*)*-m dist_free\.train --config", text), \
        f"{script.name} does not run `torchrun ... -m dist_free.train --config`"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_default_config_exists_in_repo(script, fake_bin, tmp_path):
    env = {"RDZV_ENDPOINT": "n0:29400", **slurm_env(), "SLURM_SUBMIT_DIR": str(REPO)}
    proc, calls = run_script(script, fake_bin, tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    config = Path(trainer_args(torchrun_argv(calls))[1])
    assert config.is_file() and config.is_relative_to(REPO / "configs"), config


# ---- torchrun's shutdown grace -------------------------------------------------------------

def any_launcher_env():
    """What each script needs besides its defaults (the Slurm variables, a rendezvous node)."""
    return {"RDZV_ENDPOINT": "n0:29400", **slurm_env(), "SLURM_SUBMIT_DIR": str(REPO)}


def shutdown_timeout_seen(script, fake_bin, tmp_path, **env):
    run_dir = tmp_path / f"run{len(list(tmp_path.glob('run*')))}"   # a call log of its own
    run_dir.mkdir()
    proc, calls = run_script(script, fake_bin, run_dir, env={**any_launcher_env(), **env})
    assert proc.returncode == 0, proc.stderr
    (run,) = [c for c in calls if c["tool"] == "torchrun"]
    seen = run["env"]["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]
    assert seen is not None, f"{script.name}: torchrun's environment lacks the grace (exported?)"
    return seen


@pytest.fixture(scope="module")
def launcher_grace_s(tmp_path_factory):
    """The seconds torchrun gives its workers after SIGTERM when started by launch/ (default)."""
    tmp = tmp_path_factory.mktemp("grace")
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    (bin_dir / "torchrun").write_text(FAKE_TORCHRUN)
    (bin_dir / "torchrun").chmod(0o755)
    return int(shutdown_timeout_seen(LAUNCH / "workstation.sh", bin_dir, tmp))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_launcher_gives_torchrun_the_same_shutdown_grace(script, fake_bin, tmp_path,
                                                                launcher_grace_s):
    assert shutdown_timeout_seen(script, fake_bin, tmp_path) == str(launcher_grace_s)
    # A site with slower storage can lengthen it.
    assert shutdown_timeout_seen(script, fake_bin, tmp_path,
                                 TORCH_ELASTIC_SHUTDOWN_TIMEOUT="300") == "300"


def test_launcher_grace_outlasts_the_trainer_stop(launcher_grace_s):
    assert launcher_grace_s > TRAINER_STOP_S


def test_launcher_grace_matches_the_image(launcher_grace_s):
    image_env = re.search(r"^\s*TORCH_ELASTIC_SHUTDOWN_TIMEOUT=(\d+)", DOCKERFILE.read_text(),
                          re.M)
    assert image_env and int(image_env[1]) == launcher_grace_s


def test_installed_torchrun_reads_the_grace_from_the_environment(launcher_grace_s, monkeypatch):
    # The knob is an environment variable: a misspelt name would be ignored silently (30 s).
    from torch.distributed.launcher.api import LaunchConfig
    from torch.distributed.run import config_from_args, parse_args

    if "shutdown_timeout" not in LaunchConfig.__dataclass_fields__:
        pytest.skip("torch < 2.12: torchrun always waits 30 s, whatever the environment says")
    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(launcher_grace_s))
    config, _, _ = config_from_args(parse_args(["--standalone", "--nproc_per_node=1",
                                                "-m", "dist_free.train"]))
    assert config.shutdown_timeout == launcher_grace_s


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_a_malformed_grace_fails_before_torchrun(script, fake_bin, tmp_path):
    env = {**any_launcher_env(), "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "45s"}
    proc, calls = run_script(script, fake_bin, tmp_path, env=env)
    assert proc.returncode == 2 and "TORCH_ELASTIC_SHUTDOWN_TIMEOUT" in proc.stderr
    assert calls == []


# ---- workstation ---------------------------------------------------------------------------

def test_workstation_runs_standalone_torchrun_with_defaults(fake_bin, tmp_path, config_file):
    proc, calls = run_script(LAUNCH / "workstation.sh", fake_bin, tmp_path,
                             env={"CONFIG": str(config_file)})
    assert proc.returncode == 0, proc.stderr
    argv = torchrun_argv(calls)
    assert "--standalone" in argv
    assert flag(argv, "nproc_per_node") == "4"
    # No DATA / RUN_DIR: the config's own data.root and run.dir stay in charge.
    assert trainer_args(argv) == ["--config", str(config_file)]


def test_workstation_passes_its_settings_through_to_torchrun(fake_bin, tmp_path, config_file):
    env = {"CONFIG": str(config_file), "NPROC_PER_NODE": "2", "DATA": "/d s/imagenet",
           "RUN_DIR": "/r", "MLFLOW_TRACKING_URI": "http://tracker:5000"}
    proc, calls = run_script(LAUNCH / "workstation.sh", fake_bin, tmp_path, env=env,
                             args=["train.epochs=3", "run.name=a b"])
    assert proc.returncode == 0, proc.stderr
    argv = torchrun_argv(calls)
    assert flag(argv, "nproc_per_node") == "2"
    # Command-line overrides come last so that they win over DATA / RUN_DIR.
    assert trainer_args(argv) == ["--config", str(config_file), "data.root=/d s/imagenet",
                                  "run.dir=/r", "train.epochs=3", "run.name=a b"]
    assert calls[0]["env"]["MLFLOW_TRACKING_URI"] == "http://tracker:5000"


def test_workstation_default_config_is_found_from_any_directory(fake_bin, tmp_path):
    proc, calls = run_script(LAUNCH / "workstation.sh", fake_bin, tmp_path, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert Path(trainer_args(torchrun_argv(calls))[1]).is_file()


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_missing_config_fails_before_torchrun_naming_the_file(script, fake_bin, tmp_path):
    env = {"CONFIG": str(tmp_path / "nope.yaml"), "RDZV_ENDPOINT": "n0:29400", **slurm_env()}
    proc, calls = run_script(script, fake_bin, tmp_path, env=env)
    assert proc.returncode == 2
    assert "CONFIG file not found" in proc.stderr and "nope.yaml" in proc.stderr
    assert calls == []


# ---- multi-node ----------------------------------------------------------------------------

def test_multinode_launches_an_elastic_c10d_job(fake_bin, tmp_path, config_file):
    env = {"CONFIG": str(config_file), "RDZV_ENDPOINT": "node0:29400", "NNODES": "2:4"}
    proc, calls = run_script(LAUNCH / "multinode.sh", fake_bin, tmp_path, env=env,
                             args=["train.epochs=1"])
    assert proc.returncode == 0, proc.stderr
    argv = torchrun_argv(calls)
    assert flag(argv, "rdzv_backend") == "c10d"
    assert flag(argv, "rdzv_endpoint") == "node0:29400"
    assert flag(argv, "rdzv_id") == "dist-free"
    assert flag(argv, "nnodes") == "2:4"
    assert flag(argv, "nproc_per_node") == "4"
    assert flag(argv, "max_restarts") == "3"
    assert "--standalone" not in argv
    assert trainer_args(argv) == ["--config", str(config_file), "train.epochs=1"]


def test_multinode_without_endpoint_fails_clearly(fake_bin, tmp_path, config_file):
    proc, calls = run_script(LAUNCH / "multinode.sh", fake_bin, tmp_path,
                             env={"CONFIG": str(config_file)})
    assert proc.returncode == 2 and "RDZV_ENDPOINT" in proc.stderr
    assert calls == []


# ---- Slurm ---------------------------------------------------------------------------------

def slurm_env():
    return {"SLURM_JOB_NODELIST": "gpu-a,gpu-b,gpu-c", "SLURM_JOB_NUM_NODES": "3",
            "SLURM_JOB_ID": "4242", "SLURM_GPUS_ON_NODE": "8"}


def test_slurm_runs_one_torchrun_per_node_rendezvous_on_first_node(fake_bin, tmp_path,
                                                                   config_file):
    # sbatch runs a spool copy of the script: the repo must be found via SLURM_SUBMIT_DIR.
    spool = tmp_path / "spool"
    spool.mkdir()
    shutil.copy(LAUNCH / "slurm.sbatch", spool / "slurm_script")
    env = {**slurm_env(), "SLURM_SUBMIT_DIR": str(REPO), "CONFIG": str(config_file),
           "DATA": "/datasets/imagenet"}
    proc, calls = run_script(spool / "slurm_script", fake_bin, tmp_path, env=env,
                             args=["train.epochs=2"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    srun = [c for c in calls if c["tool"] == "srun"]
    assert len(srun) == 1 and "--ntasks-per-node=1" in srun[0]["argv"]
    argv = torchrun_argv(calls)
    assert flag(argv, "rdzv_backend") == "c10d"
    assert flag(argv, "rdzv_endpoint") == "gpu-a:29400"
    assert flag(argv, "rdzv_id") == "4242"
    assert flag(argv, "nnodes") == "3"
    assert flag(argv, "nproc_per_node") == "8"  # the GPUs Slurm gave each node
    assert trainer_args(argv) == ["--config", str(config_file),
                                  "data.root=/datasets/imagenet", "train.epochs=2"]


def test_slurm_header_asks_one_task_per_node_with_gpus():
    header = [l for l in (LAUNCH / "slurm.sbatch").read_text().splitlines()
              if l.startswith("#SBATCH")]
    assert "#SBATCH --ntasks-per-node=1" in header
    assert any(l.startswith("#SBATCH --gpus-per-node=") for l in header)


def test_slurm_signals_the_steps_early_enough_for_a_clean_stop(launcher_grace_s):
    header = [l for l in (LAUNCH / "slurm.sbatch").read_text().splitlines()
              if l.startswith("#SBATCH --signal=")]
    assert len(header) == 1, header
    # [{R|B}:]SIG[@SECONDS]. "B:" would reach the batch shell only, never torchrun or the ranks.
    spec = re.fullmatch(r"#SBATCH --signal=(?:([RB]):)?(\w+)(?:@(\d+))?", header[0])
    assert spec, header[0]
    prefix, sig, lead = spec.groups()
    assert prefix is None, "B: signals only the batch shell; R: is about reservations"
    assert sig in ("TERM", "SIGTERM", "15")   # the trainer saves on SIGTERM only
    # Slurm's default lead is 60 s; torchrun must be done (or have killed) before the limit.
    assert int(lead or 60) > launcher_grace_s


def test_slurm_step_runs_torchrun_itself(fake_bin, tmp_path, config_file):
    # A shell between srun and torchrun would have to forward the step's SIGTERM by hand.
    env = {**slurm_env(), "SLURM_SUBMIT_DIR": str(REPO), "CONFIG": str(config_file)}
    proc, calls = run_script(LAUNCH / "slurm.sbatch", fake_bin, tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    (srun,) = [c for c in calls if c["tool"] == "srun"]
    assert srun["command"][0] == "torchrun"


# ---- Kubernetes ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pytorchjob():
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d is not None]
    assert len(docs) == 1
    return docs[0]


def worker_container(job):
    spec = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    (container,) = [c for c in spec["containers"] if c["name"] == "pytorch"]
    return spec, container


def test_pytorchjob_is_an_elastic_c10d_pytorchjob(pytorchjob):
    assert pytorchjob["apiVersion"] == "kubeflow.org/v1"
    assert pytorchjob["kind"] == "PyTorchJob"
    spec = pytorchjob["spec"]
    assert spec["elasticPolicy"]["rdzvBackend"] == "c10d"
    assert spec["elasticPolicy"]["maxRestarts"] >= 1
    replicas = spec["pytorchReplicaSpecs"]["Worker"]["replicas"]
    assert spec["elasticPolicy"]["minReplicas"] <= replicas <= spec["elasticPolicy"]["maxReplicas"]
    # nprocPerNode is a string in the v1 API (it also takes "gpu" / "auto").
    assert isinstance(spec["nprocPerNode"], str)


def test_pytorchjob_gpus_match_processes_per_pod(pytorchjob):
    _, container = worker_container(pytorchjob)
    gpus = container["resources"]["limits"]["nvidia.com/gpu"]
    assert int(pytorchjob["spec"]["nprocPerNode"]) == int(gpus)
    assert container["image"]


def test_pytorchjob_runs_the_trainer_on_mounted_data(pytorchjob):
    pod, container = worker_container(pytorchjob)
    argv = container["command"] + container["args"]
    assert argv[argv.index("--") + 1] == "torchrun"   # behind the init, see below
    args = trainer_args(argv)
    assert args[0] == "--config" and args[1].startswith(IMAGE_CONFIGS)
    assert (REPO / "configs" / args[1][len(IMAGE_CONFIGS):]).is_file(), args[1]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert "data.root=/data" in args and mounts["/data"].get("readOnly") is True
    assert "run.dir=/runs" in args and not mounts["/runs"].get("readOnly", False)
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/data"]["name"]]["persistentVolumeClaim"]["readOnly"] is True


def test_pytorchjob_args_load_into_a_config_on_the_mounted_paths(pytorchjob):
    from dist_free.config import load_config

    _, container = worker_container(pytorchjob)
    args = trainer_args(container["command"] + container["args"])
    cfg = load_config(REPO / "configs" / args[1][len(IMAGE_CONFIGS):], args[2:])
    assert (cfg.data.root, cfg.run.dir) == ("/data", "/runs")
    assert cfg.tracking.uri is None  # so MLFLOW_TRACKING_URI from the pod env is used


def test_pytorchjob_tracks_to_mlflow(pytorchjob):
    _, container = worker_container(pytorchjob)
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MLFLOW_TRACKING_URI"].startswith("http")


def test_pytorchjob_runs_as_the_image_user(pytorchjob):
    pod, _ = worker_container(pytorchjob)
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    user = re.findall(r"^USER (\d+)", dockerfile, re.M)[-1]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == user


def dockerfile_entrypoint():
    (line,) = re.findall(r"^ENTRYPOINT (.+)$", DOCKERFILE.read_text(), re.M)
    return json.loads(line)


def test_pytorchjob_keeps_the_image_init_as_pid_1(pytorchjob):
    # `command` replaces the image's ENTRYPOINT: without tini, torchrun would be PID 1 and no
    # one would reap orphans.
    _, container = worker_container(pytorchjob)
    entry = dockerfile_entrypoint()
    assert entry[0] == "tini" and entry[-1] == "torchrun"
    assert container["command"] == entry


def test_pytorchjob_meets_the_restricted_pod_security_standard(pytorchjob):
    pod, container = worker_container(pytorchjob)
    pod_sc, sc = pod["securityContext"], container["securityContext"]
    assert pod_sc["runAsNonRoot"] is True and sc.get("runAsNonRoot", True) is True
    assert pod_sc["runAsUser"] != 0 and "runAsUser" not in sc
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add")
    assert not sc.get("privileged", False)
    seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile"))
    assert seccomp["type"] in ("RuntimeDefault", "Localhost")
    for volume in pod["volumes"]:
        assert set(volume) - {"name"} <= {"persistentVolumeClaim", "emptyDir", "configMap",
                                          "secret", "projected", "downwardAPI", "ephemeral",
                                          "csi"}, volume


def test_pytorchjob_image_has_a_fixed_tag(pytorchjob):
    _, container = worker_container(pytorchjob)
    image = container["image"]
    name, _, digest = image.partition("@")
    tag = name.rpartition("/")[2].partition(":")[2]
    assert digest.startswith("sha256:") or (tag and tag != "latest"), image


def test_pytorchjob_grace_outlasts_torchrun(pytorchjob, launcher_grace_s):
    # The pod inherits the image's TORCH_ELASTIC_SHUTDOWN_TIMEOUT unless it sets its own.
    pod, container = worker_container(pytorchjob)
    env = {e["name"]: e.get("value") for e in container["env"]}
    grace = int(env.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", launcher_grace_s))
    assert pod["terminationGracePeriodSeconds"] > grace > TRAINER_STOP_S


# ---- MLflow UI ----------------------------------------------------------------------------

# A fake mlflow: appends its argv to $FAKE_LOG as one JSON line.
FAKE_MLFLOW = f"""#!{sys.executable}
import json, os, sys
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({{"tool": "mlflow", "argv": sys.argv[1:]}}) + "\\n")
"""


@pytest.fixture
def store(tmp_path):
    """A folder holding the embedded store a run writes (a space, to catch unquoted expansions)."""
    folder = tmp_path / "my runs"
    folder.mkdir()
    (folder / "mlflow.db").touch()
    return folder


def mlflow_ui(fake_bin, tmp_path, cwd, **env):
    """Run launch/mlflow_ui.sh with a fake mlflow; (process, mlflow's options as its CLI parses them)."""
    (fake_bin / "mlflow").write_text(FAKE_MLFLOW)
    (fake_bin / "mlflow").chmod(0o755)
    proc, calls = run_script(LAUNCH / "mlflow_ui.sh", fake_bin, tmp_path, env=env, cwd=cwd)
    if proc.returncode != 0:
        return proc, calls
    (call,) = calls
    from mlflow.cli import cli

    # The real CLI reads the arguments: a renamed or dropped option fails here.
    command = call["argv"][0]
    return proc, cli.get_command(None, command).make_context(command, call["argv"][1:]).params


def test_mlflow_ui_serves_the_store_in_the_current_folder_on_loopback(fake_bin, tmp_path, store):
    proc, params = mlflow_ui(fake_bin, tmp_path, cwd=store)
    assert proc.returncode == 0, proc.stderr
    assert (params["host"], params["port"]) == ("127.0.0.1", 5000)
    assert params["backend_store_uri"] == f"sqlite:///{store}/mlflow.db"
    assert params["default_artifact_root"] == f"{store}/mlartifacts"
    assert proc.stderr == ""


def test_mlflow_ui_takes_host_port_store_from_the_environment(fake_bin, tmp_path, store):
    proc, params = mlflow_ui(fake_bin, tmp_path, cwd=tmp_path, STORE_DIR=str(store),
                             HOST="0.0.0.0", PORT="5001")
    assert proc.returncode == 0, proc.stderr
    assert (params["host"], params["port"]) == ("0.0.0.0", 5001)
    assert params["backend_store_uri"] == f"sqlite:///{store}/mlflow.db"


def test_mlflow_ui_warns_when_it_serves_beyond_loopback(fake_bin, tmp_path, store):
    proc, _ = mlflow_ui(fake_bin, tmp_path, cwd=tmp_path, STORE_DIR=str(store), HOST="0.0.0.0")
    assert proc.returncode == 0, proc.stderr
    assert "warning: serving on 0.0.0.0 without authentication" in proc.stderr


@pytest.mark.parametrize("where", ["empty folder", "missing folder"])
def test_mlflow_ui_without_a_store_exits_2_naming_the_folder(fake_bin, tmp_path, where):
    folder = tmp_path / "no runs"
    if where == "empty folder":
        folder.mkdir()
    proc, calls = mlflow_ui(fake_bin, tmp_path, cwd=tmp_path, STORE_DIR=str(folder))
    assert proc.returncode == 2 and calls == []
    expected = "no mlflow.db in" if where == "empty folder" else "STORE_DIR not found"
    assert f"mlflow_ui.sh: {expected}" in proc.stderr and str(folder) in proc.stderr


# ---- README --------------------------------------------------------------------------------

def test_readme_warns_that_the_rendezvous_ports_must_stay_private():
    readme = (REPO / "README.md").read_text()
    (row,) = [l for l in readme.splitlines() if "launch/multinode.sh" in l and l.startswith("|")]
    port = re.search(r"RDZV_ENDPOINT=[\w.-]+:(\d+)", row)[1]
    assert port in row.split("`", 2)[2] and "MASTER_PORT" in row and "private network" in row
