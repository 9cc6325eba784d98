"""What the decoder-only families (GPT-2, Llama-style) share around their layers: how a forward's layers write
and read the KV cache (`Attention`, built once per forward by the cache: slots here, blocks in paged_cache.py),
a prefill step's inputs built on the host and copied once, and a prefix written into the start of its slot. The
layers themselves stay per family."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from server.engine.transfer import copy_to_device


@dataclass(frozen=True)
class Attention:
    """One forward's cache access, the same for every layer: the layer selects the K/V of `queries`, the cache
    writes them at `write` and returns the keys/values `read` names (the cache's own index formats)."""

    write: Any  # slots: (rows, cols) [N]; blocks: flat entry index [N]
    queries: torch.Tensor  # [N] flat index (into [n*T]) of the queries whose K/V are written
    read: Any  # slots: (slot slice, length); blocks: block tables [n, num_blocks]
    mask: torch.Tensor  # [n, 1, T, K] bool: key k visible to query t
    rows: Any = (
        None  # blocks, decode: (P, shift, position) [n] each, what the paged kernel reads instead of mask
    )


@dataclass(frozen=True)
class PrefillInputs:
    ids: torch.Tensor  # [n, Tq] right-padded prompts
    positions: torch.Tensor  # [n, Tq] from each row's P; padded queries at 0 (never read)
    last: torch.Tensor  # [n] flat index of each prompt's last query
    attention: Attention


def padded_queries(
    token_lists: list[list[int]], prefix_lens: list[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Prompts right-padded, in one numpy pass: (lens [n]; valid [n, T]: a real query, row-major; ids [n, T], 0
    where padded; positions [n, T] from each row's P, 0 where padded)."""
    lens = np.fromiter(map(len, token_lists), np.int64, len(token_lists))
    steps = np.arange(int(lens.max()))
    valid = steps[None, :] < lens[:, None]
    ids = np.zeros(valid.shape, dtype=np.int64)
    ids[valid] = np.fromiter(itertools.chain.from_iterable(token_lists), np.int64, int(lens.sum()))
    positions = np.where(valid, np.asarray(prefix_lens, dtype=np.int64)[:, None] + steps, 0)
    return lens, valid, ids, positions


def prepare_prefill(
    start: int, token_lists: list[list[int]], prefix_lens: list[int], device: torch.device
) -> PrefillInputs:
    """New sequences in slots [start, start+n) whose prefixes are in the cache: every index is built on the host
    and copied in one transfer; padded queries compute garbage that is never written to the cache nor read."""
    n = len(token_lists)
    lens, valid, ids_np, positions_np = padded_queries(token_lists, prefix_lens)
    num_q = valid.shape[1]
    host = [
        ids_np,
        positions_np,
        np.repeat(start + np.arange(n), lens),  # the slot of each real query
        positions_np[valid],  # its cache entry: its position
        np.flatnonzero(valid),  # its flat index into [n * num_q]
        np.arange(n) * num_q + lens - 1,  # each prompt's last query
    ]
    ids, positions, rows_t, cols_t, queries_t, last_t = copy_to_device(
        [torch.from_numpy(a) for a in host], device
    )
    length = int((np.asarray(prefix_lens) + lens).max())
    mask = (torch.arange(length, device=device)[None, None, :] <= positions[:, :, None])[:, None]
    attention = Attention((rows_t, cols_t), queries_t, (slice(start, start + n), length), mask)
    return PrefillInputs(ids, positions, last_t, attention)


def decode_attention(positions: torch.Tensor, length: int) -> Attention:
    """Slots [0, B) decode one token each at `positions` [B] (device), reading cache entries [0, length)."""
    num_rows = positions.shape[0]
    rows = torch.arange(num_rows, device=positions.device)
    mask = (torch.arange(length, device=positions.device)[None, :] <= positions[:, None])[:, None, None, :]
    # query i of the [B, 1] batch is flat index i
    return Attention((rows, positions), rows, (slice(0, num_rows), length), mask)


def write_decoder_prefix(cache: Any, slot: int, targets: dict[str, torch.Tensor]) -> int:
    """Copy a prefix's `decoder` target into the start of its slot of `cache` (a KVCache: kv_cache.py imports
    this module, so not the other way round); returns P (0 without a prefix)."""
    decoder = targets.get("decoder")
    if decoder is None:
        return 0
    cache.self_kv[:, :, slot, :, : decoder.shape[3]] = decoder  # [L, 2, H_kv, P, d]
    return decoder.shape[3]
