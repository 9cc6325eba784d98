"""The paged KV memory's bookkeeping: free list, tables, shared prefix blocks, LRU eviction. No torch."""

from __future__ import annotations

import pytest

from server.engine.block_pool import BlockPool


def test_a_sequence_gets_its_prefix_blocks_then_fresh_own_blocks():
    pool = BlockPool(num_blocks=11, block_size=4)
    (grant,) = pool.admit(0, "p", num_prefix_tokens=5, num_tokens=9)
    assert grant.num_prefix_blocks == 2 and grant.num_prefix_tokens == 5
    assert len(grant.table) == 2 + 3 and 0 not in grant.table  # block 0 is never handed out
    assert grant.is_prefix_new and sorted(grant.fresh) == sorted(grant.table)
    assert (pool.num_free, pool.num_prefix_blocks, pool.num_sequence_blocks) == (5, 2, 3)


def test_a_prefix_used_by_many_sequences_is_stored_once():
    pool = BlockPool(num_blocks=40, block_size=4)
    grants = [pool.admit(row, "p", 8, 4)[0] for row in range(8)]
    assert {tuple(g.table[:2]) for g in grants} == {tuple(grants[0].table[:2])}
    assert [g.is_prefix_new for g in grants] == [True] + [False] * 7
    assert all(g.fresh == g.table[2:] for g in grants[1:])  # only the first writes the prefix
    assert pool.num_prefix_blocks == 2 and pool.num_sequence_blocks == 8
    assert pool.references("p") == 8
    own = [b for g in grants for b in g.table[2:]]
    assert len(set(own)) == len(own)  # own blocks are never shared


def test_release_frees_own_blocks_and_keeps_the_prefix_resident():
    pool = BlockPool(num_blocks=10, block_size=4)
    pool.admit(0, "p", 4, 8)
    pool.release(0)
    assert pool.references("p") == 0 and pool.num_prefix_blocks == 1
    assert pool.num_free == 8
    (again,) = pool.admit(1, "p", 4, 8)
    assert not again.is_prefix_new  # still resident: not written again


def test_unreferenced_prefixes_are_evicted_least_recently_used_first_and_referenced_never():
    pool = BlockPool(num_blocks=7, block_size=4)  # 6 usable
    for row, key in enumerate(["a", "b", "c"]):
        pool.admit(row, key, 8, 4)  # 2 prefix blocks + 1 own each
        pool.release(row)
    # "a" was evicted to make room for "c"; "b" and "c" are resident and unreferenced
    assert pool.num_evictions == 1 and pool.num_resident_prefixes == 2
    pool.admit(10, "b", 8, 4)  # referenced again (most recently used)
    assert pool.can_admit("d", 8, 4)  # "c" can go
    pool.admit(11, "d", 8, 4)
    assert pool.references("b") == 1 and pool.num_evictions == 2
    assert not pool.can_admit("e", 8, 4)  # only referenced prefixes and sequences remain
    with pytest.raises(MemoryError):
        pool.admit(12, "e", 8, 4)


def test_admission_counts_a_resident_prefix_as_not_evictable_for_its_own_user():
    pool = BlockPool(num_blocks=6, block_size=4)  # 5 usable
    pool.admit(0, "p", 12, 4)  # 3 + 1
    pool.release(0)
    assert pool.can_admit("p", 12, 8)  # 2 own from the 2 free blocks, the prefix stays
    assert not pool.can_admit("p", 12, 12)  # would need to evict its own prefix


def test_beam_groups_get_one_table_per_beam_sharing_the_prefix():
    pool = BlockPool(num_blocks=20, block_size=4)
    grants = pool.admit(0, "p", 4, 6, num_seqs=3)
    assert len(grants) == 3 and {g.table[0] for g in grants} == {grants[0].table[0]}
    assert [g.is_prefix_new for g in grants] == [True, False, False]
    assert pool.num_sequence_blocks == 6
    pool.release(0)
    assert pool.num_sequence_blocks == 0 and pool.references("p") == 0


def test_what_can_never_fit_is_known_before_admission():
    pool = BlockPool(num_blocks=5, block_size=4)
    assert pool.can_ever_fit(4, 12) and not pool.can_ever_fit(4, 13)
    assert not pool.can_ever_fit(0, 8, num_seqs=3)


def test_a_beam_group_shares_its_prompt_s_whole_blocks_and_owns_the_rest():
    pool = BlockPool(num_blocks=40, block_size=4)
    # prompt of 10 tokens: 2 whole blocks shared, the third (2 prompt tokens) each beam's own; 10 + 6 new = 4 blocks
    grants = pool.admit(0, "p", 4, 16, num_seqs=4, num_shared=10)
    first = grants[0].table
    assert all(g.table[:3] == first[:3] for g in grants)  # the prefix block and the prompt's 2 whole blocks
    assert len({tuple(g.table[3:]) for g in grants}) == 4 and all(len(g.table) == 5 for g in grants)
    assert all(g.fresh == g.table[3:] for g in grants[1:])
    assert pool.num_sequence_blocks == 4 + 3 * 2 == pool.num_needed("q", 0, 16, 4, 10)
    assert pool.can_ever_fit(4, 16, 4, 10) and not pool.can_ever_fit(4, 16, 30, 10)
    pool.release(0)
    assert pool.num_sequence_blocks == 0 and pool.num_free == 38


