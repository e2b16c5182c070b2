"""dist_resnet.bench on CPU at small sizes: it measures, prints a table and writes JSON."""
import json

import pytest

from dist_resnet import bench
from tests.conftest import TINY


def test_throughput_ablation_and_loader_report(tiny_betons, tmp_path, capsys):
    common = [*TINY, f"data.dir={tiny_betons}"]
    bench.main(["throughput", *common, "--ablate", "--breakdown", "--steps", "1", "--warmup", "1", "--repeats", "2",
                "--out", str(tmp_path / "t.json")])  # the CLI, in-process
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "t.json").read_text())
    rows, parts = result["rows"], result["breakdown"]
    assert [r["variant"] for r in rows] == ["full", "no AMP (fp32)", "no channels_last", "no torch.compile",
                                            "device-resident data", "no data (one fixed batch)"]
    assert all(r["img_per_s"] > 0 and r["repeats"] == 2 for r in rows)
    assert 0.035 < rows[0]["train_gflop_per_img"] < 0.04  # resnet9 width 8: 0.037 GFLOP fwd+bwd per image
    assert "| variant | precision | img_per_s |" in out and "| component | ms_per_step |" in out
    fwd_bwd, optim, data, step, evaluation = parts
    assert step["ms_per_step"] > 0 and fwd_bwd["ms_per_step"] > 0 and 0 < evaluation["share_of_epoch"] < 1
    assert fwd_bwd["ms_per_step"] + optim["ms_per_step"] + data["ms_per_step"] == pytest.approx(step["ms_per_step"])
    bench.main(["loader", *common, "data.pipeline=device", "--epochs", "1", "--out", str(tmp_path / "l.json")])
    r = json.loads((tmp_path / "l.json").read_text())
    assert r["pipeline"] == "device" and r["img_per_s"] > 0 and "| pipeline |" in capsys.readouterr().out


def test_profile_writes_a_trace_the_top_operators_and_the_steps_split(tiny_betons, tmp_path, capsys):
    """bench profile on the tiny cpu run: the trace opens as Chrome-trace JSON (Perfetto, TensorBoard) and
    holds the step's labels; profile.md and the JSON give the split, which adds up to the step, and the
    host's top operators, the convolutions among them."""
    out = tmp_path / "prof"
    bench.main(["profile", *TINY, f"data.dir={tiny_betons}", "--steps", "3", "--warmup", "1",
                "--out", str(out / "profile.json")])
    result = json.loads((out / "profile.json").read_text())
    split = {r["part"]: r for r in result["split"]}
    assert list(split) == ["data wait", "forward", "teacher", "backward", "optimizer", "other host work", "whole step"]
    step = split.pop("whole step")["ms_per_step"]
    assert step > 0 and all(r["ms_per_step"] >= 0 for r in split.values())
    assert split["forward"]["ms_per_step"] > 0 and split["backward"]["ms_per_step"] > 0
    assert sum(r["ms_per_step"] for r in split.values()) == pytest.approx(step)
    ops = [r["op"] for r in result["top_host"]]
    assert any("conv" in op for op in ops) and result["top_device"] == []
    [trace] = (out / "trace").glob("*.pt.trace.json")
    names = {e.get("name") for e in json.loads(trace.read_text())["traceEvents"]}
    assert {"step", "data wait", "forward", "backward", "optimizer"} <= names
    md = (out / "profile.md").read_text()
    assert "| part | ms per step | share |" in md and "| operator | calls | self ms | share |" in md
    assert f"trace/{trace.name}" in md and md.strip() in capsys.readouterr().out


