"""`python -m dist_free.bench.compare`: the training methods side by side at the same cost.

    python -m dist_free.bench.compare --config configs/cifar_demo.yaml \\
        --methods natural,free,fast,nfgsm,pgd --out runs/compare

Every method trains from the same config (same data, model, optimiser, schedule shape, seed) with
its SGD-step budget set so that each run makes the same number of forward/backward passes as the
config's own method: a free replay, a natural step and an N-FGSM or FGSM-RS step's halves count
one pass each, a PGD-k step k + 1 (engine.method_registry.passes_per_step). The budget is the
config's `optim.steps` (SGD steps counting every replay), so the config must set it; step-schedule
milestones are scaled with it. A `method.step_size` the config sets is its own method's (PGD-7's
2/255 would be a quarter of N-FGSM's step): every other method takes its own default step. Each
run's best.pt is then evaluated by the same command on the same val images (PGD-50 x 10 and
standard AutoAttack unless --attack says otherwise), which also gives the gradient-masking
verdict (dist_free.evaluation.masking). The table and the JSON beside it name the machine; the
wall clock is the training process's, start to exit.

Training and evaluation run as their own commands (subprocesses), as a user would run them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from dist_free import environment
from dist_free.config import ConfigError, load_config
from dist_free.engine import method_registry

DEFAULT_METHODS = ("natural", "free", "fast", "nfgsm", "pgd")


def budgets(cfg, methods: list[str]) -> dict[str, dict]:
    """Per method: SGD steps and passes at the config's pass budget, and the overrides for it."""
    if cfg.optim.steps is None:
        raise ConfigError("compare: the config must set optim.steps (the budget in SGD steps "
                          "counting every replay); it sets optim.epochs")
    passes = cfg.optim.steps * method_registry.passes_per_step(cfg.method)
    out = {}
    for name in methods:
        method_registry.spec(name)                    # an unknown name is refused here
        section = type(cfg.method)(**{**vars(cfg.method), "name": name})
        cost = method_registry.passes_per_step(section)
        steps = max(1, round(passes / cost))
        overrides = [f"method.name={name}", f"optim.steps={steps}"]
        if name != cfg.method.name and cfg.method.step_size is not None:
            overrides.append("method.step_size=null")       # the method's own default step
        if cfg.optim.schedule == "step":
            scale = steps / cfg.optim.steps
            milestones = ",".join(str(max(1, round(m * scale))) for m in cfg.optim.milestones)
            overrides.append(f"optim.milestones=[{milestones}]")
        out[name] = {"steps": steps, "passes": steps * cost, "overrides": overrides}
    return out


def run(cmd: list[str], log: Path) -> float:
    """Run `cmd`, its output to `log`; the wall clock in seconds. A failure names the log."""
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text()[-2000:]
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {proc.returncode}; see {log}\n{tail}")
    return time.perf_counter() - start


def one_method(name: str, plan: dict, args, out: Path) -> dict:
    run_dir = out / name
    run_dir.mkdir(parents=True, exist_ok=True)
    train_cmd = [sys.executable, "-m", "dist_free.train", "--config", str(args.config),
                 *args.overrides, *plan["overrides"], f"run.dir={out}", f"run.name={name}"]
    train_s = run(train_cmd, run_dir / "train.log")
    best = run_dir / "checkpoints" / f"{args.checkpoint}.pt"
    eval_dir = run_dir / "eval"
    eval_cmd = [sys.executable, "-m", "dist_free.evaluate", "--checkpoint", str(best),
                "--attack", args.attack, "--out", str(eval_dir)]
    if args.subset:
        eval_cmd += ["--subset", str(args.subset)]
    eval_s = run(eval_cmd, run_dir / "evaluate.log")
    (report_path,) = sorted(eval_dir.glob("eval_*.json"))
    return row(name, plan, train_s, eval_s, json.loads(report_path.read_text()))


def row(name: str, plan: dict, train_s: float, eval_s: float, report: dict) -> dict:
    """The table's row for one method, from its evaluation report."""
    robust = {}
    for r in report["results"]:
        key = "autoattack" if r["attack"] == "autoattack" else f"pgd{r['steps']}x{r['restarts']}"
        robust[key] = r["robust_top1"]
    masking = report.get("gradient_masking") or {}
    return {"method": name, "sgd_steps": plan["steps"], "passes": plan["passes"],
            "train_s": round(train_s, 1), "eval_s": round(eval_s, 1),
            "images": report["images"], "clean": report["clean"]["top1"], "robust": robust,
            "masking_flagged": masking.get("flagged"), "masking_signs": masking.get("signs", [])}


def markdown(rows: list[dict], machine: str) -> str:
    attacks = list(dict.fromkeys(k for r in rows for k in r["robust"]))
    head = ["method", "SGD steps", "passes / minibatch-size", "train s", "clean",
            *attacks, "masking"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        flagged = {None: "not checked", False: "none"}.get(r["masking_flagged"],
                                                            "; ".join(r["masking_signs"]))
        cells = [r["method"], str(r["sgd_steps"]), str(r["passes"]), f"{r['train_s']:.0f}",
                 f"{100 * r['clean']:.1f}%",
                 *(f"{100 * r['robust'][a]:.1f}%" if a in r["robust"] else "n/a"
                   for a in attacks), flagged]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"\n{rows[0]['images'] if rows else 0} val images; {machine}.")
    return "\n".join(lines) + "\n"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m dist_free.bench.compare",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated (default {','.join(DEFAULT_METHODS)})")
    p.add_argument("--out", type=Path, default=Path("runs/compare"))
    p.add_argument("--attack", default="pgd,autoattack", help="as evaluate's --attack")
    p.add_argument("--subset", type=int, default=None, help="as evaluate's --subset")
    p.add_argument("--checkpoint", choices=("last", "best"), default="last",
                   help="which checkpoint of each run is evaluated (default last)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="config overrides for every method's run")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    try:
        plans = budgets(load_config(args.config, args.overrides), methods)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    commit, dirty = environment.git_commit()
    machine = (f"{environment.device_names()}; commit {commit[:7]}"
               f"{' (uncommitted changes)' if dirty else ''}")
    rows = []
    for name in methods:
        print(f"{name}: {plans[name]['steps']} SGD steps, {plans[name]['passes']} passes",
              flush=True)
        try:
            rows.append(one_method(name, plans[name], args, args.out))
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    (args.out / "compare.json").write_text(json.dumps({"machine": machine, "rows": rows},
                                                      indent=2) + "\n")
    table = markdown(rows, machine)
    (args.out / "compare.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
