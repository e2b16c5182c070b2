"""FFCV's Loader, made safe to leave early and to fail in: its decode thread's errors reach the consumer,
and an epoch left before its end joins that thread.

FFCV decodes, batches and copies to the device (in the AMP dtype, channels_last); normalisation and
the seeded augmentations run afterwards on the device (dist_resnet.data.augment). This is the only
module that imports FFCV, which compiles numba code at import: dist_resnet.data.loader imports it only
for `data.pipeline=ffcv` and for betons that dist_resnet.data.beton cannot read.
"""
from __future__ import annotations

import contextlib
import os
import queue
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from ffcv.loader import Loader as FFCVLoader
from ffcv.loader import OrderOption
from ffcv.loader.epoch_iterator import EpochIterator
from ffcv.pipeline.compiler import Compiler
from ffcv.traversal_order.base import TraversalOrder

from . import crops
from .manifest import DataError


def workers(requested: int) -> int:
    """FFCV's decode threads for this rank: `data.num_workers`, at most this rank's share of the cores it may
    run on (divided among the node's ranks, LOCAL_WORLD_SIZE as torchrun and slurm/train.sh set it): 8 ranks
    of 8 threads each on an 8-core node would oversubscribe it 8 times. numba refuses more threads than cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    ranks = os.environ.get("LOCAL_WORLD_SIZE", "")
    return max(1, min(requested, cores // (int(ranks) if ranks.isdigit() and int(ranks) > 0 else 1)))


def pipelines(device: torch.device, dtype: torch.dtype, decoder=None) -> dict:
    """The image pipeline (`decoder`, default: the stored image as it is) and the label pipeline."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import SimpleRGBImageDecoder
    from ffcv.transforms import Convert, Squeeze, ToDevice, ToTensor, ToTorchImage

    cuda = device.type == "cuda"
    # ToTorchImage(channels_last=True) is a free NHWC->NCHW view; its False path returns CPU tensors
    # even after ToDevice(cuda), so the memory format is changed on the device instead (to_format)
    return {
        "image": [SimpleRGBImageDecoder() if decoder is None else decoder, ToTensor(), ToDevice(device, non_blocking=cuda),
                  ToTorchImage(channels_last=True), Convert(dtype)],
        "label": [IntDecoder(), ToTensor(), ToDevice(device, non_blocking=cuda), Squeeze(1)],
    }


class _EpochIterator(EpochIterator):
    """FFCV's decode thread, made to hand its error to the consumer. FFCV's own thread dies on an
    exception and leaves the consumer waiting forever on its queue (a hung rank, then a hung job)."""

    error: BaseException | None = None

    def start(self) -> None:
        """Hand each seeded crop decoder its epoch's key (in a buffer FFCV just allocated), then decode."""
        graph = self.loader.graph
        for op, nodes in graph.operation_to_node.items():
            if isinstance(op, crops.SeededRandomResizedCrop):
                for node in nodes:
                    op.arm(self.memory_allocations["operation"][graph.node_to_id[node]], op.key)
        super().start()

    def run(self) -> None:
        try:
            super().run()
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            self.error = e
            while not self.terminate_event.is_set():  # wake the consumer
                try:
                    self.output_queue.put(None, timeout=0.5)
                    return
                except queue.Full:
                    pass

    def __next__(self):
        try:
            return super().__next__()
        except StopIteration:
            if self.error is not None:
                e = self.error
                raise DataError(f"reading {self.loader.fname} failed in FFCV's decode thread ({type(e).__name__}: "
                                f"{e}); the beton may be damaged: python -m dist_resnet.data.prepare --verify "
                                f"{Path(self.loader.fname).parent}") from e
            raise


class Loader(FFCVLoader):
    """FFCV's Loader with an epoch iterator that reports its decode thread's errors."""

    def __iter__(self) -> _EpochIterator:  # FFCV 1.0.2's __iter__, with _EpochIterator
        Compiler.set_num_threads(self.num_workers)
        order = self.next_traversal_order()
        selected_order = order[:len(self) * self.batch_size]
        self.next_epoch += 1
        if self.code is None or self.recompile:
            self.generate_code()
        return _EpochIterator(self, selected_order)


class Order(TraversalOrder):
    """One of our sample orders (dist_resnet.data.loader.GlobalBatchOrder) as the TraversalOrder that
    FFCV's Loader takes: FFCV calls it with the loader, then asks it for each epoch's indices."""

    def __init__(self, order):
        self.order = order  # not TraversalOrder.__init__, which needs the loader: FFCV passes it in __call__

    def __call__(self, loader) -> "Order":
        self.loader = loader
        return self

    def sample_order(self, epoch: int) -> np.ndarray:
        return self.order.sample_order(epoch)


def shuffled(path: str, order, batch_size: int, num_workers: int, os_cache: bool, batches_ahead: int, seed: int,
             device: torch.device, dtype: torch.dtype, decoder=None) -> Loader:
    """A loader of `order`'s samples (drop_last): the train split, in the world-size-invariant order."""
    return Loader(path, batch_size=batch_size, num_workers=workers(num_workers), os_cache=os_cache,
                  order=Order(order), seed=seed, pipelines=pipelines(device, dtype, decoder), drop_last=True,
                  batches_ahead=batches_ahead)


def sequential(path: str, indices: np.ndarray, batch_size: int, num_workers: int, os_cache: bool,
               batches_ahead: int, device: torch.device, dtype: torch.dtype, decoder=None) -> Loader:
    """A loader of `indices` in their order, every one once (evaluation, or reading a split into memory)."""
    return Loader(path, batch_size=batch_size, num_workers=workers(num_workers), os_cache=os_cache,
                  order=OrderOption.SEQUENTIAL, distributed=False, indices=indices,
                  pipelines=pipelines(device, dtype, decoder), drop_last=False, batches_ahead=batches_ahead)


def iterate(loader: Loader, threads: int | None) -> Iterator:
    """One epoch of `loader`, ended cleanly however it is left. FFCV sets torch's thread count to its
    worker count (in `iter` and again in its decode thread); `threads` is set back after the first batch,
    which the decode thread can only deliver after it has made its own call."""
    batches = iter(loader)
    try:
        for i, batch in enumerate(batches):  # not `yield from`: on close it would end FFCV's memory
            if i == 0 and threads:            # context under the still running thread, whose page reads
                torch.set_num_threads(threads)  # could then hang
            yield batch
    finally:
        stop_epoch(batches)


def stop_epoch(batches) -> None:
    """End an FFCV epoch iterator left before its last batch (a benchmark's few steps, a preempted run).
    FFCV never joins its decode thread. One still running at interpreter exit can abort the process:
    CI saw "terminate called without an active exception" (exit -6) after a benchmark left an epoch
    open. The thread sees the event within one batch plus 0.5 s."""
    if not batches.is_alive():
        return  # ran to its end; FFCV closes it
    batches.terminate_event.set()
    while batches.is_alive():
        batches.join(timeout=1.0)
        with contextlib.suppress(queue.Empty):  # frees the thread's last put, which has no timeout
            batches.output_queue.get_nowait()
    batches.close()
