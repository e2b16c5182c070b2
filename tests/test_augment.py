import torch

from dist_resnet.data.augment import Augment, Normalize, derive_seed


def batch(n=64):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, 32, 32, generator=g)


def test_same_seed_same_augmentation_and_different_seeds_differ():
    aug = Augment(flip=True, translate=4, cutout=8, device=torch.device("cpu"))
    x = batch()
    assert torch.equal(aug(x, 123), aug(x, 123))
    assert not torch.equal(aug(x, 123), aug(x, 124))


def test_flip_mirrors_about_half_the_images():
    x = batch(512)
    y = Augment(flip=True, translate=0, cutout=0, device=torch.device("cpu"))(x, 1)
    same = (y == x).flatten(1).all(1)
    mirrored = (y == x.flip(3)).flatten(1).all(1)
    assert (same | mirrored).all()
    assert 0.4 < mirrored.float().mean() < 0.6


def test_translate_is_a_shift_with_zero_fill():
    x = batch(256) + 1.0  # strictly positive, so zero padding is recognisable
    y = Augment(flip=False, translate=2, cutout=0, device=torch.device("cpu"))(x, 3)
    shifts = set()
    for i in range(len(x)):
        found = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                 if torch.equal(y[i], torch.nn.functional.pad(x[i], (2, 2, 2, 2))[:, 2 + dy:34 + dy, 2 + dx:34 + dx])]
        assert len(found) == 1
        shifts.add(found[0])
    assert len(shifts) == 25  # every offset in [-2, 2]^2 occurs


def test_cutout_zeroes_one_square_of_at_most_the_given_side():
    x = batch(128) + 1.0
    y = Augment(flip=False, translate=0, cutout=8, device=torch.device("cpu"))(x, 5)
    holes = (y == 0).all(1)  # (n, h, w): pixels zeroed in every channel
    assert ((y == 0) == holes.unsqueeze(1)).all()
    rows, cols = holes.any(2).sum(1), holes.any(1).sum(1)
    assert (rows <= 8).all() and (cols <= 8).all() and (holes.sum((1, 2)) > 0).all()
    assert (holes.sum((1, 2)) == rows * cols).all()  # a rectangle (clipped square)


def test_channels_last_is_kept():
    x = batch().contiguous(memory_format=torch.channels_last)
    y = Augment(True, 2, 4, torch.device("cpu"))(x, 0)
    assert y.is_contiguous(memory_format=torch.channels_last)


def test_normalize_uses_the_dataset_statistics():
    x = torch.full((1, 3, 2, 2), 255.0)
    y = Normalize([0.5, 0.5, 0.5], [0.25, 0.5, 1.0], torch.device("cpu"), torch.float32)(x)
    torch.testing.assert_close(y[0, :, 0, 0], torch.tensor([2.0, 1.0, 0.5]))


def test_derive_seed_is_stable_and_key_sensitive():
    assert derive_seed(0, 1, 2, 3) == derive_seed(0, 1, 2, 3)
    assert len({derive_seed(0, e, s, r) for e in range(3) for s in range(3) for r in range(2)}) == 18


def test_a_sample_gets_the_same_augmentation_on_any_rank_or_micro_batch():
    aug = Augment(flip=True, translate=2, cutout=4, device=torch.device("cpu"))
    x = batch(64)
    whole = aug(x, 9)
    parts = [aug(x[i:i + 16], 9, offset=i, total=64) for i in range(0, 64, 16)]
    assert torch.equal(torch.cat(parts), whole)


def test_reflect_translate_fills_with_the_mirrored_border():
    x = batch(256)
    y = Augment(flip=False, translate=2, cutout=0, device=torch.device("cpu"), pad="reflect")(x, 3)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    for i in range(len(x)):
        assert any(torch.equal(y[i], padded[i, :, 2 + dy:34 + dy, 2 + dx:34 + dx])
                   for dy in range(-2, 3) for dx in range(-2, 3))


def test_alternate_flips_are_fair_then_alternate_per_sample():
    from dist_resnet.data.augment import AlternateFlips

    flips = AlternateFlips(seed=0, n=5000, device=torch.device("cpu"))
    order = torch.randperm(5000)
    e0, e1, e2 = (flips.epoch(e, order) for e in range(3))
    assert 0.45 < e0.float().mean() < 0.55
    assert torch.equal(e1, ~e0) and torch.equal(e2, e0)  # each image is seen both ways in any two epochs
    assert torch.equal(flips.epoch(1, order[:10]), e1[:10])  # a property of the sample, not of its position
    assert not torch.equal(AlternateFlips(seed=1, n=5000, device=torch.device("cpu")).base, flips.base)


def test_cutout_of_any_side_cuts_exactly_that_square_where_it_fits():
    """An odd side makes a square of that side too (it used to be side - 1), clipped at the border."""
    for side in (5, 8):
        x = batch(256) + 1.0
        holes = (Augment(flip=False, translate=0, cutout=side, device=torch.device("cpu"))(x, 7) == 0).all(1)
        rows, cols = holes.any(2).sum(1), holes.any(1).sum(1)
        assert rows.max() == cols.max() == side and (rows <= side).all() and (cols <= side).all()
        assert ((rows == side) & (cols == side)).float().mean() > 0.4  # unclipped holes are whole squares
