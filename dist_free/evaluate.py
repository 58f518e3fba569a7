"""The `evaluate` command: clean and robust accuracy of a checkpoint (final numbers).

    python -m dist_free.evaluate --checkpoint runs/free/checkpoints/best.pt [data.root=...]
    python -m dist_free.evaluate --checkpoint best.pt --attack pgd,autoattack --subset 1000
    python -m dist_free.evaluate --checkpoint best.pt --eps 0,2/255,4/255,8/255 --steps 10 --restarts 1
    python -m dist_free.evaluate --checkpoint last.pt --protocol shafahi2019-cifar
    torchrun --nproc_per_node=4 -m dist_free.evaluate --checkpoint best.pt ...

Protocol (the defaults are the final-report protocol, not the run's in-training settings):
  --attack pgd         L-inf PGD, 50 steps x 10 random restarts, step 2.5 eps / steps, CE loss;
                       an image counts as robust only if no restart breaks it.
  --attack autoattack  AutoAttack, standard version (APGD-CE, APGD-T, FAB-T, Square), through
                       Croce & Hein's pyautoattack (pip install 'dist-free[eval]'); always fp32.
  --amp off            fp32 (default); bf16/fp16 only when asked, for PGD and clean accuracy.
  --protocol NAME      a paper's protocol by name (dist_free.evaluation.protocols): its PGD runs
                       (steps, restarts, step size) at its eps, all in one call, one report row
                       each, the name in the report. It fixes --attack, --eps, --steps,
                       --restarts and --step-size: giving any of them with it is an error (exit 2).
                       shafahi2019-cifar: PGD-20 x 10 restarts (CIFAR-10's table), PGD-20 (one
                       start, CIFAR-100's) and PGD-100, step 2/255, eps 8/255.
                       shafahi2019-imagenet: PGD-10 and PGD-50, step 1/255, one random start, at
                       the checkpoint's eval eps.
  eps                  the run's eval eps unless --eps gives a list; eps 0 is clean accuracy.
  --subset N           the first N val images ranked by sha1 of their file name (ties: label):
                       no seed, world size or folder layout changes which images, so every
                       checkpoint is measured on the same N; the report fingerprints the list.

Counts are exact: the val set (or subset) is cut into global batches of the run's val batch
size and each rank evaluates a contiguous range of whole batches; dist_free.evaluation.robust_eval counts
them and sums the counts over ranks, so 1 and N ranks give identical numbers.

Rank 0 shows its progress (the attack and eps being run, images done, rate, time left): a bar on
a terminal, a log line every 30 s elsewhere.

Every run writes a JSON report (schema: dist_free.evaluation.report.build_report) beside the checkpoint
or under --out, named eval_<attacks>_eps<eps x 255>_<dtype>_<all|subsetN>.json; an eps sweep
also writes a Markdown table and a plot with the same name. The results are checked for
gradient masking by dist_free.evaluation.masking (Square breaking what gradients could not, the
margin-loss attacks far below cross-entropy, accuracy rising with eps or above chance at eps 0.5,
a better optimiser of the same loss still helping); AutoAttack's margin-loss attacks a few points
below the cross-entropy ones is reported as what it is, not flagged. If the
checkpoint names an MLflow run and its config tracks, the numbers go to that run as final/*
metrics, the protocol as final.* tags and the report as an artifact.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import pipelines
from dist_free import checkpoint, distributed
from dist_free.config import ConfigError, config_from_dict, parse_fraction
from dist_free.evaluation import autoattack, report
from dist_free.evaluation.protocol import EvalProtocol
from dist_free.evaluation.protocols import PROTOCOLS
from dist_free.evaluation.robust_eval import ATTACKS, evaluate
from dist_free.progress import Progress
from dist_free.publish.load import eval_weights
from dist_free.tracking import TrackingConfigError, check_uri, log_to_run, redact, resolve_uri, shown_uri
from dist_free.trainer import runtime

FINAL_PGD = (50, 10)   # steps, restarts: the final-report protocol
AMP_CHOICES = ("off", "bf16", "fp16")
PROTOCOL_FIXES = ("attack", "eps", "steps", "restarts", "step_size")   # what --protocol sets


class Parser(argparse.ArgumentParser):
    def error(self, message):
        """One line naming the flag, exit status 2, no usage block and no traceback."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def number_type(kind, low: float, *, low_ok: bool = False, high: float | None = None):
    """An argparse type: a number (fractions like 2/255 allowed) above `low` (at most `high`)."""
    def parse(text: str):
        try:
            value = parse_fraction(text)
        except ValueError:
            value = None
        if value is None or (kind is int and value.denominator != 1):
            raise argparse.ArgumentTypeError(f"expected a {describe(kind, low, low_ok)}, got {text!r}")
        if value < low or (value == low and not low_ok) or (high is not None and value > high):
            bound = f" and at most {high}" if high is not None else ""
            raise argparse.ArgumentTypeError(
                f"expected a {describe(kind, low, low_ok)}{bound}, got {text!r}")
        return kind(value)
    return parse

