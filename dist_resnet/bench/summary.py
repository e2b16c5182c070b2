"""report.md from report.json: the hardware, then each part's figures (mean ± std where it has several
runs or repeats), its status and the command that made it."""
from __future__ import annotations


def pm(mean, std, digits: int = 1, scale: float = 1.0, unit: str = "") -> str:
    if mean is None:
        return "n/a"
    text = f"{mean * scale:,.{digits}f}"
    return text + (f" ± {std * scale:,.{digits}f}" if std is not None else "") + unit


def tta_rows(m: dict) -> list[tuple[str, str]]:
    if m["ran"] == 1:  # one run has no spread
        m = {**m, "acc_std": None, "train_time_s_std": None, "time_to_target_s_std": None}
    rows = [("seeds run (of asked)", f"{m['ran']} of {m['seeds']}" +
             (f"; skipped {m['skipped_seeds']} (time budget)" if m.get("skipped_seeds") else "")),
            ("test accuracy", pm(m["acc_mean"], m["acc_std"], 2, 100, " %")),
            ("training time (warm-up excluded)", pm(m.get("train_time_s_mean"), m.get("train_time_s_std"), 2,
                                                     unit=" s")),
            (f"time to {m['target']:.1%} (reached in {m['reached']} of {m['ran']})",
             pm(m["time_to_target_s_mean"], m["time_to_target_s_std"], 2, unit=" s"))]
    warm = [r["warmup_s"] for r in m["runs"] if r.get("warmup_s") is not None]
    if warm:
        rows.append(("warm-up per run (compile, untimed)", ", ".join(f"{w:.1f}" for w in warm) + " s"))
    return rows


def throughput_rows(m: dict) -> list[tuple[str, str]]:
    rows = []
    for r in m["rows"]:
        if "img_per_s" in r:
            mfu = f", MFU {r['mfu']:.1%}" if r.get("mfu") else ""
            rows.append((r["variant"], pm(r["img_per_s"], r["img_per_s_std"], 0, unit=" img/s") +
                         f" ({r.get('precision', '?')}; warm-up {r['warmup_s']:.1f} s; an epoch's steps "
                         f"{r['epoch_s']:.1f} s{mfu})"))
        else:
            rows.append((r["variant"], r.get("error") or f"skipped ({r.get('skipped')})"))
    by_precision = {}
    for r in m["rows"]:  # the first row of each precision that ran, except the no-data row
        if r.get("img_per_s") and "fixed batch" not in r["variant"]:
            by_precision.setdefault(r["precision"], r["img_per_s"])
    for low in ("bf16", "fp16"):
        if low in by_precision and "fp32" in by_precision:
            rows.append((f"{low} against fp32", f"{by_precision[low] / by_precision['fp32']:.2f}x"))
    if m.get("breakdown_skipped"):
        rows.append(("step breakdown", f"skipped ({m['breakdown_skipped']})"))
    for b in m.get("breakdown", []):
        share = b.get("share_of_step", b.get("share_of_epoch"))
        rows.append((f"step: {b['component']}", pm(b["ms_per_step"], b["ms_std"], 2, unit=" ms") +
                     (f" ({share:.0%})" if share is not None else "") + (f" — {b['note']}" if b.get("note") else "")))
    return rows


def loader_rows(m: dict) -> list[tuple[str, str]]:
    return [("images/s into the device", pm(m["img_per_s"], m["img_per_s_std"], 0) +
             f" over {m['epochs']} epochs ({m['pipeline']} pipeline)"),
            ("first epoch (numba compile, first reads)", f"{m['first_epoch_s']:.1f} s")]


