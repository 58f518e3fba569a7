"""The README's copy-paste commands are the ones CI and the project actually use."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def ci_test_command() -> str:
    lines = [l.strip() for l in (ROOT / ".ci/run").read_text().splitlines()]
    (command,) = [l for l in lines if l.endswith("python -m pytest")]
    return command


def test_ci_runs_the_readme_test_command():
    assert f"\n    {ci_test_command()}\n" in README


def test_readme_demo_command_writes_the_data_the_demo_config_reads_and_launches_it():
    demo = next(l.strip() for l in README.splitlines() if "dist_free.data demo" in l)
    assert "python -m dist_free.data demo demo_data" in demo
    assert "torchrun --nproc_per_node=2 -m dist_free.train --config configs/demo.yaml" in demo
    assert "root: demo_data" in (ROOT / "configs/demo.yaml").read_text()
    assert demo.startswith(ci_test_command().split(" && python -m pytest")[0])
