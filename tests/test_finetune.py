"""Fine-tuning, offline: torchvision models, `model.pretrained` from every kind of file, the head rebuilt,
freezing, per-layer learning rates, and transfer that beats training from scratch on real images.

No ImageNet weights can be downloaded here: a randomly initialised torchvision ResNet-50 saved to a
.pth stands in for them; the transfer experiment pretrains our own net on 5 CIFAR-10 classes."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from dist_resnet import train as train_module
from dist_resnet.config import ConfigError, OptimConfig, load_config
from dist_resnet.distributed import DistEnv
from dist_resnet.models import MODELS, STAGES, build_model, files, freeze
from dist_resnet.optim import build_optimizer
from dist_resnet.train import Trainer
from tests.conftest import CLASSES, ROOT, TINY

CPU = DistEnv(0, 1, 0, 1, torch.device("cpu"))


def trainer(betons: Path, run_dir: Path, *overrides: str) -> Trainer:
    return Trainer(load_config(TINY[1], [*TINY[2:], f"data.dir={betons}", f"run.dir={run_dir}", *overrides]), CPU)


@pytest.fixture(scope="module")
def imagenet_like_pth(tmp_path_factory) -> Path:
    """A torchvision ResNet-50 with 1000 classes, random weights (and moved BN statistics), as a .pth."""
    torch.manual_seed(1)
    net = build_model("tv_resnet50", 1000)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("pretrained") / "resnet50.pth"
    torch.save(net.state_dict(), path)
    return path


def test_every_model_names_its_stages_and_every_parameter_is_in_one_or_in_the_head():
    for name in MODELS:
        model = build_model(name, 10, 16 if name in ("resnet9", "fastnet") else 64)
        assert [n for n, _ in model.stage_modules()] == STAGES[name]
        in_stages = {id(p) for _, mods in model.stage_modules() for m in mods for p in m.parameters()}
        rest = [k for k, p in model.named_parameters() if id(p) not in in_stages]
        assert rest and all(k.startswith("fc.") for k in rest), (name, rest)


def test_a_torchvision_file_loads_every_backbone_tensor_and_the_head_is_rebuilt(tiny_betons, imagenet_like_pth,
                                                                                  tmp_path):
    """tv_resnet50 from a torchvision .pth, as a linear probe: every non-head tensor is the file's exactly,
    the head has 10 classes, ImageNet normalisation is chosen, and training moves only the head."""
    source = torch.load(imagenet_like_pth, weights_only=True)
    t = trainer(tiny_betons, tmp_path / "run", "model.name=tv_resnet50", "model.width=64",
                f"model.pretrained={imagenet_like_pth}", "model.freeze=backbone", "train.epochs=1", "optim.lr=0.1")
    try:
        before = {k: v.clone() for k, v in t.model.state_dict().items()}
        head = {k for k in before if k.startswith("fc.")}
        assert head == {"fc.weight", "fc.bias"} and before["fc.weight"].shape == (10, 2048)
        for k, v in before.items():
            if k not in head:
                assert torch.equal(v, source[k]), k
        assert t.data.feed.mean == files.IMAGENET_MEAN and t.data.feed.std == files.IMAGENET_STD
        report = json.loads((tmp_path / "run" / "pretrained.json").read_text())
        assert report["loaded"] == len(before) - 2 and report["reset"] == ["fc.weight", "fc.bias"]
        assert report["unexpected"] == [] and report["head"] == "reset for 10 classes"
        assert [g for g in t.step.optimizer.param_groups if g["params"]] and \
            {id(p) for g in t.step.optimizer.param_groups for p in g["params"]} == {id(p) for p in t.model.fc.parameters()}
        t.fit()
        after = t.model.state_dict()
        changed = [k for k in before if not torch.equal(before[k], after[k])]
        assert set(changed) == head  # frozen weights *and* BatchNorm statistics are untouched
    finally:
        t.finish()


def test_fine_tuning_fastnet_keeps_the_pretrained_whitening_stem(tiny_betons, tmp_path):
    """fastnet's stem is fitted to the training images on a fresh start; from pretrained weights it is
    the file's, as every other loaded tensor is."""
    torch.manual_seed(2)
    net = build_model("fastnet", 10, 16)
    with torch.no_grad():
        net.stem.weight.normal_()  # a stem no fit to these images would give
    torch.save(net.state_dict(), tmp_path / "fastnet.pth")
    t = trainer(tiny_betons, tmp_path / "run", "model.name=fastnet", "model.width=16",
                f"model.pretrained={tmp_path / 'fastnet.pth'}")
    try:
        assert torch.equal(t.model.state_dict()["stem.weight"], net.stem.weight)
    finally:
        t.finish()
    fresh = trainer(tiny_betons, tmp_path / "fresh", "model.name=fastnet", "model.width=16")
    try:  # a fresh start still fits it to the data
        assert not torch.equal(fresh.model.state_dict()["stem.weight"], net.stem.weight)
    finally:
        fresh.finish()


