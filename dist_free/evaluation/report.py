"""The evaluation report: its schema, its protocol text and its number formatting.

`python -m dist_free.evaluate` builds a report (`build_report`) and writes it as JSON; the model
card (dist_free.publish.card) and the bench's tables read and print the same fields with the same
words (`protocol`, `pct`, `eps_text`). The sweep's Markdown table and PNG plot are written here
too (`write_sweep`), and `mlflow_records` turns a report into final/* metrics and final.* tags.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pipelines
from dist_free import checkpoint, precision
from dist_free.engine.attacks import default_step_size
from dist_free.evaluation import autoattack, masking
from dist_free.evaluation.masking import attack_tag
from dist_free.evaluation.protocol import EvalProtocol


def pct(x: float | None, spec: str = ".2f") -> str:
    """A fraction as a percentage: pct(0.1234) == "12.34%"; None is "n/a"."""
    return "n/a" if x is None else f"{100 * x:{spec}}%"


def eps_text(eps: float) -> str:
    return f"{eps:.6g} ({eps * 255:.4g}/255)"


# ------------------------------------------------------------------ the schema

def build_report(protocol: EvalProtocol, checkpoint_path: Path, state: dict, result: dict, loader,
                 world_size: int, seconds: float) -> dict:
    """The report of `result`, measured by `protocol` on the checkpoint at `checkpoint_path`
    (`state` is what it holds). dist_free.publish.card reads it, so keep its keys:

    checkpoint {path, sha256, epoch, global_step}, split "val", images, subset (null or {n,
    selection, files_sha256}), dtype, world_size, seconds, clean {top1, top5}, results (one per
    attack per eps; see result_rows), gradient_masking (null or dist_free.evaluation.masking.assess's
    verdict, given the checkpoint's number of classes: flagged, signs, checks, not_checked,
    threshold, ce_vs_margin, pgd_minus_autoattack). A named protocol
    (dist_free.evaluation.protocols) is recorded first as "protocol"; a report from flags alone
    has no such key. batch_size and seed are recorded too:
    AutoAttack's per-image results depend on the batch an image is attacked in (see
    dist_free.evaluation.autoattack).
    """
    listing = getattr(loader, "listing", None)
    subset = None if protocol.subset is None else {
        "n": protocol.subset, "selection": pipelines.SELECTION,
        "files_sha256": pipelines.selection_sha256(listing) if listing is not None else None}
    results = result_rows(protocol, result)
    named = {} if protocol.name is None else {"protocol": protocol.name}
    return {**named,
        "checkpoint": {"path": str(checkpoint_path), "sha256": checkpoint.sha256(checkpoint_path),
                       "epoch": state["epoch"], "global_step": state.get("global_step")},
        "split": "val", "images": result["samples"], "subset": subset,
        "dtype": precision.NAMES[protocol.amp_dtype], "world_size": world_size,
        "seconds": round(seconds, 3),
        "batch_size": getattr(loader, "batch_size", None), "seed": 0,
        "clean": {"top1": result["top1"], "top5": result["top5"]},
        "results": results,
        "gradient_masking": masking.assess(results, gap=protocol.masking_gap,
                                           num_classes=num_classes(state)),
    }


def num_classes(state: dict) -> int | None:
    """The checkpoint's number of classes (chance level for the masking verdict), if recorded."""
    return (state.get("config") or {}).get("model", {}).get("num_classes")


def result_rows(protocol: EvalProtocol, result: dict) -> list[dict]:
    """One row per attack per eps; at eps 0 every attack's robust accuracy is the clean one."""
    top1, rows = result["top1"], []
    runs = [result["pgd"], *result.get("pgd_more", [])]
    for eps in protocol.eps_values:
        if "pgd" in protocol.attacks:
            for (steps, restarts, step_size), run in zip(protocol.pgd_settings, runs):
                rows.append({"attack": "pgd", "eps": eps, "steps": steps, "restarts": restarts,
                             "step_size": step_size or default_step_size(eps, steps),
                             "loss": "ce", "robust_top1": run.get(eps, top1)})
        if "autoattack" in protocol.attacks:
            aa = result["autoattack"].get(eps) or {
                "robust_top1": top1, "robust_after": dict.fromkeys(autoattack.STANDARD, top1)}
            rows.append({"attack": "autoattack", "version": autoattack.VERSION, "eps": eps,
                         "attacks": list(autoattack.STANDARD),
                         "robust_after": aa["robust_after"], "robust_top1": aa["robust_top1"]})
    return rows


def report_eps(report: dict) -> list[float]:
    return sorted({r["eps"] for r in report["results"]})


