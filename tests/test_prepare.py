"""dist_resnet.data.prepare: lossless betons, a manifest, and clear errors that leave nothing behind."""
import json
import shutil
import tarfile

import numpy as np
import pytest
from PIL import Image

from dist_resnet.data.prepare import PrepareError, prepare, sha256
from tests.conftest import CLASSES, SUBSET, python_module


def test_manifest_describes_the_betons(betons):
    m = json.loads((betons / "manifest.json").read_text())
    assert m["classes"] == CLASSES
    assert m["train"]["count"] == 5000 and m["test"]["count"] == 1000
    assert m["train"]["class_counts"] == [500] * 10 and m["test"]["class_counts"] == [100] * 10
    for split in ("train", "test"):
        assert m[split]["sha256"] == sha256(betons / f"{split}.beton")
        assert m[split]["bytes"] == (betons / f"{split}.beton").stat().st_size
    assert m["source"].endswith("cifar10-subset.tar.gz")
    assert m["mean"] == pytest.approx([0.49, 0.48, 0.45], abs=0.03)  # CIFAR-10's channel means


# the subset's betons as prepare wrote them before issue 27 (at 195f1a1, ffcv 1.0.2): the photo path must leave
# CIFAR's bytes exactly as they were (docs/BENCHMARKS.md "Beyond CIFAR": the full copy and a run, fingerprinted)
SUBSET_SHA256 = {"train": "beac118934f8cb62d971b9a84025af31bc8d1e59d248707ac7fd2c13521d128f",
                 "test": "e6f3e505b6f5962625579a5642896eb68d25bf2096bc8480c47e1da03588d49e"}


def test_cifar_betons_are_the_bytes_written_before_the_photo_path(betons):
    m = json.loads((betons / "manifest.json").read_text())
    assert {s: m[s]["sha256"] for s in ("train", "test")} == SUBSET_SHA256


def test_beton_bytes_are_reproducible(betons, tmp_path):
    m = prepare(str(SUBSET), tmp_path / "again", workers=1)
    assert m["train"]["sha256"] == json.loads((betons / "manifest.json").read_text())["train"]["sha256"]


def small_folder(root, subset_dir, per_class=2, classes=CLASSES[:3]):
    """A tiny real ImageFolder copied from the subset."""
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for f in sorted((subset_dir / split / c).iterdir())[:per_class]:
                shutil.copy(f, root / split / c / f.name)
    return root


def test_folder_source_and_refusal_to_overwrite(tmp_path, subset_dir):
    src = small_folder(tmp_path / "src", subset_dir)
    out = tmp_path / "out"
    m = prepare(str(src), out)
    assert m["classes"] == CLASSES[:3] and m["train"]["count"] == 6
    before = (out / "train.beton").read_bytes()
    with pytest.raises(PrepareError, match="--force"):
        prepare(str(src), out)
    assert (out / "train.beton").read_bytes() == before
    prepare(str(src), out, force=True)


def assert_fails_cleanly(source, out, match, **kw):
    with pytest.raises(PrepareError, match=match):
        prepare(str(source), out, **kw)
    assert not out.exists() or not any(out.iterdir())
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp")]


def test_missing_source(tmp_path):
    assert_fails_cleanly(tmp_path / "nope", tmp_path / "out", "does not exist")


