"""Muon (dist_resnet/muon.py): the orthogonalisation against an SVD reference, which tensors it trains,
its distributed form against one process, and its state across a save and a load. A run killed mid-epoch
resumes bit-exactly with it: tests/test_reliability.py (KILL_OPTS trains with optim.name=muon on 2 ranks)."""
from __future__ import annotations

import copy

import pytest
import torch

from dist_resnet.config import OptimConfig, OptimizerName
from dist_resnet.models import build_model
from dist_resnet.muon import NS_COEFFICIENTS, newton_schulz, owners
from dist_resnet.optim import build_optimizer

MUON = dict(name=OptimizerName.muon, lr=0.05, momentum=0.85, weight_decay=5e-4, muon_lr=0.24, muon_momentum=0.6)


def quintic(s: torch.Tensor, steps: int) -> torch.Tensor:
    """What the iteration does to each singular value of the normalised matrix, in fp64."""
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        s = a * s + b * s ** 3 + c * s ** 5
    return s


@pytest.mark.parametrize("shape", [(64, 288), (256, 64)])  # a wide and a tall filter matrix
@pytest.mark.parametrize("steps", [3, 5])
def test_the_update_has_the_gradients_singular_vectors_and_the_quintics_singular_values(shape, steps):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    o = newton_schulz(g, steps).double()
    expected = u @ torch.diag(quintic(s / g.norm(), steps)) @ vh
    rel = ((o - expected).norm() / expected.norm()).item()
    print(f"{shape}, {steps} steps: relative distance to U f(S) V^T {rel:.1e}")
    assert rel < 0.03  # bf16's 8-bit mantissa, through 3-5 matrix products
    got = torch.linalg.svdvals(o)
    band = quintic(s / g.norm(), steps)  # the band the coefficients give these singular values
    assert (got >= band.min() - 0.03).all() and (got <= band.max() + 0.03).all(), (got, band)
    if steps == 5:  # torch's default: every direction of a random matrix brought near 1, none past 1.2
        assert 0.6 < got.min() and got.max() < 1.2


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon arrived in torch 2.9")
def test_the_iteration_is_torchs_own():
    from torch.optim._muon import _zeropower_via_newtonschulz

    for shape in [(64, 288), (256, 64)]:
        g = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
        assert torch.equal(newton_schulz(g, 5), _zeropower_via_newtonschulz(g, NS_COEFFICIENTS, 5, 1e-7))


@pytest.mark.parametrize("name", ["fastnet", "resnet9"])
def test_the_trainable_filters_take_muon_and_everything_else_sgd(name):
    model = build_model(name, num_classes=10, width=8)
    opt = build_optimizer(model, OptimConfig(**MUON, decay_by_lr=True, head_lr_scale=4))
    names = {id(p): n for n, p in model.named_parameters()}
    muon = [names[id(p)] for g in opt.param_groups if g["muon"] for p in g["params"]]
    sgd = {names[id(p)]: g for g in opt.param_groups if not g["muon"] for p in g["params"]}
    filters = [n for n, p in model.named_parameters() if p.ndim == 4 and p.requires_grad]
    assert muon == filters and len(filters) >= 6
    assert set(sgd) == {n for n, p in model.named_parameters() if p.requires_grad} - set(filters)
    assert "fc.weight" in sgd and not any(n.endswith("conv.weight") for n in sgd)
    if name == "fastnet":  # the frozen whitening filters train with neither; its bias with SGD
        assert "stem.weight" not in muon + list(sgd) and "stem.bias" in sgd
    head = sgd["fc.weight"]
    assert head["lr"] == pytest.approx(4 * MUON["lr"])
    assert head["weight_decay"] == pytest.approx(MUON["weight_decay"] / 4)
    assert [g["lr"] for g in opt.param_groups if g["muon"]] == [MUON["muon_lr"]]


