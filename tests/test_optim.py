"""The optimisation pieces the fast preset leans on: LR factors, the norm-bias LR group, lookahead."""
import pytest
import torch
from torch import nn

from dist_resnet.config import OptimConfig, Schedule
from dist_resnet.models import build_model
from dist_resnet.optim import Lookahead, build_optimizer, build_scheduler, lr_factor


def test_lr_factor_warms_up_from_start_and_decays_to_end():
    f = [lr_factor(s, 100, 20, Schedule.onecycle, start=0.2, end=0.07) for s in range(100)]
    assert f[0] == pytest.approx(0.2 + 0.8 / 20) and f[19] == pytest.approx(1.0)
    assert f[20] == pytest.approx(1.0) and f[99] == pytest.approx(0.07 + 0.93 / 80)
    assert all(a <= b for a, b in zip(f[:20], f[1:20])) and all(a >= b for a, b in zip(f[20:], f[21:]))
    assert lr_factor(5, 10, 1, Schedule.cosine) == pytest.approx(0.5 * (1 + torch.cos(torch.tensor(4 / 9 * torch.pi))))
    assert lr_factor(0, 10, 2, Schedule.onecycle) == pytest.approx(0.5)  # start=0: (step + 1) / warmup


def test_norm_biases_get_a_scaled_lr_and_no_weight_decay():
    model = build_model("fastnet", width=8)
    opt = build_optimizer(model, OptimConfig(lr=0.5, weight_decay=1e-3, norm_bias_lr_scale=64))
    decay, no_decay, norm = opt.param_groups
    bn_biases = {id(m.bias) for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    assert {id(p) for p in norm["params"]} == bn_biases and norm["lr"] == 32.0 and norm["weight_decay"] == 0
    assert [id(p) for p in no_decay["params"]] == [id(model.stem.bias)]  # the whitening bias trains, BN scales don't
    assert decay["weight_decay"] == 1e-3 and all(p.ndim > 1 for p in decay["params"])
    assert id(model.stem.weight) not in {id(p) for g in opt.param_groups for p in g["params"]}  # frozen whitening
    sched = build_scheduler(opt, OptimConfig(lr=0.5, warmup_epochs=1, lr_start=0.2), 10, 2)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5 * 0.28, 0.5 * 0.28, 32.0 * 0.28])
    assert sched.base_lrs == [0.5, 0.5, 32.0]


def test_airbench_decay_of_norm_biases_and_the_whitening_bias():
    """optim.norm_bias_decay: BN biases decay by wd / norm_bias_lr_scale, so lr x decay per step equals the
    weights'; optim.bias_decay: the whitening bias decays at the base weight decay."""
    model = build_model("fastnet", width=8)
    opt = build_optimizer(model, OptimConfig(lr=0.5, weight_decay=1e-3, norm_bias_lr_scale=64, norm_bias_decay=True,
                                             bias_decay=True))
    decay, bias, norm = opt.param_groups
    assert norm["lr"] * norm["weight_decay"] == pytest.approx(decay["lr"] * decay["weight_decay"])
    assert [id(p) for p in bias["params"]] == [id(model.stem.bias)] and bias["weight_decay"] == 1e-3


def test_default_groups_are_unchanged_without_the_scale():
    opt = build_optimizer(build_model("resnet9", width=8), OptimConfig())
    assert len(opt.param_groups) == 2


def test_lookahead_pulls_the_weights_to_the_slow_average_every_k_steps():
    model = nn.Linear(2, 2, bias=False)
    nn.init.zeros_(model.weight)
    la = Lookahead(model, decay=0.5, every=2, total_steps=4)
    with torch.no_grad():
        model.weight.fill_(1.0)
        la.step(1)  # not a multiple of 2: nothing happens
        assert torch.equal(model.weight, torch.ones(2, 2)) and torch.equal(la.module.weight, torch.zeros(2, 2))
        model.weight.fill_(2.0)
        la.step(2)  # d = 0.5**2 * (2/4)**3 = 1/32: slow = d * 0 + (1 - d) * 2, and the model jumps there
        torch.testing.assert_close(model.weight, torch.full((2, 2), 2 * 31 / 32))
        torch.testing.assert_close(la.module.weight, model.weight)
        model.weight.fill_(5.0)
        la.step(3)
        assert torch.equal(model.weight, torch.full((2, 2), 5.0))
        la.step(4)  # the last step: d = 0.25, then the model becomes the slow weights
        torch.testing.assert_close(model.weight, torch.full((2, 2), 0.25 * 2 * 31 / 32 + 0.75 * 5))
