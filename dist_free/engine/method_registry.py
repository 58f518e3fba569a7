"""The training methods by name, each declared once: the options it takes from the config's
method section, and its builder (imported on first use).

Torch-free on purpose: dist_free.config takes its allowed `method.name` values from here, and the
config is read before any worker starts. Every method is built through
dist_free.engine.methods.build_method, which resolves the builder named here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MethodSpec:
    options: tuple[str, ...]     # the method-section keys (dist_free.config.MethodConfig) it takes
    builder: str                 # "module:Class", a StepBase subclass
    # Forward/backward passes per SGD step beyond the one every step makes: an attack's steps
    # ("steps": method.steps of them), one (a single-step attack) or none.
    attack_passes: str | int = 0


METHODS: dict[str, MethodSpec] = {
    "free": MethodSpec(("eps", "replays", "step_size", "fused"),
                       "dist_free.engine.free:FreeAdversarialTrainer"),
    "natural": MethodSpec((), "dist_free.engine.methods:NaturalTrainer"),
    "pgd": MethodSpec(("eps", "steps", "step_size"), "dist_free.engine.methods:PGDTrainer",
                      attack_passes="steps"),
    "fast": MethodSpec(("eps", "step_size"), "dist_free.engine.methods:FastFGSMTrainer",
                       attack_passes=1),
    "nfgsm": MethodSpec(("eps", "step_size", "noise"), "dist_free.engine.methods:NFGSMTrainer",
                        attack_passes=1),
}


def spec(name: str) -> MethodSpec:
    """The declaration of method `name`; ValueError naming the choices if there is none."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name]


def takes(name: str, option: str) -> bool:
    return option in spec(name).options


def passes_per_step(section) -> int:
    """Forward/backward passes one SGD step of method `section.name` costs (free training's
    replay is one SGD step and one pass: its perturbation comes from the same backward)."""
    extra = spec(section.name).attack_passes
    return 1 + (getattr(section, extra) if isinstance(extra, str) else extra)


def configured_options(section) -> dict:
    """The options the method `section.name` takes, read off `section` (the config's method
    section): the ones only other methods take are left out, since a builder refuses them."""
    return {key: getattr(section, key) for key in spec(section.name).options}