def test_freezing_up_to_a_stage_keeps_it_and_its_statistics(tiny_betons, tmp_path):
    t = trainer(tiny_betons, tmp_path / "run", "model.freeze=layer1", "train.epochs=1")
    try:
        before = {k: v.clone() for k, v in t.model.state_dict().items()}
        t.fit()
        after = t.model.state_dict()
    finally:
        t.finish()
    frozen = [k for k in before if k.startswith(("features.0.", "features.1.", "features.2."))]  # prep, layer1
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert any("running_mean" in k for k in frozen)
    assert not torch.equal(before["features.3.0.weight"], after["features.3.0.weight"])  # layer2 trains


def test_head_lr_scale_and_layer_decay_set_each_stages_lr():
    model = build_model("resnet9", width=8)
    opt = build_optimizer(model, OptimConfig(lr=1.0, head_lr_scale=10, layer_decay=0.5))
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    stages = dict(model.stage_modules())
    assert lr_of[id(model.fc.weight)] == 10.0  # the head: x10, no decay
    for depth, name in enumerate(STAGES["resnet9"]):  # prep 0.5^4 ... layer3 0.5^1
        params = [p for m in stages[name] for p in m.parameters()]
        assert {lr_of[id(p)] for p in params} == {0.5 ** (4 - depth)}, name
    decayed = {g["weight_decay"] for g in opt.param_groups if any(p.ndim > 1 for p in g["params"])}
    assert decayed == {5e-4} and len(opt.param_groups) == 2 * 4 + 1  # weights/biases per stage, head weight


@pytest.mark.parametrize("bad, message", [
    ("model.freeze=layer9", "Valid for resnet9: none, backbone, prep, layer1, layer2, layer3"),
    ("model.pretrained=torchvision", "needs a torchvision model"),
    ("optim.layer_decay=1.5", "layer_decay"),
])
def test_fine_tuning_settings_are_checked(bad, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY[1], ["data.dir=/d", "run.dir=/r", bad])
    with pytest.raises(ConfigError, match="torchvision's widths"):
        load_config(TINY[1], ["data.dir=/d", "run.dir=/r", "model.name=tv_resnet18", "model.width=8"])


def test_torchvision_weights_offline_say_to_pass_a_file(tiny_betons, tmp_path, capsys, monkeypatch):
    """No internet here: the download fails at once, and the message says what to do instead."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # no cached weights either
    with pytest.raises(SystemExit) as e:
        train_module.main([*TINY, f"data.dir={tiny_betons}", f"run.dir={tmp_path / 'run'}", "model.name=tv_resnet18",
                           "model.width=64", "model.pretrained=torchvision"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "downloading torchvision's ResNet18_Weights" in err
    assert "Without internet, pass a file instead: model.pretrained=PATH" in err


def test_a_planted_file_in_the_hub_cache_never_runs(tiny_betons, tmp_path, capsys, monkeypatch):
    """torch hub's cache ($TORCH_HOME/hub/checkpoints) is often shared on a cluster. A file planted under
    the name torchvision downloads to is read weights-only, and checked against the hash in its name: a
    crafted pickle is refused without running, a state dict that is not torchvision's is refused too."""
    from tests.test_checkpoint import crafted_checkpoint

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    marker = tmp_path / "PWNED"
    crafted_checkpoint(cache / "resnet18-f37072fd.pth", marker)
    args = [*TINY, f"data.dir={tiny_betons}", f"run.dir={tmp_path / 'run'}", "model.name=tv_resnet18",
            "model.width=64", "model.pretrained=torchvision"]
    with pytest.raises(SystemExit) as e:
        train_module.main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "could run code" in err and len(err.strip().splitlines()) == 1, err
    assert not marker.exists()
    torch.save(build_model("tv_resnet18", 1000).state_dict(), cache / "resnet18-f37072fd.pth")  # not theirs
    with pytest.raises(SystemExit) as e:
        train_module.main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "does not match the sha256 prefix in its name" in err, err


