"""The package's shape: who may import whom, decided by folder, and the top-level `pipelines` is
always ours.

Every module of dist_free/ belongs to one layer, found from its path alone (`layer_of`), so a new
file is held to its folder's rules the day it is added: no list of modules to keep up to date.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "dist_free"

# The small shared base every layer may use.
BASE = {"config", "precision", "distributed", "environment", "atomic", "checkpoint", "progress"}
# The command-line entry points: `python -m dist_free.<name>` (and dist_free.bench, tracking's
# replay command). They call the libraries; nothing else imports them.
COMMANDS = {"train", "evaluate", "export", "data"}
# Old public paths kept working (every exported MODEL_CARD.md embeds dist_free.models'): they
# re-export and define nothing.
FACES = {"models", "free"}

# Which layers each layer may import; "mlflow", "pipelines" and "nvidia" count as layers too.
ALLOWED = {
    # config.py takes its method names from engine/method_registry.py, torch-free (see
    # tests/base/test_config.py), and from no other engine module (a test below); the engine
    # imports nothing of the base, so no cycle.
    "base": {"base", "engine"},
    "engine": {"engine"},
    "evaluation": {"base", "engine", "evaluation", "pipelines"},
    "publish": {"base", "engine", "evaluation", "publish"},
    "tracking": {"base", "tracking", "mlflow", "nvidia"},
    "trainer": {"base", "engine", "evaluation", "publish", "tracking", "trainer", "pipelines"},
    "face": {"engine", "publish"},
}


def layer_of(module: str) -> str:
    """The layer of a dotted module name (dist_free.*, pipelines.*, mlflow, ...)."""
    top = module.split(".")[0]
    if top in ("mlflow", "pipelines", "nvidia"):
        return top
    if top != "dist_free":
        return "outside"
    parts = module.split(".")[1:]
    if not parts:
        return "package"
    if parts[0] == "bench" or parts[0] in COMMANDS or parts[-1] == "__main__":
        return "command"
    if parts[0] in BASE:
        return "base"
    if parts[0] in FACES:
        return "face"
    return parts[0]          # engine, evaluation, publish, trainer, tracking


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imported_modules(path: Path) -> set[str]:
    """Absolute imports, function-level ones included; relative imports resolved."""
    names = set()
    package = module_name(path) if path.name == "__init__.py" else \
        module_name(path).rsplit(".", 1)[0] if path.is_relative_to(ROOT) else ""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Call) and dynamic_import(node):
            names.add(node.args[0].value)
    return names


def dynamic_import(call: ast.Call) -> bool:
    """importlib.import_module("x") or __import__("x") with a constant name: an import too."""
    f = call.func
    named = (isinstance(f, ast.Attribute) and f.attr == "import_module") or \
        (isinstance(f, ast.Name) and f.id in ("import_module", "__import__"))
    return named and bool(call.args) and isinstance(call.args[0], ast.Constant) \
        and isinstance(call.args[0].value, str)


def modules_of(*layers: str) -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if layer_of(module_name(p)) in layers)


def layer_of_import(name: str) -> str:
    """`from dist_free import checkpoint` reads as dist_free.checkpoint, the module it names."""
    layer = layer_of(name)
    if layer == "package":
        return "package"
    return layer


def forbidden_imports(path: Path, module: str | None = None) -> list[str]:
    mine = layer_of(module or module_name(path))
    bad = []
    for name in imported_modules(path):
        theirs = layer_of_import(name)
        if theirs in ("outside", "package"):
            continue
        if theirs == "command" or theirs not in ALLOWED[mine]:
            bad.append(f"{name} ({theirs})")
    return sorted(bad)


LIBRARY_LAYERS = tuple(ALLOWED)


def test_every_module_has_a_layer():
    layers = {module_name(p): layer_of(module_name(p)) for p in PACKAGE.rglob("*.py")}
    unknown = {m: l for m, l in layers.items()
               if l not in (*ALLOWED, "command", "package")}
    assert not unknown, f"modules in no known layer (a new folder needs a rule): {unknown}"


@pytest.mark.parametrize("path", modules_of(*LIBRARY_LAYERS),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_each_library_module_imports_only_the_layers_below_it(path):
    assert not forbidden_imports(path), (
        f"{path.relative_to(ROOT)} ({layer_of(module_name(path))}) imports "
        f"{forbidden_imports(path)}")


def test_the_base_reads_only_the_engines_method_registry():
    """ALLOWED lets the base import the engine for this one torch-free module, nothing else."""
    from_engine = {name for path in modules_of("base") for name in imported_modules(path)
                   if layer_of(name) == "engine"}
    assert from_engine <= {"dist_free.engine", "dist_free.engine.method_registry"}


@pytest.mark.parametrize("path", modules_of("command"), ids=lambda p: str(p.relative_to(ROOT)))
def test_a_command_imports_no_other_command(path):
    mine = module_name(path)
    own = "dist_free.bench" if mine.startswith("dist_free.bench") else mine
    others = sorted(n for n in imported_modules(path)
                    if layer_of(n) == "command" and not n.startswith(own)
                    and not (mine.startswith("dist_free.tracking") and n.startswith("dist_free.tracking")))
    assert not others, f"{mine} imports the commands {others}"


def mlflow_imports(path: Path) -> list[str]:
    return sorted(n for n in imported_modules(path) if layer_of(n) == "mlflow")


# MLflow's one home is a folder, whatever the layers of its modules (its __main__ is a command).
OUTSIDE_TRACKING = sorted(p for p in PACKAGE.rglob("*.py") if not p.is_relative_to(PACKAGE / "tracking"))


@pytest.mark.parametrize("path", OUTSIDE_TRACKING, ids=lambda p: str(p.relative_to(ROOT)))
def test_only_tracking_imports_mlflow(path):
    """tracking/ is MLflow's one home: the commands too log through it (evaluate.py's final
    numbers go through tracking.log_to_run)."""
    assert not mlflow_imports(path), (
        f"{path.relative_to(ROOT)} imports {mlflow_imports(path)}: go through dist_free.tracking")


def test_the_mlflow_rule_catches_a_command_that_imports_it(tmp_path):
    fake = tmp_path / "evaluate.py"
    fake.write_text("def log():\n    from mlflow import MlflowClient\n"
                    "    from mlflow.entities import Metric\n")
    assert mlflow_imports(fake) == ["mlflow", "mlflow.MlflowClient", "mlflow.entities",
                                    "mlflow.entities.Metric"]


@pytest.mark.parametrize("path", modules_of("face"), ids=lambda p: str(p.relative_to(ROOT)))
def test_an_old_public_path_only_re_exports(path):
    tree = ast.parse(path.read_text())
    defined = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    assert not defined, f"{path.name} defines {[n.name for n in defined]}: it should re-export"


def test_the_layer_rules_catch_an_upward_import(tmp_path):
    """The check above reads real imports: an engine module that imports the trainer fails it."""
    fake = tmp_path / "probe.py"
    fake.write_text("def f():\n    from dist_free.trainer import loop\nimport mlflow\n"
                    "from dist_free import evaluate\n")
    assert forbidden_imports(fake, "dist_free.engine.probe") == [
        "dist_free.evaluate (command)", "dist_free.trainer (trainer)",
        "dist_free.trainer.loop (trainer)", "mlflow (mlflow)"]
    dynamic = tmp_path / "dynamic.py"
    dynamic.write_text("import importlib\nimportlib.import_module('dist_free.trainer.loop')\n"
                       "__import__('dist_free.publish')\n")
    assert forbidden_imports(dynamic, "dist_free.engine.probe") == [
        "dist_free.publish (publish)", "dist_free.trainer.loop (trainer)"]
    assert forbidden_imports(fake, "dist_free.trainer.probe") == [
        "dist_free.evaluate (command)", "mlflow (mlflow)"]


@pytest.mark.parametrize("public", [
    "from dist_free.models import from_checkpoint",     # every exported MODEL_CARD.md
    "from dist_free.free import FreeAdversarialTrainer",  # the README
    "from dist_free.models import available_models, build_model",
])
def test_the_old_public_names_still_import(public):
    proc = subprocess.run([sys.executable, "-c", public], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


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


def test_every_registered_method_is_built_by_the_engine():
    """The registry names its builders as strings, which no import shows: they stay in engine/."""
    from dist_free.engine.method_registry import METHODS
    outside = {n: m.builder for n, m in METHODS.items()
               if layer_of(m.builder.split(":")[0]) != "engine"}
    assert not outside, f"methods built outside the engine: {outside}"


def test_no_two_test_files_share_a_basename():
    """pytest imports test files by basename (rootdir mode, no __init__.py): two tests/*/x.py
    abort collection of the whole suite, which is how CI failed on 26's landing."""
    tests = Path(__file__).resolve().parents[1]
    names = [p.name for p in tests.rglob("test_*.py")]
    assert sorted({n for n in names if names.count(n) > 1}) == []
