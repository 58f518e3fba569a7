"""Clean and robust accuracy: used by the trainer, and standalone on a checkpoint.

    python -m dist_free.evaluate --checkpoint runs/free/checkpoints/best.pt [data.root=...]
    python -m dist_free.evaluate --checkpoint best.pt --eps 0,1/255,2/255,4/255,8/255 --steps 50 --restarts 2
    torchrun --nproc_per_node=4 -m dist_free.evaluate --checkpoint best.pt ...

Counts are exact: each rank evaluates a disjoint, unpadded slice of the val set and the per-rank
counts are summed with an all-reduce, so every image is counted exactly once. A sweep writes
eval_eps_sweep.json, .md (a table) and .png (accuracy against eps) beside the checkpoint, or
under --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from fractions import Fraction
from pathlib import Path

import torch

from dist_free import attacks, distributed


def evaluate(model: torch.nn.Module, loader, *, eps_values: list[float], steps: int,
             step_size: float | None = None, restarts: int = 1,
             amp_dtype: torch.dtype | None = None, max_batches: int | None = None) -> dict:
    """Clean top-1/top-5 and PGD accuracy at each eps, all-reduced over ranks.

    `model` must be the bare module (not DDP): attacks take input gradients only.
    Returns {"samples": n, "top1": .., "top5": .., "pgd": {eps: acc, ...}}.
    """
    device = next(model.parameters()).device
    counts = torch.zeros(3 + len(eps_values), dtype=torch.float64, device=device)
    for i, (images, labels) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        counts[0] += labels.numel()
        counts[1] += attacks.correct(model, images, labels, amp_dtype).sum()
        counts[2] += attacks.correct(model, images, labels, amp_dtype, topk=5).sum()
        for j, eps in enumerate(eps_values):
            counts[3 + j] += attacks.robust_correct(
                model, images, labels, eps=eps, steps=steps, step_size=step_size,
                restarts=restarts, amp_dtype=amp_dtype).sum()
    counts = distributed.all_reduce_sum(counts).tolist()
    n = counts[0]
    if n == 0:
        raise RuntimeError("the validation loader yielded no images")
    return {"samples": int(n), "top1": counts[1] / n, "top5": counts[2] / n,
            "pgd": {eps: c / n for eps, c in zip(eps_values, counts[3:])}}


def parse_eps_list(text: str) -> list[float]:
    try:
        values = [float(Fraction(v.strip())) for v in text.split(",") if v.strip()]
    except (ValueError, ZeroDivisionError):
        raise SystemExit(f"error: --eps must be a comma-separated list like 0,2/255,4/255; got {text!r}")
    if not values or any(v < 0 for v in values):
        raise SystemExit(f"error: --eps needs values >= 0, got {text!r}")
    return values


def write_sweep(result: dict, out: Path, title: str) -> list[Path]:
    """The eps sweep as JSON, a Markdown table and a PNG plot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    rows = sorted(result["pgd"].items())
    (out / "eval_eps_sweep.json").write_text(json.dumps(
        {**result, "pgd": {str(k): v for k, v in rows}}, indent=2))
    table = ["| eps | eps x 255 | robust top-1 |", "|---|---|---|"]
    table += [f"| {e:.5f} | {e * 255:.2f} | {a:.2%} |" for e, a in rows]
    table.append(f"\nclean top-1 {result['top1']:.2%}, top-5 {result['top5']:.2%}, "
                 f"{result['samples']} images, {result['steps']} PGD steps x {result['restarts']} "
                 "restarts")
    (out / "eval_eps_sweep.md").write_text("\n".join(table) + "\n")
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    ax.plot([e * 255 for e, _ in rows], [100 * a for _, a in rows], marker="o")
    ax.set(xlabel="eps (x 1/255)", ylabel="robust top-1 accuracy (%)", title=title, ylim=(0, 100))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "eval_eps_sweep.png")
    plt.close(fig)
    return [out / f"eval_eps_sweep.{ext}" for ext in ("json", "md", "png")]


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m dist_free.evaluate",
                                     description="Evaluate a checkpoint: clean and PGD accuracy.")
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--eps", help="comma-separated eps values for a sweep, e.g. 0,2/255,4/255 "
                        "(default: the run's eval eps)")
    parser.add_argument("--steps", type=int, help="PGD steps (default: the run's eval.steps)")
    parser.add_argument("--restarts", type=int, help="PGD restarts (default: the run's)")
    parser.add_argument("--step-size", help="PGD step size (default 2.5 eps / steps)")
    parser.add_argument("--out", type=Path, help="folder for the sweep's JSON, table and plot")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="config overrides on top of the checkpoint's, e.g. data.root=...")
    return parser.parse_args(argv)


def checkpoint_config(state: dict, overrides: list[str]):
    """The run's own config (from the checkpoint) with command-line overrides on top."""
    from dist_free.config import config_from_dict
    return config_from_dict(state["config"], overrides)


def main(argv: list[str] | None = None) -> int:
    from dist_free import checkpoint, runtime
    from dist_free.config import ConfigError
    import pipelines

    args = parse_args(argv)
    try:
        state = checkpoint.load(args.checkpoint)
        cfg = checkpoint_config(state, args.overrides)
    except (checkpoint.CheckpointError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    eps_values = parse_eps_list(args.eps) if args.eps else [cfg.eval_eps]
    steps = args.steps or cfg.eval.steps
    restarts = args.restarts or cfg.eval.restarts
    step_size = float(Fraction(args.step_size)) if args.step_size else cfg.eval.step_size
    d = distributed.init(cfg.run.device)
    try:
        loader = runtime.build_loader(cfg, d, "val", state.get("class_to_idx"))
        model = runtime.build_bare_model(cfg, d.device)
        model.load_state_dict(state["model"])
        # eps = 0 is the clean accuracy; PGD at eps 0 would only recompute it.
        result = evaluate(model, loader, eps_values=[e for e in eps_values if e > 0], steps=steps,
                          step_size=step_size, restarts=restarts,
                          amp_dtype=runtime.resolve_amp(cfg.run.amp, d.device))
    except pipelines.DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown()
    if 0.0 in eps_values:
        result["pgd"][0.0] = result["top1"]
    result.update(steps=steps, restarts=restarts, checkpoint=str(args.checkpoint))
    if d.is_main:
        print_result(result, cfg)
        if len(eps_values) > 1 or args.out:
            out = args.out or args.checkpoint.parent
            for path in write_sweep(result, out, f"{cfg.model.name}, {cfg.method.name} training"):
                print(f"wrote {path}")
    return 0


def print_result(result: dict, cfg) -> None:
    print(f"{result['samples']} images: clean top-1 {result['top1']:.2%}, top-5 {result['top5']:.2%}")
    for eps, acc in sorted(result["pgd"].items()):
        print(f"  eps {eps:.5f} ({eps * 255:.2f}/255): PGD-{result['steps']} x{result['restarts']} "
              f"top-1 {acc:.2%}")


if __name__ == "__main__":
    sys.exit(main())
