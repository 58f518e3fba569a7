"""Clean and robust accuracy: used by the trainer, and standalone on a checkpoint (final numbers).

    python -m dist_free.evaluate --checkpoint runs/free/checkpoints/best.pt [data.root=...]
    python -m dist_free.evaluate --checkpoint best.pt --attack pgd,autoattack --subset 1000
    python -m dist_free.evaluate --checkpoint best.pt --eps 0,2/255,4/255,8/255 --steps 10 --restarts 1
    torchrun --nproc_per_node=4 -m dist_free.evaluate --checkpoint best.pt ...

Protocol (the defaults are the final-report protocol, not the run's in-training settings):
  --attack pgd         L-inf PGD, 50 steps x 10 random restarts, step 2.5 eps / steps, CE loss;
                       an image counts as robust only if no restart breaks it.
  --attack autoattack  AutoAttack, standard version (APGD-CE, APGD-T, FAB-T, Square), through
                       Croce & Hein's pyautoattack (pip install 'dist-free[eval]'); always fp32.
  --amp off            fp32 (default); bf16/fp16 only when asked, for PGD and clean accuracy.
  eps                  the run's eval eps unless --eps gives a list; eps 0 is clean accuracy.
  --subset N           the first N val images ranked by sha1 of their file name (ties: label):
                       no seed, world size or folder layout changes which images, so every
                       checkpoint is measured on the same N; the report fingerprints the list.

Counts are exact: the val set (or subset) is cut into global batches of the run's val batch
size and each rank evaluates a contiguous range of whole batches; per-rank counts are summed
with an all-reduce, so every image is counted once. Random draws are keyed to the batch, not to
the rank: every batch's PGD random starts come from a generator seeded with the same seed, and
AutoAttack reseeds per batch as pyautoattack itself does. Since batch b holds the same images on
any world size, 1 and N ranks give identical counts (see dist_free.autoattack).

Every run writes a JSON report (schema in `build_report`) beside the checkpoint, or under --out,
named eval_<attacks>_eps<eps x 255>_<dtype>_<all|subsetN>.json; an eps sweep also writes a
Markdown table and a plot with the same name. The results are checked for gradient masking by
dist_free.masking (Square breaking what gradients could not, accuracy not falling with eps, a
better optimiser of the same loss still helping); AutoAttack's margin-loss attacks beating the
cross-entropy ones is reported as what it is, not flagged. If the
checkpoint names an MLflow run and its config tracks, the numbers go to that run as final/*
metrics, the protocol as final.* tags and the report as an artifact.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from fractions import Fraction
from pathlib import Path

import torch

from dist_free import attacks, autoattack, checkpoint, distributed, masking

ATTACKS = ("pgd", "autoattack")
AMP = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
FINAL_PGD = (50, 10)   # steps, restarts: the final-report protocol


def evaluate(model: torch.nn.Module, loader, *, eps_values: list[float], steps: int,
             step_size: float | None = None, restarts: int = 1,
             amp_dtype: torch.dtype | None = None, max_batches: int | None = None,
             attack_names: tuple[str, ...] = ("pgd",), seed: int = 0,
             verbose: bool = False) -> dict:
    """Clean top-1/top-5 and robust accuracy at each eps, all-reduced over ranks.

    `model` must be the bare module (not DDP): attacks take input gradients only. Returns
    {"samples": n, "top1", "top5", "pgd": {eps: acc}, "autoattack": {eps: {"robust_top1": acc,
    "robust_after": {attack: acc}}}}; "autoattack" only when it is among `attack_names`.
    """
    plan = {"pgd": eps_values if "pgd" in attack_names else [],
            "autoattack": eps_values if "autoattack" in attack_names else []}
    width = 3 + len(plan["pgd"]) + len(autoattack.STANDARD) * len(plan["autoattack"])
    device = next(model.parameters()).device
    counts = torch.zeros(width, dtype=torch.float64, device=device)
    for i, (images, labels) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        counts += batch_counts(model, images, labels, plan, steps=steps, step_size=step_size,
                               restarts=restarts, amp_dtype=amp_dtype, seed=seed,
                               verbose=verbose).to(device)
    return accuracies(distributed.all_reduce_sum(counts).tolist(), plan)


def batch_counts(model, images, labels, plan: dict, *, steps, step_size, restarts, amp_dtype,
                 seed, verbose) -> torch.Tensor:
    """[images, top-1, top-5, PGD robust per eps, AutoAttack robust-after per eps and attack]."""
    row = [labels.numel(), attacks.correct(model, images, labels, amp_dtype).sum(),
           attacks.correct(model, images, labels, amp_dtype, topk=5).sum()]
    for eps in plan["pgd"]:
        # A fresh generator per batch and eps: a batch's random starts do not depend on how
        # many batches this rank attacked before it, nor on which other eps were asked for.
        generator = torch.Generator(device=images.device).manual_seed(seed)
        row.append(attacks.robust_correct(model, images, labels, eps=eps, steps=steps,
                                          step_size=step_size, restarts=restarts,
                                          amp_dtype=amp_dtype, generator=generator).sum())
    for eps in plan["autoattack"]:
        result = autoattack.run_standard(model, images, labels, eps=eps, seed=seed,
                                         verbose=verbose)
        row += list(result.robust_after.values())
    return torch.tensor([float(v) for v in row], dtype=torch.float64)


def accuracies(counts: list[float], plan: dict) -> dict:
    n = counts[0]
    if n == 0:
        raise RuntimeError("the validation loader yielded no images")
    pgd = counts[3:3 + len(plan["pgd"])]
    result = {"samples": int(n), "top1": counts[1] / n, "top5": counts[2] / n,
              "pgd": {eps: c / n for eps, c in zip(plan["pgd"], pgd)}}
    if plan["autoattack"]:
        k = len(autoattack.STANDARD)
        rest = counts[3 + len(plan["pgd"]):]
        result["autoattack"] = {}
        for j, eps in enumerate(plan["autoattack"]):
            after = dict(zip(autoattack.STANDARD, (c / n for c in rest[j * k:(j + 1) * k])))
            result["autoattack"][eps] = {"robust_top1": after[autoattack.STANDARD[-1]],
                                         "robust_after": after}
    return result


# ------------------------------------------------------------------ command line

class Parser(argparse.ArgumentParser):
    def error(self, message):
        """One line naming the flag, exit status 2, no usage block and no traceback."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def number_type(kind, low: float, *, low_ok: bool = False, high: float | None = None):
    """An argparse type: a number (fractions like 2/255 allowed) above `low` (at most `high`)."""
    def parse(text: str):
        try:
            value = Fraction(text.strip())
        except (ValueError, ZeroDivisionError):
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


