"""The package's shape: who may import whom, and the top-level `pipelines` is always ours."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The engine: the algorithm, its baselines, the attacks, the models. It knows nothing of input
# pipelines, MLflow or the config file: the trainer wires those to it.
ENGINE = ["free.py", "linf.py", "methods.py", "step_base.py", "attacks.py", "models.py",
          "timm_models.py", "optim.py", "ema.py"]
FORBIDDEN = ("pipelines", "mlflow", "dist_free.config", "dist_free.tracking", "nvidia",
             "dist_free.runtime", "dist_free.loop", "dist_free.train")


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


@pytest.mark.parametrize("name", ENGINE)
def test_engine_modules_import_neither_pipelines_nor_mlflow_nor_the_config(name):
    imports = imported_modules(ROOT / "dist_free" / name)
    bad = sorted(m for m in imports if any(m == f or m.startswith(f + ".") for f in FORBIDDEN))
    assert not bad, f"dist_free/{name} imports {bad}"


# The command-line entry points. A library (the training loop included) never imports one: the
# commands call the libraries, not the other way round.
CLI = ("dist_free.evaluate", "dist_free.train", "dist_free.data", "dist_free.export",
       "dist_free.bench")
LIBRARY = ENGINE + ["loop.py", "validation.py", "runtime.py", "robust_eval.py", "report.py",
                    "model_card.py", "model_info.py", "lr_schedule.py", "progress.py", "atomic.py",
                    "precision.py", "checkpoint.py", "config.py", "distributed.py",
                    "environment.py", "autoattack.py"]


@pytest.mark.parametrize("name", LIBRARY)
def test_no_library_module_imports_a_command_line_module(name):
    imports = imported_modules(ROOT / "dist_free" / name)
    bad = sorted(m for m in imports if any(m == c or m.startswith(c + ".") for c in CLI))
    assert not bad, f"dist_free/{name} imports {bad}"


def test_pipelines_never_import_the_trainer_or_mlflow():
    for path in (ROOT / "pipelines").glob("*.py"):
        imports = imported_modules(path)
        assert not any(m.startswith(("dist_free", "mlflow")) for m in imports), path.name


def test_a_foreign_pipelines_package_that_shadows_ours_is_a_clear_import_error(tmp_path):
    foreign = tmp_path / "pipelines"
    foreign.mkdir()
    (foreign / "__init__.py").write_text("SOMEONE_ELSE = True\n")
    proc = subprocess.run([sys.executable, "-c", "import dist_free.train"], cwd=tmp_path,
                          env={"PYTHONPATH": f"{tmp_path}:{ROOT}", "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True)
    assert proc.returncode == 1                 # an uncaught ImportError
    assert "another distribution's top-level 'pipelines' package shadows" in proc.stderr
    assert str(foreign / "__init__.py") in proc.stderr


def test_our_own_pipelines_passes_the_check():
    proc = subprocess.run([sys.executable, "-c", "import dist_free, pipelines; print(pipelines.__file__)"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(ROOT / "pipelines" / "__init__.py")
