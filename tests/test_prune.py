"""Structured pruning (python -m dist_resnet.prune, dist_resnet/models/widths.py): the pruned model computes what the
original computes with the removed channels zeroed, its FLOPs fall as printed, every loader rebuilds it from the
widths its file records (evaluate, predict, export to safetensors, ONNX fp32 and int8, explain, the card, a
teacher), a fine-tune of it on 2 ranks equals 1 rank, a killed fine-tune resumes bit-exactly, and bad input is one
line (exit 2). The model pruned is the suite's trained run (the cpu preset, 4 epochs on the subset)."""
from __future__ import annotations

import json

import pytest
import torch

from dist_resnet import evaluate, export, predict, prune
from dist_resnet.checkpoint import load
from dist_resnet.models import widths
from dist_resnet.trained import build_trained, open_trained
from tests.conftest import TINY
from tests.launch import launch
from tests.runs import assert_same_run, weights

RATIO = 0.5


@pytest.fixture(scope="module")
def pruned(trained_run, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("prune") / "pruned.pt"
    result = prune.main([str(trained_run / "last.pt"), "--ratio", str(RATIO), "--out", str(out)])
    return {**result, "path": out}


def net_of(path) -> torch.nn.Module:
    mf, trained, cfg = open_trained(str(path), [])
    return build_trained(mf, trained, cfg, len(mf.classes))


def test_the_pruned_model_computes_the_original_with_the_removed_channels_zeroed(pruned, trained_run, source_images):
    """Each kept channel is found in the original by its norm's four numbers (weight, bias, running mean and
    variance); zeroing the scale and shift of every other channel zeroes its activations, which must change
    nothing: the pruned model is the original without them."""
    original, small = net_of(trained_run / "last.pt"), net_of(pruned["path"])
    norms = {n: m for n, m in small.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    removed_total = 0
    with torch.no_grad():
        for name, bn in original.named_modules():
            if not isinstance(bn, torch.nn.BatchNorm2d):
                continue
            full = torch.stack([bn.weight, bn.bias, bn.running_mean, bn.running_var], 1)
            kept = norms[name]
            rows = torch.stack([kept.weight, kept.bias, kept.running_mean, kept.running_var], 1)
            index = [int((full == r).all(1).nonzero()[0]) for r in rows]
            assert len(set(index)) == len(index) == kept.num_features and kept.num_features % 8 == 0  # --round-to
            removed = sorted(set(range(bn.num_features)) - set(index))
            bn.weight[removed], bn.bias[removed] = 0.0, 0.0
            removed_total += len(removed)
    assert removed_total > 0
    mf = open_trained(str(trained_run / "last.pt"), [])[0]
    images = torch.from_numpy(source_images["test"][0][:200]).permute(0, 3, 1, 2).float() / 255
    x = (images - torch.tensor(mf.mean).view(1, 3, 1, 1)) / torch.tensor(mf.std).view(1, 3, 1, 1)
    with torch.no_grad():
        a, b = original(x), small(x)
    print(f"pruned against zeroed original: max |diff| {(a - b).abs().max():.1e} (logits up to {a.abs().max():.2f})")
    torch.testing.assert_close(b, a, atol=1e-5, rtol=0)


def test_the_flops_and_parameters_fall_as_printed_and_the_file_records_every_width(pruned, trained_run):
    original, small = net_of(trained_run / "last.pt"), net_of(pruned["path"])
    before, after = pruned["before"], pruned["after"]
    assert before["flops"] == widths.flops(original, (32, 32)) and after["flops"] == widths.flops(small, (32, 32))
    assert before["params"] == widths.parameters(original) and after["params"] == widths.parameters(small)
    # half the channels of every layer: a quarter of the FLOPs inside, the stem's 3 inputs and the head's 10 outputs
    # kept
    assert 0.2 < pruned["flops_share"] < 0.35 and after["params"] < 0.3 * before["params"]
    state = load(pruned["path"], required=())
    assert state["widths"] == widths.record(small) and state["widths"]["fc"][1] == 10
    assert state["pruned"]["after"]["test_acc"] == after["test_acc"] and after["test_acc"] > 0.1  # better than chance
    assert not any(isinstance(v, torch.nn.Module) for v in state.values())  # weights and ints, no pickled module


def test_taylor_and_global_importance_keep_other_channels(pruned, trained_run, tmp_path):
    out = tmp_path / "taylor.pt"
    result = prune.main([str(trained_run / "last.pt"), "--ratio", str(RATIO), "--out", str(out), "--importance",
                         "taylor", "--scope", "global", "--batches", "2", "--round-to", "1"])
    layer, glob = load(pruned["path"], required=())["widths"], load(out, required=())["widths"]
    assert layer != glob and len({v[-1] for k, v in glob.items() if k.endswith(".0")}) > 2  # widths differ by layer
    assert result["after"]["flops"] < result["before"]["flops"]


def test_every_loader_rebuilds_the_pruned_model(pruned, betons, subset_dir, tmp_path, capsys):
    path = str(pruned["path"])
    assert evaluate.main([path])["test_acc"] == pruned["after"]["test_acc"]
    export.main([path, "--format", "safetensors", "--out", str(tmp_path / "p.safetensors")])
    int8 = export.main([path, "--format", "onnx", "--int8", "--out", str(tmp_path / "p.onnx"), "--verify-test-set",
                        "--calibration", "100", "--speed-seconds", "0.05"])
    top1 = int8["test"]["top1"]
    assert abs(top1["pytorch"] - pruned["after"]["test_acc"]) < 2e-3 and abs(top1["fp32"] - top1["pytorch"]) < 2e-3
    assert int8["check"]["fp32_max_logit_diff"] < 1e-3 and int8["int8"]["speed"]
    card = (tmp_path / "p.onnx.md").read_text()
    assert "structurally pruned to" in card and f"ratio {RATIO:g}, l1 importance (layer)" in card
    capsys.readouterr()
    images = sorted((subset_dir / "test" / "cat").iterdir())[:4]
    tops = []
    for model in (path, str(tmp_path / "p.safetensors"), str(tmp_path / "p.onnx")):
        predict.main([model, *map(str, images), "--json", "--topk", "1"])
        tops.append([json.loads(line)["top"][0]["class"] for line in capsys.readouterr().out.splitlines()])
    assert tops[0] == tops[1] and len(tops[0]) == 4  # the int8 graph may differ on an image
    predict.main([str(tmp_path / "p.safetensors"), str(images[0]), "--explain", str(tmp_path / "explained")])
    assert (tmp_path / "explained" / "index.csv").is_file()


def fine_tune(tiny_betons, run_dir, pruned_path, teacher, *overrides) -> list[str]:
    distil = [f"distill.teacher={teacher}", "distill.alpha=0.5"] if teacher else []
    return [*TINY, f"data.dir={tiny_betons}", f"run.dir={run_dir}", f"model.pretrained={pruned_path}", *distil,
            *overrides]


def test_a_pruned_fine_tune_with_its_teacher_resumes_bit_exactly(pruned, trained_run, tiny_betons, tmp_path):
    opts = ["train.epochs=2", "train.checkpoint_every=4"]
    argv = fine_tune(tiny_betons, tmp_path / "ref", pruned["path"], trained_run / "last.pt", *opts)
    assert launch("dist_resnet.train", argv, tmp_path / "ref.log") == [0]
    argv = fine_tune(tiny_betons, tmp_path / "cut", pruned["path"], trained_run / "last.pt", *opts)
    assert launch("dist_resnet.train", argv, tmp_path / "cut.log", env={"DIST_RESNET_FAULT": "step:13"}) == [-9]
    assert launch("dist_resnet.train", argv + ["train.resume=true"], tmp_path / "resume.log") == [0]
    assert "resumed from" in (tmp_path / "resume.log").read_text()
    assert_same_run(tmp_path / "ref", tmp_path / "cut")
    assert load(tmp_path / "cut" / "last.pt", required=())["widths"] == load(pruned["path"], required=())["widths"]


def test_two_ranks_fine_tune_a_pruned_model_as_one_rank_does(pruned, trained_run, betons, tmp_path):
    """BatchNorm sees half the global batch on each of 2 ranks: 1 rank accumulating 2 micro-batches of that half
    sees the same. 4 steps of 1024 at a small LR, the weights compared (each rank keeps its own running
    statistics, so those are not); measured 2.2e-6 (2.6e-6 with the teacher distilling; 2 ranks against 1
    distilling: tests/test_distill.py)."""
    opts = ["train.epochs=1", "optim.lr=0.02", "train.batch_size=1024"]
    for name, nproc, extra in (("w1", 1, ["train.accum_steps=2"]), ("w2", 2, [])):
        argv = fine_tune(betons, tmp_path / name, pruned["path"], None, *opts, *extra)
        assert launch("dist_resnet.train", argv, tmp_path / f"{name}.log", nproc) == [0] * nproc
    a, b = weights(tmp_path / "w1"), weights(tmp_path / "w2")
    keys = [k for k in a if a[k].is_floating_point() and "running_" not in k]
    va, vb = torch.cat([a[k].flatten() for k in keys]), torch.cat([b[k].flatten() for k in keys])
    rel = ((va - vb).norm() / va.norm()).item()
    print(f"2 ranks against 1 (2 micro-batches), pruned fine-tune: relative L2 {rel:.1e}")
    assert rel < 5e-5 and a["fc.weight"].shape == b["fc.weight"].shape == (10, widths.record(net_of(pruned["path"]))
                                                                          ["fc"][0])


def test_check_refuses_a_pruned_file_for_another_model_in_one_line(pruned, tiny_betons, tmp_path, capsys):
    from dist_resnet import train

    with pytest.raises(SystemExit) as e:
        train.main([*TINY, f"data.dir={tiny_betons}", f"run.dir={tmp_path / 'run'}", "model.name=resnet18",
                    f"model.pretrained={pruned['path']}", "--check"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "records the widths of another model" in err, err
    assert not (tmp_path / "run").exists()


def group_norm_file(trained_run, tmp_path) -> str:
    """The trained run's checkpoint made a GroupNorm model's: its config says so, its weights are a fresh one's."""
    from dist_resnet.models import build_model

    state = load(trained_run / "last.pt")
    state["config"]["model"]["norm"] = "group"
    state["model"], state["widths"] = build_model("resnet9", 10, 16, "group").state_dict(), None
    torch.save(state, tmp_path / "group.pt")
    return str(tmp_path / "group.pt")


@pytest.mark.parametrize("args, message", [
    (["--ratio", "1.2"], "--ratio 1.2 must lie in (0, 1)"),
    (["--ratio", "0.5", "--out", "x.onnx"], "name it *.pt"),
    (["--ratio", "0.5", "--out", "EXISTS"], "exists: choose another path (nothing is overwritten)"),
    (["--ratio", "0.5", "CKPT=missing"], "does not exist"),
    (["--ratio", "0.5", "model.width=8"], "holds a resnet9 (width 16, batch norm)"),
    (["--ratio", "0.5", "CKPT=group"], "is a model.norm=group model: structured pruning takes BatchNorm models"),
])
def test_bad_pruning_input_is_one_line_and_exit_2(trained_run, tmp_path, capsys, args, message):
    ckpt = {"CKPT=missing": str(tmp_path / "missing.pt"), "CKPT=group": group_norm_file(trained_run, tmp_path)}.get(
        args[-1], str(trained_run / "last.pt"))
    args = [a for a in args if not a.startswith("CKPT=")]
    (tmp_path / "exists.pt").write_text("keep me")
    if "--out" not in args:
        args += ["--out", str(tmp_path / "p.pt")]
    args = [str(tmp_path / "exists.pt") if a == "EXISTS" else a for a in args]
    with pytest.raises(SystemExit) as e:
        prune.main([ckpt, *args])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert (tmp_path / "exists.pt").read_text() == "keep me" and not (tmp_path / "p.pt").exists()

