"""The engine: a loop thread running schedule -> execute -> update, and an asyncio front (add, stream, abort).

The loop runs in its own thread so a forward pass never blocks the event loop; the front hands requests
in under a lock and gets outputs back through per-request outboxes (_Outbox).

Outputs leave the loop as one record per step (`_Record`: the scheduler's Progress — rows, tokens, output
lengths as arrays — and the requests that finished), handed to each event loop with one wake-up. There, in
one pass, a streamed request (or one with stop strings or logprobs) gets an output per token; a whole
response gets nothing until it ends, then one output with all its token ids, detokenised once.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import ctypes
import dataclasses
import logging
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from server.engine.config import EngineConfig
from server.engine.detokenizer import IncrementalText, byte_table
from server.engine.request import Request, RequestOutput, SamplingParams
from server.engine.runner import ModelRunner
from server.engine.scheduler import Progress, QueueFull, Scheduler, SchedulerConfig
from server.engine.step import StepInput, StepOutput, TokenLogprob

__all__ = ["Engine", "EngineConfig", "EngineUnavailable", "PromptTooLong", "QueueFull"]

# what a request whose own numbers broke is told (it alone fails; see Sampler)
NUMERICAL_ERROR = (
    "this request's logits became NaN or infinite (its prefix's values or its prompt overflow the "
    "arithmetic); the request was stopped, other requests are unaffected. Check the prefix's values"
)

log = logging.getLogger("prefixserve.engine")

# the engine loop's thread, in Python and (its first 15 bytes, "prefixserve-eng") in the OS: top -H, py-spy
ENGINE_THREAD_NAME = "prefixserve-engine"
_PR_SET_NAME = 15  # linux/prctl.h


def name_os_thread(name: str) -> None:
    """Give the calling thread `name` in the OS too (Linux keeps 15 bytes: /proc/<pid>/task/<tid>/comm, which
    top -H, ps -L and py-spy show), so an operator can tell the engine's thread from the front's. Python 3.11
    names threads only for itself. Elsewhere, or where prctl is missing, nothing."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def _prefix_key(prefix: Any, request_id: str | None) -> str | None:
    """What identifies a prefix's KV in the paged pool: its stored content's digest, so a replaced prefix is a
    new key (never served stale). A prefix without one (built in a test) is never shared."""
    if prefix is None:
        return None
    meta = getattr(prefix, "meta", None)
    digest = getattr(meta, "sha256", None)
    return f"sha256:{digest}" if digest else f"request:{request_id or uuid.uuid4().hex}"


class PromptTooLong(ValueError):
    pass


class EngineUnavailable(RuntimeError):
    """The engine loop is gone (/readyz says why): a new request would wait forever."""


class _Outbox:
    """A stream's outputs not read yet. The reader takes all of them at once: one wake-up (and one write of a
    streamed response) however many steps' outputs arrived while it was busy, and no future per output."""

    __slots__ = ("items", "waiter")

    def __init__(self) -> None:
        self.items: list[RequestOutput] = []
        self.waiter: asyncio.Future[None] | None = None

    def put(self, output: RequestOutput) -> None:
        self.items.append(output)
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def take(self) -> list[RequestOutput]:
        while not self.items:
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        items, self.items = self.items, []
        return items


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    outbox: _Outbox
    text: IncrementalText
    request: Request
    each_token: bool = True  # wake the consumer for every output (streamed), or once it is finished (whole)
    # a whole response with no stop strings and no logprobs: its tokens are read once, when it ends
    is_collected: bool = False
    # outputs of a whole response not handed over yet
    held: list[RequestOutput] = field(default_factory=list)
    is_done: bool = False  # its last output is handed over: later ones (a step that ran on) are dropped
    is_consumed: bool = False  # stream() is reading it (and will unregister it when done)
    is_closed: bool = False  # unregistered: nobody reads it any more


@dataclass
class _Record:
    """One step's outputs: the scheduler's Progress, the streams by row when it was made (rows are reused
    after a request leaves), and outputs made on the loop thread (beam results, errors)."""

    progress: Progress
    streams: list[_Stream | None]
    is_per_token: np.ndarray  # [progress.rows] bool: the row's stream takes an output per token
    logprobs: dict[int, TokenLogprob]
    events: list[tuple[Request, RequestOutput]]