def test_empty_source(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_fails_cleanly(tmp_path / "empty", tmp_path / "out", "is empty")
    empty_tar = tmp_path / "empty.tar.gz"
    with tarfile.open(empty_tar, "w:gz"):
        pass
    assert_fails_cleanly(empty_tar, tmp_path / "out", "empty")


def test_folder_without_splits(tmp_path):
    (tmp_path / "src" / "cats").mkdir(parents=True)
    assert_fails_cleanly(tmp_path / "src", tmp_path / "out", "train/<class>")


def test_class_sets_that_differ(tmp_path, subset_dir):
    src = small_folder(tmp_path / "src", subset_dir)
    shutil.rmtree(src / "test" / "bird")
    assert_fails_cleanly(src, tmp_path / "out", r"only in train: \['bird'\]")


def test_file_that_is_not_an_image(tmp_path, subset_dir):
    src = small_folder(tmp_path / "src", subset_dir)
    (src / "train" / "airplane" / "notes.txt").write_text("not an image")
    assert_fails_cleanly(src, tmp_path / "out", "notes.txt is not a readable image")


def test_images_of_mixed_sizes_need_resize(tmp_path, subset_dir):
    src = small_folder(tmp_path / "src", subset_dir)
    Image.new("RGB", (64, 48), (255, 0, 0)).save(src / "test" / "bird" / "big.png")
    assert_fails_cleanly(src, tmp_path / "out", r"the test images have 2 different sizes \(32x32 \(6\), 64x48 \(1\)\)"
                                                r".*--resize N")
    m = prepare(str(src), tmp_path / "out", resize=32)
    assert m["test"]["count"] == 7 and m["image_shape"] == [32, 32, 3] and m["resized_to"] == [32, 32]
    m = prepare(str(src), tmp_path / "out", resize=(24, 40), force=True)
    assert m["image_shape"] == [24, 40, 3]


def test_any_single_size_is_kept_and_modes_are_converted_and_recorded(tmp_path, subset_dir):
    """Three classes at 48x40 (from the subset's real images), some grayscale, RGBA or palette."""
    src = small_folder(tmp_path / "src", subset_dir)
    for i, f in enumerate(sorted(src.rglob("*.jpg"))):
        with Image.open(f) as im:
            im = im.resize((48, 40))
            mode = ["RGB", "L", "RGBA", "P"][i % 4]
            im.convert(mode).save(f.with_suffix(".png"))
        f.unlink()
    m = prepare(str(src), tmp_path / "out")
    assert m["image_shape"] == [40, 48, 3] and m["resized_to"] is None
    assert m["converted_modes"] == {"L": 3, "P": 3, "RGBA": 3}
    import torch

    from dist_resnet.config import DataConfig
    from tests.loaders import test_data

    x, y = next(iter(test_data(DataConfig(dir=str(tmp_path / "out"), num_workers=1), 12, torch.device("cpu"),
                              torch.float32, False)))
    assert x.shape == (6, 3, 40, 48)


def test_classes_picks_a_subset_of_classes(tmp_path, subset_dir):
    src = small_folder(tmp_path / "src", subset_dir)
    m = prepare(str(src), tmp_path / "out", classes=["bird", "airplane"])
    assert m["classes"] == ["airplane", "bird"] and m["train"]["count"] == 4
    assert_fails_cleanly(src, tmp_path / "out2", "--classes names dog, not in .*its classes: airplane, automobile, "
                                                 "bird", classes=["dog"])


def test_tarball_with_a_top_folder_and_grayscale_images(tmp_path, subset_dir):
    src = small_folder(tmp_path / "pkg" / "cifar", subset_dir)
    Image.new("L", (32, 32), 128).save(src / "train" / "airplane" / "gray.png")
    tar = tmp_path / "src.tar"
    with tarfile.open(tar, "w") as t:
        t.add(tmp_path / "pkg" / "cifar", arcname="cifar")
    m = prepare(str(tar), tmp_path / "out")
    assert m["train"]["count"] == 7


def test_cli_reports_errors_with_exit_code_2(tmp_path):
    p = python_module("dist_resnet.data.prepare", "--source", str(tmp_path / "nope"), "--out", str(tmp_path / "o"),
                      check=False, timeout=120)
    assert p.returncode == 2 and "prepare: error:" in p.stderr and "does not exist" in p.stderr


def test_source_images_are_the_committed_subset(source_images):
    assert source_images["train"][0].shape == (5000, 32, 32, 3)
    assert source_images["test"][0].dtype == np.uint8


def test_verify_checks_a_prepared_folder(betons, tmp_path, capsys):
    from dist_resnet.data.prepare import main

    main(["--verify", str(betons)])  # the CLI, in-process
    assert "all match" in capsys.readouterr().out
    bad = tmp_path / "bad"
    shutil.copytree(betons, bad)
    with open(bad / "train.beton", "r+b") as f:
        f.seek(-10, 2)
        f.write(b"0123456789")
    with pytest.raises(SystemExit) as e:
        main(["--verify", str(bad)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "train.beton does not match the sha256" in err and len(err.strip().splitlines()) == 1


def test_one_class_is_refused_in_one_line(tmp_path, subset_dir, capsys):
    """A folder of one class prepared ("1 classes") and trained to "acc 1.0000"; so did --classes naming one.
    Both are refused, as is --workers below 1 (a traceback before), each in one line, exit 2."""
    from dist_resnet.data.prepare import main

    one = small_folder(tmp_path / "one", subset_dir, classes=CLASSES[:1])
    assert_fails_cleanly(one, tmp_path / "out", "gives 1 class .airplane.: a classifier needs at least two")
    three = small_folder(tmp_path / "three", subset_dir)
    assert_fails_cleanly(three, tmp_path / "out", "gives 1 class .bird with --classes.", classes=["bird"])
    for args, message in ((["--source", str(three), "--out", str(tmp_path / "out"), "--workers", "-2"],
                           "--workers must be at least 1"),
                          (["--source", str(one), "--out", str(tmp_path / "out")], "a classifier needs at least two")):
        with pytest.raises(SystemExit) as e:
            main(args)
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp*"))


def test_a_killed_prepares_temporary_folder_is_removed_by_the_next(tmp_path, subset_dir, capsys):
    """A prepare killed with SIGKILL cannot clean up: its temporary folder names its process, and the next
    prepare into the same folder removes it (a live process's is kept)."""
    src = small_folder(tmp_path / "src", subset_dir)
    dead = tmp_path / ".out.tmp-999999999-abc"  # no such process
    live = tmp_path / ".out.tmp-1-abc"  # init: alive
    for d in (dead, live):
        (d / "src").mkdir(parents=True)
    prepare(str(src), tmp_path / "out")
    assert not dead.exists() and live.exists() and (tmp_path / "out" / "manifest.json").exists()
    assert f"removed {dead}" in capsys.readouterr().out
