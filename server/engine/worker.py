"""`--runner-process`: the forward passes and the sampler in a child process, out of the HTTP front's GIL.

In one process the front (rendering and writing every stream's events, parsing requests) and the engine's
forward share one GIL: each torch op releases it and must win it back, so a busy front stretches every step
(bench/README.md has the measurements). `RunnerProcess` has the interface the engine uses of a `ModelRunner` (execute, kv_plan,
forward_seconds, ...) and runs the real one in a spawned child that loads the backbone itself. The
engine thread (scheduling, stop rules, hand-over) stays in the front; per step it sends one StepMessage (step.py)
— which rows leave, which join (prompt, sampling parameters, prefix); the child decodes every row it holds —
and waits off the GIL for the StepOutput back (tokens by row, failed rows, beam results, the logprobs asked
for, the forward's time and the child's CPU time). A steady step's message is a few empty lists, whatever the
rows. vLLM V1 splits the same way (its EngineCore process).

With `--kv-layout paged` the block pool stays in the front with the scheduler (`RunnerProcess.block_pool`, built
from the pool the child planned) and is the one authority on blocks; the child's PagedKVCache follows the grants
the messages carry (joining rows' tables, blocks rows grew into, forks) and zeroes and writes a block when it is
granted. Steps run in order in the child, so a block freed and handed on is rewritten only after the steps sent
before, which may still read it.

The child mirrors only what the runner reads of a request: id, row, prompt, parameters and its prefix's
tensors (the runner's persistent batch counts the tokens each row sampled). A prefix's tensors cross once per prefix object of the front's cache
(the front keeps them on the host; the child copies them to its device and keeps them); when the front's
object is gone (evicted or invalidated, no request left using it) the child drops its copy with the next
message. The child ignores SIGINT and SIGTERM (a terminal's Ctrl-C reaches the whole process group): the
front decides when it stops, after its drain. The child dying (killed, out of memory) ends the engine loop:
/readyz turns 503 and waiting requests fail, as for a loop that died in one process.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

from server.engine.block_pool import BlockPool
from server.engine.config import EngineConfig
from server.engine.kv_cache import PoolPlan
from server.engine.paged_cache import POOLED_TARGETS
from server.engine.request import Request
from server.engine.step import JoiningRow, StepInput, StepMessage, StepOutput, WirePrefix, WireTensor

log = logging.getLogger("prefixserve.engine")


# -- what crosses the pipe besides the steps (StepMessage, StepOutput): typed as they are ---------------------
@dataclass(frozen=True)
class Ready:
    """The child, once: the backbone is loaded and the KV cache planned (what the front reports and schedules by)."""

    kv_plan: Any
    decode_mode: str
    max_model_len: int
    kv_num_bytes: int
    rules: Any  # the backbone's GenerationRules
    one_pass: bool  # BART: one forward call a step (encode, then decode everyone)


@dataclass(frozen=True)
class StartFailed:
    """The child, instead of Ready: why it could not start (KVBudgetError, BackboneError, ...)."""

    error: BaseException


@dataclass(frozen=True)
class Forget:
    """The front, between steps: the child may drop these prefix copies, and says how many it holds (Held)."""

    keys: list[int]


@dataclass(frozen=True)
class Held:
    num_prefixes: int


@dataclass(frozen=True)
class Stop:
    """The front: finish the message in hand and exit."""


_RUNNERS = itertools.count()

RUNNER_PROCESS_NAME = "prefixserve-run"  # the child's name in the OS (ps, top): 15 bytes at most


class RunnerDied(BaseException):  # noqa: N818 - a BaseException on purpose: Engine.step fails a batch on an
    # Exception and goes on; this must end the engine loop instead (Engine._run)
    """The runner's process is gone: no step can run."""


@dataclass(frozen=True)
class RunnerSpec:
    """What the child needs to build the ModelRunner the engine would have built: the backbone's directory,
    device and dtype, the runner's settings, the KV budget (None: the default share of what the child finds
    free after loading the model, less `prefix_cache_bytes`), and how to log."""

    model: str
    device: str
    dtype: str
    max_num_seqs: int
    max_model_len: int
    max_prefix_tokens: int
    kv_cache_bytes: int | None
    prefix_cache_bytes: int
    cuda_graphs: bool
    retain_host_memory: bool
    torch_threads: int | None = None
    log_level: str = "info"
    log_format: str = "text"
    kv_layout: str = "slots"
    kv_block_size: int = 16

    def engine_config(self, kv_cache_bytes: int | None) -> EngineConfig:
        """The config the child's ModelRunner is built with (`kv_cache_bytes`: the budget it worked out)."""
        return EngineConfig(
            max_num_seqs=self.max_num_seqs,
            max_model_len=self.max_model_len,
            max_prefix_tokens=self.max_prefix_tokens,
            kv_cache_bytes=kv_cache_bytes,
            cuda_graphs=self.cuda_graphs,
            kv_layout=self.kv_layout,
            kv_block_size=self.kv_block_size,
        )


