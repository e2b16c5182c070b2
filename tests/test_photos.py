"""Photos of mixed sizes (issue 27): variable-resolution betons, random-resized crops drawn from the seed
and decoded by FFCV, a centre crop at the test resolution, progressive resizing, and CIFAR's path as it was."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dist_resnet.checkpoint import load
from dist_resnet.config import ConfigError, DataConfig, load_config
from dist_resnet.data import sizes
from dist_resnet.data.beton import table
from dist_resnet.data.manifest import Betons
from dist_resnet.data.photos import SMART_BYTES, Storage, stored_size
from dist_resnet.data.prepare import PrepareError, prepare
from tests import photos
from tests.conftest import ROOT
from tests.launch import launch
from tests.loaders import test_data, train_data
from tests.runs import assert_same_run, metrics

CPU = torch.device("cpu")
# FFCV's resized-crop decoders (its own RandomResizedCropRGBImageDecoder too) leave numba dispatchers whose
# finalizer raises KeyError when garbage-collected under pytest; harmless, and not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(scope="module")
def mixed_src(tmp_path_factory):
    return photos.mixed(tmp_path_factory.mktemp("mixed") / "src")


@pytest.fixture(scope="module")
def mixed_betons(mixed_src, tmp_path_factory):
    out = tmp_path_factory.mktemp("mixed") / "betons"
    prepare(str(mixed_src), out, workers=2, storage=Storage("smart", max_resolution=320))
    return out


def test_prepare_keeps_each_photo_at_its_own_size_and_records_sizes_and_storage(mixed_src, mixed_betons):
    from PIL import Image

    m = json.loads((mixed_betons / "manifest.json").read_text())
    assert m["variable_resolution"] and m["image_shape"] is None
    assert m["storage"] == {"write_mode": "smart", "max_resolution": 320, "jpeg_quality": 90,
                            "compress_probability": 0.5, "smart_threshold_bytes": SMART_BYTES}
    assert set(m["converted_modes"]) == {"L", "CMYK", "RGBA"}  # grey, CMYK JPEGs and a PNG with alpha
    rows = table(str(mixed_betons / "train.beton"))["image"]
    files = sorted(p for p in (mixed_src / "train").rglob("*") if p.is_file())
    want = []
    for f in files:
        with Image.open(f) as im:
            want.append(stored_size(im.height, im.width, 320))
    got = list(zip(rows["height"].tolist(), rows["width"].tolist()))
    assert got == want and max(max(s) for s in got) <= 320  # each at its own size, the longer side at most 320
    big = sum(h * w * 3 > SMART_BYTES for h, w in got)
    assert m["train"]["stored_jpeg"] == big == int((rows["mode"] == 0).sum()) and 0 < big < len(got)
    s = m["train"]["sizes"]
    assert s["min_hw"] == np.min(got, 0).tolist() and s["max_hw"] == np.max(got, 0).tolist()
    assert sum(s["shorter_side"].values()) == m["train"]["count"] == 24
    assert Betons.open(mixed_betons, verify=True).manifest == m


def test_an_unreadable_photo_is_named_and_nothing_is_written(mixed_src, tmp_path):
    import shutil

    src = shutil.copytree(mixed_src, tmp_path / "src")
    (src / "test" / "class1" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a JPEG")
    with pytest.raises(PrepareError, match=r"1 file\(s\) in test cannot be read or stored: .*broken.jpg is not a readable "
                                          r"image"):
        prepare(str(src), tmp_path / "out", storage=Storage("jpg"))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp*"))


@pytest.mark.parametrize("args, message", [
    (["--write-mode", "jpg", "--resize", "64"], "Give one or the other"),
    (["--jpeg-quality", "0"], "--jpeg-quality must be in 1..100, not 0"),
    (["--compress-probability", "1.5"], r"--compress-probability must be in \[0, 1\], not 1.5"),
])
def test_bad_photo_options_are_one_line_errors_with_exit_2(mixed_src, tmp_path, capsys, args, message):
    import re

    from dist_resnet.data import prepare as cli

    with pytest.raises(SystemExit) as e:
        cli.main(["--source", str(mixed_src), "--out", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and re.search(message, err) and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_a_degenerate_photo_is_named_in_the_first_pass(mixed_src, tmp_path):
    """A 700x1 PNG is stored 0 px high at --max-resolution 512: OpenCV's resize failed inside FFCV's writer
    process, and prepare waited forever. The first pass names it; nothing is written."""
    import shutil

    from PIL import Image

    src = shutil.copytree(mixed_src, tmp_path / "src")
    Image.new("RGB", (700, 1), (10, 20, 30)).save(src / "train" / "class2" / "strip.png")
    with pytest.raises(PrepareError, match=r"1 file\(s\) in train cannot be read or stored: .*strip.png is 700x1: "
                                           r"with its longer side brought to --max-resolution 512, it would be 512x0"):
        prepare(str(src), tmp_path / "out", storage=Storage("smart"))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp*"))


# a prepare stopped with SIGTERM while it writes: each image takes 0.2 s, and the first one says so in a file
PREPARE_SLOWLY = """import sys, time
from pathlib import Path
from dist_resnet.data import photos, prepare
src, out = Path(sys.argv[1]), Path(sys.argv[2])
item = photos.Photos.__getitem__
def slow(self, i):
    (out.parent / "writing").touch()
    time.sleep(0.2)
    return item(self, i)
