"""Configuration: presets load, overrides apply, and every mistake names its key."""

from pathlib import Path

import pytest

from dist_free.config import Config, ConfigError, load_config, to_yaml

ROOT = Path(__file__).resolve().parents[2]
PRESETS = sorted((ROOT / "configs").rglob("*.yaml"))


def test_overrides_are_parsed_to_the_fields_types():
    cfg = load_config(None, ["method.eps=2/255", "optim.milestones=[10,20]", "data.root=/data",
                             "model.channels_last=false", "eval.step_size=null"])
    assert cfg.method.eps == pytest.approx(2 / 255)
    assert cfg.optim.milestones == (10, 20)
    assert cfg.data.root == "/data" and cfg.model.channels_last is False
    assert cfg.eval.step_size is None


def test_defaults_need_no_file():
    assert Config().run.dir == "runs" and Config().tracking.experiment == "dist-free"
    assert load_config(None, []) == Config()


def test_epochs_are_divided_by_replays_for_free_training_only():
    assert load_config(None, ["optim.epochs=90", "method.replays=4"]).real_epochs() == 23
    assert load_config(None, ["optim.epochs=90", "method.name=natural"]).real_epochs() == 90


@pytest.mark.parametrize("override, key", [
    ("method.epz=1", "method.epz"),
    ("nosection.x=1", "nosection"),
    ("method.eps=0", "method.eps"),
    ("method.eps=-4/255", "method.eps"),
    ("method.eps=4", "method.eps"),
    ("method.replays=0", "method.replays"),
    ("method.replays=2.5", "method.replays"),
    ("data.batch_size=abc", "data.batch_size"),
    ("data.batch_size=0", "data.batch_size"),
    ("run.amp=fp8", "run.amp"),
    ("model.channels_last=maybe", "model.channels_last"),
    ("optim.milestones=[60,30]", "optim.milestones"),
    ("data.image_size=300", "data.image_size"),
    ("data.min_area=1.5", "data.min_area"),
])
def test_bad_values_name_their_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_bad_files_are_reported(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    unsafe = tmp_path / "unsafe.yaml"
    unsafe.write_text("method: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):     # safe_load refuses the tag
        load_config(unsafe)
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["method.eps"])


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(None, ["method.eps=2/255", "optim.milestones=[5]"])
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_preset_is_valid(preset):
    load_config(preset)


def test_paper_imagenet_presets():
    for eps in (2, 4):
        cfg = load_config(ROOT / f"configs/imagenet/free_m4_eps{eps}.yaml")
        assert cfg.model.name == "resnet50" and cfg.method.name == "free"
        assert cfg.method.replays == 4 and cfg.method.eps == pytest.approx(eps / 255)
        assert cfg.real_epochs() == 23    # 90 natural epochs / m=4, rounded up (the paper's 23)


def test_config_choices_mirror_the_loader_kinds_with_the_method_registry():
    import typing

    import pipelines
    from dist_free.config import LoaderKind, MethodName
    from dist_free.engine import method_registry
    assert set(typing.get_args(LoaderKind)) == set(pipelines.KINDS)
    # tests/trainer/test_runtime.py builds every one of these choices from a config.
    assert set(typing.get_args(MethodName)) == set(method_registry.METHODS)


def test_the_config_loads_without_torch():
    """The config is read before any worker starts: it, and the method registry it reads, must
    not pull torch in."""
    import subprocess
    import sys
    code = "import sys, dist_free.config; print(sorted(m for m in sys.modules if m == 'torch'))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("value, expected", [("true", True), ("off", None), ("false", False),
                                             ("auto", "auto"), ("AUTO", "auto")])
def test_method_fused_is_a_bool_or_auto(value, expected):
    if expected is None:
        with pytest.raises(ConfigError, match="method.fused"):
            load_config(None, [f"method.fused={value}"])
        return
    assert load_config(None, [f"method.fused={value}"]).method.fused == expected


def test_a_choice_outside_its_literal_is_refused_naming_key_with_choices():
    with pytest.raises(ConfigError, match=r"run\.amp: 'fp8' is not one of \['auto', 'bf16'"):
        load_config(None, ["run.amp=fp8"])


def test_eval_select_on_is_robust_or_clean_and_a_bad_value_names_the_key():
    assert load_config(None, []).eval.select_on == "robust"
    assert load_config(None, ["eval.select_on=clean"]).eval.select_on == "clean"
    with pytest.raises(ConfigError, match=r"eval\.select_on: 'pgd' is not one of "
                                          r"\['robust', 'clean'\]"):
        load_config(None, ["eval.select_on=pgd"])
