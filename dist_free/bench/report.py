"""The bench's printed table (Markdown, so it pastes into bench/RESULTS.md as is) and the
per-device section of RESULTS.md that `--results-md` refreshes in place."""

from __future__ import annotations

from pathlib import Path

from dist_free.bench.resident import resident_lines
from dist_free.evaluation.report import pct

MB = 2**20


def spread(s: dict, scale: float = 1.0, fmt: str = "{:.3g}") -> str:
    """median [min-max] of a summary dict."""
    return (f"{fmt.format(s['median'] * scale)} [{fmt.format(s['min'] * scale)}-"
            f"{fmt.format(s['max'] * scale)}]")


def verdict(t: dict) -> str:
    return f"{t['target']}: {'met' if t['met'] else 'NOT met'}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows]


def ms_or_noise(seconds: float) -> str:
    # A difference of two medians (natural step - fwd/bwd, input-grad fwd/bwd - fwd/bwd) can come
    # out below zero when the part is smaller than the rounds' spread: say so rather than print a
    # negative time.
    return f"{seconds * 1e3:.3g}" if seconds > 0 else "below noise"


def step_lines(step: dict) -> list[str]:
    rows = []
    for dtype, s in step.items():
        if not isinstance(s, dict) or "ratios" not in s:
            continue
        r, b, t = s["ratios"], s["breakdown"], s["targets"]
        rows.append([dtype, spread(s["seconds"]["natural_step"], 1e3),
                     spread(r["free_replay/natural_step"]) + f" ({verdict(t['free_replay_vs_natural'])})",
                     spread(r["pgd7_step/natural_step"]) + f" ({verdict(t['pgd7_vs_natural'])})",
                     spread(r["fgsm_rs_step/natural_step"]) + f" ({verdict(t['fgsm_rs_vs_natural'])})",
                     nfgsm_cell(r, t),
                     ms_or_noise(b["input_grad_extra_s"]), f"{b['update_s'] * 1e3:.3g}",
                     ms_or_noise(b["optimizer_step_s"])])
    first = next(v for v in step.values() if isinstance(v, dict) and "model" in v)
    title = (f"### {{n}}. Step cost: {first['model']}, {first['image_size']} px, batch {first['batch']}, "
             f"free m={first['replays']}; median [min-max] of {first['repeats']} interleaved rounds")
    return [title, ""] + table(
        ["dtype", "natural step ms", "free replay / natural", "PGD-7 / natural", "FGSM-RS / natural",
         "N-FGSM / natural", "input-grad extra ms", "update ms", "optimizer step ms"], rows) + arch_lines(
        step.get("architectures") or {})


def nfgsm_cell(ratios: dict, targets: dict) -> str:
    # Results measured before N-FGSM joined the table have no such column.
    if "nfgsm_step/natural_step" not in ratios:
        return "not measured"
    return spread(ratios["nfgsm_step/natural_step"]) + f" ({verdict(targets['nfgsm_vs_natural'])})"


def arch_lines(archs: dict) -> list[str]:
    """The timm rows: a free replay against a natural step on ConvNeXt and ViT."""
    rows = []
    for label, by_dtype in archs.items():
        for dtype, s in by_dtype.items():
            kw = ", ".join(f"{k}={v}" for k, v in s["kwargs"].items())
            rows.append([f"{label}: {s['model']}" + (f" ({kw})" if kw else ""),
                         f"{s['params'] / 1e6:.3g} M", f"{s['image_size']} px, batch {s['batch']}",
                         dtype, spread(s["seconds"]["natural_step"], 1e3),
                         spread(s["ratios"]["free_replay/natural_step"]) +
                         f" ({verdict(s['targets']['free_replay_vs_natural'])})"])
    if not rows:
        return []
    return ["", "Modern architectures (timm; channels_last for ConvNeXt only):", ""] + table(
        ["architecture", "params", "input", "dtype", "natural step ms", "free replay / natural"],
        rows)


