"""The frontier of `bench compress`: each variant's graphs (ONNX fp32 and int8, scored on the whole test set), their
throughput in one process (batch 1 and 64, the graphs taking turns), the issue's goals against what was measured,
and the table, JSON and plot."""
from __future__ import annotations

import json
import time
from pathlib import Path

from ..fileio import atomic_write, sha256, write_json

GOALS = {"distill_lift": 0.01, "pruned_flops": 0.3, "pruned_gap": 0.01, "int8_speedup": 4.0, "int8_gap": 0.015}


def graphs(ckpt: Path, data: str, calibration: int, stem: Path) -> tuple[dict, bytes, bytes]:
    """The model's size, FLOPs and test accuracy as fp32 and int8 ONNX graphs (reused while `ckpt` is the same
    file); the two graphs."""
    fp32_path, int8_path, info_path = stem.with_suffix(".onnx"), stem.with_name(stem.name + "-int8.onnx"), \
        stem.with_suffix(".json")
    digest = sha256(ckpt)
    if info_path.is_file() and json.loads(info_path.read_text()).get("sha256") == digest:
        return json.loads(info_path.read_text()), fp32_path.read_bytes(), int8_path.read_bytes()
    from .. import export, quantize, rewrite, verify
    from ..models import widths

    model, mf, cfg = export.pixel_model(str(ckpt), [f"data.dir={data}"], False)
    size = tuple(mf.image_shape or (32, 32))
    net = export.bare(model)
    graph_model, _ = rewrite.for_export(model, size)
    fp32 = export.export_onnx(graph_model, export.metadata(mf, mf.config, size, net), size, str(fp32_path))
    int8 = quantize.quantize_int8(fp32, quantize.calibration_images(cfg, calibration))
    test = verify.score_test_set(model, {"fp32": fp32, "int8": int8}, "int8", verify.open_betons(cfg), cfg)
    info = {"sha256": digest, "checkpoint": str(ckpt), "params": widths.parameters(net),
            "flops": widths.flops(net, size), "top1": test["top1"], "size": list(size)}
    stem.parent.mkdir(parents=True, exist_ok=True)
    for path, data_ in ((fp32_path, fp32), (int8_path, int8)):
        atomic_write(path, lambda f, d=data_: f.write(d))
    write_json(info_path, info)
    return info, fp32, int8


def speeds(sessions: dict, data: str, size: tuple[int, int], seconds: float) -> dict:
    """img/s (mean, std over 5 rounds) of every graph at batch 1 and 64, all taking turns in each round."""
    from .. import quantize, verify
    from ..config import load_config

    cfg = load_config(None, [f"data.dir={data}", "run.dir=unused"])  # the test images, read as evaluation does
    x = verify.check_sample(verify.open_betons(cfg), cfg, 64)[0]
    assert tuple(x.shape[-2:]) == size, (x.shape, size)
    return {b: quantize.throughput(sessions, x, b, seconds=seconds) for b in (1, 64)}


def measure(variants: list, args, skipped: list[str]) -> dict:
    from .. import quantize

    out, rows, sessions = Path(args.out), [], {}
    for v in variants:
        ckpt = v.checkpoint()
        row = {"variant": v.name, "how": v.how, **v.measured, "commands": v.commands}
        if ckpt is not None:
            t0 = time.perf_counter()
            info, fp32, int8 = graphs(ckpt, args.data, args.calibration, out / "onnx" / v.name)
            row.update({k: info[k] for k in ("params", "flops", "top1", "size")})
            if v.file is not None:  # a given model: its accuracy on this test set, as PyTorch computes it
                row.update({"acc_mean": info["top1"]["pytorch"], "acc_std": 0.0, "seeds": 1})
            sessions[(v.name, "fp32")], sessions[(v.name, "int8")] = quantize.session(fp32), quantize.session(int8)
            print(f"[{v.name}] graphs in {time.perf_counter() - t0:.0f} s: test top-1 " +
                  ", ".join(f"{k} {a:.4f}" for k, a in info["top1"].items()), flush=True)
        rows.append(row)
    if sessions:
        size = tuple(next(r["size"] for r in rows if "size" in r))
        for batch, rates in speeds(sessions, args.data, size, args.speed_seconds).items():
            for (name, kind), (mean, std) in rates.items():
                row = next(r for r in rows if r["variant"] == name)
                row[f"{kind}_img_per_s_b{batch}"], row[f"{kind}_img_per_s_b{batch}_std"] = mean, std
    teacher = rows[0]
    for r in rows:
        if "flops" in r and "flops" in teacher:
            r["flops_share"] = r["flops"] / teacher["flops"]
        if "int8_img_per_s_b64" in r and "fp32_img_per_s_b64" in teacher:
            r["int8_b64_vs_teacher_fp32"] = r["int8_img_per_s_b64"] / teacher["fp32_img_per_s_b64"]
    from .report import hardware

    return {"rows": rows, "goals": goals(rows), "skipped": skipped, "hardware": hardware(),
            "date": time.strftime("%Y-%m-%d"), "settings": {k: v for k, v in vars(args).items()}}