def describe(kind, low, low_ok) -> str:
    return f"{'whole number' if kind is int else 'number'} {'>=' if low_ok else '>'} {low}"


def eps_list(text: str) -> list[float]:
    parse = number_type(float, 0, low_ok=True)
    values = [parse(v) for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list like 0,2/255,4/255, "
                                         f"got {text!r}")
    return sorted(set(values))


def attack_list(text: str) -> tuple[str, ...]:
    names = {v.strip().lower() for v in text.split(",") if v.strip()}
    unknown = sorted(names - set(ATTACKS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown attack {', '.join(unknown) or text!r}; "
                                         f"expected pgd, autoattack or pgd,autoattack")
    return tuple(a for a in ATTACKS if a in names)


def protocol_name(text: str) -> str:
    if text not in PROTOCOLS:
        raise argparse.ArgumentTypeError(f"unknown protocol {text!r}; expected one of "
                                         f"{', '.join(PROTOCOLS)}")
    return text


def parse_args(argv):
    p = Parser(prog="python -m dist_free.evaluate",
               description="Evaluate a checkpoint: clean, PGD and AutoAttack accuracy.")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--protocol", type=protocol_name,
                   help=f"a paper's protocol by name: {', '.join(PROTOCOLS)} (fixes --attack, "
                        "--eps, --steps, --restarts, --step-size)")
    p.add_argument("--attack", type=attack_list,
                   help="pgd, autoattack or pgd,autoattack (default pgd)")
    p.add_argument("--eps", type=eps_list, help="comma-separated eps values, e.g. "
                   "0,2/255,4/255 (default: the run's eval eps)")
    p.add_argument("--steps", type=number_type(int, 0),
                   help=f"PGD steps (default {FINAL_PGD[0]})")
    p.add_argument("--restarts", type=number_type(int, 0),
                   help=f"PGD random restarts (default {FINAL_PGD[1]})")
    p.add_argument("--step-size", type=number_type(float, 0),
                   help="PGD step size, e.g. 1/255 (default 2.5 eps / steps)")
    p.add_argument("--amp", choices=AMP_CHOICES, default="off",
                   help="precision of PGD and clean accuracy (default off = fp32)")
    p.add_argument("--subset", type=number_type(int, 0),
                   help="evaluate only the fixed first N val images (see the module docstring)")
    p.add_argument("--masking-gap", type=number_type(float, 0, low_ok=True, high=1), default=0.03,
                   help="flag two runs of the same loss (PGD vs APGD-CE, fewer vs more steps) "
                        "differing by more than this (default 0.03); see dist_free.evaluation.masking")
    p.add_argument("--out", type=Path, help="folder for the report (default: the checkpoint's)")
    p.add_argument("--verbose", action="store_true", help="show AutoAttack's progress log")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="config overrides on top of the checkpoint's, e.g. data.root=...")
    args = p.parse_args(argv)
    given = [f"--{k.replace('_', '-')}" for k in PROTOCOL_FIXES if getattr(args, k) is not None]
    if args.protocol and given:
        p.error(f"argument --protocol: {args.protocol} fixes {', '.join(given)}; drop "
                f"{'it' if len(given) == 1 else 'them'} or the protocol")
    if args.protocol:
        named = PROTOCOLS[args.protocol]
        first = named.pgd[0]
        args.attack, args.steps, args.restarts = ("pgd",), first.steps, first.restarts
        args.step_size = first.step_size
        args.eps = None if named.eps is None else [named.eps]
    args.attack = args.attack or ("pgd",)
    args.steps = args.steps or FINAL_PGD[0]
    args.restarts = args.restarts or FINAL_PGD[1]
    if "autoattack" in args.attack and args.amp != "off":
        p.error(f"argument --amp: AutoAttack runs in fp32 only; drop --amp {args.amp} or "
                "evaluate PGD separately")
    return args


def checkpoint_config(state: dict, overrides: list[str]):
    """The run's own config (from the checkpoint) with command-line overrides on top."""
    return config_from_dict(state["config"], overrides)


