"""The bench's printed table (Markdown, so it pastes into bench/RESULTS.md as is) and the
per-device section of RESULTS.md that `--results-md` refreshes in place."""

from __future__ import annotations

from pathlib import Path

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
    # A difference of two medians (natural step - fwd/bwd) can come out below zero when the part
    # is smaller than the rounds' spread: say so rather than print a negative time.
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
                     f"{b['input_grad_extra_s'] * 1e3:.3g}", f"{b['update_s'] * 1e3:.3g}",
                     ms_or_noise(b["optimizer_step_s"])])
    first = next(v for v in step.values() if isinstance(v, dict) and "model" in v)
    title = (f"### 1. Step cost: {first['model']}, {first['image_size']} px, batch {first['batch']}, "
             f"free m={first['replays']}; median [min-max] of {first['repeats']} interleaved rounds")
    return [title, ""] + table(
        ["dtype", "natural step ms", "free replay / natural", "PGD-7 / natural", "FGSM-RS / natural",
         "input-grad extra ms", "update ms", "optimizer step ms"], rows)


def update_lines(u: dict) -> list[str]:
    s = u["seconds"]
    rows = [[name, spread(s[name], 1e3), f"{s[name]['gb_per_s']:.1f}"] for name in ("eager", "fused", "copy")]
    return [f"### 2. Perturbation update: {tuple(u['shape'])}, fp32 buffer, {u['grad_and_output_dtype']} "
            f"gradient and output; {u['bytes_per_update'] / MB:.3g} MiB moved per update", ""] + table(
        ["variant", "ms", "GB/s"], rows) + [
        "", f"fused vs eager: {spread(u['fused_speedup'])}x ({verdict(u['targets']['fused_vs_eager'])}); "
        f"fused at {100 * u['fused_fraction_of_copy']:.0f}% of copy bandwidth "
        f"({verdict(u['targets']['fused_fraction_of_copy_bw'])}); one-off compile {u['compile_s']:.1f} s"]


def pipeline_lines(p: dict) -> list[str]:
    ips = p["images_per_s"]
    rows = [[f"{name} ({p['kinds'][name]})", spread(ips[name], fmt="{:.0f}"),
             f"{p['images_per_s_per_thread'][name]:.0f}"] for name in ips]
    d = p["dataset"]
    return [f"### 3. Input pipeline: {d['files']} JPEGs (~500x375, q{d['quality']}, "
            f"{d['mean_kb']:.0f} KiB avg, cut from real photos), decode + random-resized-crop "
            f"{p['image_size']} + flip, {p['threads']} threads/workers", ""] + table(
        ["loader", "images/s", "per thread"], rows) + [
        "", f"DALI / DataLoader: {spread(p['dali_vs_dataloader'])} ({verdict(p['targets']['dali_vs_dataloader'])})"]


def e2e_lines(e: dict) -> list[str]:
    rows = [[f"{name} ({e['kinds'][name]})", f"{e[name]['images_per_s']:.1f}",
             f"{100 * e[name]['data_wait_frac']:.0f}%"] for name in ("jpeg", "synthetic")]
    return [f"### 4. End to end: free m={e['replays']}, {e['model']} {e['image_size']} px, batch "
            f"{e['batch']}, {e['dtype']}", ""] + table(["input", "images/s", "data wait"], rows) + [
        "", f"JPEG / synthetic: {e['jpeg_vs_synthetic']:.2f}"]


def memory_lines(m: dict) -> list[str]:
    rows = [[name, f"{m[name]['peak_bytes'] / MB:.0f}", f"{m[name]['baseline_bytes'] / MB:.0f}",
             f"{m[name]['buffer_bytes'] / MB:.1f}"] for name in ("natural", "free")]
    s = m["settings"]
    return [f"### 5. Memory: {s['model']} {s['image_size']} px, batch {s['batch']}, {s['dtype']} "
            f"({m['free']['measure']})", ""] + table(
        ["method", "peak MiB", "before training MiB", "perturbation buffers MiB"], rows) + [
        "", f"free / natural peak: {m['free_vs_natural_peak']:.3f}; buffers are "
        f"{100 * m['buffer_share_of_peak']:.2f}% of free's peak and "
        f"{100 * m['buffer_share_of_training_memory']:.1f}% of its growth during training"]


def scaling_lines(sc: dict) -> list[str]:
    rows = []
    for n, run in sc["runs"].items():
        f, nat = run["ranks"][0]["free"], run["ranks"][0]["natural"]
        rows.append([n, run["threads_per_rank"],
                     " / ".join(f"{r['free']['images_per_s_per_rank']:.0f}" for r in run["ranks"]),
                     f"{run['free_per_rank_vs_world1']:.2f}",
                     f"{f['allreduce_bytes_per_pass'] / MB:.3f}", f"{nat['allreduce_bytes_per_pass'] / MB:.3f}",
                     f"{f['param_bytes'] / MB:.3f}", f"{f['perturbation_bytes'] / MB:.2f}"])
    s = sc["settings"]
    return [f"### 6. Scaling: free m={s['replays']}, {s['model']} {s['image_size']} px, batch {s['batch']}"
            f"/rank, {s['device']}", ""] + table(
        ["world", "threads/rank", "free images/s per rank", "per rank vs world 1",
         "all-reduced MiB per free replay", "per natural step", "param MiB", "perturbation MiB"], rows)


LINES = {"step": step_lines, "update": update_lines, "pipeline": pipeline_lines,
         "e2e": e2e_lines, "memory": memory_lines, "scaling": scaling_lines}


def format_table(result: dict) -> str:
    env = result["environment"]
    out = [f"## {env['device']}", "",
           f"commit {env['commit']}, torch {env['torch']}, DALI {env['dali']}, Python {env['python']}, "
           f"{env['torch_threads']} torch threads, {env['date']}", "", f"    {env['command']}", ""]
    for part, lines in LINES.items():
        if part in result:
            out += lines(result[part]) + [""]
    return "\n".join(out).rstrip() + "\n"


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
