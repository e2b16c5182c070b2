import pytest
import torch

from dist_resnet.checkpoint import unwrap
from dist_resnet.models import MODELS, build_model


@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_builds_and_gives_logits(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, width=16 if name == "resnet9" else 64).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


def test_resnet18_has_the_known_11_17M_parameters():
    n = sum(p.numel() for p in build_model("resnet18").parameters())
    assert n == 11_173_962  # CIFAR ResNet-18 (3x3 stem, 10 classes)


def test_resnet9_width_scales_the_classic_net():
    classic = sum(p.numel() for p in build_model("resnet9", width=64).parameters())
    assert 6.5e6 < classic < 6.6e6  # DAWNBench ResNet-9 is ~6.57M parameters
    narrow = sum(p.numel() for p in build_model("resnet9", width=16).parameters())
    assert narrow < classic / 14


def test_channels_last_gives_the_same_output():
    torch.manual_seed(0)
    model = build_model("resnet18").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        cl = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-4)


def test_unknown_model_is_rejected_with_the_choices():
    with pytest.raises(ValueError, match="resnet18"):
        build_model("resnet1000")


def test_unwrap_strips_compile_and_ddp_wrappers():
    import torch.distributed as dist

    model = build_model("resnet9", width=8)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # a real DDP needs a group
    try:
        wrapped = torch.nn.parallel.DistributedDataParallel(torch.compile(model))  # the trainer's wrap order
        assert isinstance(wrapped, torch.nn.parallel.DistributedDataParallel)
        assert unwrap(wrapped) is model and unwrap(torch.compile(model)) is model
        assert not any(k.startswith(("module.", "_orig_mod.")) for k in unwrap(wrapped).state_dict())
    finally:
        dist.destroy_process_group()


def test_ema_warms_up_then_tracks_the_weights_and_buffers():
    from dist_resnet.optim import EMA

    model = build_model("resnet9", width=8)
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model.features[0][1].running_mean.add_(1.0)
    ema.update(step=0)  # warm-up decay min(0.9, 1/10) = 0.1: mostly the new weights
    w, e = model.fc.weight, ema.module.fc.weight
    torch.testing.assert_close(e, w - 0.1)
    torch.testing.assert_close(ema.module.features[0][1].running_mean, torch.full((8,), 0.9))
    ema.update(step=1000)  # full decay 0.9: 0.9 * (w - 0.1) + 0.1 * w
    torch.testing.assert_close(ema.module.fc.weight, w - 0.09)
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_whitening_stem_decorrelates_real_image_patches(source_images):
    import torch.nn.functional as F

    x = torch.from_numpy(source_images["train"][0][::3]).permute(0, 3, 1, 2).float() / 255  # every class
    x = (x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), keepdim=True)
    model = build_model("fastnet")
    model.init_from_data(x)
    w = model.stem.weight
    assert not w.requires_grad and torch.equal(w[12:], -w[:12])
    with torch.no_grad():
        z = F.conv2d(x.double(), w[:12].double()).permute(0, 2, 3, 1).reshape(-1, 12)
    cov = z.T @ z / len(z)
    off = cov - torch.diag(torch.diag(cov))
    print(f"whitened 2x2 patches: diagonal {torch.diag(cov).min():.3f}..{torch.diag(cov).max():.3f}, "
          f"largest off-diagonal {off.abs().max():.1e}")
    assert off.abs().max() < 1e-5  # decorrelated
    patches = x.double().unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 12)
    lam = torch.linalg.eigvalsh(patches.T @ patches / len(patches)).flip(0)
    torch.testing.assert_close(torch.diag(cov), lam / (lam + 5e-4), rtol=1e-4, atol=1e-6)  # unit variance, less eps


def test_fastnet_has_airbench_stages_and_the_residual_is_an_option():
    from dist_resnet.config import load_config
    from dist_resnet.models import Residual

    model = build_model("fastnet")
    assert not any(isinstance(m, Residual) for m in model.modules())  # conv-pool-BN-GELU-conv-BN-GELU
    assert 1.9e6 < sum(p.numel() for p in model.parameters()) < 2.0e6
    older = build_model("fastnet", residual=True)
    assert sum(isinstance(m, Residual) for m in older.modules()) == 3
    assert sum(p.numel() for p in older.parameters()) == sum(p.numel() for p in model.parameters())
    # a checkpoint's config from before model.residual existed is read as the residual shape it had
    old_cfg = {"model": {"name": "fastnet", "width": 64}, "data": {"dir": "/d"}, "run": {"dir": "/r"}}
    assert load_config(None, [], base=old_cfg).model.residual
    assert any(k.startswith("stages.0.residual.body.") for k in older.state_dict())  # the keys it was saved with
    assert not load_config(None, ["data.dir=/d", "run.dir=/r", "model.name=fastnet"]).model.residual


