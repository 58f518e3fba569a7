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


METHODS: dict[str, MethodSpec] = {
    "free": MethodSpec(("eps", "replays", "step_size", "fused"),
                       "dist_free.engine.free:FreeAdversarialTrainer"),
    "natural": MethodSpec((), "dist_free.engine.methods:NaturalTrainer"),
    "pgd": MethodSpec(("eps", "steps", "step_size"), "dist_free.engine.methods:PGDTrainer"),
    "fast": MethodSpec(("eps", "step_size"), "dist_free.engine.methods:FastFGSMTrainer"),
}


def spec(name: str) -> MethodSpec:
    """The declaration of method `name`; ValueError naming the choices if there is none."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    return METHODS[name]


def takes(name: str, option: str) -> bool:
    return option in spec(name).options


def configured_options(section) -> dict:
    """The options the method `section.name` takes, read off `section` (the config's method
    section): the ones only other methods take are left out, since a builder refuses them."""
    return {key: getattr(section, key) for key in spec(section.name).options}