# -- the front's side ---------------------------------------------------------------------------------------
class RunnerProcess:
    """A ModelRunner in a spawned child process. Start-up waits until the child has loaded the backbone and
    planned its KV cache, and raises what it raised (KVBudgetError, BackboneError) if it could not."""

    def __init__(self, spec: RunnerSpec, on_forward=None, start_timeout: float = 900.0):
        context = multiprocessing.get_context("spawn")  # never fork a process that may hold CUDA or threads
        self._conn, child = context.Pipe()
        self.process = context.Process(
            target=_serve, args=(child, spec), name=RUNNER_PROCESS_NAME, daemon=True
        )
        self.process.start()
        child.close()
        # the pipe's order: steps are answered in the order sent (`_answers`: whether each one expects a reply)
        self._pipe = threading.Condition()
        self._answers: deque[bool] = deque()
        if not self._conn.poll(start_timeout):
            self.close()
            raise RuntimeError(f"the runner process did not start within {start_timeout:g} s")
        ready = self._recv()
        if isinstance(ready, StartFailed):
            self.close()
            raise ready.error
        self.kv_plan, self.decode_mode, self.rules = ready.kv_plan, ready.decode_mode, ready.rules
        self.max_model_len, self.kv_num_bytes = ready.max_model_len, ready.kv_num_bytes
        self._one_pass = ready.one_pass
        # paged: the front's pool is the one authority on blocks (the scheduler admits, grows and frees by it);
        # the child's tensors follow the grants each step carries
        self.block_pool: BlockPool | None = None
        self.pooled_targets: frozenset[str] = frozenset()
        if isinstance(self.kv_plan, PoolPlan):
            plan = self.kv_plan
            self.block_pool = BlockPool(plan.num_blocks, plan.block_size, plan.is_encoder_decoder)
            self.pooled_targets = POOLED_TARGETS
        self.on_forward = on_forward or (lambda requests: None)
        self.forward_seconds = 0.0
        self.cpu_seconds = 0.0  # the child's CPU time in steps (Engine counts it in the step's CPU time)
        self._token = next(_RUNNERS)  # tells this runner's keys on a prefix object from another runner's
        self._keys = itertools.count()
        self._forgotten: list[int] = []  # prefix copies the child may drop (their front objects are gone)
        self._forgotten_lock = threading.Lock()
        # ids of the requests the child holds (slots, sampler state) until they leave
        self._held: set[str] = set()

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def health(self) -> str | None:
        """None while the child runs; else what happened to it. Reads the process's sentinel (readable once it
        exited) rather than reaping it: only close() waits for the child, so two threads never race to."""
        if not multiprocessing.connection.wait([self.process.sentinel], 0):
            return None
        return f"the runner process is gone (exit code {self.process.exitcode})"

    @property
    def cache(self) -> Any:
        """What the start-up line reads of the KV cache (it lives in the child)."""
        return SimpleNamespace(num_bytes=self.kv_num_bytes)

    def execute(self, batch: StepInput) -> StepOutput:
        """ModelRunner.execute, in the child. Raises the step's exception as the child raised it (the engine
        fails the step's requests), or RunnerDied if the child is gone."""
        self.submit(batch)
        return self.collect()

    def submit(self, batch: StepInput) -> None:
        """Send a step to the child without waiting for its answer (collect() reads the answers in order): the
        engine prepares the next step while the child runs this one."""
        leaving = [r.row for r in batch.finished if r.request_id in self._held]
        preempted = [r.row for r in batch.preempted if r.request_id in self._held]
        self._held.difference_update(r.request_id for r in batch.finished)
        self._held.update(r.request_id for r in batch.prefill)
        joining = [
            JoiningRow(
                r.row,
                r.request_id,
                r.prompt_token_ids,
                r.params,
                self._prefix(r.prefix),
                tuple(batch.resumed.get(r.row, ())),
                tuple(batch.blocks.get(r.row, ())),
                batch.forks.get(r.row),
            )
            for r in batch.prefill
        ]
        with self._forgotten_lock:
            forgotten, self._forgotten = self._forgotten, []
        if not batch.sequences and not leaving and not preempted and not forgotten:
            self._answers.append(False)  # nothing to send: collect() answers an empty output
            return
        # what ModelRunner reports before its forward calls: GPT-2 decodes the running rows, then prefills the
        # joining ones; BART decodes everyone, the joining rows included, in one call
        if self._one_pass:
            if batch.sequences:
                self.on_forward(batch.decode + batch.prefill)
        else:
            if batch.decode:
                self.on_forward(batch.decode)
            running = [r for r in batch.prefill if r.row not in batch.forks]  # forking choices run nothing
            if running:
                self.on_forward(running)
        with self._pipe:
            try:
                self._conn.send(StepMessage(leaving, joining, forgotten, preempted, batch.grown))
            except Exception as exc:
                raise self._gone(exc) from exc
            self._answers.append(True)

    def collect(self) -> StepOutput:
        """The answer to the oldest step submitted and not yet collected."""
        with self._pipe:
            if not self._answers.popleft():
                return StepOutput()
            try:
                reply = self._recv()
            finally:
                self._pipe.notify_all()
        if isinstance(reply, BaseException):
            raise reply
        self.forward_seconds += reply.forward_seconds
        self.cpu_seconds += reply.cpu_seconds
        return reply

    def held_prefixes(self) -> int:
        """How many prefixes' tensors the child holds (sends what the front has dropped first)."""
        with self._forgotten_lock:
            forgotten, self._forgotten = self._forgotten, []
        return self._call(Forget(forgotten)).num_prefixes

    def _prefix(self, prefix: Any) -> WirePrefix | None:
        """The key, and the tensors the first time this prefix object goes to the child; None: no prefix."""
        if prefix is None:
            return None
        keys = prefix.__dict__.setdefault("_runner_keys", {})  # runner -> the key its child knows it by
        key = keys.get(self._token)
        if key is not None:
            return WirePrefix(key)
        key = keys[self._token] = next(self._keys)
        weakref.finalize(prefix, self._forget, key)
        return WirePrefix(key, {name: _to_wire(tensor) for name, tensor in prefix.targets.items()})

    def _forget(self, key: int) -> None:  # from whichever thread drops the front's last reference
        with self._forgotten_lock:
            self._forgotten.append(key)

    def _call(self, message: Any) -> Any:
        """A request-reply outside the steps, once every submitted step is collected."""
        with self._pipe:
            self._pipe.wait_for(lambda: not any(self._answers))
            try:
                self._conn.send(message)
            except Exception as exc:
                raise self._gone(exc) from exc
            return self._recv()

    def _recv(self) -> Any:
        try:
            return self._conn.recv()
        except Exception as exc:
            raise self._gone(exc) from exc

    def _gone(self, exc: Exception) -> BaseException:
        """RunnerDied for a pipe that broke or a child that is gone (killed, or closed under a waiting step:
        then the error is whatever the closed pipe raised); anything else as it is."""
        if isinstance(exc, OSError | EOFError) or self.health() is not None:
            return self._died()
        return exc

    def _died(self) -> RunnerDied:
        multiprocessing.connection.wait([self.process.sentinel], 1)  # a killed child's exit, not a reap
        return RunnerDied(self.health() or "the runner process stopped answering")

    def close(self) -> None:
        """Stop the child (it finishes the message it is on) and wait for it; kill it after 10 s. Does not wait
        on a step that never returns (a stuck child): then the child is killed."""
        if self.process.is_alive() and self._pipe.acquire(timeout=5):
            try:
                self._conn.send(Stop())
            except (OSError, EOFError, ValueError):
                pass
            finally:
                self._pipe.release()
            self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self._conn.close()