def test_the_whitening_bias_freezes_in_the_optimizer_and_the_stem_runs_in_fp32():
    """Frozen, the bias still gets its gradient (DDP needs one for every parameter at every step) but the
    optimizer's step leaves it as it is; the rest of the net trains."""
    from dist_resnet.engine.warmup import WhitenBias

    model = build_model("fastnet", width=8)
    x = torch.randn(4, 3, 32, 32)
    sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9, weight_decay=0.1)
    hook = WhitenBias(model.stem, 1, sgd)
    for epoch in (0, 1):
        hook.start_epoch(epoch)
        bias, head = model.stem.bias.detach().clone(), model.fc.weight.detach().clone()
        sgd.zero_grad(set_to_none=True)
        model(x).sum().backward()
        assert model.stem.bias.grad is not None and model.stem.bias.requires_grad
        sgd.step()
        assert torch.equal(model.stem.bias, bias) == (epoch == 1) and not torch.equal(model.fc.weight, head)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.stem(x.bfloat16()).dtype == torch.float32
    with pytest.raises(ValueError, match="model.norm=batch"):
        build_model("fastnet", norm="group")


@pytest.mark.parametrize("name, blocks", [("resnet18", 8), ("preact_resnet18", 8), ("resnet50", 16), ("resnet9", 2),
                                          ("tv_resnet18", 8), ("tv_resnet50", 16)])
def test_drop_path_rises_with_depth_acts_in_training_only_and_keeps_the_keys(name, blocks):
    from dist_resnet.models import regularize
    from dist_resnet.models.layers import DropPath

    torch.manual_seed(0)
    plain = build_model(name, 10, 8 if not name.startswith("tv_") else 64)
    model = build_model(name, 10, 8 if not name.startswith("tv_") else 64)
    model.load_state_dict(plain.state_dict())
    rates = regularize(model, 0.5, 0.3)
    assert len(rates) == blocks and rates[0] == 0 and rates[-1] == pytest.approx(0.3)
    assert rates == sorted(rates) and len([m for m in model.modules() if isinstance(m, DropPath)]) == blocks
    assert model.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(8, 3, 32, 32)
    plain.eval(), model.eval()
    assert torch.equal(model(x), plain(x))  # evaluation: neither dropout nor drop-path acts
    model.train()
    outs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        outs.append(model(x))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])  # seeded by torch's generator


def test_drop_path_drops_whole_branches_per_sample():
    from dist_resnet.models.layers import DropPath

    torch.manual_seed(0)
    out = DropPath(0.25).train()(torch.ones(4000, 3, 2, 2))
    kept = out[:, 0, 0, 0]
    assert kept.unique().tolist() == [0.0, pytest.approx(4 / 3)] and (out == kept.view(-1, 1, 1, 1)).all()
    assert abs((kept == 0).float().mean().item() - 0.25) < 0.03  # the rate, and the mean kept at 1


def test_drop_path_needs_residual_branches():
    from dist_resnet.config import ConfigError, load_config
    from dist_resnet.models import regularize

    with pytest.raises(ConfigError, match="model.name=fastnet has none: use model.dropout, or model.residual=true"):
        load_config(None, ["model.name=fastnet", "model.drop_path=0.1", "data.dir=x", "run.dir=y"])
    load_config(None, ["model.name=fastnet", "model.residual=true", "model.drop_path=0.1", "data.dir=x", "run.dir=y"])
    with pytest.raises(ValueError, match="FastNet has no residual branches"):
        regularize(build_model("fastnet", 10, 8), 0.0, 0.1)


def test_a_net_that_would_corrupt_memory_in_channels_last_trains_in_contiguous_memory(tiny_betons, tmp_path):
    """torch 2.14.1's oneDNN corrupts the heap in the weight gradient of a strided 1x1 convolution laid out
    channels_last on the CPU with 2-15 input channels (docs/onednn_1x1.py: 2-7 crash on AVX2, 8 was reported on
    AVX512): resnet18 at width 4 has such shortcuts, and its first backward passes ended in a segfault, "double
    free or corruption" or a hang. The run says so in one line and trains in contiguous memory to its end; a
    width with no such layer keeps channels_last, and a GPU is not concerned."""
    from dist_resnet.models import channels_last_fault
    from tests.conftest import TINY
    from tests.launch import launch

    log = tmp_path / "log"
    argv = [*TINY, f"data.dir={tiny_betons}", f"run.dir={tmp_path / 'r'}", "model.name=resnet18", "model.width=4",
            "train.epochs=1"]
    codes = launch("dist_resnet.train", argv, log, env={"OMP_NUM_THREADS": "1"}, timeout=120)
    text = log.read_text()
    assert codes == [0], text[-3000:]
    assert "note: model.channels_last is off for this run" in text and "(stages.2.shortcut.0;" in text, text
    assert channels_last_fault(build_model("resnet18", 10, 16), torch.device("cpu")) is None
    assert channels_last_fault(build_model("resnet18", 10, 4), torch.device("cuda")) is None
