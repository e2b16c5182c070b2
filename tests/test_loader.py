"""The FFCV loaders on real betons: lossless, full coverage, disjoint shards, exact eval partition."""
import threading
from collections import Counter

import numpy as np
import pytest
import torch

from dist_resnet.config import DataConfig
from dist_resnet.data.loader import GlobalBatchOrder
from dist_resnet.data.manifest import DataError, read_manifest
from tests.loaders import test_data, train_data
from tests.launch import launch
from tests.shard_probe import as_uint8

CPU = torch.device("cpu")


def keys(images: np.ndarray) -> Counter:
    return Counter(img.tobytes() for img in images)


def test_test_beton_round_trip_is_bit_exact_in_order(betons, source_images):
    data = test_data(DataConfig(dir=str(betons), num_workers=2), 128, CPU, torch.float32, False)
    xs, ys = zip(*[(as_uint8(x), y.clone().numpy()) for x, y in data.loader])
    images, labels = source_images["test"]
    np.testing.assert_array_equal(np.concatenate(xs), images)
    np.testing.assert_array_equal(np.concatenate(ys), labels)


def test_one_train_epoch_visits_every_sample_once_and_reshuffles(betons, source_images):
    data = train_data(DataConfig(dir=str(betons), num_workers=2), 250, seed=0, device=CPU, dtype=torch.float32,
                     channels_last=False)
    assert len(data) == 20
    images, labels = source_images["train"]
    label_of = {img.tobytes(): int(lab) for img, lab in zip(images, labels)}
    orders = []
    for epoch in range(2):
        data.loader.next_epoch = epoch
        seen = [(as_uint8(x), y.clone().numpy()) for x, y in data.loader]
        xs = np.concatenate([s[0] for s in seen])
        ys = np.concatenate([s[1] for s in seen])
        assert keys(xs) == keys(images)  # every sample exactly once, bit-exact
        assert all(label_of[x.tobytes()] == y for x, y in zip(xs, ys))
        orders.append(xs)
    assert not np.array_equal(orders[0], orders[1])  # RANDOM order reshuffles every epoch