def test_report_on_cpu_measures_each_part_within_its_budget_and_writes_both_files(tiny_betons, tmp_path):
    """`bench report` with tiny settings: the CPU set (precision, the cpu preset's time-to-accuracy, int8 of
    the model it trained, the compression frontier from it), each part a process of its own; report.json and report.md hold the same
    figures, the hardware, and each part's command."""
    from tests.conftest import python_module

    out = tmp_path / "report"
    tiny = [o for o in TINY[2:] if not o.startswith("run.")] + ["train.epochs=1"]
    # the betons as every other command takes them (data.dir=), not only --data
    python_module("dist_resnet.bench", "report", f"data.dir={tiny_betons}", "--out", str(out), "--quick",
                  "--budget-s", "600", *tiny, timeout=700)  # ~130 s; each part's share must cover its start
    report = json.loads((out / "report.json").read_text())
    text = (out / "report.md").read_text()
    assert report["kind"] == "cpu" and report["total_s"] <= 600 + 30
    assert report["hardware"]["cores"] >= 1 and "native" in report["hardware"]["cpu_bf16"]
    parts = {p["name"]: p for p in report["parts"]}
    assert list(parts) == ["precision", "profile", "cpu_tta", "int8", "compress"]
    assert all(p["status"] == "done" for p in parts.values())
    assert (out / "parts" / "profile.md").exists() and list((out / "parts" / "trace").glob("*.json"))
    rows = parts["precision"]["measured"]["rows"]
    assert [r["variant"] for r in rows] == ["train.precision=fp32", "train.precision=bf16"]
    assert [r["precision"] for r in rows] == ["fp32", "bf16"] and all(r["img_per_s"] > 0 for r in rows)
    tta = parts["cpu_tta"]["measured"]
    assert tta["ran"] == 1 and 0 <= tta["acc_mean"] <= 1  # one epoch of 10 steps: about chance
    int8 = parts["int8"]["measured"]["int8"]["speed"]
    assert int8["int8_img_per_s_b64"] > 0 and 0 < int8["size_ratio"] < 0.5
    for p in parts.values():  # each figure's command is in both files
        assert p["command"].startswith("python -m dist_resnet.") and p["command"] in text
    assert f"{tta['acc_mean'] * 100:.2f}" in text and "bf16 against fp32" in text and "img/s at batch 64" in text
    assert "step: backward" in text and "top on the host" in text
    compress_part(parts["compress"], out / "compress", text)


