"""`DaemonThreads`: a small pool of daemon threads that runs callables and hands back
futures, for work a process must be able to leave behind when it exits.

concurrent.futures' ThreadPoolExecutor joins its threads at interpreter exit: one thread
stuck in a libvirt call to a cell that never answers would keep nanod from ever stopping.
The per-cell libvirt threads (reconciler/drivers/libvirt_hv.py) and the long-work lane
(reconciler/longwork.py) use this pool instead; what they leave unfinished, the reconciler
converges after the restart. Threads start as work arrives (at most `workers`) and end
after `idle_seconds` without work, so a pool nobody uses any more holds no thread.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
_Work = tuple[concurrent.futures.Future[Any], Callable[..., Any], tuple[Any, ...]]


class DaemonThreads:
    def __init__(self, workers: int, name: str, *, idle_seconds: float = 30.0) -> None:
        if workers < 1:
            raise ValueError(f"{name}: at least one thread is needed, not {workers}")
        self._workers = workers
        self._name = name
        self._idle_seconds = idle_seconds
        self._queue: queue.SimpleQueue[_Work] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._idle = 0  # threads waiting for work

    def submit(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._lock:
            # the caller's context goes along: a store write made on this thread for a
            # reconcile carries its fence (state/leases.py) and its request ids
            self._queue.put((future, contextvars.copy_context().run, (fn, *args)))
            if self._idle < self._queue.qsize() and len(self._threads) < self._workers:
                thread = threading.Thread(target=self._serve, daemon=True,
                                          name=f"{self._name}-{len(self._threads)}")
                self._threads.add(thread)
                thread.start()
        return future

    def thread_count(self) -> int:
        with self._lock:
            return len(self._threads)

    def _serve(self) -> None:
        me = threading.current_thread()
        while True:
            with self._lock:
                self._idle += 1
            try:
                future, fn, args = self._queue.get(timeout=self._idle_seconds)
            except queue.Empty:
                with self._lock:
                    self._idle -= 1
                    if self._queue.empty():  # checked under the lock submit() holds
                        self._threads.discard(me)
                        return
                continue
            with self._lock:
                self._idle -= 1
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as exc:  # for whoever waits on the future
                    future.set_exception(exc)
