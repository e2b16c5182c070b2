"""Using a trained model: predict on image files, export to ONNX and safetensors, evaluate per class.
All on the suite's one trained checkpoint (the cpu preset, 4 epochs on the committed subset)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dist_resnet import evaluate, export, predict
from tests.conftest import CLASSES


@pytest.fixture(scope="module")
def evaluated(trained_run, betons, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("eval")
    result = evaluate.main([str(trained_run / "last.pt"), f"data.dir={betons}", "--out", str(out / "r.json"),
                            "--confusion", str(out / "confusion.png")])
    return {**result, "png": out / "confusion.png", "json": json.loads((out / "r.json").read_text())}


def test_evaluate_reports_per_class_accuracy_and_the_confusion_matrix(evaluated, trained_run):
    m = json.loads((trained_run / "metrics.json").read_text())
    assert evaluated["test_acc"] == m["test_acc"] and evaluated["json"]["classes"] == CLASSES
    confusion = evaluated["json"]["confusion"]
    assert [sum(row) for row in confusion] == [100] * 10 and sum(confusion[i][i] for i in range(10)) == 1000 * m["test_acc"]
    assert evaluated["per_class_acc"]["airplane"] == confusion[0][0] / 100
    assert evaluated["png"].read_bytes()[:4] == b"\x89PNG"


def predictions(capsys, *args: str) -> list[dict]:
    predict.main([*args, "--json"])
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def confusion_of(preds: list[dict]) -> list[list[int]]:
    m = [[0] * 10 for _ in range(10)]
    for p in preds:
        m[CLASSES.index(Path(p["path"]).parent.name)][CLASSES.index(p["top"][0]["class"])] += 1
    return m


@pytest.fixture(scope="module")
def exported(trained_run, betons, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("export")
    onnx = export.main([str(trained_run / "last.pt"), f"data.dir={betons}", "--format", "onnx", "--out",
                        str(out / "model.onnx"), "--verify-test-set"])
    export.main([str(trained_run / "last.pt"), "--format", "safetensors", "--out", str(out / "model.safetensors")])
    return {"onnx": out / "model.onnx", "safetensors": out / "model.safetensors", "check": onnx}


def test_predict_on_the_jpeg_files_equals_evaluate_on_the_beton(trained_run, subset_dir, evaluated, capsys):
    """The test split's 1,000 real JPEG files, decoded by predict, against the same images from the beton."""
    preds = predictions(capsys, str(trained_run / "last.pt"), str(subset_dir / "test"))
    assert len(preds) == 1000 and len(preds[0]["top"]) == 5
    assert confusion_of(preds) == evaluated["json"]["confusion"]
    assert all(abs(sum(t["prob"] for t in p["top"]) - 1) < 0.5 for p in preds)


def test_onnx_export_is_checked_against_pytorch_and_carries_its_metadata(exported, evaluated):
    import onnx

    check, test = exported["check"]["check"], exported["check"]["test"]
    print(f"ONNX: largest logit difference {check['fp32_max_logit_diff']:.1e}, top-1 agreement "
          f"{check['fp32_top1_agreement']:.3f}; test accuracy PyTorch {test['top1']['pytorch']:.4f}, onnxruntime "
          f"{test['top1']['fp32']:.4f}")
    assert check["fp32_max_logit_diff"] <= 1e-3 and check["fp32_top1_agreement"] == 1.0 and check["images"] == 256
    assert set(check["per_class"].values()) <= {25, 26} and len(check["per_class"]) == 10  # every class, stratified
    assert test["top1"]["pytorch"] == evaluated["test_acc"] and test["top1"]["fp32"] == evaluated["test_acc"]
    model = onnx.load(str(exported["onnx"]))
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["classes"]) == CLASSES and json.loads(meta["input_size"]) == [32, 32]
    assert len(meta["source_sha256"]) == 64 and meta["dist_resnet_version"]
    batch = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.dim_value  # a dynamic batch