def int8_rows(m: dict) -> list[tuple[str, str]]:
    test, speed = m.get("test") or {}, (m.get("int8") or {}).get("speed") or {}
    rows = [(f"{k} graph: test top-1", f"{v:.2%} on {test['images']} images") for k, v in test.get("top1", {}).items()]
    if "int8_fp32_agreement" in test:
        drop = 100 * (test["top1"]["fp32"] - test["top1"]["int8"])
        rows.append(("int8 drop", f"{drop:.2f} points; agreement {test['int8_fp32_agreement']:.2%}"))
    if speed:
        rows.append(("size int8/fp32", f"{speed['size_ratio']:.2f}x"))
    for b in (1, 64):
        if f"speedup_{b}" in speed:
            rows.append((f"img/s at batch {b}, fp32 → int8",
                         f"{pm(speed[f'fp32_img_per_s_b{b}'], speed[f'fp32_img_per_s_b{b}_std'], 0)} → "
                         f"{pm(speed[f'int8_img_per_s_b{b}'], speed[f'int8_img_per_s_b{b}_std'], 0)} "
                         f"({speed[f'speedup_{b}']:.2f}x)"))
    return rows


def profile_rows(m: dict) -> list[tuple[str, str]]:
    rows = [(f"step: {r['part']}", f"{r['ms_per_step']:.2f} ms" + (f" ({r['share']:.0%})" if r["share"] else ""))
            for r in m["split"]]
    for key, where in (("top_device", "device"), ("top_host", "host")):
        rows += [(f"top on the {where}: `{r['op']}`", f"{r['self_ms']:.2f} ms ({r['share']:.0%})") for r in m[key][:5]]
    return rows + [("trace (beside this part's JSON)", ", ".join(f"parts/trace/{t}" for t in m["trace"]))]


def compress_rows(m: dict) -> list[tuple[str, str]]:
    rows = []
    for r in m["rows"]:
        if "acc_mean" in r and "fp32_img_per_s_b64" in r:
            rows.append((f"{r['variant']} ({r['how']})", f"{100 * r['acc_mean']:.2f} % (int8 graph "
                         f"{100 * r['top1']['int8']:.2f} %), {r['flops'] / 1e6:.1f} MFLOPs, img/s at batch 64: fp32 "
                         f"{r['fp32_img_per_s_b64']:.0f}, int8 {r['int8_img_per_s_b64']:.0f}"))
    return rows + [(f"goal: {g['goal']}", f"{'met' if g['met'] else 'missed'}: {g['measured']}") for g in m["goals"]]


def figures(part: dict) -> list[tuple[str, str]]:
    m = part.get("measured")
    kinds = (("goals", compress_rows), ("written", int8_rows), ("rows", throughput_rows), ("runs", tta_rows),
             ("first_epoch_s", loader_rows), ("split", profile_rows))
    return next((rows(m) for key, rows in kinds if key in (m or {})), [])  # each part's JSON has its own key


def markdown(report: dict) -> str:
    h = report["hardware"]
    device = f"{h['gpu']} ({h.get('gpu_memory_gib')} GiB), driver {h.get('driver')}" if h.get("gpu") else "no GPU"
    lines = [f"# bench report ({report['kind']})", "",
             f"- {h['date']}, commit {h.get('commit') or 'unknown'}",
             f"- {device}; CPU {h['cpu']} ({h['cores']} cores; bf16 native: {h['cpu_bf16']['native']}: "
             f"{h['cpu_bf16']['why']})",
             f"- Python {h['python']}, torch {h['torch']}, CUDA {h.get('cuda') or 'none'}",
             f"- budget {report['budget_s']:.0f} s, took {report.get('total_s', 'n/a')} s" +
             (f"; overrides: {' '.join(report['overrides'])}" if report.get("overrides") else ""), ""]
    for part in report["parts"]:
        lines += [f"## {part['name']}: {part['title']}", "",
                  f"{part['status']}" + (f" in {part['seconds']} s" if "seconds" in part else "") +
                  (f": {part['reason']}" if part.get("reason") else ""), ""]
        if part.get("command"):
            lines += ["```", part["command"], "```", ""]
        rows = figures(part)
        if rows:
            lines += ["| figure | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]
    return "\n".join(lines)
