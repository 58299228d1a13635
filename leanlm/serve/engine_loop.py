"""The engine on a background thread, fed by an asyncio server.

The engine is single-threaded: only the loop thread touches it. HTTP handlers send commands (add,
abort) through a thread-safe queue and receive StepOutputs on an asyncio.Queue of their event loop.
torch releases the GIL inside its kernels, so the server keeps answering while a step runs.
"""
from __future__ import annotations

import asyncio
import queue
import threading
import uuid

from leanlm.errors import LeanLMError
from leanlm.infer.engine import Engine, SamplingParams, StepOutput


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._cmds: queue.Queue = queue.Queue()
        self._wake = threading.Event()
        self._sinks: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._stopping = False
        self.step_errors = 0
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._run, name="leanlm-engine", daemon=True)
        self._thread.start()

    # ---- called from the event loop -----------------------------------------------------------
    def add(self, prompt: list[int], params: SamplingParams, sink: asyncio.Queue) -> str:
        """Queue a request; its StepOutputs (or a LeanLMError) arrive on `sink`."""
        rid = uuid.uuid4().hex
        with self._lock:
            if self._stopping:
                raise LeanLMError("server is shutting down")
            self._sinks[rid] = (asyncio.get_running_loop(), sink)
        self._cmds.put(("add", rid, prompt, params))
        self._wake.set()
        return rid

    def abort(self, rid: str) -> None:
        self._cmds.put(("abort", rid, None, None))
        self._wake.set()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop stepping; every in-flight request ends with finish_reason "abort"."""
        with self._lock:
            self._stopping = True
        self._wake.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # ---- the loop thread ----------------------------------------------------------------------
    def _deliver(self, rid: str, item, final: bool) -> None:
        with self._lock:
            target = self._sinks.pop(rid, None) if final else self._sinks.get(rid)
        if target is not None:
            loop, sink = target
            try:
                loop.call_soon_threadsafe(sink.put_nowait, item)
            except RuntimeError:  # the client's event loop is gone
                pass

    def _drain(self) -> None:
        while True:
            try:
                op, rid, prompt, params = self._cmds.get_nowait()
            except queue.Empty:
                return
            if op == "add":
                try:
                    self.engine.add_request(prompt, params, request_id=rid)
                except LeanLMError as e:
                    self._deliver(rid, e, True)
            elif self.engine.abort(rid):
                self._deliver(rid, StepOutput(rid, None, finished=True, finish_reason="abort"), True)
            else:
                with self._lock:
                    self._sinks.pop(rid, None)

    def _abort_all(self) -> None:
        self._drain()
        for rid in list(self.engine.seqs):
            self.engine.abort(rid)
        with self._lock:
            rids = list(self._sinks)
        for rid in rids:
            self._deliver(rid, StepOutput(rid, None, finished=True, finish_reason="abort"), True)

    def _run(self) -> None:
        while True:
            self._wake.clear()
            if self._stopping:
                self._abort_all()
                return
            self._drain()
            if not self.engine.has_unfinished():
                self._wake.wait(0.5)
                continue
            try:
                outs = self.engine.step()
            except Exception as e:  # a bug or OOM: fail the in-flight requests, keep serving new ones
                self.step_errors += 1
                self.last_error = f"{type(e).__name__}: {e}"
                self._abort_all()
                continue
            for o in outs:
                self._deliver(o.request_id, o, o.finished)