def test_onnx_and_safetensors_files_predict_like_the_checkpoint(trained_run, exported, subset_dir, capsys):
    images = str(subset_dir / "test" / "cat")
    ref = predictions(capsys, str(trained_run / "last.pt"), images)
    for kind in ("onnx", "safetensors"):
        got = predictions(capsys, str(exported[kind]), images)
        assert [p["top"][0]["class"] for p in got] == [p["top"][0]["class"] for p in ref], kind
        assert max(abs(a["top"][0]["prob"] - b["top"][0]["prob"]) for a, b in zip(got, ref)) < 1e-4, kind


def test_an_export_that_computes_something_else_is_refused(trained_run, betons, tmp_path, capsys, monkeypatch):
    """A graph whose output differs from the model's by more than 1e-3 exits 1 and writes nothing."""
    real = export.export_onnx

    def wrong(model, meta, size, out):
        with torch.no_grad():
            model.net.fc.weight.mul_(1.01)  # the graph is made from a model that is not quite this one
        try:
            return real(model, meta, size, out)
        finally:
            with torch.no_grad():
                model.net.fc.weight.div_(1.01)

    monkeypatch.setattr(export, "export_onnx", wrong)
    with pytest.raises(SystemExit) as e:
        export.main([str(trained_run / "last.pt"), f"data.dir={betons}", "--format", "onnx", "--out",
                     str(tmp_path / "m.onnx")])
    assert e.value.code == 1 and "does not compute what the model does" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


def test_predict_reports_bad_files_and_still_predicts_the_rest(trained_run, subset_dir, tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "mixed"
    folder.mkdir()
    good = sorted((subset_dir / "test" / "ship").iterdir())[:3]
    for f in good:
        shutil.copy(f, folder / f.name)
    (folder / "notes.jpg").write_text("not an image")
    (folder / "cut.jpg").write_bytes(good[0].read_bytes()[:200])  # truncated
    with Image.open(good[1]) as im:
        im.resize((64, 48)).convert("L").save(folder / "gray.png")  # another size and mode
    with pytest.raises(SystemExit) as e:
        predict.main([str(trained_run / "last.pt"), str(folder), "--topk", "3"])
    out, err = capsys.readouterr()
    assert e.value.code == 2
    lines = out.splitlines()
    assert len(lines) == 4 and all(len(line.split("\t")) == 4 for line in lines)  # 3 JPEGs + the resized PNG
    assert "notes.jpg: not a readable image" in err and "cut.jpg: not a readable image" in err
    assert err.count("resized to the model's 32x32") == 1 and "2 of 6 files could not be read" in err


def test_predict_and_export_refuse_what_they_cannot_use(trained_run, exported, betons, tmp_path, capsys):
    """(A crafted pickle, through every entry point: test_reliability.py.)"""
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    (tmp_path / "empty").mkdir()
    for main, args, message in (
            (predict.main, [str(tmp_path / "junk.onnx"), str(tmp_path)], "is not a readable ONNX model"),
            (predict.main, [str(trained_run / "last.pt"), str(tmp_path / "empty")], "no image files found"),
            (predict.main, [str(trained_run / "last.pt"), str(tmp_path), "--device", "cuda"], "CUDA is not available"),
            (export.main, [str(trained_run / "last.pt"), "--format", "onnx", "--out", str(tmp_path / "m.onnx"),
                           "data.dir=/nowhere"], "checking the export needs real test images"),
            (predict.main, [str(exported["safetensors"]), str(tmp_path), "--ema"], "--ema applies to checkpoints"),
            (evaluate.main, [str(exported["safetensors"]), f"data.dir={betons}", "--ema"],
             "holds one set of weights, not a checkpoint's raw and EMA weights")):
        if "cuda" in args and torch.cuda.is_available():
            continue
        with pytest.raises(SystemExit) as e:
            main(args)
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_an_export_into_a_folder_not_made_yet(trained_run, tmp_path):
    out = tmp_path / "not" / "yet" / "model.safetensors"
    export.main([str(trained_run / "last.pt"), "--format", "safetensors", "--out", str(out)])
    assert out.stat().st_size > 100_000