def grads_for(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn(p.shape, generator=g)


def steps(model, opt, first: int, n: int) -> None:
    for i in range(first, first + n):
        grads_for(model, i)
        opt.step()


def test_a_step_rescales_each_filter_then_steps_along_the_orthogonalised_nesterov_direction():
    """The first step written out, against the optimizer's; the other groups as torch.optim.SGD computes them."""
    import math

    model = build_model("resnet9", num_classes=10, width=8)
    twin, start = copy.deepcopy(model), copy.deepcopy(model)
    opt = build_optimizer(model, OptimConfig(**MUON))
    index, twins = {id(p): i for i, p in enumerate(model.parameters())}, list(twin.parameters())
    groups = [{"lr": g["lr"], "weight_decay": g["weight_decay"], "params": [twins[index[id(p)]] for p in g["params"]]}
              for g in opt.param_groups if not g["muon"]]
    ref = torch.optim.SGD(groups, lr=0.1, momentum=MUON["momentum"], nesterov=True)
    grads_for(model, 0)
    grads_for(twin, 0)
    opt.step()
    ref.step()
    m, lr = MUON["muon_momentum"], MUON["muon_lr"]
    for (n, p), q, p0 in zip(model.named_parameters(), twin.parameters(), start.parameters()):
        if p.ndim == 4:  # the norm fixed at sqrt(out), then -lr NS(g + m B) with B = g at the first step
            g = q.grad
            u = newton_schulz(g.add(g, alpha=m).reshape(len(g), -1), 3, torch.float32).view_as(g)  # fp32 on a CPU
            expected = p0.detach().mul(math.sqrt(len(p0)) / p0.norm()).add(u.float(), alpha=-lr)
            assert torch.equal(p, expected), n
        else:
            assert torch.equal(p, q), n


def test_the_momentum_buffers_resume_bit_exactly():
    model = build_model("resnet9", num_classes=10, width=8)
    twin = copy.deepcopy(model)
    a = build_optimizer(model, OptimConfig(**MUON))
    steps(model, a, 0, 4)
    b = build_optimizer(twin, OptimConfig(**MUON))
    steps(twin, b, 0, 2)
    saved = copy.deepcopy(b.state_dict())
    resumed = build_optimizer(twin, OptimConfig(**MUON))
    resumed.load_state_dict(saved)
    assert len(saved["state"]) == sum(1 for p in twin.parameters() if p.requires_grad)
    steps(twin, resumed, 2, 2)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))


def test_owners_balance_the_work_and_cover_every_matrix():
    shapes = [torch.Size(s) for s in [(16, 27), (32, 144), (32, 288), (64, 288), (64, 576), (128, 576), (128, 1152)]]
    for world in (1, 2, 3):
        o = owners(shapes, world)
        assert sorted(set(o)) == list(range(min(world, len(shapes))))
    assert owners(shapes, 2)[-1] != owners(shapes, 2)[-2]  # the two costliest go to different ranks


def _rank(rank: int, world: int, init: str, out: str, start: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    calls = []
    model = build_model("resnet9", num_classes=10, width=8)
    model.load_state_dict(torch.load(start))
    opt = build_optimizer(model, OptimConfig(**MUON), dist.group.WORLD)
    ns = opt.newton_schulz
    opt.newton_schulz = lambda g, s: calls.append(tuple(g.shape)) or ns(g, s)
    steps(model, opt, 0, 3)
    torch.save({"weights": model.state_dict(), "calls": calls, "state": opt.state_dict()}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_two_ranks_share_the_orthogonalisation_and_step_exactly_as_one_process(tmp_path):
    """Every rank holds the same gradients (as after DDP's all-reduce); each orthogonalises about half the
    matrices, and all end on the very weights and momentum buffers one process computes."""
    import torch.multiprocessing as mp

    torch.manual_seed(0)
    model = build_model("resnet9", num_classes=10, width=8)
    init = copy.deepcopy(model.state_dict())
    opt = build_optimizer(model, OptimConfig(**MUON))
    steps(model, opt, 0, 3)
    torch.save(init, tmp_path / "init.pt")
    store, out, start = f"file://{tmp_path / 'store'}", str(tmp_path / "out"), str(tmp_path / "init.pt")
    mp.spawn(_rank, args=(2, store, out, start), nprocs=2)
    ranks = [torch.load(tmp_path / f"out.{r}") for r in range(2)]
    n_filters = sum(1 for p in model.parameters() if p.ndim == 4)
    per_step = [len(r["calls"]) // 3 for r in ranks]
    print(f"matrices orthogonalised per step, rank 0 and 1: {per_step} of {n_filters}")
    assert sum(per_step) == n_filters and min(per_step) >= 2
    for r in ranks:
        assert all(torch.equal(r["weights"][k], v) for k, v in model.state_dict().items())
        assert all(torch.equal(r["state"]["state"][i]["momentum_buffer"], s["momentum_buffer"])
                   for i, s in opt.state_dict()["state"].items())


def test_muon_keys_without_muon_are_refused():
    from dist_resnet.config import ConfigError
    from dist_resnet.config.checks import check_optim

    with pytest.raises(ConfigError, match="applies only with optim.name=muon"):
        check_optim(OptimConfig(muon_lr=0.1))
    check_optim(OptimConfig(name=OptimizerName.muon, muon_lr=0.1))