def compress_part(part: dict, out, text: str) -> None:
    """bench compress, as the report's part runs it: the cpu preset's model (here 1 tiny epoch) as the teacher, a
    width-8 student alone and distilled, the teacher pruned at 0.5 and fine-tuned with it distilling; each variant's
    fp32 and int8 graphs scored on the test set and timed together; the table, the goals and the plot. The command
    the report names, run again, reuses every run and graph (only the speeds are measured again)."""
    import shlex

    from dist_resnet.bench import compress

    result = part["measured"]
    rows = {r["variant"]: r for r in result["rows"]}
    assert list(rows) == ["teacher", "small", "small+kd", "pruned-0.5"] and not result["skipped"]
    for r in rows.values():
        assert r["fp32_img_per_s_b64"] > 0 and r["int8_img_per_s_b1"] > 0 and 0 < r["top1"]["int8"] <= 1
        assert all(c.startswith("python -m dist_resnet.") for c in r["commands"])
        assert r["commands"] or r["variant"] == "teacher"  # a given teacher has no command here
        assert 0 <= r["acc_mean"] <= 1 and f"| {r['variant']} |" in (out / "frontier.md").read_text()
    # the teacher's channels halved (rounded to a multiple of 4 here): a quarter of its FLOPs, near enough
    assert 0.2 < rows["pruned-0.5"]["flops_share"] < 0.35 and rows["small"]["flops_share"] == 1.0  # both width 8
    assert rows["teacher"]["top1"]["fp32"] == pytest.approx(rows["teacher"]["top1"]["pytorch"], abs=0.01)
    assert len(result["goals"]) == 4 and all(g["measured"] for g in result["goals"])
    assert "goal: distillation lifts" in text and "python -m dist_resnet.prune" in (out / "frontier.md").read_text()
    assert (out / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    again = compress.main(shlex.split(part["command"])[4:])  # after "python -m dist_resnet.bench compress"
    assert [r["acc_mean"] for r in again["rows"]] == [r["acc_mean"] for r in result["rows"]]


def test_a_report_part_past_its_budget_is_stopped_and_said_so(tiny_betons, tmp_path):
    """A part gets its share of the budget: one that would run longer is stopped (its process group
    killed), and the report says so and goes on to the next part, which is skipped for lack of time."""
    from tests.conftest import python_module

    out = tmp_path / "report"
    slow = [o for o in TINY[2:] if not o.startswith("run.")] + ["train.epochs=2000"]
    python_module("dist_resnet.bench", "report", "--data", str(tiny_betons), "--out", str(out), "--only",
                  "cpu_tta,int8", "--budget-s", "16", *slow, timeout=120)
    parts = {p["name"]: p for p in json.loads((out / "report.json").read_text())["parts"]}
    assert parts["cpu_tta"]["status"] == "stopped at the time budget" and parts["cpu_tta"]["seconds"] < 16
    assert parts["int8"]["status"] == "skipped" and "cpu_tta" in parts["int8"]["reason"]
    assert "stopped at the time budget" in (out / "report.md").read_text()


def test_the_side_by_side_script_feeds_airbench_the_betons_and_runs_the_preset(tiny_betons, tmp_path):
    """docs/reports/side_by_side.py at tiny settings, without CUDA: airbench's data files hold the betons'
    images and labels in their order; its script is changed in its run count only, and its table's final rows
    are read; the preset's side runs through bench tta and lands in the Markdown table."""
    import importlib.util

    import numpy as np
    import torch

    from dist_resnet.data import beton
    from tests.conftest import ROOT

    spec = importlib.util.spec_from_file_location("side_by_side", ROOT / "docs" / "reports" / "side_by_side.py")
    sbs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sbs)
    sbs.airbench_data(tiny_betons, tmp_path / "cifar10")
    train = torch.load(tmp_path / "cifar10" / "train.pt")
    images, labels = beton.read_raw(str(tiny_betons / "train.beton"), np.arange(1000))
    assert train["images"].shape == (1000, 32, 32, 3) and train["images"].dtype == torch.uint8
    assert np.array_equal(train["images"].numpy(), images) and np.array_equal(train["labels"].numpy(), labels)
    assert train["classes"][:2] == ["airplane", "automobile"] and torch.load(tmp_path / "cifar10" / "test.pt")["images"].shape[0] == 200
    source = "x = 1\n    accs = torch.tensor([main(run, model) for run in range(200)])\n"
    assert sbs.patched(source, 5) == source.replace("range(200)", "range(5)")
    with pytest.raises(SystemExit, match="range"):
        sbs.patched("print(1)", 5)
    log = ("|  run   |  epoch  |  train_acc  |  val_acc  |  tta_val_acc  |  time_seconds  |\n"
           "|     0  |      8  |     0.9690  |   0.9390  |               |        2.4501  |\n"
           "|        |   eval  |     0.9690  |   0.9390  |       0.9401  |        2.5900  |\n")
    assert sbs.airbench_results(log) == [{"tta_val_acc": 0.9401, "time_seconds": 2.59}]
    tiny = ["model.width=8", "train.batch_size=100", "data.num_workers=1", "train.epochs=1", "model.compile=false",
            "train.warmup_steps=0", "train.device=cpu", "train.precision=fp32", "run.pictures=false"]
    result = sbs.main(["--betons", str(tiny_betons), "--no-airbench", "--seeds", "1", "--out", str(tmp_path / "sbs"),
                       *tiny])
    [fast] = result["rows"]
    assert fast["runs"] == 1 and 0 <= fast["acc_mean"] <= 1 and fast["time_s_mean"] > 0
    assert "| configs/fast.yaml | 1 |" in (tmp_path / "sbs" / "side_by_side.md").read_text()