# -- the child's side ---------------------------------------------------------------------------------------
def _serve(conn: Any, spec: RunnerSpec) -> None:
    """The child's main: load, plan, say ready, then answer messages until "stop" or the front is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from server.engine.engine import name_os_thread
    from server.logs import configure_logging

    name_os_thread(RUNNER_PROCESS_NAME)
    configure_logging(spec.log_level, spec.log_format)
    if spec.retain_host_memory:
        from server.host_memory import retain_freed_memory

        log.info("runner process: %s", retain_freed_memory(os.environ))
    from server.host_threads import set_forward_threads

    log.info("runner process: %s", set_forward_threads(spec.torch_threads, os.environ))
    try:
        runner, backbone = _build(spec)
    except Exception as exc:  # the front raises it: the server does not start, and says why
        conn.send(StartFailed(_picklable(exc)))
        return
    conn.send(
        Ready(
            runner.kv_plan,
            runner.decode_mode,
            runner.max_model_len,
            runner.cache.num_bytes,
            backbone.rules,
            runner.is_encoder_decoder,
        )
    )
    _Child(runner, backbone).run(conn)


def _build(spec: RunnerSpec) -> tuple[Any, Any]:
    from server.engine.backbone import load_backbone
    from server.engine.kv_cache import kv_budget
    from server.engine.runner import ModelRunner

    torch.set_grad_enabled(False)
    backbone = load_backbone(spec.model, spec.device, spec.dtype)
    # paged on CUDA: the child keeps the pooled targets on the host (their blocks are their device copy)
    on_host = spec.kv_layout == "paged" and backbone.device.type == "cuda"
    budget = kv_budget(spec.kv_cache_bytes, 0 if on_host else spec.prefix_cache_bytes, backbone.device)
    runner = ModelRunner(backbone, spec.engine_config(budget))
    log.info("runner process %d: %s on %s/%s", os.getpid(), backbone.name, backbone.device, backbone.dtype)
    return runner, backbone


class _Child:
    def __init__(self, runner: Any, backbone: Any):
        self.runner = runner
        self.backbone = backbone
        self.requests: dict[int, Request] = {}  # row -> the mirror of the request the runner holds there
        self.preempted: dict[
            int, Request
        ] = {}  # row -> a preempted request's mirror, until it rejoins or leaves
        self.prefixes: dict[int, SimpleNamespace] = {}  # key -> an object with the device `targets`

    def run(self, conn: Any) -> None:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):  # the front is gone
                return
            if isinstance(message, StepMessage):
                conn.send(self.step(message))
                continue
            if isinstance(message, Stop):
                return
            if isinstance(message, Forget):
                self._forget(message.keys)
                conn.send(Held(len(self.prefixes)))

    def _forget(self, keys: list[int]) -> None:
        for key in keys:
            self.prefixes.pop(key, None)

    def step(self, message: StepMessage) -> StepOutput | BaseException:
        """One StepMessage: the runner's StepOutput with this process's CPU time, or the step's exception."""
        started = time.thread_time()
        self._forget(message.forgotten)
        # a row preempted earlier that finished while it waited leaves too: its sampler state goes
        finished = [
            (self.requests if row in self.requests else self.preempted).pop(row)
            for row in message.leaving
            if row in self.requests or row in self.preempted
        ]
        preempted = [self.requests.pop(row) for row in message.preempted if row in self.requests]
        self.preempted.update((r.row, r) for r in preempted)
        try:
            prefill = [self._join(row) for row in message.joining]
            joining = message.joining
            # the runner decodes every row it holds: `decode` only says whether there are any
            decode = list(self.requests.values()) if len(self.requests) > len(prefill) else []
            step = StepInput(
                prefill,
                decode,
                finished,
                blocks={row.row: list(row.blocks) for row in joining if row.blocks},
                preempted=preempted,
                grown=message.grown,
                resumed={row.row: list(row.resumed) for row in joining if row.resumed},
                forks={row.row: row.fork for row in joining if row.fork is not None},
            )
            out = self.runner.execute(step)
        except Exception as exc:  # as in one process: the step's requests fail; they leave at the next step
            log.exception("runner step failed")
            return _picklable(exc)
        out.cpu_seconds = time.thread_time() - started
        return out

    def _join(self, row: JoiningRow) -> Request:
        from server.engine.transfer import stage, upload

        wire, prefix = row.prefix, None
        if wire is not None:
            key, tensors = wire.key, wire.tensors
            if tensors is not None:
                device, dtype = self.backbone.device, self.backbone.dtype
                # paged: the pooled targets stay on the host; the runner writes them into blocks when needed
                pooled = self.runner.pooled_targets
                targets = {
                    name: (stage if name in pooled else upload)(_from_wire(t), device, dtype)
                    for name, t in tensors.items()
                }
                self.prefixes[key] = SimpleNamespace(targets=targets)
            prefix = self.prefixes[key]
        request = Request(row.request_id, row.prompt_token_ids, row.params, prefix, row=row.row)
        self.preempted.pop(row.row, None)
        self.requests[row.row] = request
        return request


def _to_wire(tensor: torch.Tensor) -> WireTensor:
    """A tensor as plain bytes for the pipe (no shared-memory handles, every dtype bfloat16 included)."""
    host = tensor.detach().cpu().contiguous()
    return WireTensor(
        host.view(torch.uint8).numpy().tobytes(), str(host.dtype).removeprefix("torch."), tuple(host.shape)
    )


def _from_wire(wire: WireTensor) -> torch.Tensor:
    data = torch.frombuffer(bytearray(wire.data), dtype=torch.uint8)
    return data.view(getattr(torch, wire.dtype)).reshape(wire.shape)


def _picklable(exc: BaseException) -> BaseException:
    """`exc` if it crosses the pipe intact, else a RuntimeError with its type and message."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")
    return exc