class Engine:
    def __init__(
        self,
        backbone: Any,
        config: EngineConfig,
        release_prefix: Callable[[Any], None] = lambda prefix: None,
        on_forward: Callable[[list[Request]], None] | None = None,
        runner: Any = None,
    ):
        self.backbone = backbone
        self.config = config
        self.is_encoder_decoder = backbone.spec.is_encoder_decoder
        # a ModelRunner in this thread, or a RunnerProcess (worker.py)
        self.runner: Any = runner or ModelRunner(backbone, config, on_forward)
        if self.runner.kv_plan.num_seqs < config.max_num_seqs:  # the KV budget holds fewer sequences
            config = dataclasses.replace(config, max_num_seqs=self.runner.kv_plan.num_seqs)
        self.config = config
        self.overlaps = config.overlap and hasattr(self.runner, "submit")
        self.scheduler = Scheduler(
            SchedulerConfig(
                config.max_num_seqs,
                config.max_prefill_tokens,
                backbone.rules.eos_token_ids,
                max_queue=config.max_queue,
                policy=config.policy,  # type: ignore[arg-type]
                row_cooldown=self.overlaps,
                num_ahead=int(self.overlaps),
                # a preempted row resumes by recomputing its prompt and tokens: the runners do that for the
                # decoder-only families, and for BART with the paged layout (its slots do not re-encode a source)
                preempt_for_share=config.policy == "fair"
                and (not self.is_encoder_decoder or config.kv_layout == "paged"),
            ),
            getattr(self.runner, "block_pool", None),
        )
        self._in_flight: deque[StepInput] = deque()  # overlapped: steps sent whose answers are not read yet
        self.release_prefix = release_prefix
        # the front detokenizes (on the event loop) with its own copy: a HF fast tokenizer used by two threads
        # at once can fail with "Already borrowed" (prompts are tokenized in worker threads)
        self._detokenizer = copy.deepcopy(backbone.tokenizer)
        self._token_bytes = byte_table(self._detokenizer)  # None: not byte-level, decoded in windows
        self.num_generated_tokens = 0
        self.num_steps = 0
        self.num_overlapped_steps = 0  # steps sent before the answer to the one before was read
        self.step_seconds = 0.0  # wall time of the steps counted in num_steps
        # the stepping thread's CPU time in them: step - cpu = time a step waited (for the GIL, a device, a core)
        self.step_cpu_seconds = 0.0
        self._streams: dict[str, _Stream] = {}
        num_rows = len(self.scheduler.rows.requests)
        self._row_streams: list[_Stream | None] = [None] * num_rows  # by scheduler row
        # by row: its stream takes an output per token (streamed, stop strings, logprobs; not a collected one)
        self._is_per_token = np.zeros(num_rows, dtype=bool)
        # the event loops that have registered streams, and how many each
        self._loops: dict[asyncio.AbstractEventLoop, int] = {}
        # records and outputs per event loop whose hand-over callback is scheduled but has not run (_deliver_all)
        self._handovers: dict[asyncio.AbstractEventLoop, list[_Record | tuple[Request, RequestOutput]]] = {}
        self._handover_lock = threading.Lock()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._is_stopping = False
        self._busy_since: float | None = None  # when the loop found work and started stepping (None: idle)
        self.loop_error: str | None = None

    # -- prompts ------------------------------------------------------------------------------------
    @property
    def max_model_len(self) -> int:
        return self.runner.max_model_len

    def tokenize(self, prompt: str) -> list[int]:
        token_ids = list(self.backbone.tokenizer(prompt)["input_ids"])
        if not token_ids and self.backbone.rules.bos_token_id is not None:
            token_ids = [self.backbone.rules.bos_token_id]  # what HF generate does with an empty prompt
        return token_ids

    def check_fits(
        self, num_prompt_tokens: int, num_prefix_tokens: int, max_new_tokens: int, num_beams: int = 1
    ) -> None:
        """Raise PromptTooLong unless prefix + prompt + new tokens fit the backbone's positions (and, paged,
        the `num_beams` sequences fit the whole block pool: else they would wait forever)."""
        if num_prompt_tokens == 0:
            raise PromptTooLong(
                "the prompt is empty and the backbone has no BOS token; send at least one token"
            )
        problem = self.backbone.spec.fit_error(
            num_prefix_tokens, num_prompt_tokens, max_new_tokens, self.max_model_len
        )
        if problem is not None:
            raise PromptTooLong(f"{problem}; shorten the prompt or lower max_new_tokens")
        pool = self.scheduler.blocks
        # the door knows P only: a BART prefix is counted with cross entries too (a PEFT one has none)
        if pool is not None and not pool.can_ever_fit(
            pool.prefix_tokens(num_prefix_tokens, num_prefix_tokens),
            pool.num_own_prompt(num_prompt_tokens) + max_new_tokens,
            num_beams,
            pool.num_own_prompt(num_prompt_tokens),
        ):
            raise PromptTooLong(
                f"prefix, prompt and {max_new_tokens} new tokens x {num_beams} sequences need more KV blocks than "
                f"the pool holds ({pool.num_usable} of {pool.block_size} positions); shorten the prompt, lower "
                "max_new_tokens or num_beams"
            )

    def _num_prefix_tokens(self, prefix: Any) -> int:
        """A request's prefix entries as admission counts them: P, or (paged, encoder-decoder) its decoder and
        cross entries as the block pool holds them."""
        if prefix is None:
            return 0
        pool = self.scheduler.blocks
        if pool is None or not self.is_encoder_decoder:
            return prefix.num_virtual_tokens
        targets = prefix.targets
        num_decoder, num_cross = (targets[n].shape[3] if n in targets else 0 for n in ("decoder", "cross"))
        return pool.prefix_tokens(num_decoder, num_cross)

    # -- the loop -----------------------------------------------------------------------------------
    def step(self) -> _Record | None:
        """One engine step: schedule -> execute -> update. Returns the step's record to deliver."""
        started, cpu_started = time.perf_counter(), time.thread_time()
        batch = self._schedule()
        if not batch.sequences:
            self.runner.execute(batch)  # frees the slots of aborted requests
            return None
        try:
            out = self.runner.execute(batch)
        except Exception as exc:  # a bad step fails its requests, not the service
            return self._failed_step(batch.sequences, exc)
        return self._record(batch, out, started, cpu_started)

    def overlapped_step(self) -> list[_Record]:
        """Schedule step k and send it, then record step k-1 while the runner computes step k. Rows that
        finished in step k-1 run once more in step k (their tokens are dropped) and leave in step k+1. A beam
        group's steps are not overlapped (its search must not run past its end): each is recorded before the
        next is scheduled."""
        records = []
        if self.scheduler.num_beam_groups and self._in_flight:
            records.append(self._collect(time.perf_counter(), time.thread_time()))
        started, cpu_started = time.perf_counter(), time.thread_time()
        batch = self._schedule()
        self.runner.submit(batch)
        self._in_flight.append(batch)
        if len(self._in_flight) > 1:
            self.num_overlapped_steps += bool(batch.sequences)
            records.append(self._collect(started, cpu_started))
        if self.scheduler.num_beam_groups:
            records.append(self._collect(time.perf_counter(), time.thread_time()))
        return [r for r in records if r is not None]

    def _collect(self, started: float, cpu_started: float) -> _Record | None:
        """The oldest step in flight: its answer recorded (None when it ran nothing)."""
        batch = self._in_flight.popleft()
        try:
            out = self.runner.collect()
        except Exception as exc:  # as in step(): the step's requests fail, not the service
            return self._failed_step(batch.sequences, exc) if batch.sequences else None
        if not batch.sequences:
            return None
        return self._record(batch, out, started, cpu_started)

    def _schedule(self) -> StepInput:
        with self._lock:
            batch = self.scheduler.schedule()
            for request in batch.finished:  # a left row holds on to nothing (its prefix is released below)
                if request.row >= 0:
                    self._row_streams[request.row] = None
            if len(self._row_streams) < self.scheduler.rows.capacity:  # the scheduler's rows grew
                self._grow_rows(self.scheduler.rows.capacity)
            for request in batch.prefill:  # the joining rows' streams, by row
                stream = self._row_streams[request.row] = self._streams.get(request.request_id)
                self._is_per_token[request.row] = stream is not None and not stream.is_collected
        for request in batch.finished:
            if request.prefix is not None:
                self.release_prefix(request.prefix)
        return batch

    def _grow_rows(self, num_rows: int) -> None:
        self._row_streams += [None] * (num_rows - len(self._row_streams))
        self._is_per_token = np.pad(self._is_per_token, (0, num_rows - self._is_per_token.size))

    def _record(self, batch: StepInput, out: StepOutput, started: float, cpu_started: float) -> _Record:
        with self._lock:
            progress = self.scheduler.update(batch, out)
        record = _Record(
            progress,
            self._row_streams.copy(),
            self._is_per_token[progress.rows],
            out.logprobs,
            self._finished_outputs(progress),
        )
        self._count(progress)
        self.num_steps += 1
        self.step_seconds += time.perf_counter() - started
        self.step_cpu_seconds += time.thread_time() - cpu_started + out.cpu_seconds
        return record

    def _failed_step(self, requests: list[Request], exc: Exception) -> _Record:
        log.exception(
            "engine step failed; failing requests %s", ", ".join(r.trace_id or r.request_id for r in requests)
        )
        with self._lock:
            for request in requests:
                request.finish("error")
        events = [(r, self._output(r, None, "", f"engine error: {exc}", "engine_error")) for r in requests]
        return _Record(Progress(), [], np.zeros(0, dtype=bool), {}, events)

    def _count(self, progress: Progress) -> None:
        """Tokens generated; the first token's time of the rows that got theirs (the joining rows)."""
        self.num_generated_tokens += int(progress.rows.size)
        first = progress.rows[progress.num_output == 1]
        if first.size:
            now = time.monotonic()
            for row in first.tolist():
                request = self.scheduler.rows.requests[row]
                if request is not None and request.first_token_time is None:
                    request.first_token_time = now

    def _finished_outputs(self, progress: Progress) -> list[tuple[Request, RequestOutput]]:
        """Outputs the loop thread makes for requests the step finished: a beam group's tokens, a numerical
        error. (Other finishes are read from the record on the event loop.)"""
        events: list[tuple[Request, RequestOutput]] = []
        for request in progress.finished:
            if request.finish_reason == "error":
                events.append((request, self._output(request, None, "", NUMERICAL_ERROR, "numerical_error")))
            elif request.params.num_beams > 1:
                events += self._beam_outputs(request)
        return events

    def _beam_outputs(self, request: Request) -> list[tuple[Request, RequestOutput]]:
        """A beam search's tokens are known only when it is done: then one output per token, the last one
        finishing the request (stream consumers see them all at once; the front adds the text). Nothing
        before that."""
        if not request.is_finished:
            return []
        tokens = request.output_token_ids
        outputs = []
        for index, token_id in enumerate(tokens):
            self.num_generated_tokens += 1
            is_last = index == len(tokens) - 1
            output = self._output(request, token_id, "")
            output.is_finished, output.num_output_tokens = is_last, index + 1
            output.finish_reason = request.finish_reason if is_last else None
            outputs.append((request, output))
        if not tokens:  # the best hypothesis is an immediate EOS
            outputs.append((request, self._output(request, None, "")))
        return outputs

    def _output(
        self,
        request: Request,
        token_id: int | None,
        text: str,
        error: str | None = None,
        error_code: str | None = None,
    ) -> RequestOutput:
        return RequestOutput(
            request_id=request.request_id,
            token_id=token_id,
            text=text,
            is_finished=request.is_finished,
            finish_reason=request.finish_reason,
            num_prompt_tokens=len(request.prompt_token_ids),
            num_output_tokens=len(request.output_token_ids),
            error=error,
            error_code=error_code,
        )

    def _run(self) -> None:
        name_os_thread(ENGINE_THREAD_NAME)
        try:
            while True:
                with self._lock:
                    self._busy_since = None
                    while not self.scheduler.has_work() and not self._in_flight and not self._is_stopping:
                        self._lock.wait()
                    if self._is_stopping:
                        return
                    self._busy_since = time.monotonic()
                if self.overlaps:
                    records = self.overlapped_step() if self.scheduler.has_work() else self._drain()
                    if records:
                        self._deliver_all(list(records))
                    continue
                record = self.step()
                if record is not None:
                    self._deliver_all([record])
        except BaseException as exc:  # the loop is gone: say so (/readyz turns 503) and fail what waits on it
            log.critical("engine loop died", exc_info=True)
            self.loop_error = f"{type(exc).__name__}: {exc}"
            self._fail_all(f"engine loop died ({self.loop_error})")

    def _drain(self) -> list[_Record]:
        """Nothing left to schedule: the last step sent is recorded."""
        record = self._collect(time.perf_counter(), time.thread_time())
        return [] if record is None else [record]

    def _fail_all(self, message: str) -> None:
        with self._lock:
            requests = self.scheduler.requests()
            for request in requests:
                request.finish("error")
        self._deliver_all([(r, self._output(r, None, "", error=message)) for r in requests])

    def health(self) -> str | None:
        """None while the loop is alive and stepping; else why not (dead, stuck in one step, not started)."""
        if self.loop_error is not None:
            return f"engine loop died: {self.loop_error}"
        if self._thread is None or not self._thread.is_alive():
            return "engine loop is not running"
        # --runner-process: the child may be gone while the loop idles (it notices at its next step)
        runner_error = getattr(self.runner, "health", lambda: None)()
        if runner_error is not None:
            return runner_error
        busy_since = self._busy_since
        if busy_since is not None and time.monotonic() - busy_since > self.config.max_step_seconds:
            return f"engine loop stuck: no step finished for over {self.config.max_step_seconds:g} s"
        return None

    def warm_up(self) -> None:
        """A greedy and a sampled request of two tokens through the real step before serving, so first-call
        costs (allocator, kernels, lazy inits) are not paid by the first client. Not counted in metrics."""
        rules = self.backbone.rules
        token = next(
            t for t in (rules.bos_token_id, min(rules.eos_token_ids, default=None), 0) if t is not None
        )
        on_forward, self.runner.on_forward = self.runner.on_forward, lambda requests: None
        try:
            with self._lock:
                for i, temperature in enumerate((0.0, 1.0)):
                    params = SamplingParams(
                        max_new_tokens=2, temperature=temperature, seed=0, ignore_eos=True
                    )
                    self.scheduler.add(Request(f"warm-up-{i}", [token], params))
            while self.scheduler.has_work():
                self.step()
        finally:
            self.runner.on_forward = on_forward
            self.num_generated_tokens = self.num_steps = 0
            self.step_seconds = self.step_cpu_seconds = self.runner.forward_seconds = 0.0

    def _deliver_all(self, items: list[_Record | tuple[Request, RequestOutput]]) -> None:
        """Records (and single outputs) handed over with one wake-up per event loop, not one per request: each
        call_soon_threadsafe writes to the loop's self-pipe and schedules a callback. A stream stays registered
        until its consumer is done with it (stream() removes it), so a request that finishes before anyone
        reads it still hands over every output."""
        for loop in list(self._loops):
            if loop.is_closed():  # a consumer whose loop is gone reads nothing
                with self._handover_lock:
                    self._handovers.pop(loop, None)
                continue
            with self._handover_lock:
                waiting = self._handovers.get(loop)
                if waiting is not None:  # a hand-over is scheduled and has not run yet: it takes these too
                    waiting.extend(items)
                    continue
                self._handovers[loop] = list(items)
            loop.call_soon_threadsafe(self._hand_over, loop)

    def _hand_over(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the consumers' event loop, once per step (or per few steps, when the loop fell behind: then
        the engine thread skipped the wake-up, a write to the loop's self-pipe), in step order."""
        with self._handover_lock:
            items = self._handovers.pop(loop, [])
        for item in items:
            if isinstance(item, _Record):
                self._hand_over_record(loop, item)
                continue
            request, output = item
            stream = self._streams.get(request.request_id)
            if stream is not None and stream.loop is loop:
                self._emit(stream, output)

    def _hand_over_record(self, loop: asyncio.AbstractEventLoop, record: _Record) -> None:
        """One step's record: an output per token for the per-token streams among its rows (a whole response
        with no stop strings or logprobs is skipped: it reads its tokens when it ends), then the finished."""
        progress, streams, per_token = record.progress, record.streams, record.is_per_token
        ending = {r.row: r for r in progress.finished}
        for row, token_id, num_output in zip(
            progress.rows[per_token].tolist(),
            progress.token_ids[per_token].tolist(),
            progress.num_output[per_token].tolist(),
            strict=True,
        ):
            stream = streams[row]
            if stream is None or stream.loop is not loop:
                continue
            request = stream.request
            reason = request.finish_reason if row in ending else None
            output = RequestOutput(
                request.request_id,
                token_id,
                "",
                reason is not None,
                reason,
                len(request.prompt_token_ids),
                num_output,
            )
            logprob = record.logprobs.get(row)
            if logprob is not None:
                output.logprob, output.top_logprobs = logprob.logprob, logprob.top
            self._emit(stream, output)
        for row, request in ending.items():
            stream = streams[row] if row < len(streams) else None
            if stream is None or stream.loop is not loop or request.finish_reason == "error":
                continue
            if stream.is_collected or request.params.num_beams == 1 and request.finish_reason == "stop":
                self._emit(stream, self._output(request, None, ""))  # EOS, or the whole response's end
        for request, output in record.events:
            stream = self._streams.get(request.request_id)
            if stream is not None and stream.loop is loop:
                self._emit(stream, output)

    def _emit(self, stream: _Stream, output: RequestOutput) -> None:
        """One output to its stream: its text (a stop string finishes the request), then to the outbox — at
        once for a streamed request, all together when it is finished for a whole one (one task wake-up per
        request, not one per token)."""
        if stream.is_done or stream.is_closed:
            return
        if stream.is_collected and output.is_finished and output.error is None:
            output.token_ids = list(stream.request.output_token_ids)
            output.num_output_tokens = len(output.token_ids)
            output.text = stream.text.whole(output.token_ids)
        else:
            output = self._with_text(stream.request, stream.text, output)
        stream.is_done = output.is_finished
        if stream.each_token:
            stream.outbox.put(output)
            return
        stream.held.append(output)
        if output.is_finished:
            for held in stream.held:
                stream.outbox.put(held)
            stream.held.clear()

    def _deliver(self, request: Request, output: RequestOutput) -> None:
        self._deliver_all([(request, output)])

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=ENGINE_THREAD_NAME, daemon=True)
        self._thread.start()

    def abort_all(self) -> int:
        """Abort every waiting and running request (drain deadline); returns how many."""
        with self._lock:
            ids = [r.request_id for r in self.scheduler.requests() if not r.is_finished]
        for request_id in ids:
            self.abort(request_id)
        return len(ids)

    def stop(self) -> None:
        with self._lock:
            self._is_stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        close = getattr(self.runner, "close", None)
        if close is not None:
            close()

    # -- the async front ------------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    def tenant_load(self) -> dict[str, Any]:
        """{tenant: TenantLoad(num_running, num_waiting)} for the active tenants."""
        with self._lock:
            return self.scheduler.tenant_load()

    def check_room(self, tenant: str | None, weight: float = 1.0, num: int = 1) -> None:
        """Raise QueueFull if `num` requests of `tenant` would be refused now: lets the front refuse before it
        tokenizes and loads a prefix (add() checks again)."""
        with self._lock:
            self.scheduler.check_room(tenant or "", weight, num)

    def add(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prefix: Any = None,
        prefix_id: str | None = None,
        tenant: str | None = None,
        request_id: str | None = None,
        weight: float = 1.0,
        trace_id: str | None = None,
        each_token: bool = True,
    ) -> Request:
        """Queue a request (its prefix already pinned) for `tenant` with its fair-share `weight`.
        Raises QueueFull (the queue is full and the tenant holds its share), EngineUnavailable (the loop
        died). Read it with stream(): an output per token as it comes, or (`each_token` False, for a whole
        response) all of them at the end."""
        ids = None if request_id is None else [request_id]
        (request,) = self.add_choices(
            prompt_token_ids, [params], prefix, prefix_id, tenant, ids, weight, trace_id, each_token
        )
        return request

    def add_choices(
        self,
        prompt_token_ids: list[int],
        choices: list[SamplingParams],
        prefix: Any = None,
        prefix_id: str | None = None,
        tenant: str | None = None,
        request_ids: list[str] | None = None,
        weight: float = 1.0,
        trace_id: str | None = None,
        each_token: bool = True,
    ) -> list[Request]:
        """add() for the n choices of one request (one prompt, one prefix pinned once per choice, a sampling
        setting each): queued together or not at all, so that they are admitted together (paged: the prompt
        runs once and its blocks are shared)."""
        ids = request_ids or [uuid.uuid4().hex for _ in choices]
        group = ids[0] if len(choices) > 1 else None
        key = _prefix_key(prefix, ids[0])  # one key: the choices share the prefix's blocks
        requests = [
            Request(
                request_id=request_id,
                prompt_token_ids=prompt_token_ids,
                params=params,
                prefix=prefix,
                prefix_id=prefix_id,
                num_prefix_tokens=self._num_prefix_tokens(prefix),
                prefix_key=key,
                tenant=tenant,
                group=group,
                trace_id=trace_id,
            )
            for request_id, params in zip(ids, choices, strict=True)
        ]
        streams = [self._new_stream(request, each_token) for request in requests]
        with self._lock:  # the loop sets loop_error before it fails what the scheduler holds (_fail_all)
            if self.loop_error is not None:
                raise EngineUnavailable(f"engine loop died ({self.loop_error}); this replica cannot generate")
            self.scheduler.check_room(tenant or "", weight, len(requests))
            for request, stream in zip(requests, streams, strict=True):
                self.scheduler.add(request, weight)
                self._register(stream)
            self._lock.notify_all()
        return requests

    def _new_stream(self, request: Request, each_token: bool) -> _Stream:
        params = request.params
        return _Stream(
            asyncio.get_running_loop(),
            _Outbox(),
            IncrementalText(
                self._detokenizer,
                params.stop,
                self._token_bytes,
                params.include_stop_str_in_output,
                params.min_tokens,
            ),
            request,
            each_token,
            is_collected=not each_token
            and not params.stop
            and params.logprobs is None
            and params.num_beams == 1,
        )

    def _register(self, stream: _Stream) -> None:
        self._streams[stream.request.request_id] = stream
        self._loops[stream.loop] = self._loops.get(stream.loop, 0) + 1

    def _unregister(self, request_id: str) -> None:
        with self._lock:
            stream = self._streams.pop(request_id, None)
            if stream is None:
                return
            stream.is_closed = True
            left = self._loops.pop(stream.loop) - 1
            if left:
                self._loops[stream.loop] = left

    async def stream(self, request: Request) -> AsyncGenerator[RequestOutput, None]:
        """Outputs of a request until it finishes. Cancelling the consumer aborts the request."""
        async for outputs in self.stream_batches(request):
            for output in outputs:
                yield output

    async def stream_batches(self, request: Request) -> AsyncGenerator[list[RequestOutput], None]:
        """Outputs of a request until it finishes, every output waiting at once in one list (one per step
        while the reader keeps up). Cancelling the consumer aborts the request."""
        stream = self._streams.get(request.request_id)
        if stream is None:
            return
        stream.is_consumed = True
        try:
            while True:
                outputs = await stream.outbox.take()
                yield outputs
                if outputs[-1].is_finished:  # nothing follows a finished output (_emit)
                    return
        finally:
            if not request.is_finished:
                self.abort(request.request_id)
            self._unregister(request.request_id)

    def _with_text(self, request: Request, text: IncrementalText, output: RequestOutput) -> RequestOutput:
        """Fill in the output's text delta; a stop string finishes the request (its slot frees next step)."""
        delta = "" if output.token_id is None else text.add(output.token_id)
        if text.is_stopped and not output.is_finished:
            with self._lock:
                request.finish("stop")
                self._lock.notify_all()
        if text.is_stopped:
            # the engine may have finished it otherwise in the same step (length): the stop string wins
            output.is_finished, output.finish_reason = True, "stop"
        elif output.is_finished:
            delta += text.flush()
        output.text = delta  # each output is made for its one request: filled in place
        return output

    def abort(self, request_id: str) -> None:
        """Stop a request; its slot is freed at the next step and its stream ends with finish_reason abort."""
        with self._lock:
            request = self.scheduler.abort(request_id)
            self._lock.notify_all()
        if request is not None and request.finish_reason == "abort":
            self._deliver(request, self._output(request, None, ""))
        stream = self._streams.get(request_id)
        if stream is not None and not stream.is_consumed:
            self._unregister(request_id)  # nobody will read it
