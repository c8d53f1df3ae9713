"""torch.npu streams and events: each stream's work runs in order on a worker thread; the host waits only at syncs.

On the device an operator returns to the host at once and runs later, in order, on its stream; events order
streams; `synchronize()` and host reads wait. Here a stream is a queue with a worker thread: the AFD operators
always go through it (they may spin for flags another rank owes), ordinary tensor work runs at once in the
calling thread when its stream has nothing pending (the common case: no thread hop) and is queued behind the
pending work otherwise. A failure on a stream is kept (sticky, like a device error) and raised at the next host
sync of that stream, after being printed at once: a job never waits in silence on an error.
"""
from __future__ import annotations

import threading
import time
import weakref
from collections import deque
from contextlib import contextmanager

import torch

from ..ops._polling import Waiting
from . import watchdog
from .devices import device_count, device_index

PRIVATEUSE1 = 20  # c10::DeviceType::PrivateUse1
ACL_ERROR_RT_AICPU_EXCEPTION = 507018  # what torch_npu reports when a stream's kernel failed


class StreamError(RuntimeError):
    """Work on an npu stream failed; raised at the next host sync of that stream (synchronize, a host read)."""

    def __init__(self, stream: "Stream", op: str, error: BaseException):
        self.stream_id, self.op, self.error = stream.stream_id, op, error
        code = f", error code {ACL_ERROR_RT_AICPU_EXCEPTION}"
        super().__init__(f"npu:{stream.device_index} stream {stream.stream_id}: {op} failed: "
                         f"{type(error).__name__}: {error} (ACL stream synchronize failed{code})")


class _Task:
    __slots__ = ("fn", "name", "always")

    def __init__(self, fn, name: str, always: bool):
        self.fn, self.name, self.always = fn, name, always


# The queues with work launched and not done, or a kept error (set add/discard are atomic under the GIL): a
# synchronize() with both empty has nothing to wait for, the common case after an operator ran inline.
busy: set = set()


class _Queue:
    """One stream's work: launched and finished counts, the worker, the sticky error."""

    def __init__(self, stream: "Stream"):
        self.stream_ref = stream
        self.cond = threading.Condition()
        self.tasks: deque[_Task] = deque()
        self.launched = 0
        self.done = 0
        self.error: tuple[str, BaseException] | None = None
        self.running: tuple[str, float] | None = None
        self.thread: threading.Thread | None = None

    def launch(self, fn, name: str, always: bool = False) -> int:
        with self.cond:
            self.launched += 1
            busy.add(self)
            self.tasks.append(_Task(fn, name, always))
            if self.thread is None:
                self.thread = threading.Thread(target=self._work, name=f"npu stream {self.stream_ref.stream_id}",
                                               daemon=True)
                self.thread.start()
            self.cond.notify_all()
            return self.launched

    def _work(self) -> None:
        watchdog.current_stream_of_thread.stream = self.stream_ref
        while True:
            with self.cond:
                while not self.tasks:
                    self.cond.wait()
                task = self.tasks[0]
                skip = self.error is not None and not task.always  # a failed stream runs no more kernels
                self.running = (task.name, time.monotonic())
            try:
                if not skip:
                    task.fn()
            except BaseException as exc:  # kept for the host, and said now
                self.keep_error(task.name, exc)
            finally:
                with self.cond:
                    self.tasks.popleft()
                    self.done += 1
                    self.running = None
                    if self.done == self.launched and self.error is None:
                        busy.discard(self)
                    self.cond.notify_all()

    def idle(self) -> bool:
        return self.done == self.launched

    def keep_error(self, name: str, exc: BaseException) -> None:
        """A failure of this stream's work: raised at the next host sync (the first one kept), said now."""
        with self.cond:
            if self.error is None:
                self.error = (name, exc)
            busy.add(self)
        watchdog.announce(f"npu:{self.stream_ref.device_index} stream {self.stream_ref.stream_id}: "
                          f"{name} failed: {type(exc).__name__}: {exc}")

    def take_error(self) -> None:
        """Raise (once) the sticky error of this stream."""
        with self.cond:
            err, self.error = self.error, None
            if self.done == self.launched:
                busy.discard(self)
        if err is not None:
            raise StreamError(self.stream_ref, err[0], err[1]) from err[1]

    def wait(self, seq: int | None = None) -> None:
        """The host waits until the work launched so far (or up to `seq`) is done, then raises a kept error."""
        with self.cond:
            target = self.launched if seq is None else seq
            while self.done < target and self.error is None:
                self.cond.wait(0.1)
                watchdog.check_parent()
        self.take_error()