def test_epoch_yields_normalised_augmented_batches(betons):
    data = train_data(DataConfig(dir=str(betons), num_workers=2), 500, seed=0, device=CPU, dtype=torch.float32,
                     channels_last=True)
    step, [(x, y)] = next(iter(data.epoch(0)))
    assert step == 0
    assert x.shape == (500, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert abs(x.mean().item()) < 0.3 and 0.7 < x.std().item() < 1.3


def test_two_ranks_get_disjoint_shards_and_an_exact_test_partition(betons, source_images, tmp_path):
    codes = launch("tests.shard_probe", [str(betons), str(tmp_path), "250"], tmp_path / "log", nproc=2)
    assert codes == [0, 0], (tmp_path / "log").read_text()
    r0, r1 = (np.load(tmp_path / f"rank{r}.npz") for r in range(2))
    train, _ = source_images["train"]
    for epoch in ("epoch0", "epoch1"):
        assert len(r0[epoch]) == len(r1[epoch]) == 2500
        assert keys(r0[epoch]) + keys(r1[epoch]) == keys(train)  # disjoint, and together the whole set
    assert not np.array_equal(r0["epoch0"], r0["epoch1"])
    test, test_labels = source_images["test"]
    assert len(r0["test_x"]) + len(r1["test_x"]) == 1000  # no padding: each image once
    np.testing.assert_array_equal(r0["test_x"], test[0::2])
    np.testing.assert_array_equal(r1["test_x"], test[1::2])
    np.testing.assert_array_equal(r1["test_y"], test_labels[1::2])


def test_missing_data_dir_says_how_to_make_it(tmp_path):
    with pytest.raises(DataError, match="dist_resnet.data.prepare"):
        read_manifest(tmp_path)


def test_batch_larger_than_a_shard_is_an_error_not_an_empty_epoch(betons, tmp_path):
    """Checked once, when a run is built, before any loader exists (in-process, with a 2-rank environment)."""
    from dist_resnet.config import ConfigError, load_config
    from dist_resnet.distributed import DistEnv
    from dist_resnet.train import Trainer
    from tests.conftest import ROOT

    two = DistEnv(rank=0, world_size=2, local_rank=0, local_world_size=2, device=CPU)
    for overrides, message in ((["train.batch_size=8192"], "larger than the 5000 train images"),
                               (["train.batch_size=250", "train.accum_steps=2"],
                                "does not divide by the world size 2 x train.accum_steps 2")):
        cfg = load_config(ROOT / "configs" / "cpu.yaml", [f"data.dir={betons}", f"run.dir={tmp_path}", *overrides])
        with pytest.raises(ConfigError, match=message):
            Trainer(cfg, two)


def test_global_order_is_the_same_for_any_world_size_and_resumes_mid_epoch():
    one = GlobalBatchOrder(1000, 100, seed=3, rank=0, world=1)
    two = [GlobalBatchOrder(1000, 100, seed=3, rank=r, world=2) for r in range(2)]
    for epoch in range(2):
        full = one.sample_order(epoch).reshape(10, 100)
        halves = [o.sample_order(epoch).reshape(10, 50) for o in two]
        np.testing.assert_array_equal(full, np.concatenate(halves, axis=1))
    assert not np.array_equal(one.sample_order(0), one.sample_order(1))
    one.skip = (1, 4)
    np.testing.assert_array_equal(one.sample_order(1), full.reshape(-1)[400:])
    assert len(one.sample_order(1)) == 1000  # a skip applies once


def test_device_resident_mode_gives_the_very_same_batches_as_ffcv(betons):
    """data.pipeline=device: same samples, same order, same augmentations, same eval partition."""
    kw = dict(seed=5, device=CPU, dtype=torch.float32, channels_last=True, rank=1, world=2)
    aug = dict(translate=2, cutout=4, translate_pad="reflect", flip_alternate=True)
    cfg = DataConfig(dir=str(betons), num_workers=2, **aug)
    ffcv = train_data(cfg, 500, **kw)
    dev = train_data(DataConfig(dir=str(betons), num_workers=2, pipeline="device", **aug), 500, **kw)
    for epoch, start in [(0, 0), (1, 3)]:
        a, b = list(ffcv.epoch(epoch, start)), list(dev.epoch(epoch, start))
        assert len(a) == len(b) == 10 - start
        for (sa, [(xa, ya)]), (sb, [(xb, yb)]) in zip(a, b):
            assert sa == sb and torch.equal(ya, yb) and torch.equal(xa, xb)
    tf = test_data(cfg, 64, CPU, torch.float32, False, rank=1, world=3)
    td = test_data(DataConfig(dir=str(betons), pipeline="device"), 64, CPU, torch.float32, False, rank=1, world=3)
    for (xa, ya), (xb, yb) in zip(tf, td, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_alternate_flip_shows_each_image_the_other_way_in_the_next_epoch(betons):
    data = train_data(DataConfig(dir=str(betons), num_workers=2, pipeline="device", translate=0, flip_alternate=True),
                     500, seed=2, device=CPU, dtype=torch.float32, channels_last=False)
    images = data.normalize(data.resident[0])

    def flipped(epoch: int) -> dict[int, bool]:
        perm, out = data.order.permutation(epoch), {}
        for step, [(x, _)] in data.epoch(epoch):
            idx = perm[step * 500:(step + 1) * 500]
            same = (x == images[idx]).flatten(1).all(1)
            mirrored = (x == images[idx].flip(3)).flatten(1).all(1)
            assert (same | mirrored).all()
            out.update(zip(idx.tolist(), mirrored.tolist()))
        return out

    e0, e1 = flipped(0), flipped(1)
    assert len(e0) == len(e1) == 5000
    assert 0.45 < sum(e0.values()) / 5000 < 0.55
    assert sum(e0[i] != e1[i] for i in e0) > 4990  # left-right symmetric images count as both


def test_leaving_an_epoch_early_stops_ffcv_decode_thread(betons):
    """A benchmark's few steps or a preempted run leave epochs early. FFCV's decode thread must be gone
    by then: one still decoding at interpreter exit aborted the process (CI saw exit -6)."""
    from ffcv.loader.epoch_iterator import EpochIterator

    def decoding() -> list:
        return [t for t in threading.enumerate() if isinstance(t, EpochIterator) and t.is_alive()]

    cfg = DataConfig(dir=str(betons), num_workers=2, batches_ahead=2)
    data = train_data(cfg, 250, seed=0, device=CPU, dtype=torch.float32, channels_last=False)
    # late: the queue holds the last two batches, and the thread waits in its final put, which has no timeout
    for taken in (1, len(data) - cfg.batches_ahead):
        epoch = data.epoch(0)
        for _ in range(taken):
            next(epoch)
        assert decoding()
        epoch.close()
        assert not decoding()
    assert sum(1 for _ in data.epoch(1)) == len(data)  # the loader still runs whole epochs
    test = iter(test_data(cfg, 100, CPU, torch.float32, False))
    next(test)
    test.close()
    assert not decoding()


def test_ffcv_does_not_undo_the_thread_count(betons):
    """FFCV sets torch's thread count to its worker count at every epoch (and in its decode thread):
    on a 16-core machine 4 ranks would each run 8 threads, 32 in all. The loaders put it back."""
    cfg = DataConfig(dir=str(betons), num_workers=2)
    data = train_data(cfg, 500, 0, CPU, torch.float32, False, threads=1)
    assert torch.get_num_threads() == 1
    seen = [torch.get_num_threads() for _ in data.epoch(0)]
    assert set(seen[1:]) == {1} and torch.get_num_threads() == 1
    test = test_data(cfg, 500, CPU, torch.float32, False, threads=1)
    assert [torch.get_num_threads() for _ in test][1:] == [1] and torch.get_num_threads() == 1


def corrupt_sample_pointer(beton, sample: int) -> None:
    """Point one image's data at a place past the end of the file (size unchanged): the kind of damage
    that only a hash finds, and that FFCV reads mid-epoch."""
    from ffcv.reader import Reader

    raw = bytearray(beton.read_bytes())
    meta = Reader(str(beton)).metadata
    offset = raw.find(meta.tobytes()[:64])
    bad = meta.copy()
    bad[sample]["f0"]["data_ptr"] = len(raw) + 10**6
    raw[offset:offset + meta.nbytes] = bad.tobytes()
    beton.write_bytes(bytes(raw))


def test_a_decode_error_mid_epoch_ends_the_epoch_with_that_error(betons, tmp_path):
    """FFCV's decode thread dies on an exception and its consumer then waits forever on the queue.
    Numba's bounds check (off by default) turns this damage into such an exception."""
    import shutil

    import numba

    damaged = tmp_path / "damaged"
    shutil.copytree(betons, damaged)
    corrupt_sample_pointer(damaged / "train.beton", 2500)
    old, numba.config.BOUNDSCHECK = numba.config.BOUNDSCHECK, 1
    try:
        data = train_data(DataConfig(dir=str(damaged), num_workers=2), 250, 0, CPU, torch.float32, False)
        done = []

        def consume():
            try:
                for step, _ in data.epoch(0):
                    done.append(step)
            except DataError as e:
                done.append(e)

        t = threading.Thread(target=consume, daemon=True)
        t.start()
        t.join(120)
        assert not t.is_alive(), "the epoch hangs after the decode thread failed"
    finally:
        numba.config.BOUNDSCHECK = old
    assert isinstance(done[-1], DataError) and 0 < len(done) - 1 < len(data), done[-3:]
    assert "train.beton failed in FFCV's decode thread" in str(done[-1]) and "--verify" in str(done[-1])


@pytest.mark.parametrize("damage, message", [
    ("not json", "is not valid JSON"),  # truncated, or edited by hand
    ('{"classes": []}', "'classes' must be a non-empty list"),
    ("drop test", "'test' is missing"),
    ("std zero", "'std' must be > 0"),
])
def test_a_damaged_manifest_is_a_clear_error(betons, tmp_path, damage, message):
    import json
    import shutil

    d = tmp_path / "d"
    shutil.copytree(betons, d)
    m = json.loads((d / "manifest.json").read_text())
    if damage == "drop test":
        del m["test"]
    elif damage == "std zero":
        m["std"] = [0.0, 0.2, 0.2]
    text = damage if damage in ("not json", '{"classes": []}') else json.dumps(m)
    (d / "manifest.json").write_text(text)
    with pytest.raises(DataError, match=f"manifest.json .*{message}.*prepare it again"):
        read_manifest(d)


def test_betons_are_checked_against_the_manifest(betons, tmp_path):
    import shutil

    from dist_resnet.data.manifest import check_betons

    d = tmp_path / "d"
    shutil.copytree(betons, d)
    manifest = read_manifest(d)
    check_betons(d, manifest, hashes=True)
    with open(d / "test.beton", "r+b") as f:  # one flipped byte: same size, other hash
        f.seek(5000)
        b = f.read(1)
        f.seek(5000)
        f.write(bytes([b[0] ^ 1]))
    check_betons(d, manifest)  # sizes only: it passes
    with pytest.raises(DataError, match="test.beton does not match the sha256.*prepare it again"):
        check_betons(d, manifest, hashes=True)
    with open(d / "train.beton", "ab") as f:
        f.write(b"x")
    with pytest.raises(DataError, match=r"train.beton has \d+ bytes but the manifest says \d+: it is truncated"):
        check_betons(d, manifest)


def test_resident_data_that_does_not_fit_is_a_clear_error(betons, monkeypatch):
    from dist_resnet.data import loader

    monkeypatch.setattr(loader, "available_memory", lambda device: 20 * 2**20)  # a machine with 20 MiB free
    with pytest.raises(DataError, match=r"data.pipeline=device needs 0.1 GiB for the train split but this machine "
                                        r"has 0.0 GiB free .* use data.pipeline=ffcv"):
        train_data(DataConfig(dir=str(betons), pipeline="device"), 500, 0, CPU, torch.float32, False)


def test_the_validation_split_is_stratified_fixed_and_exact_across_ranks(betons):
    """val_fraction of every class, the same whatever the training seed; the train data never sees it,
    and 3 ranks evaluate every validation image exactly once."""
    from dist_resnet.data.manifest import Betons
    from dist_resnet.data.split import split_indices

    cfg = DataConfig(dir=str(betons), num_workers=2, val_fraction=0.1)
    opened = Betons.open(betons)
    train_idx, val_idx = split_indices(opened, 0.1, 0)
    labels = opened.train_labels()
    assert len(val_idx) == 500 and np.bincount(labels[val_idx]).tolist() == [50] * 10
    assert len(np.intersect1d(train_idx, val_idx)) == 0 and len(train_idx) + len(val_idx) == 5000
    assert np.array_equal(split_indices(opened, 0.1, 0)[1], val_idx)  # a function of val_seed alone
    assert not np.array_equal(split_indices(opened, 0.1, 1)[1], val_idx)
    data = train_data(cfg, 500, seed=3, device=CPU, dtype=torch.float32, channels_last=False, indices=train_idx)
    assert len(data) == 9 and set(data.order.sample_order(0)) <= set(train_idx.tolist())
    parts = [test_data(cfg, 64, CPU, torch.float32, False, rank=r, world=3, split="train", indices=val_idx)
             for r in range(3)]
    seen = np.concatenate([np.concatenate([y.numpy() for _, y in part]) for part in parts])
    assert sum(p.count for p in parts) == 1500 and len(seen) == 500  # each rank knows the whole count
    assert np.bincount(seen).tolist() == [50] * 10


def test_the_betons_tables_read_without_ffcv_are_ffcvs_own(betons, tmp_path):
    """dist_resnet.data.beton reads prepare's betons with numpy alone (no FFCV import, no pipeline compile):
    its metadata equals FFCV's Reader's, and the raw images it copies are those FFCV decodes."""
    from ffcv.reader import Reader

    from dist_resnet.data.beton import read_raw, table

    for split in ("train", "test"):
        path = str(betons / f"{split}.beton")
        ours, theirs = table(path), Reader(path).metadata
        assert np.array_equal(ours["image"], theirs["f0"]) and np.array_equal(ours["label"], theirs["f1"])
    idx = np.array([999, 3, 500])
    images, labels = read_raw(str(betons / "test.beton"), idx)
    data = test_data(DataConfig(dir=str(betons), num_workers=1), 1000, CPU, torch.float32, False)  # FFCV decodes
    x, y = next(iter(data.loader))
    assert np.array_equal(images, as_uint8(x)[idx]) and np.array_equal(labels, y.numpy()[idx])
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    rows = [(images[i], int(labels[i])) for i in range(3)]  # what read_raw leaves to FFCV: JPEG, other fields
    for name, fields in (("jpeg", {"image": RGBImageField(write_mode="jpg"), "label": IntField()}),
                         ("other", {"image": RGBImageField(write_mode="raw"), "target": IntField()})):
        DatasetWriter(str(tmp_path / f"{name}.beton"), fields, num_workers=1).from_indexed_dataset(rows)
        assert read_raw(str(tmp_path / f"{name}.beton"), np.arange(3)) is None
    assert table(str(tmp_path / "jpeg.beton"))["image"]["mode"].tolist() == [0, 0, 0]


def test_ffcv_threads_are_the_ranks_share_of_the_cores(monkeypatch):
    """8 ranks on a node each asking 8 decode threads would put 64 threads on 8 cores: each rank gets its
    share of the cores it may run on (LOCAL_WORLD_SIZE, as torchrun sets it), never fewer than one."""
    from dist_resnet.data.ffcv import workers

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert workers(8) == 8 and workers(3) == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert workers(8) == 2 and workers(1) == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert workers(8) == 1