def val_loader(cfg, d, class_to_idx, subset: int | None):
    """The run's val pipeline, cut in whole batches (the same images per batch on any world size:
    AutoAttack's per-image results depend on the batch an image is attacked in)."""
    return runtime.build_loader(cfg, d, "val", class_to_idx, subset=subset, whole_batches=True)


def eval_protocol(args, cfg) -> EvalProtocol:
    """The protocol the flags (or --protocol) ask for; eps defaults to the run's eval eps."""
    more = () if not getattr(args, "protocol", None) else tuple(
        (s.steps, s.restarts, s.step_size) for s in PROTOCOLS[args.protocol].pgd[1:])
    return EvalProtocol(attacks=args.attack, eps_values=tuple(args.eps or [cfg.eval_eps]),
                        steps=args.steps, restarts=args.restarts, step_size=args.step_size,
                        amp=args.amp, subset=args.subset, masking_gap=args.masking_gap,
                        name=getattr(args, "protocol", None), more_pgd=more)


def load_run(args):
    """(checkpoint state, config); raises CheckpointError/ConfigError/AutoAttackUnavailable, or
    TrackingConfigError for a tracking URI with credentials in it."""
    state = checkpoint.load(args.checkpoint)
    cfg = checkpoint_config(state, args.overrides)
    runtime.check_model(cfg)     # the architecture (and timm kwargs) before anything is read
    if cfg.tracking.enabled:     # a password must not reach the output, nor MLflow's errors
        check_uri(resolve_uri(cfg.tracking.uri))
    if "autoattack" in args.attack:
        autoattack.require()     # before any data is read: fail in a second, not an hour
    return state, cfg


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        state, cfg = load_run(args)
    except (checkpoint.CheckpointError, ConfigError, autoattack.AutoAttackUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrackingConfigError as e:
        print(f"error: tracking.uri: {e}", file=sys.stderr)
        return 2
    protocol = eval_protocol(args, cfg)
    d = distributed.init(cfg.run.device)
    setup_logging(d.is_main)
    start = time.perf_counter()
    try:
        loader = val_loader(cfg, d, state.get("class_to_idx"), protocol.subset)
        model = runtime.build_bare_model(cfg, d.device)
        model.load_state_dict(eval_weights(state))     # the EMA's, when the run kept one
        progress = Progress("evaluate", getattr(loader, "num_samples", 0), unit="img",
                            enabled=d.is_main, mode=cfg.run.progress)
        result = evaluate(model, loader, eps_values=protocol.attacked_eps, steps=protocol.steps,
                          step_size=protocol.step_size, restarts=protocol.restarts,
                          amp_dtype=protocol.amp_dtype, attack_names=protocol.attacks,
                          verbose=args.verbose, progress=progress, more_pgd=protocol.more_pgd)
        progress.close()
    except pipelines.DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown()
    if d.is_main:
        built = report.build_report(protocol, args.checkpoint, state, result, loader,
                                    d.world_size, time.perf_counter() - start)
        finish(args, cfg, state, built)
    return 0


def setup_logging(is_main: bool) -> None:
    """Progress lines (dist_free.progress) on rank 0's stderr when it is not a terminal."""
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)


def finish(args, cfg, state: dict, rep: dict) -> None:
    """Rank 0: print the protocol and numbers, write the report (and sweep), log to MLflow."""
    out = args.out or args.checkpoint.parent
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{report.report_stem(rep)}.json"
    path.write_text(json.dumps(rep, indent=2) + "\n")
    report.print_report(rep)
    print(f"wrote {path}")
    if len(report.report_eps(rep)) > 1:
        for written in report.write_sweep(rep, out / report.report_stem(rep),
                                          f"{cfg.model.name}, {cfg.method.name} training"):
            print(f"wrote {written}")
    log_to_mlflow(rep, path, state, cfg)


def log_to_mlflow(rep: dict, path: Path, state: dict, cfg) -> None:
    """Record the report on the checkpoint's own MLflow run; a failure only warns."""
    run_id = state.get("mlflow_run_id")
    if not run_id or not cfg.tracking.enabled:
        return
    uri = resolve_uri(cfg.tracking.uri)
    try:
        metrics, tags = report.mlflow_records(rep)
        log_to_run(uri, run_id, metrics, tags, path, "final_eval")
        print(f"logged to MLflow run {run_id} at {shown_uri(uri)}")
    except Exception as e:  # any tracking trouble: the report on disk is what matters
        detail = redact((str(e).splitlines() or [""])[0], uri)    # MLflow's errors quote the URI
        print(f"warning: could not log to MLflow run {run_id} at {shown_uri(uri)} "
              f"({type(e).__name__}: {detail}); the report is at {path}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
