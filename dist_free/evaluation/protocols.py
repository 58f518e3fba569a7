"""The paper's evaluation protocols by name, as data: `python -m dist_free.evaluate --protocol NAME`.

Each protocol is a list of PGD settings (steps, random restarts, step size) and an eps (None: the
checkpoint's own eval eps). The settings are the authors' own evaluation code's:

  shafahi2019-cifar     ashafahi/free_adv_train, multi_restart_pgd_attack.py (--pgd_steps,
                        --num_restarts, --step_size 2.0 on 0-255 pixels) and its README's tables:
                        CIFAR-10's "10 restart PGD-20" and "PGD-100", CIFAR-100's "PGD-20" and
                        "PGD-100" (one random start, --num_restarts' default), step 2/255, eps
                        8/255: PGD-20 x 10, PGD-20 and PGD-100.
  shafahi2019-imagenet  mahyarnajibi/FreeAdversarialTraining, configs.yml ADV.pgd_attack
                        [(10, 1/255), (50, 1/255)] and lib/validation.py (one uniform random start
                        in the eps-ball), at the training eps clip_eps: the checkpoint's 2 or 4/255.

Both attack the last checkpoint, as the authors' code does: free_train.py keeps only its latest
checkpoint (tf.train.Saver(max_to_keep=1)); main_free.py attacks the last epoch's model at the end
of training (it also keeps a model_best, chosen by clean top-1: eval.select_on=clean).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PGDSetting:
    steps: int
    restarts: int
    step_size: float | None       # None: 2.5 eps / steps (dist_free.engine.attacks.default_step_size)


@dataclass(frozen=True)
class NamedProtocol:
    name: str
    pgd: tuple[PGDSetting, ...]
    eps: float | None              # None: the checkpoint's eval eps
    source: str


PROTOCOLS: dict[str, NamedProtocol] = {p.name: p for p in (
    NamedProtocol("shafahi2019-cifar",
                  (PGDSetting(20, 10, 2 / 255), PGDSetting(20, 1, 2 / 255),
                   PGDSetting(100, 1, 2 / 255)), 8 / 255,
                  "ashafahi/free_adv_train multi_restart_pgd_attack.py and README"),
    NamedProtocol("shafahi2019-imagenet",
                  (PGDSetting(10, 1, 1 / 255), PGDSetting(50, 1, 1 / 255)), None,
                  "mahyarnajibi/FreeAdversarialTraining configs.yml and lib/validation.py"),
)}