def report_stem(report: dict) -> str:
    """eval_<attacks>_eps<eps x 255>_<dtype>_<all|subsetN>: one file per protocol
    (eps 0.5/255 is written 0p5: no second dot in the file name)."""
    tags = list(dict.fromkeys(attack_tag(r) for r in report["results"]))
    eps = "-".join(f"{e * 255:.4g}".replace(".", "p") for e in report_eps(report))
    images = f"subset{report['subset']['n']}" if report["subset"] else "all"
    return f"eval_{'+'.join(tags)}_eps{eps}_{report['dtype']}_{images}"


# ------------------------------------------------------------------ the protocol in words

def protocol(r: dict, dtype: str | None = None, step: str | None = None) -> str:
    """One result row's attack in one phrase; `dtype` appended when given, `step` (text) in
    place of the row's step size."""
    if r["attack"] == "pgd":
        step = step or (f"{r['step_size']:.5g}" if r.get("step_size") else None)
        text = (f"PGD-{r['steps']} x {r['restarts']} restarts{f', step {step}' if step else ''}, "
                f"{r.get('loss', 'ce').upper()} loss")
        return f"{text}, {dtype}" if dtype else text
    if r["attack"] == "autoattack":
        text = f"AutoAttack {r.get('version', '?')} ({', '.join(r.get('attacks') or [])})"
        return f"{text}, fp32" if dtype else text
    return str(r["attack"])


def sweep_protocol(report: dict) -> str:
    """The protocols of a report in one phrase each, PGD's step size as the rule it followed."""
    pgd = [r for r in report["results"] if r["attack"] == "pgd" and r["eps"] > 0]
    rule = all(math.isclose(r["step_size"], default_step_size(r["eps"], r["steps"])) for r in pgd)
    step = "2.5 eps / steps" if rule or not pgd else f"{pgd[0]['step_size']:.5g}"
    return "; ".join(dict.fromkeys(protocol(r, report["dtype"], step) for r in report["results"]))


def images_text(report: dict) -> str:
    s = report["subset"]
    chosen = f"fixed subset of {s['n']}, sha256 {s['files_sha256']}" if s else "all"
    return f"{report['images']} val images ({chosen})"


def print_report(report: dict) -> None:
    clean = report["clean"]
    if report.get("protocol"):
        print(f"protocol {report['protocol']}")
    print(f"{images_text(report)}, {report['world_size']} rank(s), {report['dtype']}: clean "
          f"top-1 {pct(clean['top1'])}, top-5 {pct(clean['top5'])}")
    for r in report["results"]:
        after = ""
        if r["attack"] == "autoattack":
            after = " (after " + ", ".join(f"{k} {pct(v)}" for k, v in r["robust_after"].items()) + ")"
        print(f"  eps {r['eps']:.5f} ({r['eps'] * 255:.4g}/255), {protocol(r, report['dtype'])}: "
              f"robust top-1 {pct(r['robust_top1'])}{after}")
    lines = masking.summary(report["gradient_masking"])
    flagged = bool(lines) and report["gradient_masking"]["flagged"]
    if flagged:
        print(f"\n!!! WARNING: {lines[0]}. Do not trust these figures. !!!\n", file=sys.stderr)
    for line in lines[1:] if flagged else lines:
        print(f"  {line}")


# ------------------------------------------------------------------ the eps sweep

def sweep_table(report: dict) -> tuple[list[str], dict[str, list[tuple[float, float]]]]:
    """The sweep as Markdown lines, and its curves: attack tag -> [(eps, robust top-1)]."""
    curves = {}
    for r in report["results"]:
        curves.setdefault(attack_tag(r), []).append((r["eps"], r["robust_top1"]))
    tags = list(curves)
    table = [f"| eps | eps x 255 | {' | '.join(f'{t} robust top-1' for t in tags)} |",
             "|---|---|" + "---|" * len(tags)]
    for i, eps in enumerate(report_eps(report)):
        table.append(f"| {eps:.5f} | {eps * 255:.2f} | "
                     + " | ".join(pct(curves[t][i][1]) for t in tags) + " |")
    table.append(f"\nAttack: {sweep_protocol(report)}. Clean top-1 {pct(report['clean']['top1'])}, "
                 f"top-5 {pct(report['clean']['top5'])}; {images_text(report)}; checkpoint "
                 f"{report['checkpoint']['path']} (epoch {report['checkpoint']['epoch']}, sha256 "
                 f"{report['checkpoint']['sha256'][:16]}...).")
    return table, curves


def write_sweep(report: dict, stem: Path, title: str) -> list[Path]:
    """The eps sweep as a Markdown table and a PNG plot, one curve per attack."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table, curves = sweep_table(report)
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


# ------------------------------------------------------------------ MLflow records

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
    if report.get("protocol"):
        tags["final.protocol"] = report["protocol"]
    return metrics, tags