def parse_args(argv):
    p = Parser(prog="python -m dist_free.evaluate",
               description="Evaluate a checkpoint: clean, PGD and AutoAttack accuracy.")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--attack", type=attack_list, default=("pgd",),
                   help="pgd, autoattack or pgd,autoattack (default pgd)")
    p.add_argument("--eps", type=eps_list, help="comma-separated eps values, e.g. "
                   "0,2/255,4/255 (default: the run's eval eps)")
    p.add_argument("--steps", type=number_type(int, 0), default=FINAL_PGD[0],
                   help=f"PGD steps (default {FINAL_PGD[0]})")
    p.add_argument("--restarts", type=number_type(int, 0), default=FINAL_PGD[1],
                   help=f"PGD random restarts (default {FINAL_PGD[1]})")
    p.add_argument("--step-size", type=number_type(float, 0),
                   help="PGD step size, e.g. 1/255 (default 2.5 eps / steps)")
    p.add_argument("--amp", choices=tuple(AMP), default="off",
                   help="precision of PGD and clean accuracy (default off = fp32)")
    p.add_argument("--subset", type=number_type(int, 0),
                   help="evaluate only the fixed first N val images (see the module docstring)")
    p.add_argument("--masking-gap", type=number_type(float, 0, low_ok=True, high=1), default=0.03,
                   help="flag two runs of the same loss (PGD vs APGD-CE, fewer vs more steps) "
                        "differing by more than this (default 0.03); see dist_free.masking")
    p.add_argument("--out", type=Path, help="folder for the report (default: the checkpoint's)")
    p.add_argument("--verbose", action="store_true", help="show AutoAttack's progress log")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="config overrides on top of the checkpoint's, e.g. data.root=...")
    args = p.parse_args(argv)
    if "autoattack" in args.attack and args.amp != "off":
        p.error(f"argument --amp: AutoAttack runs in fp32 only; drop --amp {args.amp} or "
                "evaluate PGD separately")
    return args


