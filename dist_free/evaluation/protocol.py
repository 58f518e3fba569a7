"""A final evaluation's protocol: which attacks, at which eps, how hard, on which images, in which
precision. `python -m dist_free.evaluate` builds one from its flags; the evaluation runs it and
the report (report.build_report) records it, so neither depends on the command line."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dist_free import precision


@dataclass(frozen=True)
class EvalProtocol:
    attacks: tuple[str, ...]          # robust_eval.ATTACKS names, in that order
    eps_values: tuple[float, ...]     # ascending; eps 0 is the clean accuracy
    steps: int                        # PGD steps
    restarts: int                     # PGD random restarts
    step_size: float | None           # PGD step; None: 2.5 eps / steps
    amp: str                          # "off" (fp32), "bf16" or "fp16": PGD and clean accuracy
    subset: int | None                # the fixed first N val images (pipelines.SELECTION); None: all
    masking_gap: float                # masking.assess's threshold
    name: str | None = None           # a named protocol (evaluation.protocols), or None: the flags'
    more_pgd: tuple = ()              # further (steps, restarts, step_size) PGD runs after the first

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return precision.dtype_of(self.amp)

    @property
    def pgd_settings(self) -> tuple[tuple[int, int, float | None], ...]:
        """Every PGD run asked for, (steps, restarts, step_size), the first from steps/restarts."""
        return ((self.steps, self.restarts, self.step_size), *self.more_pgd)

    @property
    def attacked_eps(self) -> list[float]:
        """The eps values to attack at: at eps 0 an attack would only recompute clean accuracy."""
        return [e for e in self.eps_values if e > 0]
