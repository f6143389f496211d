"""The compile worker: a subprocess that compiles pieces into Inductor's caches while the model runs.

``CompileWorker.submit(job)`` queues a ``PieceJob``; one worker process (``python -m
hetcache_compile.compile_worker``, started at the first job) compiles the jobs one at a time with the
inner compiler the job names, which writes Inductor's FX graph cache and AOTAutograd's cache; the
``Ticket`` it returns is ``done`` when the worker is through. The process that submitted the job then
compiles it itself (``compile_jobs.compile_job``), which finds every cache entry the worker wrote: a
load, not a compilation.

Why a process and not a thread: AOTAutograd and Inductor trace with FX, which patches process-wide
state while it traces (``nn.Module.__call__``, its "tracing now" flag); a compiled model called by
another thread meanwhile fails its Dynamo guards and is compiled again, or refuses to run. A worker
process shares nothing but the cache directory. It inherits the environment
(``TORCHINDUCTOR_CACHE_DIR``), so it writes where this process reads; on a GPU it opens a CUDA context
of its own. It exits when this process does (its input closes).
"""

from __future__ import annotations

import atexit
import collections
import logging
import os
import pickle
import subprocess
import sys
import threading
from dataclasses import dataclass, field

from .compile_jobs import PieceJob

logger = logging.getLogger("hetcache_compile")


@dataclass
class Ticket:
    """A submitted job: ``done`` once the worker is through with it; ``error`` says why it failed, if it did."""

    job: PieceJob
    done: bool = False
    error: str | None = None
    seconds: float = 0.0
    cache_hit: bool = False
    cancelled: bool = False


@dataclass
class CompileWorker:
    """The client side: a queue of tickets, one job in flight, a thread that reads the worker's answers (it
    touches no tensors and no compiler state)."""

    _queue: collections.deque = field(default_factory=collections.deque)
    _in_flight: Ticket | None = None
    _process: subprocess.Popen | None = None
    _lock: threading.Condition = field(default_factory=threading.Condition)

    def submit(self, job: PieceJob) -> Ticket:
        ticket = Ticket(job)
        with self._lock:
            self._queue.append(ticket)
            self._send_next()
        return ticket

    def wait(self, tickets: list[Ticket]) -> None:
        """Block until ``tickets`` are done (or the worker died, which fails them)."""
        with self._lock:
            self._lock.wait_for(lambda: all(t.done for t in tickets))

    def cancel(self, tickets: list[Ticket]) -> None:
        """Drop ``tickets`` not yet sent; the one in flight finishes (its answer is ignored)."""
        with self._lock:
            for ticket in tickets:
                ticket.cancelled = True
            self._queue = collections.deque(t for t in self._queue if not t.cancelled)
            for ticket in tickets:
                if ticket is not self._in_flight:
                    ticket.done = True
            self._lock.notify_all()

    def _send_next(self) -> None:
        """With the lock held: send the next queued job if none is in flight."""
        if self._in_flight is not None or not self._queue:
            return
        ticket = self._queue.popleft()
        try:
            process = self._ensure_process()
            pickle.dump(ticket.job, process.stdin)
            process.stdin.flush()
            self._in_flight = ticket
        except (OSError, pickle.PicklingError) as error:
            self._fail(ticket, f"the compile worker cannot take it: {error}")
            self._send_next()

    def _ensure_process(self) -> subprocess.Popen:
        if self._process is None or self._process.poll() is not None:
            self._process = subprocess.Popen([sys.executable, "-m", "hetcache_compile.compile_worker"],
                                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                             stderr=subprocess.DEVNULL, env=os.environ.copy())
            threading.Thread(target=self._read, args=(self._process,), name="hetcache-compile-worker-reader",
                             daemon=True).start()
            atexit.register(_stop, self._process)
            logger.info("hetcache: started the compile worker (pid %d)", self._process.pid)
        return self._process

    def _read(self, process: subprocess.Popen) -> None:
        while True:
            try:
                error, seconds, cache_hit = pickle.load(process.stdout)
            except (EOFError, OSError, pickle.UnpicklingError):
                with self._lock:
                    if self._in_flight is not None:
                        self._fail(self._in_flight, "the compile worker exited")
                        self._in_flight = None
                    self._send_next()
                return
            with self._lock:
                ticket, self._in_flight = self._in_flight, None
                if ticket is not None:
                    ticket.error, ticket.seconds, ticket.cache_hit, ticket.done = error, seconds, cache_hit, True
                self._send_next()
                self._lock.notify_all()

    def _fail(self, ticket: Ticket, why: str) -> None:
        ticket.error, ticket.done = why, True
        self._lock.notify_all()


_SHARED: list[CompileWorker] = []


def shared_worker() -> CompileWorker:
    """The process's compile worker, made at the first call (one process compiles for every model)."""
    if not _SHARED:
        _SHARED.append(CompileWorker())
    return _SHARED[0]


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        try:
            process.stdin.close()
            process.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            process.kill()


def main() -> None:
    """Compile jobs read from standard input; answer each with (error, seconds, cache hit) on standard output."""
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # whatever the compilers print goes elsewhere
    from .compile_jobs import compile_job_with_its_compiler
    from .passes.offload import offload_ops

    offload_ops()  # hetcache's own operators, which graphs may call
    jobs = sys.stdin.buffer
    while True:
        try:
            job = pickle.load(jobs)
        except EOFError:
            return
        try:
            compiled = compile_job_with_its_compiler(job)
            answer = (None, compiled.seconds, compiled.cache_hit)
        except Exception as error:  # noqa: BLE001 - reported to the client, which compiles the piece itself
            answer = (f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}", 0.0, False)
        pickle.dump(answer, answers)
        answers.flush()


if __name__ == "__main__":
    main()