def update_lines(u: dict) -> list[str]:
    s = u["seconds"]
    rows = [[name, spread(s[name], 1e3), f"{s[name]['gb_per_s']:.1f}"]
            for name in ("eager", "eager_alloc", "fused", "copy") if name in s]
    return [f"### {{n}}. Perturbation update: {tuple(u['shape'])}, {u['x_dtype']} clean batch, fp32 "
            f"buffer, gradient and replay input; {u['bytes_per_update'] / MB:.3g} MiB moved per update",
            ""] + table(
        ["variant", "ms", "GB/s"], rows) + [
        "", "eager: the trainer's CPU path, scratch reused; eager_alloc: the same code allocating "
        "its scratch per call; fused: torch.compile of the same function.",
        "", f"fused vs eager: {spread(u['fused_speedup'])}x ({verdict(u['targets']['fused_vs_eager'])}); "
        f"reused scratch vs allocating: {spread(u['scratch_speedup'])}x; "
        f"fused at {100 * u['fused_fraction_of_copy']:.0f}% of copy bandwidth "
        f"({verdict(u['targets']['fused_fraction_of_copy_bw'])}); one-off compile {u['compile_s']:.1f} s"]


def ratio_cell(r: dict) -> str:
    lo, hi = r["median_ci95"]
    return f"{r['median']:.4f} [CI {lo:.4f}-{hi:.4f}; IQR/med {pct(r['iqr_over_median'], '.2g')}]"


def floor_lines(fl: dict) -> list[str]:
    rows, notes = [], []
    for dtype, f in fl.items():
        if not isinstance(f, dict) or "ratios" not in f:
            continue
        sec, r, t, parts = f["seconds"], f["ratios"], f["targets"], f["parts"]
        rows.append([dtype] + [f"{sec[k]['median'] * 1e3:.1f}"
                               for k in ("natural_step", "floor", "free_replay")]
                    + [ratio_cell(r["free_replay/floor"]) + f" ({verdict(t['free_replay_vs_floor'])})",
                       ratio_cell(r["floor/natural_step"]),
                       f"{parts['replay_elementwise_s'] * 1e3:.3g} vs "
                       f"{parts['floor_elementwise_s'] * 1e3:.3g} ms: {100 * parts['gap_over_floor']:+.2f}% "
                       f"({verdict(t['bottom_up_gap'])})"])
        if "profile" in f:
            tot = f["profile"]["totals"]
            rep, flo = tot["free_replay"], tot["floor"]
            gaps = [f"{op.removeprefix('aten::')} {d['free_replay']['self_ms'] - d['floor']['self_ms']:+.2f}"
                    for op, d in list(f["profile"]["largest_differences"].items())[:5]]
            notes.append(f"{dtype}: allocations kept by top-level ops per pass: replay "
                         f"{rep['allocations']:.1f} ({rep['alloc_bytes'] / MB:.2f} MiB), floor "
                         f"{flo['allocations']:.1f} ({flo['alloc_bytes'] / MB:.2f} MiB); largest per-op "
                         f"self-time differences (replay - floor, ms per pass): " + ", ".join(gaps))
    first = next(v for v in fl.values() if isinstance(v, dict) and "model" in v)
    return [f"### {{n}}. Replay vs its floor: {first['model']}, {first['image_size']} px, batch "
            f"{first['batch']}, m={first['replays']}, {first['threads']} threads; one pass of each per "
            f"round, {first['rounds']} rounds (order rotated), ratios paired per round: median [95% CI "
            "of the median; IQR/median of the rounds]", ""] + table(
        ["dtype", "natural step ms", "floor ms", "replay ms", "replay / floor", "floor / natural",
         "bottom up: element-wise work per replay vs floor"], rows) + [
        "", "floor = a natural step on the replay input that also takes the input gradient, then the "
        "fused (torch.compile) perturbation update; replay = a FreeAdversarialTrainer.train_step with "
        "m = 1 (the same element-wise work per replay as at any m). Bottom up: the trainer's "
        "element-wise work per replay at the configured m (first input, updates) against the fused "
        "update, each timed alone; the gap as a share of the floor."] + (
        [""] + [f"- {n}" for n in notes] if notes else [])


def reference_lines(ref: dict) -> list[str]:
    if "skipped" in ref:
        return ["### {n}. Against the authors' loop", "", ref["skipped"]]
    ips, r = ref["images_per_s"], ref["ratios"]
    rows = [[name, ref[name], spread(ips[name], fmt="{:.2f}")]
            for name in ("reference", "ours_fp32", "ours_recommended")]
    return [f"### {{n}}. Against the authors' loop, end to end: free m={ref['replays']}, eps "
            f"{ref['eps'] * 255:.3g}/255, {ref['model']} {ref['image_size']} px, batch {ref['batch']}, same "
            f"JPEGs; {ref['batches_per_run']} batches per run, steady state, {ref['rounds']} interleaved "
            "rounds", ""] + table(
        ["loop", "settings", "images/s"], rows) + [
        "", f"ours (recommended) / reference: {spread(r['ours_recommended/reference'])}x "
        f"({verdict(ref['targets']['recommended_vs_reference'])}); ours fp32 / reference: "
        f"{spread(r['ours_fp32/reference'])}x; recommended / ours fp32: "
        f"{spread(r['ours_recommended/ours_fp32'])}x"]


