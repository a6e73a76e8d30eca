"""Threads that share a CPU's cores without fighting over them: work items computed by a few worker threads and
handed back in order (:func:`map_in_order`), each worker's torch ops on its share of the intra-op threads
(:func:`torch_threads`, set in the calling thread before the workers start: new threads take its value). File
reads, checksums and torch's kernels release the GIL, so a worker that reads its next block (one core) overlaps the
others' products instead of stalling torch's own thread team."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from itertools import islice
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def map_in_order(function: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """``function(item)`` for every item, computed by ``workers`` threads and yielded in the items' order. At most
    ``workers`` items are in flight besides the one the caller holds (memory: that many results); an item's
    exception is raised where its result would have been yielded, and no item is started after it (those already
    running finish, their results dropped)."""
    items = iter(items)
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="influence-worker") as pool:
        pending = deque(pool.submit(function, item) for item in islice(items, max(1, workers)))
        try:
            while pending:
                result = pending.popleft().result()
                pending.extend(pool.submit(function, item) for item in islice(items, 1))
                yield result
        finally:
            for future in pending:
                future.cancel()


@contextmanager
def torch_threads(count: int) -> Iterator[int]:
    """Torch ops on ``count`` intra-op threads while inside (worker threads supply the rest of the parallelism);
    yields the thread count it replaced."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield threads
    finally:
        torch.set_num_threads(threads)
