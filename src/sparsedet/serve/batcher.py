"""Dynamic batching: requests that arrive together run as one padded forward.

Each request puts its image in a bounded queue and awaits a future. Each of ``workers`` worker
coroutines takes the first waiting request, gathers more until ``max_batch`` are taken or
``max_wait_ms`` have passed, and hands the batch to its inference thread, so the event loop keeps
answering (``/health``, errors, new requests) while batches run. On a CPU two workers, each with
half the cores, answer more images per second than one with all of them: a forward spread over
threads waits at every operator for the slowest thread; two forwards side by side do not
(docs/serve.md has the measurement). A model gives the same detections from several threads.
A full queue refuses at once (``QueueFull``) instead of growing a backlog that no client waits for.
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable


class QueueFull(Exception):
    """The batcher holds ``max_queue`` requests already: answer 503 and let the client retry."""


@dataclass
class _Job:
    item: Any
    future: asyncio.Future
    queued: float = field(default_factory=time.perf_counter)


class Batcher:
    """``await batcher.submit(item)`` -> ``run(items)[i]`` for this item, computed in one call of
    ``run`` with up to ``max_batch - 1`` other items that arrived within ``max_wait_ms``, on one of
    ``workers`` threads.
    ``observe(size, seconds)`` is told each batch's size and its seconds in ``run``; ``on_depth``
    the number of waiting requests whenever it changes."""

    def __init__(self, run: Callable[[list], list], max_batch: int = 8, max_wait_ms: float = 5.0,
                 max_queue: int = 64, workers: int = 1,
                 observe: Callable[[int, float], None] = lambda size, seconds: None,
                 on_depth: Callable[[int], None] = lambda depth: None):
        if max_batch < 1 or max_queue < 1 or workers < 1 or max_wait_ms < 0:
            raise ValueError("max_batch, max_queue and workers must be at least 1, max_wait_ms at least 0")
        self.run, self.max_batch, self.max_wait = run, max_batch, max_wait_ms / 1000
        self.max_queue, self.observe, self.on_depth = max_queue, observe, on_depth
        self.queue: asyncio.Queue[_Job] | None = None
        self.workers = workers
        self.executor = ThreadPoolExecutor(workers, thread_name_prefix="sparsedet-inference")
        self.tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        self.queue = asyncio.Queue(self.max_queue)
        self.tasks = [asyncio.create_task(self._work()) for _ in range(self.workers)]

    async def stop(self) -> None:
        """Finish what is queued, then stop the workers and the inference threads."""
        if self.tasks:
            await self.queue.join()
            for task in self.tasks:
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
        self.executor.shutdown(wait=True)

    async def call(self, function: Callable, *args):
        """``function(*args)`` on an inference thread (anything else that uses the model)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, function, *args)

    @property
    def depth(self) -> int:
        return self.queue.qsize() if self.queue is not None else 0

    async def submit(self, item: Any) -> Any:
        job = _Job(item, asyncio.get_running_loop().create_future())
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            raise QueueFull(f"{self.max_queue} requests are waiting already") from None
        self.on_depth(self.depth)
        return await job.future

    async def _work(self) -> None:
        while True:
            jobs = [await self.queue.get()]
            deadline = asyncio.get_running_loop().time() + self.max_wait
            while len(jobs) < self.max_batch:
                left = deadline - asyncio.get_running_loop().time()
                try:
                    jobs.append(self.queue.get_nowait() if left <= 0 else
                                await asyncio.wait_for(self.queue.get(), left))
                except (asyncio.QueueEmpty, asyncio.TimeoutError):
                    break
            self.on_depth(self.depth)
            await self._run(jobs)
            for _ in jobs:
                self.queue.task_done()

    async def _run(self, jobs: list[_Job]) -> None:
        live = [job for job in jobs if not job.future.done()]  # a client that left cancelled its future
        if not live:
            return
        start = time.perf_counter()
        try:
            results = await self.call(self.run, [job.item for job in live])
        except Exception as err:  # noqa: BLE001 - every waiting request gets the batch's failure
            for job in live:
                if not job.future.done():
                    job.future.set_exception(err)
            return
        finally:
            self.observe(len(live), time.perf_counter() - start)
        for job, result in zip(live, results, strict=True):
            if not job.future.done():
                job.future.set_result(result)