def pipeline_lines(p: dict) -> list[str]:
    ips = p["images_per_s"]
    rows = [[f"{name} ({p['kinds'][name]})", spread(ips[name], fmt="{:.0f}"),
             f"{p['images_per_s_per_thread'][name]:.0f}"] for name in ips]
    d = p["dataset"]
    return [f"### {{n}}. Input pipeline: {d['files']} JPEGs (~500x375, q{d['quality']}, "
            f"{d['mean_kb']:.0f} KiB avg, cut from real photos), decode + random-resized-crop "
            f"{p['image_size']} + flip, {p['threads']} threads/workers", ""] + table(
        ["loader", "images/s", "per thread"], rows) + [
        "", f"DALI / DataLoader: {spread(p['dali_vs_dataloader'])} "
        f"({verdict(p['targets']['dali_vs_dataloader'])})"]


def e2e_lines(e: dict) -> list[str]:
    rows = [[f"{name} ({e['kinds'][name]})", f"{e[name]['images_per_s']:.1f}",
             f"{100 * e[name]['data_wait_frac']:.0f}%"] for name in ("jpeg", "synthetic")]
    return [f"### {{n}}. End to end: free m={e['replays']}, {e['model']} {e['image_size']} px, batch "
            f"{e['batch']}, {e['dtype']}", ""] + table(["input", "images/s", "data wait"], rows) + [
        "", f"JPEG / synthetic: {e['jpeg_vs_synthetic']:.2f}"]


def memory_lines(m: dict) -> list[str]:
    rows = [[name, f"{m[name]['peak_bytes'] / MB:.0f}", f"{m[name]['baseline_bytes'] / MB:.0f}",
             f"{m[name]['buffer_bytes'] / MB:.1f}"] for name in ("natural", "free")]
    s = m["settings"]
    return [f"### {{n}}. Memory: {s['model']} {s['image_size']} px, batch {s['batch']}, {s['dtype']} "
            f"({m['free']['measure']})", ""] + table(
        ["method", "peak MiB", "before training MiB", "free training's buffers MiB"], rows) + [
        "", f"free / natural peak: {m['free_vs_natural_peak']:.3f}; buffers are "
        f"{100 * m['buffer_share_of_peak']:.2f}% of free's peak and "
        f"{100 * m['buffer_share_of_training_memory']:.1f}% of its growth during training"]


def share_cell(m: dict) -> str:
    return spread(m["allreduce_share"], 100, "{:.1f}") + "%" if "allreduce_share" in m else "-"


def scaling_lines(sc: dict) -> list[str]:
    rows = []
    for n, run in sc["runs"].items():
        f, nat = run["ranks"][0]["free"], run["ranks"][0]["natural"]
        rows.append([n, run["threads_per_rank"],
                     " / ".join(f"{r['free']['images_per_s_per_rank']:.0f}" for r in run["ranks"]),
                     f"{run['free_per_rank_vs_world1']:.2f}", share_cell(f), share_cell(nat),
                     f"{f['allreduce_bytes_per_pass'] / MB:.3f}",
                     f"{nat['allreduce_bytes_per_pass'] / MB:.3f}",
                     f"{f['perturbation_bytes'] / MB:.2f}"])
    s = sc["settings"]
    return [f"### {{n}}. DDP scaling: free m={s['replays']}, {s['model']} {s['image_size']} px, batch "
            f"{s['batch']}/rank, {s['device']}, {s['threads_per_rank']} thread(s) per rank at every world "
            f"size; median of {s.get('rounds', 1)} rounds of {s['steps']} steps", ""] + table(
        ["world", "threads/rank", "free images/s per rank", "per rank vs world 1",
         "all-reduce share, free", "all-reduce share, natural", "all-reduced MiB per free replay",
         "per natural step", "perturbation MiB (never sent)"], rows) + [
        "", "all-reduce share: 1 - (time of the same steps with DDP's all-reduce replaced by a no-op "
        "hook) / (time with it), per round [min-max]; it includes waiting for the slower rank."]


def robust_cell(r: dict) -> str:
    after = r.get("robust_after")
    if not after:
        return f"{r['robust']} of {r['images']}"
    return " -> ".join(f"{name} {n}" for name, n in after.items()) + f" of {r['images']}"