def test_the_choices_of_a_request_share_the_prompt_s_whole_blocks_until_the_last_leaves():
    pool = BlockPool(num_blocks=40, block_size=4)
    # prompt of 10 tokens + the position written next: 2 whole blocks shared, the third each choice's own
    assert pool.can_admit("p", 4, 11, num_seqs=4, num_shared=10)
    grants = pool.admit_choices([3, 5, 7, 9], "p", 4, 11, 10)
    first = grants[0].table
    assert all(g.table[:3] == first[:3] for g in grants)  # the prefix block and the prompt's 2 whole blocks
    assert len({g.table[3] for g in grants}) == 4 and all(len(g.table) == 4 for g in grants)
    assert [g.is_prefix_new for g in grants] == [True, False, False, False]
    assert all(g.fresh == g.table[3:] for g in grants[1:])
    assert pool.num_sequence_blocks == 2 + 4 * 1 == pool.num_needed("q", 0, 11, 4, 10)
    assert pool.references("p") == 4
    pool.release(3)  # the first choice leaves (or is preempted): the others still read the shared blocks
    assert pool.num_sequence_blocks == 2 + 3 and pool.references("p") == 3
    pool.grow(5, 2)  # a choice grows alone
    assert pool.num_sequence_blocks == 2 + 3 + 2
    for row in (5, 7):
        pool.release(row)
    assert pool.num_sequence_blocks == 2 + 1
    pool.release(9)  # the last one frees them
    assert pool.num_sequence_blocks == 0 and pool.num_free == 39 - 1 and pool.references("p") == 0
    assert len(set(pool._free)) == len(pool._free)  # no block given back twice


def test_loads_hits_and_evictable_blocks_are_counted():
    pool = BlockPool(num_blocks=20, block_size=4)
    pool.admit(0, "a", 8, 4)  # written into new blocks
    pool.admit(1, "a", 8, 4)  # resident: referenced, nothing written
    pool.admit(2, "b", 4, 4)
    assert (pool.num_prefix_loads, pool.num_prefix_hits, pool.num_evictable_blocks) == (2, 1, 0)
    pool.release(0)
    assert pool.num_evictable_blocks == 0  # "a" is still referenced by row 1
    pool.release(1)
    assert pool.num_evictable_blocks == 2 and pool.num_prefix_blocks == 3
    pool.admit(3, None, 0, 4)  # no prefix: neither a load nor a hit
    assert (pool.num_prefix_loads, pool.num_prefix_hits) == (2, 1)


def test_a_tenant_cycling_many_prefixes_never_takes_a_referenced_one_s_blocks():
    """One row holds prefix "v" while another tenant cycles 40 distinct prefixes through a pool that holds three
    at a time: theirs evict each other (least recently used first), "v"'s blocks stay its own throughout."""
    pool = BlockPool(num_blocks=12, block_size=4)  # 11 usable
    (victim,) = pool.admit(0, "v", 8, 8)  # 2 prefix + 2 own
    v_blocks = victim.table[:2]
    for i in range(40):
        key = f"h{i % 20}"
        assert pool.can_admit(key, 8, 4)
        (grant,) = pool.admit(1, key, 8, 4)  # 2 prefix + 1 own, evicting others' as needed
        assert not set(grant.table) & set(victim.table)
        pool.release(1)
        assert pool.references("v") == 1
    assert pool.num_evictions > 0 and pool.num_prefix_loads == 41  # every cycled prefix was evicted by then
    (again,) = pool.admit(2, "v", 8, 4)
    assert again.table[:2] == v_blocks and not again.is_prefix_new
    # 5 blocks held (row 0's 2 + 2, row 2's 1): 6 free or evictable, "v"'s 2 not among them
    assert pool.can_admit("x", 4 * 5, 4) and not pool.can_admit("x", 4 * 6, 4)


def test_the_counted_evictable_and_prefix_blocks_match_a_recount_through_random_traffic():
    """The pool counts its unreferenced prefixes' blocks as they change (an admission scans none of them): over
    random admissions, choices, growth and releases across 30 prefixes the counts equal a recount, and an eviction
    always takes the unreferenced prefix released longest ago."""
    import random

    rng = random.Random(0)
    pool = BlockPool(num_blocks=64, block_size=4)
    running: dict[int, str | None] = {}
    released_at: dict[str, int] = {}
    next_row = 0
    for tick in range(3000):
        if running and (rng.random() < 0.45 or len(running) > 12):
            row = rng.choice(list(running))
            key = running.pop(row)
            pool.release(row)
            if key is not None and pool.references(key) == 0:
                released_at[key] = tick
        elif running and rng.random() < 0.15:
            row = rng.choice(list(running))
            if pool.can_grow(1) and pool._sequences[row].shared is None:
                pool.grow(row, 1)
        else:
            key = rng.choice([None, *(f"p{i}" for i in range(30))])
            num_prefix, num_tokens = rng.randint(1, 12), rng.randint(1, 16)
            choices = rng.choice([1, 1, 1, 3])
            if not pool.can_admit(key, num_prefix, num_tokens, choices, num_shared=num_tokens):
                continue
            idle = [k for k, p in pool._prefixes.items() if p.num_refs == 0 and k != key]
            evictions = pool.num_evictions
            rows = list(range(next_row, next_row + choices))
            next_row += choices
            pool.admit_choices(rows, key, num_prefix, num_tokens, num_shared=num_tokens)
            evicted = [k for k in idle if k not in pool._prefixes]
            assert len(evicted) == pool.num_evictions - evictions
            oldest = sorted(idle, key=lambda k: released_at[k])[: len(evicted)]
            assert sorted(evicted) == sorted(oldest)  # least recently used first
            running.update(dict.fromkeys(rows, key))
        unreferenced = sum(len(p.blocks) for p in pool._prefixes.values() if p.num_refs == 0)
        assert pool.num_evictable_blocks == unreferenced
        assert pool.num_prefix_blocks == sum(len(p.blocks) for p in pool._prefixes.values())
        assert pool.num_free + pool.num_prefix_blocks + pool.num_sequence_blocks == pool.num_usable