def test_weights_of_another_model_are_refused_naming_the_keys(tiny_betons, imagenet_like_pth, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train_module.main([*TINY, f"data.dir={tiny_betons}", f"run.dir={tmp_path / 'run'}", "model.name=tv_resnet18",
                           "model.width=64", f"model.pretrained={imagenet_like_pth}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "does not fit this model" in err and "layer1.0.conv1.weight" in err


# ---------------------------------------------------------------- transfer, with weights learned here
HALVES = (CLASSES[:5], CLASSES[5:])
FINETUNE = ["optim.lr=0.2", "optim.warmup_epochs=0.2"]
MARGIN = 0.08  # measured on this subset, seeds 0-2: fine-tuned 49.8 / 55.4 / 54.0 %, scratch 34.8 / 36.8 / 21.0 %


@pytest.fixture(scope="module")
def halves(tmp_path_factory) -> tuple[Path, Path]:
    """Betons of the subset's first 5 classes (A) and its other 5 (B)."""
    from dist_resnet.data.prepare import prepare
    from tests.conftest import SUBSET

    root = tmp_path_factory.mktemp("halves")
    for name, classes in zip("AB", HALVES):
        prepare(str(SUBSET), root / name, classes=classes, workers=2)
    return root / "A", root / "B"


def run(betons: Path, run_dir: Path, *overrides: str) -> dict:
    with contextlib.redirect_stdout(io.StringIO()):
        return train_module.main(["--config", str(ROOT / "configs" / "cpu.yaml"), f"data.dir={betons}",
                                  f"run.dir={run_dir}", "model.width=8", "data.pipeline=device", "run.progress=false", "train.precision=fp32",
                                  *overrides])


def test_pretraining_on_five_classes_helps_the_other_five(halves, tmp_path):
    """Pretrain on airplane..deer (6 epochs), then 1 epoch on dog..truck: fine-tuned from those weights
    vs from scratch, the same budget (the cpu preset's recipe for scratch, its own for fine-tuning)."""
    a, b = halves
    pre = run(a, tmp_path / "pretrain", "train.epochs=6")
    tuned = run(b, tmp_path / "finetuned", "train.epochs=1", f"model.pretrained={tmp_path / 'pretrain' / 'last.pt'}",
                *FINETUNE)
    scratch = run(b, tmp_path / "scratch", "train.epochs=1")
    report = json.loads((tmp_path / "finetuned" / "pretrained.json").read_text())
    print(f"pretrained on A: {pre['test_acc']:.3f}; on B after 1 epoch: fine-tuned {tuned['test_acc']:.3f}, "
          f"from scratch {scratch['test_acc']:.3f}")
    assert report["head"] == "reset for 5 classes" and report["reset"] == ["fc.weight"]  # other classes: new head
    assert tuned["test_acc"] >= scratch["test_acc"] + MARGIN


def test_a_safetensors_export_of_the_same_classes_keeps_its_head(halves, tmp_path):
    """Our .safetensors carries its class names: on data with those classes the head is loaded too."""
    from dist_resnet import export

    a, _ = halves
    run(a, tmp_path / "src", "train.epochs=1")
    weights = tmp_path / "weights.safetensors"
    with contextlib.redirect_stdout(io.StringIO()):
        export.main([str(tmp_path / "src" / "last.pt"), "--format", "safetensors", "--out", str(weights)])
    t = trainer(a, tmp_path / "run", f"model.pretrained={weights}", "model.width=8")
    try:
        source = files.read(tmp_path / "src" / "last.pt").weights
        assert all(torch.equal(v, source[k]) for k, v in t.model.state_dict().items())
        assert json.loads((tmp_path / "run" / "pretrained.json").read_text())["head"] == "loaded"
        assert t.data.feed.mean == json.loads((a / "manifest.json").read_text())["mean"]  # ours: the dataset's statistics
    finally:
        t.finish()


def test_freeze_keeps_frozen_batchnorm_in_eval_mode():
    model = build_model("resnet9", width=8)
    assert freeze(model, "layer1") == ["prep", "layer1"]
    model.train()
    bn = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert [m.training for m in bn] == [False, False, False, False, True, True, True, True]


# ---------------------------------------------------------------- any image folder, any size
@pytest.fixture(scope="module")
def three_classes(subset_dir, tmp_path_factory) -> Path:
    """3 classes at 48x40 (upscaled from the subset's real images): 300 train, 60 test."""
    from PIL import Image

    from dist_resnet.data.prepare import prepare
    from tests.conftest import image_folder

    root = tmp_path_factory.mktemp("three")
    src = image_folder(root / "src", subset_dir, {"train": 100, "test": 20}, CLASSES[:3])
    for f in src.rglob("*.jpg"):
        with Image.open(f) as im:
            im.resize((48, 40), Image.BICUBIC).save(f)
    prepare(str(src), root / "betons", workers=2)
    return root / "betons"


def test_training_takes_any_class_count_and_image_size(three_classes, tmp_path):
    m = run(three_classes, tmp_path / "run", "train.epochs=1", "train.batch_size=100")
    assert m["completed"] and m["test_count"] == 60
    per_class = json.loads((tmp_path / "run" / "per_class.json").read_text())
    assert list(per_class["accuracy"]) == CLASSES[:3]
    m = run(three_classes, tmp_path / "resized", "train.epochs=1", "train.batch_size=100", "data.resize=64")
    assert m["completed"] and files.read(tmp_path / "resized" / "last.pt").image_shape == [40, 48]


def test_a_model_that_cannot_take_the_size_says_so(three_classes, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run(three_classes, tmp_path / "run", "model.name=fastnet")
    err = capsys.readouterr().err
    assert e.value.code == 2 and "model.name=fastnet is built for 32x32 images" in err and "gives 40x48" in err