def eval_lines(ev: dict) -> list[str]:
    rows = []
    keys = (("pgd", "PGD"), ("autoattack_fresh", "AutoAttack, fresh network"),
            ("autoattack_unbreakable", "AutoAttack, unbreakable network"))
    for n, run in ev["runs"].items():
        for key, label in keys:
            per_rank = " / ".join(f"{r[key]['images_per_s']:.3g}" for r in run["ranks"])
            rows.append([n, label, per_rank, f"{run[f'{key}_images_per_s_total']:.3g}",
                         robust_cell(run["ranks"][0][key])])
    s = ev["settings"]
    src = ev["runs"]["1"]["ranks"][0].get("autoattack_source", "")
    return [f"### {{n}}. Evaluation throughput: {s['model']} {s['image_size']} px, {s['classes']} classes, "
            f"eps {s['eps'] * 255:.3g}/255, {s['threads_per_rank']} thread per rank", ""] + table(
        ["world", "attack", "images/s per rank", "images/s total", "robust (rank 0)"], rows) + [
        "", f"PGD: dist_free.engine.attacks.robust_correct, {s['pgd_steps']} steps x {s['pgd_restarts']} "
        f"restart(s), batch {s['batch']}/rank; its cost does not depend on the model's robustness. "
        f"AutoAttack: standard L-inf via {src}, one run per rank; each attack runs only on the images "
        f"the earlier ones left robust, so its cost grows with robust accuracy. Fresh network: "
        f"{s['batch']} images/rank labelled with its own predictions (robust count after each attack "
        f"shown); unbreakable network: the same one with its last layer shrunk, "
        f"{s['aa_batch_never']} images/rank, every attack in full on every image (the upper bound)."]


LINES = {"step": step_lines, "floor": floor_lines, "update": update_lines,
         "pipeline": pipeline_lines, "e2e": e2e_lines, "reference": reference_lines,
         "memory": memory_lines, "scaling": scaling_lines, "eval": eval_lines,
         "resident": resident_lines}


def format_table(result: dict) -> str:
    env = result["environment"]
    out = [f"## {env['device']}", "",
           f"commit {env['commit']}, torch {env['torch']}, DALI {env['dali']}, Python {env['python']}, "
           f"{env['torch_threads']} torch threads, {env['date']}", "", f"    {env['command']}", ""]
    n = 0
    for part, lines in LINES.items():
        if part in result:
            n += 1
            body = lines(result[part])
            out += [body[0].replace("{n}", str(n))] + body[1:] + [""]
    return "\n".join(out).rstrip() + "\n"


def gpu_check_table(result: dict) -> str:
    """`--gpu-check`'s run as Markdown for bench/RESULTS.md: what it ran on, then one row per
    check with its status and figure, each speed or memory figure beside its floor."""
    env, sizes = result["environment"], result["sizes"]
    summary = result.get("summary") or {k: sum(c["status"] == k for c in result["checks"].values())
                                        for k in ("PASS", "FAIL", "SKIP")}
    total = f" in {result['total_s']:.0f} s" if "total_s" in result else " (cut short)"
    head = [f"## {env.get('gpu') or env['device']} (GPU check)", "",
            f"{env.get('gpu') or env['device']}, driver {env.get('driver') or 'n/a'}, torch "
            f"{env['torch']}, CUDA {env['cuda']}, DALI {env['dali'] or 'not importable'}, Python "
            f"{env['python']}; speed checks {sizes['model']} {sizes['image_size']} px, batch "
            f"{sizes['batch']}, {sizes['dtype']}; commit {env['commit']}, {env['date']}.",
            f"{summary['PASS']} PASS, {summary['FAIL']} FAIL, {summary['SKIP']} SKIP{total}.", ""]
    rows = [[f"`{name}`", c["status"], c["figure"].replace("|", "/"), f"{c['check_s']:.0f}"]
            for name, c in result["checks"].items()]
    return "\n".join(head + table(["check", "status", "figure (floors beside their figures)", "s"],
                                  rows)) + "\n"


def markers(device: str) -> tuple[str, str]:
    return f"<!-- bench: {device} -->", f"<!-- /bench: {device} -->"


def update_results_md(path: Path, result: dict, table_text: str, json_path: Path) -> None:
    """Replace this device's section (between its markers) or append one; other devices stay."""
    start, end = markers(result["environment"]["device"])
    block = f"{start}\n{table_text}\nJSON: `{json_path}`\n{end}"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