photos.Photos.__getitem__ = slow
prepare.main(["--source", str(src), "--out", str(out), "--write-mode", "raw", "--workers", "2"])
"""


def test_a_writer_that_dies_ends_prepare_and_sigterm_cleans_up(mixed_src, tmp_path, monkeypatch, capsys):
    """FFCV's writer polls a counter and never looks at its processes: one that died left prepare sleeping for
    ever (a 700x1 image; here a file changed after the first pass). Now it ends in one line, exit 2, in
    seconds; and a prepare stopped with SIGTERM while it writes removes its temporary folder and stops its
    writers on the way out (a killed one left .OUT.tmp-* behind)."""
    import shutil
    import signal
    import subprocess
    import sys
    import time

    from dist_resnet.data import photos as photo_prepare
    from dist_resnet.data.prepare import main

    src = shutil.copytree(mixed_src, tmp_path / "src")
    survey = photo_prepare.survey

    def survey_then_break(files, *args):
        result = survey(files, *args)
        files[-1][0].write_bytes(b"not an image any more")  # after the first pass read it
        return result

    monkeypatch.setattr(photo_prepare, "survey", survey_then_break)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["--source", str(src), "--out", str(tmp_path / "out"), "--write-mode", "raw", "--workers", "2"])
    said = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert e.value.code == 2 and len(said) == 1 and said[0].startswith("prepare: error: a writer process of "
                                                                      "train.beton died (") \
        and "nothing was written" in said[0], said
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp*"))
    cmd = [sys.executable, "-c", PREPARE_SLOWLY]
    run = subprocess.Popen([*cmd, str(mixed_src), str(tmp_path / "out")], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (tmp_path / "writing").exists() and time.time() < deadline and run.poll() is None:
        time.sleep(0.1)
    assert list(tmp_path.glob(".out.tmp-*")), "no temporary folder while writing"
    run.send_signal(signal.SIGTERM)
    assert run.wait(60) == 128 + signal.SIGTERM, run.stderr.read()[-3000:]
    assert "prepare: stopped by SIGTERM; nothing was written" in run.stderr.read()
    assert not list(tmp_path.glob(".out.tmp*")) and not (tmp_path / "out").exists()


def test_the_crop_draws_follow_torchvision_random_resized_crop():
    """20,000 crops of a 300 x 200 image from the seeded draw against torchvision's own: the area share
    and the log aspect ratio have the same distributions (two-sample KS, both seeded: no flake)."""
    from scipy.stats import ks_2samp
    from torchvision.transforms import RandomResizedCrop

    from dist_resnet.data.crops import epoch_key, image_key, random_crop

    h, w, n = 300, 200, 20000
    scale, ratio = np.array([0.08, 1.0]), np.array([3 / 4, 4 / 3])
    key = epoch_key(0, 0)
    ours = np.array([random_crop(h, w, scale, ratio, image_key(key, i)) for i in range(n)])
    torch.manual_seed(0)
    img = torch.empty(3, h, w)
    theirs = np.array([RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(n)])
    for a in (ours, theirs):
        assert ((a[:, 0] >= 0) & (a[:, 0] + a[:, 2] <= h) & (a[:, 1] >= 0) & (a[:, 1] + a[:, 3] <= w)).all()
    area = [a[:, 2] * a[:, 3] / (h * w) for a in (ours, theirs)]
    log_ratio = [np.log(a[:, 3] / a[:, 2]) for a in (ours, theirs)]
    centre = [(a[:, 0] + a[:, 2] / 2) / h for a in (ours, theirs)]
    for name, (x, y) in {"area": area, "log ratio": log_ratio, "centre": centre}.items():
        stat = ks_2samp(x, y).statistic
        print(f"{name}: mean {x.mean():.4f} vs torchvision {y.mean():.4f}, KS {stat:.4f}")
        assert stat < 0.02, (name, stat)  # 1.95 * sqrt(2 / n) = 0.0195: the 0.1 % critical value


def test_the_centre_crop_equals_torchvision_resize_and_center_crop(tmp_path):
    """data.test_res=224 with data.test_crop_ratio=0.875 against torchvision's Resize(256) + CenterCrop(224)
    of each stored image (raw, or its JPEG decoded), for photos of 260-400 px as ImageNet's: within JPEG and
    interpolation tolerance: FFCV resizes with OpenCV's INTER_AREA, torchvision with antialiased bilinear, and
    their crops' corners differ by under a pixel (so the pictures are smooth here; with pixel noise, a
    sub-pixel shift alone moves the mean by several levels). Upscaling, where INTER_AREA is nearest-like,
    differs more."""
    from torchvision.transforms import v2

    from dist_resnet.data.crops import centre
    from dist_resnet.data.ffcv import iterate, sequential

    src = photos.mixed(tmp_path / "src", classes=2, per_split={"train": 2, "test": 4}, sides=(260, 400),
                       noise=0, cycles=2)
    prepare(str(src), tmp_path / "b", workers=1, storage=Storage("proportion", max_resolution=400))
    path = str(tmp_path / "b" / "test.beton")
    n = table(path)["image"].shape[0]
    loader = sequential(path, np.arange(n), n, 1, True, 1, CPU, torch.uint8, centre((224, 224), 224 / 256))
    (x, _), = list(iterate(loader, None))
    assert x.shape == (n, 3, 224, 224)
    tv = v2.Compose([v2.Resize(256, antialias=True), v2.CenterCrop(224)])
    stored = stored_images(path)
    diffs = [(x[i].float() - tv(torch.from_numpy(stored[i]).permute(2, 0, 1)).float()).abs().mean().item()
             for i in range(n)]
    print("mean |ffcv - torchvision| per image (0-255):", [(s.shape[:2], round(d, 2)) for s, d in zip(stored, diffs)])
    assert max(diffs) < 3.0, diffs


def stored_images(path: str) -> list[np.ndarray]:
    """Each image of a beton as stored (raw bytes, or its JPEG decoded by OpenCV as FFCV decodes it)."""
    import cv2

    rows, data = table(path)["image"], np.memmap(path, dtype=np.uint8, mode="r")
    out = []
    for r in rows:
        h, w, ptr = int(r["height"]), int(r["width"]), int(r["data_ptr"])
        if r["mode"] == 1:
            out.append(np.array(data[ptr:ptr + h * w * 3]).reshape(h, w, 3))
        else:
            buf = np.array(data[ptr:ptr + 4 * h * w * 3])
            out.append(cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB))
    return out


def photo_cfg(d, **kw) -> DataConfig:
    return DataConfig(**{"dir": str(d), "crop": "rrc", "res": 64, "test_res": 64, "num_workers": 1, **kw})


def test_seeded_crops_do_not_depend_on_threads_ranks_or_the_step_a_run_resumes_at(mixed_betons):
    """The train batches of an epoch: the same with 1 or 2 decode threads; 2 ranks' batches are the two
    halves of 1 rank's; a resumed epoch (start_step=1) gives the very batches from step 1 on; another
    epoch draws other crops; with progressive resizing the side changes at the ramp."""
    def batches(data, epoch=0, start=0):
        return [torch.cat([x for x, _ in micro]) for _, micro in data.epoch(epoch, start)]

    cfg = photo_cfg(mixed_betons, res_end=96, res_ramp=[0, 1])  # 64 px in epoch 0, 96 px from epoch 1
    data = train_data(cfg, 8, 7, CPU, torch.float32, True)
    one = batches(data)
    assert len(one) == 3 and one[0].shape == (8, 3, 64, 64)
    two_threads = train_data(photo_cfg(mixed_betons, num_workers=2), 8, 7, CPU, torch.float32, True)
    assert all(torch.equal(a, b) for a, b in zip(one, batches(two_threads)))
    halves = [batches(train_data(cfg, 8, 7, CPU, torch.float32, True, r, 2)) for r in (0, 1)]
    assert all(torch.equal(a, torch.cat([h0, h1])) for a, h0, h1 in zip(one, *halves))
    assert all(torch.equal(a, b) for a, b in zip(one[1:], batches(data, start=1)))
    assert not any(torch.equal(a, b) for a, b in zip(one, batches(two_threads, epoch=1)))  # other crops
    assert [batches(data, epoch=e)[0].shape[-1] for e in (1, 2)] == [96, 96]


def test_progressive_resizing_grows_the_side_in_steps_of_32():
    """FFCV's rn50 schedule: data.res up to epoch E0, data.res_end from E1, linear between, in 32-px steps
    (epochs counted from 0, as FFCV's loop counts them)."""
    d = DataConfig(dir="x", crop="rrc", res=160, res_end=192, res_ramp=[2, 6])
    assert [sizes.train_side(d, e) for e in range(8)] == [160, 160, 160, 160, 192, 192, 192, 192]  # 176: half up
    d = DataConfig(dir="x", crop="rrc", res=64, res_end=160, res_ramp=[1, 4])
    assert [sizes.train_side(d, e) for e in range(6)] == [64, 64, 96, 128, 160, 160]
    assert sizes.train_sides(d, 6) == [64, 96, 128, 160]
    assert sizes.train_side(DataConfig(dir="x", crop="rrc", res=64), 5) == 64  # no ramp


@pytest.mark.parametrize("overrides, message", [
    (["data.pipeline=ffcv"], "holds photos of many sizes: set data.crop=rrc, data.res"),
    (["data.pipeline=ffcv", "data.crop=rrc", "data.res=64"], "holds photos of many sizes: set data.crop=rrc, data.res"),
    (["data.pipeline=device", "data.crop=rrc", "data.res=64", "data.test_res=64"],
     "crop while FFCV decodes: set data.pipeline=ffcv"),
    (["data.pipeline=ffcv", "data.crop=rrc", "data.res=1024", "data.test_res=48"],
     "data.res=1024 is above the largest photo stored in data.dir="),
    (["data.pipeline=ffcv", "data.crop=rrc", "data.res=64", "data.test_res=400"], "use at most 320"),
])
def test_photo_betons_need_the_crop_keys_and_ffcv(mixed_betons, tmp_path, capsys, overrides, message):
    """Each refusal of the photo rules is one line and exit 2, before anything is written; and `--check`, the
    launch scripts' first step, says the very same line (it used to pass them: "config and data ok")."""
    from dist_resnet import train

    argv = ["--config", str(ROOT / "configs" / "cpu.yaml"), f"data.dir={mixed_betons}", f"run.dir={tmp_path / 'r'}",
            *overrides]
    said = []
    for check in (["--check"], []):
        with pytest.raises(SystemExit) as e:
            train.main([*check, *argv])
        said.append(capsys.readouterr().err)
        assert e.value.code == 2 and message in said[-1] and len(said[-1].strip().splitlines()) == 1, said[-1]
    assert said[0] == said[1]
    assert not (tmp_path / "r").exists() or not list((tmp_path / "r").glob("*.pt"))


@pytest.mark.parametrize("overrides, message", [
    (["data.res=64"], "data.res=64 sets the size of the random-resized crop: set data.crop=rrc"),
    (["data.crop=rrc", "data.resize=64"], "leave data.resize at 0"),
    (["data.crop=rrc", "data.res=64", "data.res_end=96"], "data.res_ramp=[E0,E1] with E0 < E1"),
    (["data.crop=rrc", "data.res=64", "data.res_end=96", "data.res_ramp=[0,9]"], "ends after the run's 2 epochs"),
    (["data.crop=rrc", "data.rrc_scale=[0.5,0.1]"], "bad value for 'data.rrc_scale'"),
    (["data.rrc_scale=[0.35,1]"], "data.rrc_scale=[0.35,1] applies only with data.crop=rrc, which is not set"),
    (["data.rrc_ratio=[0.5,2]"], "data.rrc_ratio=[0.5,2] applies only with data.crop=rrc"),
    (["data.test_crop_ratio=0.9"], "data.test_crop_ratio=0.9 applies only with data.test_res"),
    (["data.crop=rrc", "data.res=64", "data.res_ramp=[0,1]"], "data.res_ramp=[0,1] applies only with data.res_end"),
])
def test_crop_keys_are_checked_before_anything_starts(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(ROOT / "configs" / "cpu.yaml", ["data.dir=x", "run.dir=y", "train.epochs=2", *overrides])


PHOTO_KEYS = ["data.pipeline=ffcv", "data.crop=rrc", "data.res=32", "data.res_end=64", "data.res_ramp=[0,1]",
              "data.test_res=48", "train.epochs=2"]  # 32 px in epoch 0, 64 px in epoch 1, evaluated at 48 px
PHOTO_RUN = ["--config", str(ROOT / "configs" / "cpu.yaml"), "model.width=8", "train.batch_size=8",
             "run.progress=false", "data.num_workers=1", "train.precision=fp32", *PHOTO_KEYS,
             "train.checkpoint_every=2", "optim.warmup_epochs=0.5", "run.pictures=false"]


def test_a_photo_run_resumes_bit_exactly_across_a_resolution_change(mixed_src, mixed_betons, tmp_path, capsys):
    """3 steps per epoch at 32 px, then 64 px: a kill at step 5 (after the change) resumes from the
    checkpoint of step 4 to the same weights and history; evaluation runs at 48 px, as the checkpoint says,
    and predict, the ONNX export and its card take that side and the centre crop from it."""
    opts = [*PHOTO_RUN, f"data.dir={mixed_betons}"]
    codes = launch("dist_resnet.train", [*opts, f"run.dir={tmp_path / 'ref'}"], tmp_path / "ref.log", 1)
    log = (tmp_path / "ref.log").read_text()
    assert codes == [0], log
    assert "epoch 1: train side 32 px" in log and "epoch 2: train side 64 px (was 32 px)" in log, log
    assert load(tmp_path / "ref" / "last.pt")["image_shape"] == [48, 48]
    run_dir = tmp_path / "run"
    codes = launch("dist_resnet.train", [*opts, f"run.dir={run_dir}"], tmp_path / "kill.log", 1,
                   {"DIST_RESNET_FAULT": "step:5"})
    assert codes == [-9] and load(run_dir / "last.pt")["step"] == 4, (tmp_path / "kill.log").read_text()
    codes = launch("dist_resnet.train", [*opts, f"run.dir={run_dir}", "train.resume=true"], tmp_path / "res.log", 1)
    assert codes == [0], (tmp_path / "res.log").read_text()
    assert "epoch 2: train side 64 px\n" in (tmp_path / "res.log").read_text()  # the side it resumes at
    assert_same_run(tmp_path / "ref", run_dir)
    assert metrics(run_dir)["history"][-1]["test_count"] == 12
    # the photo model's test side and centre crop reach predict, the ONNX file and its card
    photo = sorted((mixed_src / "test" / "class0").iterdir())[0]
    from dist_resnet import export, predict

    capsys.readouterr()
    assert predict.main([str(run_dir / "last.pt"), str(photo), "--topk", "1"]) == 1  # images predicted
    out, err = capsys.readouterr()
    assert out.startswith(f"{photo}\tclass") and "centre-cropped and resized to the model's 48x48" in err, (out, err)
    onnx = tmp_path / "m.onnx"
    result = export.main([str(run_dir / "last.pt"), "--format", "onnx", "--out", str(onnx), "--verify-test-set"])
    test = result["test"]  # the whole test set, read as evaluation reads it (it crashed: "only supports constant
    assert test["images"] == 12 and test["top1"]["fp32"] == test["top1"]["pytorch"]  # image", nothing written)
    assert test["top1"]["pytorch"] == metrics(run_dir)["test_acc"]  # the checkpoint's test side and centre crop
    card = onnx.with_name("m.onnx.md").read_text()
    assert "N x 3 x 48 x 48" in card and "the central 0.875 of the shorter side, square, resized to 48x48" in card
    assert "each centre-cropped as evaluated: the central 0.875 of the shorter side resized to 48x48" in card
    assert "random-resized crops of 32 px, growing to 64 px (each 0.08-1 of a photo's area), from photos stored " \
           "at most 320 px" in card
    assert "JPEG quality 75" not in card and "32x32" not in card  # CIFAR's text on a photo model's card
    capsys.readouterr()
    assert predict.main([str(onnx), str(photo), "--topk", "1"]) == 1
    assert "centre-cropped and resized to the model's 48x48" in capsys.readouterr().err


def test_blurpool_blurs_before_each_strided_conv_and_keeps_torchvision_keys():
    import torch.nn.functional as F

    from dist_resnet.models import build_model
    from dist_resnet.models.torchvision import BlurConv2d

    torch.manual_seed(0)
    plain, blurred = build_model("tv_resnet18", 10), build_model("tv_resnet18", 10, blurpool=True)
    assert list(plain.state_dict()) == list(blurred.state_dict())  # torchvision's weights load as they are
    blurred.load_state_dict(plain.state_dict())
    convs = [n for n, m in blurred.named_modules() if isinstance(m, BlurConv2d)]
    assert convs == ["layer2.0.conv1", "layer2.0.downsample.0", "layer3.0.conv1", "layer3.0.downsample.0",
                     "layer4.0.conv1", "layer4.0.downsample.0"]  # strided, >= 16 input channels (not the stem)
    conv, x = blurred.layer2[0].conv1, torch.randn(2, 64, 16, 16)
    k = torch.tensor([1.0, 2.0, 1.0])
    want = F.conv2d(F.conv2d(x, (k[:, None] * k / 16).expand(64, 1, 3, 3), padding=1, groups=64), conv.weight,
                    stride=2, padding=1)
    assert torch.allclose(conv(x), want, atol=1e-5)
    plain.eval(), blurred.eval()
    y = torch.randn(1, 3, 64, 64)
    assert not torch.allclose(plain(y), blurred(y))


def test_the_quasi_random_order_reads_few_pages_per_batch_and_stays_world_size_invariant():
    """5,000 images over 40 pages: each global batch of the quasi-random order touches a few pages (the
    random one nearly all); every image once per epoch; 2 ranks slice the same global batches; a resume
    at step 3 gives the rest of the epoch."""
    from dist_resnet.data.orders import WINDOW, GlobalBatchOrder, QuasiRandomOrder

    pages = np.repeat(np.arange(40), 125)
    q = QuasiRandomOrder(5000, 250, 3, 0, 1, None, pages)
    perm = q.permutation(0)
    assert sorted(perm.tolist()) == list(range(5000)) and not np.array_equal(perm, q.permutation(1))
    touched = [len(np.unique(pages[perm[i:i + 250]])) for i in range(0, 5000, 250)]
    rand = GlobalBatchOrder(5000, 250, 3, 0, 1).permutation(0)
    touched_random = [len(np.unique(pages[rand[i:i + 250]])) for i in range(0, 5000, 250)]
    print(f"pages per batch: quasi-random {np.mean(touched):.1f} (max {max(touched)}), random {np.mean(touched_random):.1f}")
    assert max(touched) <= WINDOW + 3 and np.mean(touched_random) > 3 * np.mean(touched)
    halves = [QuasiRandomOrder(5000, 250, 3, r, 2, None, pages).sample_order(0).reshape(20, 125) for r in range(2)]
    assert np.array_equal(np.concatenate(halves, 1).reshape(-1), perm)
    q.skip = (0, 3)
    assert np.array_equal(q.sample_order(0), perm[3 * 250:])


def test_a_quasi_random_run_reads_the_beton_without_the_page_cache(tiny_betons):
    """CIFAR's betons read without the page cache, in the quasi-random order, with random-resized crops at
    the stored size (data.res=0)."""
    cfg = DataConfig(dir=str(tiny_betons), order="quasi_random", os_cache=False, num_workers=1, crop="rrc")
    data = train_data(cfg, 100, 0, CPU, torch.float32, True)
    batches = [micro[0] for _, micro in data.epoch(0)]
    seen = torch.cat([y for _, y in batches])
    assert len(seen) == 1000 and torch.equal(torch.bincount(seen), torch.full((10,), 100))
    assert all(x.shape == (100, 3, 32, 32) for x, _ in batches)


def test_progressive_resizing_compiles_each_side_in_the_warm_up_and_nothing_after(mixed_betons, tmp_path,
                                                                                    eager_compile):
    """A compiled model (dynamo with its eager backend) across a resolution change, 32 px then 64 px, and
    an evaluation at 48 px: the warm-up compiles what every side needs, the epochs and evaluations after it
    compile nothing more (dynamo marks the changing side dynamic at the second size, so a third side
    would not recompile either)."""
    from tests.runs import build_trainer

    trainer = build_trainer(mixed_betons, tmp_path, "model.compile=true", "train.batch_size=8",
                            "train.warmup_steps=1", *PHOTO_KEYS)
    trainer.warmup(trainer.state)
    graphs = eager_compile()
    batches = trainer.batches()
    shapes = set()
    for _ in range(6):  # 3 steps per epoch: epoch 0 at 32 px, epoch 1 at 64 px
        micro = next(batches)
        shapes.add(micro[0][0].shape[-1])
        trainer.train_step(micro)
    batches.close()
    trainer.evaluate()
    assert shapes == {32, 64} and eager_compile() == graphs, (graphs, eager_compile())
    trainer.close()


# the run-level variant: test_seeded_crops_do_not_depend_on_threads_ranks_or_the_step_a_run_resumes_at proves
# that 2 ranks' batches are exactly the halves of 1 rank's, and tests/test_distributed.py that DDP equals one batch
@pytest.mark.slow
def test_two_ranks_train_a_photo_run_as_one_rank_does(mixed_betons, tmp_path):
    """The world-size test of tests/test_distributed.py on photos: random-resized crops at 32 px, GroupNorm,
    1 rank x 8 against 2 ranks x 4 per step: the same crops reach the same step, so the weights agree to
    the same tolerance (fp32 reduction order)."""
    from tests.runs import relative_distance

    opts = [*PHOTO_RUN[:7], f"data.dir={mixed_betons}", "data.pipeline=ffcv", "data.crop=rrc", "data.res=32",
            "data.test_res=32", "train.epochs=1", "model.norm=group", "optim.lr=0.02"]
    for name, nproc in (("w1", 1), ("w2", 2)):
        codes = launch("dist_resnet.train", [*opts, f"run.dir={tmp_path / name}"], tmp_path / f"{name}.log", nproc)
        assert codes == [0] * nproc, (tmp_path / f"{name}.log").read_text()
    rel = relative_distance(tmp_path / "w1", tmp_path / "w2")
    assert rel < 5e-5, rel
    ma, mb = metrics(tmp_path / "w1")["history"][0], metrics(tmp_path / "w2")["history"][0]
    assert ma["train_loss"] == pytest.approx(mb["train_loss"], rel=1e-5) and mb["test_count"] == 12


def test_the_loader_bench_measures_each_loader_and_refuses_bad_input_in_one_line(mixed_src, mixed_betons, tmp_path,
                                                                                  tiny_betons, capsys):
    """`python -m dist_resnet.bench.photos` at tiny settings: every loader is timed at the side asked (one epoch,
    one round: no spread, where it printed numpy's warnings and "± nan"), and bad arguments get one line and exit
    2 before anything is measured: among them an --out it could not write after the whole measurement, and
    betons of another dataset than the folder (it printed a 28.6x "speed-up" of one dataset over another)."""
    from dist_resnet.bench import photos as bench

    capsys.readouterr()
    out = bench.main(["--folder", str(mixed_src), "--betons", str(mixed_betons), "--res", "32", "--workers", "1",
                      "--batch", "8", "--epochs", "1", "--rounds", "1", "--out", str(tmp_path / "b.json")])
    said = capsys.readouterr()
    assert "nan" not in said.out and "Warning" not in said.err, said
    assert {(r["loader"], r["res"]) for r in out["rows"]} == {(n, 32) for n in bench.LOADERS}
    assert all(r["img_per_s"] > 0 and r["epochs"] == 1 and r["img_per_s_std"] is None for r in out["rows"])
    assert json.loads((tmp_path / "b.json").read_text())["rows"] == out["rows"]
    for bad, message in ((["--folder", str(tmp_path / "none")], "is not a folder"),
                         (["--betons", str(tmp_path)], "--betons: data.dir="),
                         (["--betons", str(tiny_betons)], "(10 classes, 1000 train images), not from --folder"),
                         (["--out", str(tmp_path / "missing" / "b.json"), "--batch", "8"],
                          "is not a folder this process can write"),
                         (["--batch", "25"], "more than the 24 train images"), (["--res", "0"], "at least 1")):
        args = {"--folder": str(mixed_src), "--betons": str(mixed_betons), "--res": "32"}
        args.update(dict(zip(bad[::2], bad[1::2])))
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            bench.main([x for kv in args.items() for x in kv])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
