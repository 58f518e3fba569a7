"""What a bench child process runs: `python -m dist_free.bench.worker_main KIND ... --out F.json`
(under torchrun for ddp and eval). The measurements are dist_free.bench.workers', which the parent
imports too; this entry point is imported by nothing."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dist_free.bench.workers import ddp_worker, eval_worker, memory_worker
from dist_free.precision import DTYPES


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dist_free.bench.worker_main")
    p.add_argument("kind", choices=["memory", "ddp", "eval"])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--method", default="free")
    p.add_argument("--model", required=True)
    p.add_argument("--image-size", type=int, required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--replays", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (ddp, eval)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (ddp, eval)")
    p.add_argument("--channels-last", action="store_true")
    # eval
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--eps", type=float, default=8 / 255)
    p.add_argument("--pgd-steps", type=int, default=10)
    p.add_argument("--pgd-restarts", type=int, default=1)
    p.add_argument("--aa-batch-never", type=int, default=16,
                   help="images per rank for AutoAttack's never-broken case (its full budget)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    result = {"memory": memory_worker, "ddp": ddp_worker, "eval": eval_worker}[a.kind](a)
    if result is not None:
        a.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