def goals(rows: list[dict]) -> list[dict]:
    """Each goal of the issue, with the figures it was judged on (None where a variant is missing)."""
    by = {r["variant"]: r for r in rows}
    t, small, kd = by.get("teacher", {}), by.get("small", {}), by.get("small+kd", {})
    out = []
    if "acc_mean" in small and "acc_mean" in kd:
        lift = kd["acc_mean"] - small["acc_mean"]
        out.append({"goal": f"distillation lifts the small model by >= {GOALS['distill_lift']:.1%}",
                    "met": lift >= GOALS["distill_lift"], "measured": f"{lift:+.2%} ({kd['acc_mean']:.2%} against "
                                                                      f"{small['acc_mean']:.2%})"})
    pruned = [r for r in rows if r["variant"].startswith("pruned") and "acc_mean" in r
              and r.get("flops_share", 1) <= GOALS["pruned_flops"]]
    if not pruned or "acc_mean" not in t:
        out.append({"goal": f"a pruned model at <= {GOALS['pruned_flops']}x the teacher's FLOPs", "met": False,
                    "measured": "none: every ratio kept more FLOPs, or a run is missing"})
        return out
    p = max(pruned, key=lambda r: r["acc_mean"])
    gap = t["acc_mean"] - p["acc_mean"]
    out.append({"goal": f"{p['variant']} ({p['flops_share']:.2f}x FLOPs) within {GOALS['pruned_gap']:.1%} of the "
                        "teacher", "met": gap <= GOALS["pruned_gap"],
                "measured": f"{p['acc_mean']:.2%} against {t['acc_mean']:.2%} ({-gap:+.2%})"})
    if "acc_mean" in small:
        out.append({"goal": f"{p['variant']} beats the small model trained alone ({small.get('flops_share', 0):.2f}x "
                            "FLOPs)", "met": p["acc_mean"] > small["acc_mean"],
                    "measured": f"{p['acc_mean']:.2%} against {small['acc_mean']:.2%}"})
    if "int8_b64_vs_teacher_fp32" in p:
        int8_gap = t["acc_mean"] - p["top1"]["int8"]
        out.append({"goal": f"{p['variant']} in int8 >= {GOALS['int8_speedup']:g}x the teacher's fp32 graph at batch "
                            f"64, within {GOALS['int8_gap']:.1%}",
                    "met": p["int8_b64_vs_teacher_fp32"] >= GOALS["int8_speedup"] and int8_gap <= GOALS["int8_gap"],
                    "measured": f"{p['int8_b64_vs_teacher_fp32']:.2f}x, int8 top-1 {p['top1']['int8']:.2%} "
                                f"({-int8_gap:+.2%})"})
    return out


def _rate(r: dict, kind: str, b: int) -> str:
    key = f"{kind}_img_per_s_b{b}"
    return f"{r[key]:.0f} ± {r[key + '_std']:.0f}" if key in r else "-"


def markdown(result: dict) -> str:
    h = result["hardware"]
    lines = [f"Measured {h['date']} on {h['cpu']} ({h['cores']} cores), torch {h['torch']}, commit {h['commit']}; "
             f"{result.get('total_s', 0) / 60:.0f} min in all.", "",
             "| variant | how | test acc (runs: mean ± std, seeds) | train s (mean) | int8 graph acc | params | "
             "MFLOPs | FLOPs × teacher | img/s b1 fp32 | b1 int8 | img/s b64 fp32 | b64 int8 | "
             "int8 b64 × teacher fp32 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        acc = f"{r['acc_mean']:.2%} ± {r['acc_std']:.2%} ({r['seeds']})" if "acc_mean" in r else "not run"
        times = [t for t in r.get("train_time_s") or [] if t]
        lines.append(" | ".join([
            f"| {r['variant']}", r["how"], acc, f"{sum(times) / len(times):.0f}" if times else "-",
            f"{r['top1']['int8']:.2%}" if "top1" in r else "-",
            f"{r['params']:,}" if "params" in r else "-", f"{r['flops'] / 1e6:.1f}" if "flops" in r else "-",
            f"{r['flops_share']:.2f}" if "flops_share" in r else "-", _rate(r, "fp32", 1), _rate(r, "int8", 1),
            _rate(r, "fp32", 64), _rate(r, "int8", 64),
            f"{r['int8_b64_vs_teacher_fp32']:.2f}x |" if "int8_b64_vs_teacher_fp32" in r else "- |"]))
    lines += ["", "Goals:", *[f"- {'met' if g['met'] else 'missed'}: {g['goal']}: {g['measured']}"
                              for g in result["goals"]]]
    if result["skipped"]:
        lines.append(f"- not run (deadline or failure; see logs/): {', '.join(result['skipped'])}")
    lines += ["", "Commands (each run's; `bench compress` runs them all):", "", "```bash", result["command"],
              *[c for r in result["rows"] for c in r["commands"]], "```", ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Test accuracy against img/s at batch 64: one point per variant and graph, fp32 circles, int8 triangles."""
    from ..plot import _pyplot, save_figure

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, marker in (("fp32", "o"), ("int8", "^")):
        pts = [(r[f"{kind}_img_per_s_b64"], r["acc_mean"] if kind == "fp32" else r["top1"]["int8"], r["variant"])
               for r in result["rows"] if f"{kind}_img_per_s_b64" in r and "acc_mean" in r]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, s=50, label=f"{kind} graph")
        for x, y, name in pts:
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("onnxruntime img/s at batch 64 (this CPU, log scale)")
    ax.set_ylabel("CIFAR-10 test accuracy")
    ax.set_title(f"accuracy against speed, {result['hardware']['cpu'][:40]}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def write(result: dict, out: Path) -> None:
    text = markdown(result)
    write_json(out / "frontier.json", result)
    atomic_write(out / "frontier.md", lambda f: f.write(text.encode()))
    if any("fp32_img_per_s_b64" in r for r in result["rows"]):
        plot(result, out / "frontier.png")
    print(text, flush=True)