def checkpoint_config(state: dict, overrides: list[str]):
    """The run's own config (from the checkpoint) with command-line overrides on top."""
    from dist_free.config import config_from_dict
    return config_from_dict(state["config"], overrides)


def val_loader(cfg, d, class_to_idx, subset: int | None):
    """The run's val pipeline, cut in whole batches (the same images per batch on any world size:
    AutoAttack's per-image results depend on the batch an image is attacked in)."""
    from dist_free import runtime
    return runtime.build_loader(cfg, d, "val", class_to_idx, subset=subset, whole_batches=True)


def load_run(args):
    """(checkpoint state, config); raises CheckpointError/ConfigError/AutoAttackUnavailable."""
    state = checkpoint.load(args.checkpoint)
    cfg = checkpoint_config(state, args.overrides)
    if "autoattack" in args.attack:
        autoattack.require()     # before any data is read: fail in a second, not an hour
    return state, cfg


def main(argv: list[str] | None = None) -> int:
    import pipelines
    from dist_free import runtime
    from dist_free.config import ConfigError

    args = parse_args(argv)
    try:
        state, cfg = load_run(args)
    except (checkpoint.CheckpointError, ConfigError, autoattack.AutoAttackUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    eps_values = args.eps or [cfg.eval_eps]
    d = distributed.init(cfg.run.device)
    start = time.perf_counter()
    try:
        loader = val_loader(cfg, d, state.get("class_to_idx"), args.subset)
        model = runtime.build_bare_model(cfg, d.device)
        model.load_state_dict(state["model"])
        # eps = 0 is the clean accuracy; attacking at eps 0 would only recompute it.
        result = evaluate(model, loader, eps_values=[e for e in eps_values if e > 0],
                          steps=args.steps, step_size=args.step_size, restarts=args.restarts,
                          amp_dtype=AMP[args.amp], attack_names=args.attack,
                          verbose=args.verbose)
    except pipelines.DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown()
    if d.is_main:
        report = build_report(args, state, result, eps_values, loader, d.world_size,
                              time.perf_counter() - start)
        finish(args, cfg, state, report)
    return 0


def finish(args, cfg, state: dict, report: dict) -> None:
    """Rank 0: print the protocol and numbers, write the report (and sweep), log to MLflow."""
    out = args.out or args.checkpoint.parent
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{report_stem(report)}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print_report(report)
    print(f"wrote {path}")
    if len(report_eps(report)) > 1:
        for written in write_sweep(report, out / report_stem(report),
                                   f"{cfg.model.name}, {cfg.method.name} training"):
            print(f"wrote {written}")
    log_to_mlflow(report, path, state, cfg)


# ------------------------------------------------------------------ the report

def build_report(args, state: dict, result: dict, eps_values: list[float], loader,
                 world_size: int, seconds: float) -> dict:
    """The report (dist_free.export reads it, so keep its keys):

    checkpoint {path, sha256, epoch, global_step}, split "val", images, subset (null or {n,
    selection, files_sha256}), dtype, world_size, seconds, clean {top1, top5}, results (one per
    attack per eps; see result_rows), gradient_masking (null or dist_free.masking.assess's
    verdict: flagged, signs, checks, not_checked, ce_vs_margin, pgd_minus_autoattack).
    batch_size and seed are recorded too: AutoAttack's per-image results depend on the batch
    an image is attacked in (see dist_free.autoattack).
    """
    import pipelines
    listing = getattr(loader, "listing", None)
    subset = None if args.subset is None else {
        "n": args.subset, "selection": pipelines.SELECTION,
        "files_sha256": pipelines.selection_sha256(listing) if listing is not None else None}
    results = result_rows(args, result, eps_values)
    return {
        "checkpoint": {"path": str(args.checkpoint), "sha256": checkpoint.sha256(args.checkpoint),
                       "epoch": state["epoch"], "global_step": state.get("global_step")},
        "split": "val", "images": result["samples"], "subset": subset,
        "dtype": DTYPE_NAMES[AMP[args.amp]], "world_size": world_size,
        "seconds": round(seconds, 3),
        "batch_size": getattr(loader, "batch_size", None), "seed": 0,
        "clean": {"top1": result["top1"], "top5": result["top5"]},
        "results": results,
        "gradient_masking": masking.assess(results, gap=args.masking_gap),
    }


def result_rows(args, result: dict, eps_values: list[float]) -> list[dict]:
    """One row per attack per eps; at eps 0 every attack's robust accuracy is the clean one."""
    top1, rows = result["top1"], []
    for eps in eps_values:
        if "pgd" in args.attack:
            rows.append({"attack": "pgd", "eps": eps, "steps": args.steps,
                         "restarts": args.restarts,
                         "step_size": args.step_size or 2.5 * eps / args.steps, "loss": "ce",
                         "robust_top1": result["pgd"].get(eps, top1)})
        if "autoattack" in args.attack:
            aa = result["autoattack"].get(eps) or {
                "robust_top1": top1, "robust_after": dict.fromkeys(autoattack.STANDARD, top1)}
            rows.append({"attack": "autoattack", "version": autoattack.VERSION, "eps": eps,
                         "attacks": list(autoattack.STANDARD),
                         "robust_after": aa["robust_after"], "robust_top1": aa["robust_top1"]})
    return rows


def report_eps(report: dict) -> list[float]:
    return sorted({r["eps"] for r in report["results"]})


def attack_tag(r: dict) -> str:
    return f"pgd{r['steps']}x{r['restarts']}" if r["attack"] == "pgd" else r["attack"]


def report_stem(report: dict) -> str:
    """eval_<attacks>_eps<eps x 255>_<dtype>_<all|subsetN>: one file per protocol
    (eps 0.5/255 is written 0p5: no second dot in the file name)."""
    tags = list(dict.fromkeys(attack_tag(r) for r in report["results"]))
    eps = "-".join(f"{e * 255:.4g}".replace(".", "p") for e in report_eps(report))
    images = f"subset{report['subset']['n']}" if report["subset"] else "all"
    return f"eval_{'+'.join(tags)}_eps{eps}_{report['dtype']}_{images}"


def protocol(r: dict, dtype: str, step: str | None = None) -> str:
    if r["attack"] == "pgd":
        step = step or f"{r['step_size']:.5g}"
        return f"PGD-{r['steps']} x {r['restarts']} restarts, step {step}, CE loss, {dtype}"
    return f"AutoAttack {r['version']} ({', '.join(r['attacks'])}), fp32"


def sweep_protocol(report: dict) -> str:
    """The protocols of a report in one phrase each, PGD's step size as the rule it followed."""
    pgd = [r for r in report["results"] if r["attack"] == "pgd" and r["eps"] > 0]
    rule = all(math.isclose(r["step_size"], 2.5 * r["eps"] / r["steps"]) for r in pgd)
    step = "2.5 eps / steps" if rule or not pgd else f"{pgd[0]['step_size']:.5g}"
    return "; ".join(dict.fromkeys(protocol(r, report["dtype"], step) for r in report["results"]))


def images_text(report: dict) -> str:
    s = report["subset"]
    chosen = f"fixed subset of {s['n']}, sha256 {s['files_sha256']}" if s else "all"
    return f"{report['images']} val images ({chosen})"


def print_report(report: dict) -> None:
    clean = report["clean"]
    print(f"{images_text(report)}, {report['world_size']} rank(s), {report['dtype']}: clean "
          f"top-1 {clean['top1']:.2%}, top-5 {clean['top5']:.2%}")
    for r in report["results"]:
        after = ""
        if r["attack"] == "autoattack":
            after = " (after " + ", ".join(f"{k} {v:.2%}" for k, v in r["robust_after"].items()) + ")"
        print(f"  eps {r['eps']:.5f} ({r['eps'] * 255:.4g}/255), {protocol(r, report['dtype'])}: "
              f"robust top-1 {r['robust_top1']:.2%}{after}")
    lines = masking.summary(report["gradient_masking"])
    if lines and report["gradient_masking"]["flagged"]:
        print(f"\n!!! WARNING: {lines[0]}. Do not trust these figures. !!!\n", file=sys.stderr)
    for line in lines[1:] if lines and report["gradient_masking"]["flagged"] else lines:
        print(f"  {line}")


def write_sweep(report: dict, stem: Path, title: str) -> list[Path]:
    """The eps sweep as a Markdown table and a PNG plot, one curve per attack."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {}
    for r in report["results"]:
        curves.setdefault(attack_tag(r), []).append((r["eps"], r["robust_top1"]))
    tags = list(curves)
    table = [f"| eps | eps x 255 | {' | '.join(f'{t} robust top-1' for t in tags)} |",
             "|---|---|" + "---|" * len(tags)]
    for i, eps in enumerate(report_eps(report)):
        table.append(f"| {eps:.5f} | {eps * 255:.2f} | "
                     + " | ".join(f"{curves[t][i][1]:.2%}" for t in tags) + " |")
    table.append(f"\nAttack: {sweep_protocol(report)}. Clean top-1 {report['clean']['top1']:.2%}, top-5 "
                 f"{report['clean']['top5']:.2%}; {images_text(report)}; checkpoint "
                 f"{report['checkpoint']['path']} (epoch {report['checkpoint']['epoch']}, sha256 "
                 f"{report['checkpoint']['sha256'][:16]}...).")
    md, png = stem.parent / f"{stem.name}.md", stem.parent / f"{stem.name}.png"
    md.write_text("\n".join(table) + "\n")
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    for tag, points in curves.items():
        ax.plot([e * 255 for e, _ in points], [100 * a for _, a in points], marker="o", label=tag)
    ax.set(xlabel="eps (x 1/255)", ylabel="robust top-1 accuracy (%)", ylim=(0, 100),
           title=f"{title}\n{report['images']} val images, {report['dtype']}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return [md, png]


# ------------------------------------------------------------------ MLflow

def tracking_uri(uri: str | None) -> str:
    """As the trainer resolves it: the config's, else $MLFLOW_TRACKING_URI, else ./mlflow.db."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def mlflow_records(report: dict) -> tuple[dict[str, float], dict[str, str]]:
    """final/* metrics and final.* tags; a sweep's metric names carry their eps."""
    sweep = len(report_eps(report)) > 1
    metrics = {"final/clean_top1": report["clean"]["top1"],
               "final/clean_top5": report["clean"]["top5"]}
    for r in report["results"]:
        eps = f"_eps{r['eps'] * 255:.4g}" if sweep else ""
        metrics[f"final/{attack_tag(r)}{eps}_top1"] = r["robust_top1"]
    s = report["subset"]
    tags = {"final.attack": sweep_protocol(report),
            "final.eps": ",".join(f"{e:.6g}" for e in report_eps(report)),
            "final.images": str(report["images"]), "final.dtype": report["dtype"],
            "final.subset": f"{s['n']} ({s['selection']}; sha256 {s['files_sha256']})" if s
            else "none (all val images)",
            "final.checkpoint": f"{report['checkpoint']['path']} sha256 "
                                f"{report['checkpoint']['sha256']}"}
    return metrics, tags


def log_to_mlflow(report: dict, path: Path, state: dict, cfg) -> None:
    """Record the report on the checkpoint's own MLflow run; a failure only warns."""
    run_id = state.get("mlflow_run_id")
    if not run_id or not cfg.tracking.enabled:
        return
    uri = tracking_uri(cfg.tracking.uri)
    # Fail in seconds when a server is down, not after MLflow's minutes of retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    try:
        from mlflow import MlflowClient
        from mlflow.entities import Metric, RunTag
        client = MlflowClient(uri)
        now = int(time.time() * 1000)
        metrics, tags = mlflow_records(report)
        client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
                         tags=[RunTag(k, v) for k, v in tags.items()])
        client.log_artifact(run_id, str(path), "final_eval")
        print(f"logged to MLflow run {run_id} at {uri}")
    except Exception as e:  # any tracking trouble: the report on disk is what matters
        print(f"warning: could not log to MLflow run {run_id} at {uri} "
              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
              f"the report is at {path}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
