"""A request queue and the one thread that runs the model: continuous batching.

Requests for any tasks wait in one queue. The loop keeps one running
:class:`~hydraopt.runtime.generation.Decoder`: between two decode steps it admits whatever is
waiting (up to ``max_batch`` rows in all), prefilling the newcomers and appending them to the
batch, and every request leaves the batch the step it finishes, its future resolved at once. So a
request arriving while others decode joins them at the next step instead of waiting for the batch
to end, and a short answer never waits for a long one. Every step is one forward pass for all rows
of all tasks: x·A' once per layer, then each row's task head. When nothing is decoding, the first
request waits ``wait_s`` for company, so a burst is prefilled together.

Only this thread touches the model, so the HTTP layer never runs torch on its event loop.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import cast

from hydraopt.runtime.generation import Decoder, Generation, RowRequest, SamplingParams
from hydraopt.runtime.model import RuntimeModel


@dataclass(eq=False)  # compared and hashed by identity: a Job is the key of its decoder row
class Job:
    """One validated request waiting to be decoded.

    Attributes:
        prompt_ids: the prompt's token ids.
        task: the task name (known to the runtime: checked before queueing).
        params: its decoding settings.
        on_text: called from the model thread with the text so far (streaming), or None.
        future: resolved with the :class:`Generation` (or the exception of its batch).
    """

    prompt_ids: list[int]
    task: str
    params: SamplingParams
    on_text: Callable[[str], None] | None = None
    future: Future[Generation] = field(default_factory=Future)


class Batcher:
    """Decodes :class:`Job` s on one thread, new ones joining the running batch between steps.

    Args:
        runtime: the model with its bundle installed.
        max_batch: most requests decoding at once.
        wait_s: how long the first request, when nothing is decoding, waits for company.
    """

    def __init__(self, runtime: RuntimeModel, *, max_batch: int = 16, wait_s: float = 0.01):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.runtime = runtime
        self.max_batch = max_batch
        self.wait_s = wait_s
        self._queue: queue.Queue[Job] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="hydraopt-batcher", daemon=True)
        self._decoder = Decoder(runtime, on_text=_stream_text)
        # counters the tests read to see what the loop did
        self.batches = 0  # admissions: prefill passes that brought new rows in
        self.largest_batch = 0  # most rows in one decode step
        self.joined_running = 0  # requests admitted while other rows were mid-decode

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def submit(self, job: Job) -> Future[Generation]:
        self._queue.put(job)
        return job.future

    def _loop(self) -> None:
        while not self._stop.is_set():
            jobs = self._waiting()
            if jobs:
                self._admit(jobs)
            if self._decoder:
                self._step()

    def _waiting(self) -> list[Job]:
        """Jobs to admit now: whatever waits (up to the free rows); block briefly when idle."""
        room = self.max_batch - len(self._decoder)
        jobs: list[Job] = []
        if not self._decoder:
            try:
                jobs.append(self._queue.get(timeout=0.1))
            except queue.Empty:
                return []
            while len(jobs) < room:  # idle: let a burst gather for one prefill
                try:
                    jobs.append(self._queue.get(timeout=self.wait_s))
                except queue.Empty:
                    break
            return jobs
        while len(jobs) < room:
            try:
                jobs.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return jobs

    def _admit(self, jobs: list[Job]) -> None:
        live = [job for job in jobs if job.future.set_running_or_notify_cancel()]
        if not live:
            return
        running = len(self._decoder)
        requests = [RowRequest(job, job.prompt_ids, job.task, job.params) for job in live]
        try:
            finished = self._decoder.add(requests)
        except Exception as error:  # only the newcomers failed; the running rows go on
            for job in live:
                job.future.set_exception(error)
            return
        self.batches += 1
        self.joined_running += len(live) if running else 0
        _resolve(finished)

    def _step(self) -> None:
        self.largest_batch = max(self.largest_batch, len(self._decoder))
        try:
            finished = self._decoder.step()
        except Exception as error:  # the step failed as a whole; the loop keeps serving
            for row in self._decoder.rows:
                cast(Job, row.request.key).future.set_exception(error)
            self._decoder = Decoder(self.runtime, on_text=_stream_text)
            return
        _resolve(finished)


def _stream_text(key: Hashable, text: str) -> None:
    callback = cast(Job, key).on_text
    if callback is not None:
        callback(text)


def _resolve(finished: list[tuple[Hashable, Generation]]) -> None:
    for key, result in finished:
        cast(Job, key).future.set_result(result)
