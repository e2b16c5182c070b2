"""The README's "Evaluate, predict, export" and "Explain" commands, exactly as the README gives them, on a
bf16 checkpoint and on an fp32 one: every file they promise is written, and every model card's accuracy is
the accuracy of the file it sits beside, scored here independently with onnxruntime. (`bench compress` trains
for an hour at its defaults: here its arguments are parsed; tests/test_prune.py runs it at tiny settings.)"""
from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, TINY

pytest.importorskip("onnxruntime", reason="the export extra is not installed: pip install -e '.[export]'")


def readme_commands() -> list[list[str]]:
    """The commands of the README's two blocks, as argument lists (optional `[...]` parts left out)."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("**Evaluate, predict, export**"):text.index("**Look**")]
    lines = [re.sub(r"\s*\[[^\]]*\]", "", line.split("  #")[0]) for line in block.splitlines()
             if line.startswith("python -m ")]
    return [shlex.split(line)[2:] for line in lines]


@pytest.fixture(scope="module")
def bf16_run(tiny_betons, tmp_path_factory) -> Path:
    """A bf16 run (autocast on the CPU): its batches and evaluations are bf16, as a GPU run's are; with EMA."""
    from dist_resnet import train

    run_dir = tmp_path_factory.mktemp("bf16") / "run"
    # 4 epochs: after 2, a width-8 net on 1,000 images sits so near its ties that its int8 graph's agreement
    # with the fp32 one was 88.5-97 % by seed and thread count, around export's 90 % gate; after 4, 96-99.5 %.
    # Width 4 (with 7-bit int8 weights: 99 % on an AVX2 EPYC) halves the fixture where bf16 is emulated (85 s)
    train.main([*TINY, f"data.dir={tiny_betons}", f"run.dir={run_dir}", "train.epochs=4", "train.precision=bf16",
                "train.ema=true", "train.ema_decay=0.9", "model.width=4"])
    return run_dir


@pytest.fixture(scope="module")
def ema_run(tiny_betons, tmp_path_factory) -> Path:
    """A tiny fp32 run with EMA, 2 epochs (the bf16 run above is built only for the `slow` variant: where
    bf16 is emulated it costs about 40 s)."""
    from dist_resnet import train

    run_dir = tmp_path_factory.mktemp("ema") / "run"
    train.main([*TINY, f"data.dir={tiny_betons}", f"run.dir={run_dir}", "train.epochs=2", "train.ema=true",
                "train.ema_decay=0.9", "model.width=4"])
    return run_dir


def onnx_accuracy(model: Path, data: Path) -> tuple[float, int]:
    """Top-1 of an .onnx file on the whole test beton, read here from the beton's raw bytes."""
    import onnxruntime as ort

    from dist_resnet.data.beton import read_raw, table

    path = str(data / "test.beton")
    x, y = read_raw(path, np.arange(len(table(path)["label"])))
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    feed = x.transpose(0, 3, 1, 2).astype(np.float32) / 255
    logits = np.concatenate([session.run(None, {"image": feed[i:i + 200]})[0] for i in range(0, len(feed), 200)])
    return float((logits.argmax(1) == y).mean()), len(y)


# bf16: the same commands on a bf16 checkpoint, a long variant (its exports and cards are also checked by
# test_cards_of_two_exports_in_one_folder_each_describe_their_own_file; bf16 is emulated on CPUs without it)
@pytest.mark.parametrize("which", ["fp32", pytest.param("bf16", marks=pytest.mark.slow)])
def test_the_readme_commands_on_a_checkpoint(which, trained_run, betons, tiny_betons, subset_dir, tmp_path,
                                             monkeypatch, capsys, request):
    run_dir, data = (trained_run, betons) if which == "fp32" else (request.getfixturevalue("bf16_run"), tiny_betons)
    assert (run_dir / "config.yaml").read_text().count(f"precision: {which}") == 1
    photos = tmp_path / "more_images"
    photos.mkdir()
    for c in ("cat", "ship"):
        (photos / f"{c}.jpg").write_bytes((subset_dir / "test" / c / "0001.jpg").read_bytes())
    (tmp_path / "photo.jpg").write_bytes((subset_dir / "test" / "dog" / "0002.jpg").read_bytes())
    monkeypatch.chdir(tmp_path)
    commands = readme_commands()
    assert len(commands) == 8 and all(c[0].startswith("dist_resnet.") for c in commands)
    compress = [c for c in commands if c[:2] == ["dist_resnet.bench", "compress"]]
    from dist_resnet.bench.compress import arguments

    assert len(compress) == 1 and arguments().parse_intermixed_args(compress[0][2:]).out == "compress"
    for module, *argv in [c for c in commands if c not in compress]:
        argv = [str(run_dir / "best.pt") if a == "runs/cpu/best.pt" else a for a in argv]
        extra = ["--speed-seconds", "0.05"] if "--int8" in argv else []  # measured, never judged: kept short
        importlib.import_module(module).main([*argv, *extra])
    out = capsys.readouterr().out
    for name in ("eval.json", "confusion.png", "model.onnx", "model.onnx.md", "model-int8.onnx", "model-int8.onnx.md",
                 "pruned.pt", "explained/index.csv", "explained/0001-photo.png", "mistakes.png"):
        assert (tmp_path / name).is_file(), name
    assert out.count("\t") >= 3 * 3  # predict printed 3 images x 3 classes
    for model in ("model.onnx", "model-int8.onnx"):
        card = (tmp_path / f"{model}.md").read_text()
        claimed = re.search(rf"Test accuracy of this file \(`{re.escape(model)}`\): ([0-9.]+) on (\d+) images", card)
        acc, n = onnx_accuracy(tmp_path / model, data)
        assert claimed and float(claimed[1]) == round(acc, 4) and int(claimed[2]) == n, (model, claimed, acc)
        assert str(tmp_path) not in card and str(run_dir) not in card and str(data) not in card



def test_cards_of_two_exports_in_one_folder_each_describe_their_own_file(trained_run, ema_run, tmp_path):
    """An int8 export without --verify-test-set (it used to crash on the card, KeyError 'goals'), after an
    fp32 one into the same folder: two cards, each naming its file; the calibration images are those used
    (9999 asked of 5,000); an --ema export says its weights are the EMA's and gives the EMA's accuracy."""
    import torch

    from dist_resnet import export

    ckpt = str(trained_run / "last.pt")
    export.main([ckpt, "--format", "onnx", "--out", str(tmp_path / "model.onnx")])
    export.main([ckpt, "--format", "onnx", "--int8", "--out", str(tmp_path / "model-int8.onnx"), "--calibration", "9999"])
    fp32, int8 = ((tmp_path / f"{m}.md").read_text() for m in ("model.onnx", "model-int8.onnx"))
    assert fp32.splitlines()[0].endswith(": `model.onnx`") and "`model-int8.onnx`" in int8.splitlines()[0]
    assert "calibrated on 5000 train images" in int8 and "was not run through this file" in int8
    assert "int8" not in fp32.split("## Measured by this export")[1].split("## Intended")[0]
    export.main([str(ema_run / "last.pt"), "--format", "safetensors", "--ema", "--out", str(tmp_path / "ema.safetensors")])
    card = (tmp_path / "ema.safetensors.md").read_text()
    last = [h for h in torch.load(ema_run / "last.pt", weights_only=True)["history"] if "ema_test_acc" in h][-1]
    assert "the EMA of the weights (train.ema_decay=0.9)" in card
    assert f"Test accuracy of the EMA weights (decay 0.9) at epoch {last['epoch']}" in card
    assert f"{last['ema_test_acc']:.4f} on" in card
