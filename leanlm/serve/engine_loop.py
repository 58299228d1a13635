"""The engine on a background thread, fed by an asyncio server.

The engine is single-threaded: only the loop thread touches it. HTTP handlers send commands (add,
abort) through a thread-safe queue and receive StepOutputs on an asyncio.Queue of their event loop.
torch releases the GIL inside its kernels, so the server keeps answering while a step runs.

Nothing a request does may stop the loop: a step that raises finishes only the requests of that
step (each gets a StepOutput with finish_reason "error"); anything else that escapes fails every
request in flight and the loop goes on; if the thread dies anyway, a watchdog fails the requests it
held and starts a new one. Admission is bounded (requests and tokens in flight): over it, `add`
raises Overloaded and the server answers 429.
"""
from __future__ import annotations

import asyncio
import queue
import threading
import time
import uuid
from dataclasses import dataclass

from leanlm.errors import LeanLMError
from leanlm.infer.engine import Engine, SamplingParams, StepError, StepOutput


class Overloaded(Exception):
    """Too many requests or tokens in flight; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class ShuttingDown(Exception):
    """The server is draining or stopped: no new requests."""


@dataclass
class Limits:
    max_pending: int = 256  # requests (each choice of each prompt counts) queued or running
    max_pending_tokens: int = 1 << 20  # their prompt + max_tokens, summed


class AsyncEngine:
    def __init__(self, engine: Engine, limits: Limits | None = None, watchdog_s: float = 0.25):
        self.engine = engine
        self.limits = limits or Limits()
        self._cmds: queue.Queue = queue.Queue()
        self._wake = threading.Event()
        self._sinks: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue, int]] = {}
        self._lock = threading.Lock()
        self._stopping = False
        self.draining = False
        self.pending_tokens = 0
        self.step_errors = 0
        self.restarts = 0
        self.rejected = 0
        self.last_error: str | None = None
        self._thread = self._start()
        self._watchdog = threading.Thread(target=self._watch, args=(watchdog_s,), name="leanlm-engine-watchdog",
                                          daemon=True)
        self._watchdog.start()

    def _start(self) -> threading.Thread:
        t = threading.Thread(target=self._run, name="leanlm-engine", daemon=True)
        t.start()
        return t

    # ---- called from the event loop -----------------------------------------------------------
    def add_many(self, items: list[tuple[list[int], SamplingParams]], sink: asyncio.Queue, adapter: int = 0
                 ) -> list[str]:
        """Queue several requests at once (all or none); their StepOutputs arrive on `sink`."""
        cost = [len(p) + sp.max_tokens for p, sp in items]
        loop = asyncio.get_running_loop()
        rids = [uuid.uuid4().hex for _ in items]
        with self._lock:
            if self._stopping or self.draining:
                raise ShuttingDown("the server is shutting down; retry on another replica")
            lim = self.limits
            if len(self._sinks) + len(items) > lim.max_pending:
                self.rejected += 1
                raise Overloaded(f"{len(self._sinks)} requests in flight, the server takes at most "
                                 f"{lim.max_pending}; retry later")
            if self.pending_tokens + sum(cost) > lim.max_pending_tokens:
                self.rejected += 1
                raise Overloaded(f"{self.pending_tokens} tokens in flight (prompts + max_tokens), the server "
                                 f"takes at most {lim.max_pending_tokens}; retry later or lower max_tokens")
            for rid, c in zip(rids, cost):
                self._sinks[rid] = (loop, sink, c)
            self.pending_tokens += sum(cost)
        for rid, (p, sp) in zip(rids, items):
            self._cmds.put(("add", rid, p, sp, adapter))
        self._wake.set()
        return rids

    def add(self, prompt: list[int], params: SamplingParams, sink: asyncio.Queue, adapter: int = 0) -> str:
        return self.add_many([(prompt, params)], sink, adapter)[0]

    def abort(self, rid: str) -> None:
        self._cmds.put(("abort", rid, None, None, 0))
        self._wake.set()

    def call(self, fn, timeout: float = 30.0):
        """Run fn(engine) on the loop thread between steps (adapter loading); returns its result or raises."""
        done, box = threading.Event(), {}
        self._cmds.put(("call", None, (fn, done, box), None, 0))
        self._wake.set()
        if not done.wait(timeout):
            raise TimeoutError("the engine did not answer in time")
        if "error" in box:
            raise box["error"]
        return box.get("value")

    @property
    def num_pending(self) -> int:
        return len(self._sinks)

    def begin_drain(self) -> None:
        """Refuse new requests; the ones in flight run on."""
        with self._lock:
            self.draining = True

    def shutdown(self, timeout: float = 10.0, reason: str = "the server is shutting down") -> None:
        """Stop stepping; every request still in flight ends with an error."""
        with self._lock:
            self._stopping = True
            self._stop_reason = reason
        self._wake.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        if not self._thread.is_alive():
            self._fail_all(reason)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # ---- the loop thread ----------------------------------------------------------------------
    def _deliver(self, rid: str, item, final: bool) -> None:
        with self._lock:
            target = self._sinks.pop(rid, None) if final else self._sinks.get(rid)
            if target is not None and final:
                self.pending_tokens -= target[2]
        if target is not None:
            loop, sink, _ = target
            try:
                loop.call_soon_threadsafe(sink.put_nowait, item)
            except RuntimeError:  # the client's event loop is gone
                pass

    def _error(self, rid: str, message: str) -> None:
        self._deliver(rid, StepOutput(rid, None, finished=True, finish_reason="error", error=message), True)

    def _drain(self) -> None:
        while True:
            try:
                op, rid, a, b, adapter = self._cmds.get_nowait()
            except queue.Empty:
                return
            if op == "add":
                if rid not in self._sinks:
                    continue  # failed or aborted before it reached the engine
                try:
                    self.engine.add_request(a, b, request_id=rid, adapter=adapter)
                except LeanLMError as e:
                    self._deliver(rid, e, True)
                except Exception as e:
                    self._error(rid, f"{type(e).__name__}: {e}")
            elif op == "call":
                fn, done, box = a
                try:
                    box["value"] = fn(self.engine)
                except BaseException as e:
                    box["error"] = e
                done.set()
            elif self.engine.abort(rid):
                self._deliver(rid, StepOutput(rid, None, finished=True, finish_reason="abort"), True)
            else:
                with self._lock:
                    target = self._sinks.pop(rid, None)
                    if target is not None:
                        self.pending_tokens -= target[2]

    def _fail_all(self, message: str) -> None:
        """Every request in flight gets an error; the engine is reset to empty."""
        try:
            self.engine.reset()
        except Exception:
            pass
        with self._lock:
            rids = list(self._sinks)
        for rid in rids:
            self._error(rid, message)

    def _run(self) -> None:
        while True:
            try:
                self._wake.clear()
                if self._stopping:
                    self._drain()
                    self._fail_all(getattr(self, "_stop_reason", "the server is shutting down"))
                    return
                self._drain()
                if not self.engine.has_unfinished():
                    self._wake.wait(0.5)
                    continue
                try:
                    outs = self.engine.step()
                except StepError as e:  # only that step's requests fail
                    self.step_errors += 1
                    self.last_error = str(e)
                    for rid in e.request_ids:
                        self._error(rid, f"the engine failed while computing this request ({e})")
                    continue
                for o in outs:
                    self._deliver(o.request_id, o, o.finished)
            except Exception as e:  # a bug outside a step: fail what is in flight, keep serving
                self.step_errors += 1
                self.last_error = f"{type(e).__name__}: {e}"
                self._fail_all(f"the engine failed ({self.last_error})")

    def _watch(self, every: float) -> None:
        while not self._stopping:
            time.sleep(every)
            if self._stopping or self._thread.is_alive():
                continue
            # the loop thread died (a BaseException): fail its requests, start a new one
            self._fail_all("the engine stopped unexpectedly and was restarted; retry the request")
            self._thread = self._start()
            self.restarts += 1
