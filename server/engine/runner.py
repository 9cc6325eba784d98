"""StepInput -> tensors -> forward -> StepOutput. Owns the KV slots and the persistent batch (batch.py).

Slots stay compact: the running sequences always occupy slots [0, B), so a decode step reads the cache
as a view with no gather. When a sequence leaves, the last slot's live entries move into its place (one
copy of one sequence); a joining sequence copies its prefix once into its slot. Nothing else is copied,
except for beam search (beam.py): a beam group's prompt is run once, then its KV (prefix, prompt; BART's
cross entries too) is copied into the group's other k-1 slots, and after each step a beam that continues
another beam copies only the generated part [prefix + prompt, seq_len) from that beam's slot. Paged, the choices of
one request admitted together run their prompt once: the others copy the block where it ends and sample their
first token from its last logits.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from server.engine.batch import InputBatch
from server.engine.beam import BeamChoice, BeamSearch, as_tensor
from server.engine.block_pool import BlockPool, SeqBlocks
from server.engine.config import EngineConfig
from server.engine.cuda_graphs import LENGTH_STEP, DecodeGraphs, PagedDecodeGraphs
from server.engine.kv_cache import KVCache, KVPlan, PoolPlan, plan_block_pool, plan_kv_cache
from server.engine.paged_cache import POOLED_TARGETS, PagedKVCache, split_encoder_decoder
from server.engine.request import Request
from server.engine.sampler import RowsSampled, Sampler
from server.engine.step import StepInput, StepOutput
from server.engine.transfer import copy_to_device


def _targets(request: Request) -> dict[str, torch.Tensor]:
    return {} if request.prefix is None else request.prefix.targets


def _prefix_lens(request: Request) -> tuple[int, int]:
    """BART: (P of its decoder prefix, P of its cross prefix), 0 for a target the prefix lacks."""
    targets = _targets(request)
    decoder, cross = targets.get("decoder"), targets.get("cross")
    return (0 if decoder is None else decoder.shape[3], 0 if cross is None else cross.shape[3])


def uses_graphs(config: EngineConfig, backbone) -> bool:
    """Decode steps as CUDA graphs: asked for (--cuda-graphs), on CUDA, a decoder-only family (BART decodes
    eagerly), in either KV layout."""
    return config.cuda_graphs and backbone.device.type == "cuda" and not backbone.spec.is_encoder_decoder


class ModelRunner:
    def __init__(
        self, backbone, config: EngineConfig, on_forward: Callable[[list[Request]], None] | None = None
    ):
        self.backbone = backbone
        self.is_encoder_decoder = backbone.spec.is_encoder_decoder
        self.max_model_len = min(config.max_model_len, backbone.max_positions)
        self.is_paged = config.kv_layout == "paged"
        self.block_pool: BlockPool | None = None
        # prefix targets whose only device copy is the pool's blocks (the prefix cache keeps them on the host)
        self.pooled_targets = POOLED_TARGETS if self.is_paged else frozenset()
        self.cache: KVCache | PagedKVCache
        if self.is_paged:
            self._init_paged(config, uses_graphs(config, backbone))
        else:
            cross_len = config.max_prefix_tokens + backbone.max_positions if self.is_encoder_decoder else 0
            per_seq = KVCache.bytes_per_slot(backbone.shape, self.max_model_len, cross_len, backbone.dtype)
            # raises KVBudgetError when not even one full-length sequence fits
            self.kv_plan: KVPlan | PoolPlan = plan_kv_cache(
                per_seq, self.max_model_len, config.max_num_seqs, config.kv_cache_bytes
            )
            self.cache = KVCache(
                backbone.shape,
                self.kv_plan.num_seqs,
                self.max_model_len,
                cross_len,
                backbone.device,
                backbone.dtype,
            )
        self.graphs = self._decode_graphs(config)
        self.sampler = Sampler(backbone.rules, backbone.spec, backbone.device)
        self.beams = BeamSearch(backbone.rules, backbone.spec, backbone.device)
        self.batch = InputBatch(self.kv_plan.num_seqs)
        self._out = StepOutput()  # this step's answer, filled as the forward calls return
        self._chunks: list[tuple[np.ndarray, np.ndarray]] = []  # (rows, tokens) sampled this step
        self._to_fork: list[tuple[int, BeamChoice]] = []  # chosen, KV not yet forked (see _fork_beams)
        self.on_forward = on_forward or (lambda requests: None)
        self.forward_seconds = 0.0  # time inside the backbone's forward calls (bench: host time per step)
        self._beam_blocks: dict[int, list[SeqBlocks]] = {}  # paged: a new beam group's other beams' tables

    def _init_paged(self, config: EngineConfig, graphed: bool) -> None:
        """The block pool (the scheduler admits by it) and its tensors: every family's self-attention entries,
        and BART's cross entries (its cross prefix's and its source's) in the same blocks. `graphed`: one more
        block, out of the budget, where the graphs' pad rows write."""
        backbone = self.backbone
        size = config.kv_block_size
        per_block = PagedKVCache.bytes_per_block(backbone.shape, size, backbone.dtype)
        self.kv_plan = plan_block_pool(
            per_block,
            size,
            self.max_model_len,
            config.max_num_seqs,
            config.kv_cache_bytes,
            self.is_encoder_decoder,
            num_reserved=int(graphed),
        )
        self.block_pool = BlockPool(self.kv_plan.num_blocks, size, self.is_encoder_decoder)
        # a sequence's table: its prefix's blocks, then its own (at most the model's positions); a cross table:
        # the cross prefix's, then the source's (at most max_model_len tokens)
        num_prefix = -(-config.max_prefix_tokens // size)
        width = num_prefix + -(-self.max_model_len // size) + 1
        cross_width = num_prefix + -(-self.max_model_len // size) if self.is_encoder_decoder else 0
        self.cache = PagedKVCache(
            backbone.shape,
            self.kv_plan.num_blocks,
            size,
            config.max_num_seqs,
            width,
            backbone.device,
            backbone.dtype,
            max_cross_blocks=cross_width,
            has_scratch_block=graphed,
        )

    def _decode_graphs(self, config: EngineConfig) -> DecodeGraphs | None:
        """Decode steps as graph replays where uses_graphs says so; captured on CUDA, run padded otherwise."""
        if not uses_graphs(config, self.backbone):
            return None
        capture = self.backbone.device.type == "cuda"
        if isinstance(self.cache, PagedKVCache):
            return PagedDecodeGraphs(self.backbone, self.cache, self.kv_plan.num_seqs, capture)
        return DecodeGraphs(self.backbone, self.cache, self.kv_plan.num_seqs, capture)

    @property
    def decode_mode(self) -> str:
        """What the start-up log says about decode steps."""
        if self.graphs is not None:
            paged = (
                ", --kv-layout paged: block tables in fixed buffers, each row's blocks gathered"
                if isinstance(self.cache, PagedKVCache)
                else ""
            )
            return (
                f"CUDA graphs, captured on first use per bucket of rows ({', '.join(map(str, self.graphs.buckets))})"
                f" x keys (multiples of {LENGTH_STEP}){paged}; --cuda-graphs false for eager"
            )
        why = (
            " (CUDA graphs are for the decoder-only families on CUDA)"
            if self.backbone.device.type != "cuda" or self.is_encoder_decoder
            else " (--cuda-graphs false)"
        )
        if isinstance(self.cache, PagedKVCache):
            read = (
                "blocks read in place (CPU kernel)"
                if self.cache.kernel is not None
                else "blocks gathered into a contiguous buffer"
            )
            return f"eager, --kv-layout paged: {read}{why}"
        return "eager" + why

    def execute(self, batch: StepInput) -> StepOutput:
        """Free the leaving rows' slots, then one token for every row the runner holds and every joining row
        (a BeamResult for a beam group; a failed row where its logits were not finite: it failed alone)."""
        self._free(batch.finished)
        self._free(batch.preempted, keep_state=True)
        if batch.grown:
            self._grow(batch.grown)
        self._out, self._chunks = StepOutput(), []
        if not batch.sequences:
            return self._out
        forward_before = self.forward_seconds
        if self.is_encoder_decoder:
            self._encode(batch.prefill, batch.blocks, batch.resumed)
            self._decode()
        else:
            if self.batch.num_slots:
                self._decode()
            self._prefill(batch.prefill, batch.blocks, batch.resumed, batch.forks)
        out = self._out
        if self._chunks:
            out.rows = np.concatenate([rows for rows, _ in self._chunks])
            out.token_ids = np.concatenate([tokens for _, tokens in self._chunks])
        out.forward_seconds = self.forward_seconds - forward_before
        return out

    def _free(self, finished: list[Request], keep_state: bool = False) -> None:
        """The slots of leaving rows; `keep_state`: preempted rows (paged), whose sampler state (penalty
        history) serves them again when they resume."""
        b = self.batch
        slots = []
        for request in finished:
            if request.row >= 0:
                slots += [s for s in b.slots_of(request.row) if b.requests[s] is request]
            if keep_state:
                continue
            self.sampler.forget(request.request_id)
            self.beams.forget(request.request_id)
            self._beam_blocks.pop(request.row, None)
        # highest first: the last slot, which moves into a freed one, is then never one that leaves
        for slot in sorted(slots, reverse=True):
            if isinstance(self.cache, PagedKVCache):  # blocks are zeroed when handed out again
                self.cache.remove(slot, b.num_slots - 1)
                b.remove(slot)
                continue
            # what a request wrote is never read by the next one (masked entries still enter the matmul
            # with weight 0, and 0 * NaN is NaN): zero it, and the copy a compaction leaves behind
            self.cache.clear(slot, int(b.seq_len[slot]), int(b.cross_len[slot]))
            last = b.num_slots - 1
            if slot != last:
                seq_len, cross_len = int(b.seq_len[last]), int(b.cross_len[last])
                self.cache.move(last, slot, seq_len, cross_len)
                self.cache.clear(last, seq_len, cross_len)
            b.remove(slot)

    def _join(self, request: Request, seq_len: int, cross_len: int, last_token: int) -> int:
        return self.batch.append(request, self.sampler.key(request), seq_len, cross_len, last_token)

    def _prefill(
        self,
        requests: list[Request],
        blocks: dict[int, list[SeqBlocks]],
        resumed: dict[int, list[int]] | None = None,
        forks: dict[int, int] | None = None,
    ) -> None:
        """Decoder-only: write prefixes, run the prompts, sample each sequence's first token. A row resuming
        after a preemption (paged) runs its prompt and the tokens it generated, and samples its next token. A
        forking choice (paged, `forks`) runs nothing: it joins after the rows that run, takes the last prompt
        block of the row it forks from, and samples its first token from that row's logits."""
        if not requests:
            return
        resumed, forks = resumed or {}, forks or {}
        if forks:  # the rows that run first, then the forking choices: logits' rows follow the slots
            requests = [r for r in requests if r.row not in forks] + [r for r in requests if r.row in forks]
        start = self.batch.num_slots
        if isinstance(self.cache, PagedKVCache):
            prefix_lens = self._join_blocks(self.cache, start, requests, blocks)
        else:
            prefix_lens = [
                self.backbone.write_prefix(self.cache, start + i, _targets(r)) for i, r in enumerate(requests)
            ]
        pad = self.backbone.rules.pad_token_id or 0  # what a row that failed would feed (it leaves next step)
        token_lists = [r.prompt_token_ids + resumed.get(r.row, []) for r in requests]
        for request, num_prefix, tokens in zip(requests, prefix_lens, token_lists, strict=True):
            slot = self._join(request, num_prefix + len(tokens), 0, pad)
            self.batch.num_output[slot] = len(tokens) - len(request.prompt_token_ids)
        num_run = len(requests) - len(forks)
        self.on_forward(requests[:num_run])
        started = time.perf_counter()
        logits = self.backbone.prefill(self.cache, start, token_lists[:num_run], prefix_lens[:num_run])
        self.forward_seconds += time.perf_counter() - started
        if forks:
            logits = self._fork_choices(logits, start, requests[num_run:], forks)
        self._choose(logits, start, start + len(requests))
        self._fork_beams()

    def _fork_choices(
        self, logits: torch.Tensor, start: int, forking: list[Request], forks: dict[int, int]
    ) -> torch.Tensor:
        """Paged: the forking choices (slots after the rows that ran) take the block where the prompt of the
        row they fork from ends (its whole blocks they share) and its last logits. Returns logits [ran +
        forking, V]: each forking choice then samples as it would alone, from the same numbers."""
        assert isinstance(self.cache, PagedKVCache)
        b = self.batch
        ran = {int(b.rows[slot]): slot for slot in range(start, start + logits.shape[0])}
        sources = [ran[forks[r.row]] for r in forking]
        by_source: dict[int, list[int]] = {}
        for target, source in enumerate(sources, start=start + logits.shape[0]):
            by_source.setdefault(source, []).append(target)
        for source, targets in by_source.items():  # a request's choices: one prefix, one prompt, one length
            seq_len = int(b.seq_len[source])
            self.cache.copy_own([source] * len(targets), targets, seq_len, seq_len)
        picked = logits.index_select(0, as_tensor([s - start for s in sources], logits.device))
        return torch.cat([logits, picked])

    def _grow(self, grown: dict[int, list[int]]) -> None:
        """Paged: rows given more blocks (zeroed) for the positions they write next."""
        assert isinstance(self.cache, PagedKVCache)
        self.cache.zero([block for blocks in grown.values() for block in blocks])
        for row, blocks in grown.items():
            self.cache.append(self.batch.slots_of(row)[0], blocks)

    def _join_blocks(
        self, cache: PagedKVCache, start: int, requests: list[Request], blocks: dict[int, list[SeqBlocks]]
    ) -> list[int]:
        """Paged: the joining rows' tables into slots [start, start+n); their new blocks zeroed, then the
        prefixes new to the pool written into theirs. Returns each row's P."""
        grants = [blocks[r.row] for r in requests]
        cache.zero([block for group in grants for g in group for block in g.fresh])
        for i, (request, group) in enumerate(zip(requests, grants, strict=True)):
            first = group[0]
            self._join_table(cache, start + i, request, first)
            if first.is_prefix_new:
                self._write_prefix(cache, request, first)
            if len(group) > 1:
                self._beam_blocks[request.row] = group[1:]
        return [group[0].num_prefix_tokens for group in grants]

    def _join_table(self, cache: PagedKVCache, slot: int, request: Request, blocks: SeqBlocks) -> None:
        """Paged: a slot's table; BART's grant split into its decoder table and its cross table."""
        if not self.is_encoder_decoder:
            cache.join(slot, blocks)
            return
        decoder, cross = split_encoder_decoder(
            blocks, cache.block_size, len(request.prompt_token_ids), *_prefix_lens(request)
        )
        cache.join(slot, decoder, cross)

    def _write_prefix(self, cache: PagedKVCache, request: Request, blocks: SeqBlocks) -> None:
        """Paged: a prefix new to the pool into its blocks (BART: [decoder | cross], a part each)."""
        targets = _targets(request)
        prefix_blocks = blocks.table[: blocks.num_prefix_blocks]
        if not self.is_encoder_decoder:
            cache.write_prefix(prefix_blocks, targets["decoder"])
            return
        num_decoder = -(-_prefix_lens(request)[0] // cache.block_size)
        for name, part in (("decoder", prefix_blocks[:num_decoder]), ("cross", prefix_blocks[num_decoder:])):
            if name in targets:
                cache.write_prefix(part, targets[name])

    def _encode(
        self,
        requests: list[Request],
        blocks: dict[int, list[SeqBlocks]] | None = None,
        resumed: dict[int, list[int]] | None = None,
    ) -> None:
        """BART: write prefixes, encode the sources; the new rows join the next decode with the start token. A
        row resuming after a preemption (paged) runs its start token and generated tokens but the last through
        the decoder, and joins feeding the last: the decode goes on from the same position and step."""
        if not requests:
            return
        resumed = resumed or {}
        # resuming rows first: their decoder prefill covers slots [start, start + m)
        requests = sorted(requests, key=lambda r: not resumed.get(r.row))
        start = self.batch.num_slots
        if isinstance(self.cache, PagedKVCache):
            self._join_blocks(self.cache, start, requests, blocks or {})
            written = [_prefix_lens(r) for r in requests]
        else:
            written = [
                self.backbone.write_prefix(self.cache, start + i, _targets(r)) for i, r in enumerate(requests)
            ]
        started = time.perf_counter()
        cross_lens = self.backbone.encode(
            self.cache,
            start,
            [r.prompt_token_ids for r in requests],
            [_targets(r).get("encoder") for r in requests],
            [num_cross for _, num_cross in written],
        )
        start_token = self.backbone.rules.decoder_start_token_id
        decoder_lists = [[start_token, *resumed.get(r.row, [])] for r in requests]
        num_resumed = sum(len(tokens) > 1 for tokens in decoder_lists)
        if num_resumed:
            self.backbone.prefill_decoder(
                self.cache,
                start,
                [tokens[:-1] for tokens in decoder_lists[:num_resumed]],
                [num_decoder for num_decoder, _ in written[:num_resumed]],
                cross_lens[:num_resumed],
            )
        self.forward_seconds += time.perf_counter() - started
        for request, (num_decoder, _), cross_len, tokens in zip(
            requests, written, cross_lens, decoder_lists, strict=True
        ):
            slot = self._join(request, num_decoder + len(tokens) - 1, cross_len, tokens[-1])
            self.batch.num_output[slot] = len(tokens) - 1

    def _decode(self) -> None:
        """One token for every slot: the inputs are slices of the persistent batch."""
        b, n = self.batch, self.batch.num_slots
        # built on the host, copied once (pinned, non_blocking on CUDA): no wait before the forward
        host = [torch.from_numpy(b.last_token[:n].copy()), torch.from_numpy(b.seq_len[:n].copy())]
        if self.is_encoder_decoder:
            host.append(torch.from_numpy(b.cross_len[:n].copy()))
        tokens, positions, *cross = copy_to_device(host, self.backbone.device)
        length = self.cache.decode_length(b.seq_len[:n])
        self.on_forward(b.requests[:n])
        started = time.perf_counter()
        if self.is_encoder_decoder:
            cross_length = int(b.cross_len[:n].max())
            logits = self.backbone.decode(self.cache, tokens, positions, length, cross[0], cross_length)
        elif self.graphs is not None:
            logits = self.graphs(tokens, positions, length)
        else:
            logits = self.backbone.decode(self.cache, tokens, positions, length)
        self.forward_seconds += time.perf_counter() - started
        self._choose(logits, 0, n)
        b.seq_len[:n] += 1
        self._fork_beams()

    # -- choosing: the sampler for ordinary slots, the beam search for beam groups -----------------------------
    def _choose(self, logits: torch.Tensor, start: int, end: int) -> None:
        """The next token of slots [start, end) (logits' rows, in order): recorded by row for the StepOutput,
        and fed at the next step. Without beam slots this is the sampler alone (one host wait), and arrays."""
        b = self.batch
        if not b.num_special or not b.is_beam[start:end].any():
            self._sampled(np.arange(start, end), self._sample(logits, slice(start, end)))
            return
        ordinary = np.flatnonzero(~b.is_beam[start:end]) + start
        if ordinary.size:
            own = logits.index_select(0, as_tensor((ordinary - start).tolist(), logits.device))
            self._sampled(ordinary, self._sample(own, ordinary))
        self._choose_beams(logits, start, end)

    def _sample(self, logits: torch.Tensor, slots: slice | np.ndarray) -> RowsSampled:
        b = self.batch
        return self.sampler.sample_rows(logits, b.view(slots, self._forced(slots)))

    def _sampled(self, slots: np.ndarray, out: RowsSampled) -> None:
        """Record the sampled tokens by row; the slots that got one feed it next and count it."""
        b = self.batch
        ok = ~out.failed
        rows = b.rows[slots]
        fed = slots[ok]
        b.last_token[fed] = out.token_ids[ok]
        b.num_output[fed] += 1
        self._chunks.append((rows[ok], out.token_ids[ok]))
        if not ok.all():
            self._out.failed += rows[~ok].tolist()
        for i, logprob in out.logprobs.items():
            self._out.logprobs[int(rows[i])] = logprob

    def _forced(self, slots: slice | np.ndarray) -> dict[int, int]:
        """{position in `slots`: token} for the slots whose token the family's rules force at this step (HF's
        ForcedBOS at the first, ForcedEOS at the last): array tests find the candidates, only they are asked."""
        rules = self.backbone.rules
        if rules.forced_bos_token_id is None and rules.forced_eos_token_id is None:
            return {}
        b = self.batch
        num_output, max_new = b.num_output[slots], b.max_new[slots]
        prompt_len, ignore_eos = b.prompt_len[slots], b.ignore_eos[slots]
        cur_len = num_output + (1 if self.is_encoder_decoder else prompt_len)
        candidates = (cur_len == 1) | (~ignore_eos & (num_output == max_new - 1))
        forced = {}
        for i in np.flatnonzero(candidates).tolist():
            token = self.backbone.spec.forced_token(
                rules, int(prompt_len[i]), int(num_output[i]), int(max_new[i]), bool(ignore_eos[i])
            )
            if token is not None:
                forced[i] = token
        return forced

    def _choose_beams(self, logits: torch.Tensor, start: int, end: int) -> None:
        """The beam groups among slots [start, end): one BeamSearch step for them all; each slot feeds its beam's
        token; the group's BeamResult (or its failure) is its row's answer."""
        b = self.batch
        groups: dict[int, list[int]] = {}  # row -> its slots' positions in logits, in beam order
        for slot in sorted(np.flatnonzero(b.is_beam[start:end]) + start, key=lambda s: b.beam[s]):
            groups.setdefault(int(b.rows[slot]), []).append(int(slot) - start)
        requests = [b.requests[positions[0] + start] for positions in groups.values()]
        choices = self.beams.step(logits, list(zip(requests, groups.values(), strict=True)))
        for (row, positions), choice in zip(groups.items(), choices, strict=True):
            self._to_fork.append((row, choice))
            if choice.result is None:
                self._out.failed.append(row)
                continue
            self._out.beams[row] = choice.result
            for position in positions:
                b.last_token[position + start] = choice.token_ids[int(b.beam[position + start])]

    def _fork_beams(self) -> None:
        """After a step: a new group fills its other k-1 slots from its one slot (appended, feeding the other
        beams' tokens); in a running group, beam j takes the generated KV of beam parents[j] — one gather, so
        any permutation is safe. A group that is done or failed leaves at the next step: nothing to copy."""
        b = self.batch
        to_fork, self._to_fork = self._to_fork, []
        for row, choice in to_fork:
            if choice.result is None or choice.result.token_ids is not None:
                continue
            slots = b.slots_of(row)
            first = slots[0]
            request = b.requests[first]
            seq_len, cross_len = int(b.seq_len[first]), int(b.cross_len[first])
            group = self.beams.groups[request.request_id]
            if len(slots) == 1:
                new = list(range(b.num_slots, b.num_slots + group.num_beams - 1))
                if isinstance(self.cache, PagedKVCache):
                    for slot, grant in zip(new, self._beam_blocks.pop(row), strict=True):
                        self._join_table(self.cache, slot, request, grant)
                    # the prefix and the prompt's whole blocks are shared: only the block where the prompt
                    # ends is copied
                    self.cache.copy_own([first] * len(new), new, seq_len, seq_len)
                else:
                    _copy_kv(self.cache, [first] * len(new), new, 0, seq_len, cross_len)
                group.gen_start = seq_len
                for beam, token in enumerate(choice.token_ids[1:], start=1):
                    b.append(request, 0, seq_len, cross_len, token, beam)
                continue
            moves = [(slots[p], slots[j]) for j, p in enumerate(choice.parents) if p != j]
            if moves:
                src, dst = zip(*moves, strict=True)
                if isinstance(self.cache, PagedKVCache):
                    self.cache.copy_own(list(src), list(dst), group.gen_start, seq_len)
                else:
                    _copy_kv(self.cache, list(src), list(dst), group.gen_start, seq_len, 0)


def _copy_kv(cache: KVCache, src: list[int], dst: list[int], start: int, end: int, cross_len: int) -> None:
    """Slots dst take slots src's self-attention entries [start, end) (and cross entries [0, cross_len)).
    The right-hand side is gathered into a new tensor before the write, so src and dst may overlap."""
    src_index = as_tensor(src, cache.self_kv.device)
    dst_index = as_tensor(dst, cache.self_kv.device)
    cache.self_kv[:, :, dst_index, :, start:end] = cache.self_kv[:, :, src_index, :, start:end]
    if cross_len and cache.cross_kv is not None:
        cache.cross_kv[:, :, dst_index, :, :cross_len] = cache.cross_kv[:, :, src_index, :, :cross_len]
