"""A request queue and the one thread that runs the model over batches of requests.

Requests for any tasks wait in one queue; the loop takes the first waiting request, gathers
whatever else arrives within ``wait_s`` (up to ``max_batch``), and decodes them as one mixed batch
(:func:`hydraopt.runtime.generation.generate_batch`): x·A' is computed once per layer for all of
them, each row then gets its task's head. Requests arriving during a batch wait for the next one
(static batching; a row that finishes early rides along until its batch ends).

Only this thread touches the model, so the HTTP layer never runs torch on its event loop.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from hydraopt.runtime.generation import Generation, SamplingParams, generate_batch
from hydraopt.runtime.model import RuntimeModel


@dataclass
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
    """Collects :class:`Job` s into mixed batches and decodes them on one thread.

    Args:
        runtime: the model with its bundle installed.
        max_batch: most requests in one batch.
        wait_s: how long the first request of a batch waits for company.
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
        self.batches = 0  # how many batches ran (tests read it to see requests batched together)
        self.largest_batch = 0

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
            try:
                first = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get(timeout=self.wait_s))
                except queue.Empty:
                    break
            self._run(batch)

    def _run(self, batch: list[Job]) -> None:
        live = [job for job in batch if job.future.set_running_or_notify_cancel()]
        if not live:
            return
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(live))

        def on_text(row: int, text: str) -> None:
            callback = live[row].on_text
            if callback is not None:
                callback(text)

        try:
            results = generate_batch(
                self.runtime,
                [job.prompt_ids for job in live],
                [job.task for job in live],
                [job.params for job in live],
                on_text=on_text,
            )
        except Exception as error:  # the batch failed as a whole; the loop keeps serving
            for job in live:
                job.future.set_exception(error)
            return
        for job, result in zip(live, results, strict=True):
            job.future.set_result(result)