class Stream(torch.Stream):
    """torch.npu.Stream: a queue of device work with its own worker thread (stream 0 of a device is the default)."""

    _next_id = 1
    _id_lock = threading.Lock()
    _all: list = []  # weak references to every stream made (synchronize() waits for each of a device)

    def __new__(cls, device=None, priority: int = 0, *, stream_id: int | None = None, **kwargs):
        index = device_index(device)
        if stream_id is None:
            with Stream._id_lock:
                stream_id, Stream._next_id = Stream._next_id, Stream._next_id + 1
        self = super().__new__(cls, stream_id=stream_id, device_index=index, device_type=PRIVATEUSE1)
        self.priority = priority
        self._queue = _Queue(self)
        with Stream._id_lock:
            Stream._all = [r for r in Stream._all if r() is not None] + [weakref.ref(self)]
        return self

    @classmethod
    def all_streams(cls) -> list["Stream"]:
        return [s for s in (r() for r in cls._all) if s is not None]

    def __init__(self, *args, **kwargs):  # torch.Stream's own __init__ would try to make a stream again
        pass

    @property
    def npu_stream(self) -> int:
        return self.stream_id

    def launch(self, fn, name: str, always: bool = False) -> int:
        return self._queue.launch(fn, name, always)

    def idle(self) -> bool:
        """Nothing pending: work for this stream may run at once in the calling thread. A kept error is raised."""
        q = self._queue
        if q.error is not None:
            q.take_error()
        return q.done == q.launched

    def query(self) -> bool:
        return self._queue.idle()

    def synchronize(self) -> None:
        self._queue.wait()

    def wait_event(self, event: "Event") -> None:
        event.wait(self)

    def wait_stream(self, stream: "Stream") -> None:
        self.wait_event(stream.record_event())

    def record_event(self, event: "Event | None" = None) -> "Event":
        event = event if event is not None else Event()
        event.record(self)
        return event

    def pending(self) -> str:
        q = self._queue
        running = f", running {q.running[0]} for {time.monotonic() - q.running[1]:.1f}s" if q.running else ""
        return f"stream {self.stream_id}: {q.launched - q.done} pending{running}"

    def __repr__(self) -> str:
        return f"<torch.npu.Stream device=npu:{self.device_index} npu_stream={self.stream_id}>"

    def __eq__(self, other) -> bool:
        return isinstance(other, torch.Stream) and other.stream_id == self.stream_id and \
            other.device_index == self.device_index

    def __hash__(self) -> int:
        return hash((self.device_index, self.stream_id))


class Event:
    """torch.npu.Event: a marker recorded on a stream; other streams and the host wait for it."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False):
        self.enable_timing = enable_timing
        self._cond = threading.Condition()
        self._recorded = 0  # records made (host side)
        self._completed = 0  # records the stream reached
        self._time = 0.0

    def record(self, stream: Stream | None = None) -> None:
        stream = stream if stream is not None else current_stream()
        with self._cond:
            self._recorded += 1
            generation = self._recorded

        def reached():
            with self._cond:
                self._completed = max(self._completed, generation)
                self._time = time.perf_counter()
                self._cond.notify_all()

        stream.launch(reached, "event record", always=True)

    def wait(self, stream: Stream | None = None) -> None:
        """Work launched on `stream` after this waits for the latest record (a never-recorded event: no wait)."""
        stream = stream if stream is not None else current_stream()
        with self._cond:
            target = self._recorded
        if target == 0:
            return
        stream.launch(lambda: self._wait_on_stream(target, stream), "event wait")

    def _wait_on_stream(self, target: int, stream: Stream) -> None:
        waiting = Waiting(f"npu stream {stream.stream_id} event wait", "an event recorded on another stream")
        policy = watchdog.policy()
        while True:
            with self._cond:
                if self._completed >= target:
                    return
            waiting.iterations += 1
            policy(waiting)

    def query(self) -> bool:
        with self._cond:
            return self._completed >= self._recorded

    def synchronize(self) -> None:
        with self._cond:
            target = self._recorded
            while self._completed < target:
                self._cond.wait(0.1)
                watchdog.check_parent()

    def elapsed_time(self, end_event: "Event") -> float:
        """Milliseconds between this event and end_event (both completed)."""
        self.synchronize()
        end_event.synchronize()
        return (end_event._time - self._time) * 1000.0

    def __repr__(self) -> str:
        return f"<torch.npu.Event recorded={self._recorded} completed={self._completed}>"



# -- each thread's current stream per device, and each device's default stream ------------------------------------
_current = threading.local()  # .streams {device: Stream}, per thread
_default_streams: dict[int, Stream] = {}
_default_lock = threading.Lock()


def default_stream(device=None) -> Stream:
    index = device if type(device) is int else device_index(device)
    stream = _default_streams.get(index)
    if stream is None:
        with _default_lock:
            stream = _default_streams.get(index)
            if stream is None:
                stream = _default_streams[index] = Stream(device_index(index), stream_id=0)
    return stream


def current_stream(device=None) -> Stream:
    index = device if type(device) is int and 0 <= device < device_count() else device_index(device)
    streams = getattr(_current, "streams", None)
    if streams is not None and index in streams:
        return streams[index]
    return default_stream(index)


def set_stream(stream: Stream) -> None:
    if not hasattr(_current, "streams"):
        _current.streams = {}
    _current.streams[stream.device_index] = stream


@contextmanager
def stream(s: Stream | None):
    """with torch.npu.stream(s): work launched inside runs on s (None: no change)."""
    if s is None:
        yield
        return
    before = current_stream(s.device_index)
    set_stream(s)
    try:
        yield
    finally:
        set_stream(before)
