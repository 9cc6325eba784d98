"""Fair admission (virtual token counter), the tenant-aware queue and row faults: no model, no torch."""

from __future__ import annotations

import pytest

from server.engine.request import Request, RequestStatus, SamplingParams
from server.engine.scheduler import QueueFull, Scheduler, SchedulerConfig
from server.engine.step import StepOutput

EOS = 0


def make(name: str, tenant: str, num_prompt: int = 4, max_new: int = 8) -> Request:
    return Request(
        name, list(range(1, num_prompt + 1)), SamplingParams(max_new_tokens=max_new), tenant=tenant
    )


def scheduler(**kwargs) -> Scheduler:
    return Scheduler(SchedulerConfig(eos_token_ids=frozenset({EOS}), **kwargs))


def run(s: Scheduler, steps: int, refill=None) -> dict[str, int]:
    """Step the scheduler, one token per running request; count tokens served per tenant."""
    served: dict[str, int] = {}
    for _ in range(steps):
        batch = s.schedule()
        for request in batch.finished:
            if refill is not None:
                refill(request)
        s.update(batch, StepOutput.of(batch.sequences, [7] * len(batch.sequences)))
        for request in batch.sequences:
            served[request.tenant] = served.get(request.tenant, 0) + 1
    return served


def keep_backlogged(s: Scheduler, tenants: dict[str, float], depth: int = 32, max_new: int = 8):
    """Every tenant keeps about `depth` requests waiting: each finished request is replaced."""
    counter = iter(range(10**9))

    def add(tenant: str) -> None:
        if tenant in tenants:
            request = make(f"{tenant}-{next(counter)}", tenant, max_new=max_new)
            s.add(request, weight=tenants[tenant])

    for tenant in tenants:
        for _ in range(depth):
            add(tenant)
    return lambda request: add(request.tenant)


def test_equal_tenants_get_equal_service_whatever_their_backlog():
    s = scheduler(max_num_seqs=4)
    counter = iter(range(10**9))
    for _ in range(200):  # the heavy tenant queues far more than the light one
        s.add(make(f"heavy-{next(counter)}", "heavy"))
    for _ in range(200):
        s.add(make(f"light-{next(counter)}", "light"))
    served = run(s, 200)
    assert abs(served["heavy"] - served["light"]) <= 0.05 * (served["heavy"] + served["light"])


def test_fifo_serves_in_arrival_order():
    s = scheduler(max_num_seqs=4, policy="fifo")
    for i in range(200):
        s.add(make(f"heavy-{i}", "heavy"))
    s.add(make("light-0", "light"))
    served = run(s, 200)
    assert "light" not in served  # stuck behind the flood: what the fair policy fixes


@pytest.mark.parametrize("weights", [{"a": 1.0, "b": 3.0}, {"a": 1.0, "b": 2.0, "c": 5.0}])
def test_weighted_shares_follow_weights(weights):
    s = scheduler(max_num_seqs=8)
    refill = keep_backlogged(s, weights)
    served = run(s, 600, refill)
    total, weight_sum = sum(served.values()), sum(weights.values())
    for tenant, weight in weights.items():
        assert served[tenant] / total == pytest.approx(weight / weight_sum, rel=0.05), served


def test_returning_tenant_does_not_bank_idle_time():
    s = scheduler(max_num_seqs=2)
    refill = keep_backlogged(s, {"busy": 1.0})
    run(s, 300, refill)  # "idle" was away while "busy" was served alone
    counter = iter(range(10**9))
    for _ in range(50):
        s.add(make(f"idle-{next(counter)}", "idle"))
    assert s.counters["idle"] >= min(s.counters[t] for t in s.load if t != "idle")
    served = run(s, 100, refill)
    # lifted to the busy tenant's counter: it shares from now on, it does not take everything to catch up
    assert served["busy"] >= 0.4 * (served["busy"] + served["idle"]), served


def test_returning_after_everyone_was_idle_is_lifted_too():
    s = scheduler(max_num_seqs=2)
    a = make("a0", "a", max_new=50)
    s.add(a)
    run(s, 60)  # a alone, then nothing is active
    assert not s.has_work()
    s.add(make("b0", "b"))
    assert s.counters["b"] >= s.counters["a"] - 1e-9


def test_light_tenant_is_admitted_at_the_next_free_slot():
    s = scheduler(max_num_seqs=2, max_queue=1000)
    refill = keep_backlogged(s, {"flood": 1.0}, depth=300, max_new=4)
    run(s, 20, refill)
    light = make("light", "light", max_new=4)
    s.add(light)
    waited = 0
    while light.status.value == "waiting" and waited < 10:
        run(s, 1, refill)
        waited += 1
    # the flood's requests take 4 steps: one turnover of the slots is at most 4 steps away
    assert waited <= 5, "the light tenant waited for more than one slot turnover"


def test_full_queue_refuses_only_tenants_over_their_share():
    s = scheduler(max_num_seqs=1, max_queue=8)
    s.add(make("run", "a"))
    s.schedule()  # the one slot is busy
    for i in range(8):
        s.add(make(f"a{i}", "a"))
    with pytest.raises(QueueFull) as refused:
        s.add(make("a-over", "a"))
    assert refused.value.code == "tenant_queue_full"
    # b holds nothing: within its share (8 * 1/2 = 4 places) it is queued although the queue is full
    for i in range(4):
        s.add(make(f"b{i}", "b"))
    with pytest.raises(QueueFull):
        s.add(make("b-over", "b"))
    assert s.num_waiting == 12


def test_queue_share_is_weighted():
    s = scheduler(max_num_seqs=1, max_queue=10)
    s.add(make("run", "a"))
    s.schedule()
    for i in range(10):
        s.add(make(f"a{i}", "a"), weight=1.0)
    for i in range(7):  # weight 4 of 5: 8 places
        s.add(make(f"b{i}", "b"), weight=4.0)
    s.add(make("b7", "b"), weight=4.0)
    with pytest.raises(QueueFull):
        s.add(make("b8", "b"), weight=4.0)


def test_fifo_queue_refuses_anyone_when_full():
    s = scheduler(max_num_seqs=1, max_queue=2, policy="fifo")
    s.add(make("run", "a"))
    s.schedule()
    s.add(make("a0", "a"))
    s.add(make("a1", "a"))
    with pytest.raises(QueueFull) as refused:
        s.add(make("b0", "b"))
    assert refused.value.code == "queue_full"


def test_failed_row_finishes_alone_with_error():
    s = scheduler()
    good, bad = make("good", "a"), make("bad", "b")
    s.add(good)
    s.add(bad)
    batch = s.schedule()
    s.update(batch, StepOutput.of(batch.sequences, [5, None] if batch.sequences[0] is good else [None, 5]))
    assert bad.finish_reason == "error" and bad.output_token_ids == []
    assert s.rows.token_ids(good.row) == [5] and not good.is_finished


def test_tenant_load_counts_running_and_waiting_and_forgets_idle_tenants():
    s = scheduler(max_num_seqs=1)
    s.add(make("a0", "a", max_new=1))
    s.add(make("a1", "a", max_new=1))
    s.add(make("b0", "b", max_new=1))
    s.schedule()
    load = s.tenant_load()
    assert (load["a"].num_running, load["a"].num_waiting, load["b"].num_waiting) == (1, 1, 1)
    for _ in range(10):
        s.update(batch := s.schedule(), StepOutput.of(batch.sequences, [7] * len(batch.sequences)))
    s.schedule()
    assert s.tenant_load() == {} and not s.has_work()


def test_abort_waiting_frees_its_place_at_once():
    s = scheduler(max_num_seqs=1, max_queue=1, policy="fifo")
    s.add(make("run", "a"))
    s.schedule()
    s.add(make("w", "a"))
    s.abort("w")
    s.add(make("w2", "a"))  # the aborted one no longer holds the place
    assert [r.request_id for r in s.schedule().finished] == ["w"]


def test_blocks_are_shared_fairly_when_they_run_short():
    """The paged layout admits by free blocks: a tenant queueing long requests (each reserving 8 of the pool's
    32 blocks) gets no more of the service than one queueing short ones (1 block each) — blocks that free up go
    to the tenant furthest under its share, and the short tenant is never starved."""
    from server.engine.block_pool import BlockPool

    pool = BlockPool(num_blocks=33, block_size=4)
    s = Scheduler(SchedulerConfig(max_num_seqs=64, eos_token_ids=frozenset({EOS})), pool)
    counter = iter(range(10**9))

    def add(tenant: str) -> None:
        long = tenant == "hog"
        s.add(
            make(f"{tenant}-{next(counter)}", tenant, num_prompt=16 if long else 2, max_new=16 if long else 2)
        )

    for _ in range(64):
        add("hog")
        add("light")
    served = run(s, 300, refill=lambda request: add(request.tenant))
    assert pool.num_free + pool.num_sequence_blocks == 32  # every block accounted for
    assert served["light"] > 0.8 * served["hog"], served  # VTC: service evened out, not blocks grabbed


def test_a_preempted_request_waits_first_in_line_and_can_be_aborted_or_stopped_while_it_waits():
    """Paged: rows take blocks as they grow; when none is left the tenant with the most service loses its
    latest request, which keeps its row and tokens, waits first in its tenant's line, and resumes with them.
    Finished while waiting (abort, a stop string in the front), it gives its row back."""
    from server.engine.block_pool import BlockPool

    pool = BlockPool(num_blocks=9, block_size=4)  # 8 usable
    s = Scheduler(SchedulerConfig(max_num_seqs=8, eos_token_ids=frozenset({EOS})), pool)
    requests = [make(f"r{i}", "t", num_prompt=3, max_new=12) for i in range(4)]
    for request in requests:
        s.add(request)
    preempted: list[Request] = []
    while not preempted:  # 4 rows of 1 block each grow to 3 (3 prompt + 6 tokens): 12 > 8
        batch = s.schedule()
        preempted += batch.preempted
        s.update(batch, StepOutput.of(batch.sequences, [7] * len(batch.sequences)))
    assert preempted and s.num_preemptions == len(preempted)
    assert len(preempted) == 2  # the latest request, then the one short of a block itself
    for request in preempted:
        assert request.status is RequestStatus.WAITING and s.rows.requests[request.row] is request
        assert request in s.waiting["t"] and s.rows.num_output[request.row] > 0  # tokens kept
    assert s.waiting["t"][0] is preempted[-1]  # first in line
    aborted, stopped = preempted
    s.abort(aborted.request_id)
    stopped.finish("stop")  # a stop string the front found in a token it had streamed
    batch = s.schedule()
    assert aborted in batch.finished and stopped in batch.finished
    for request in preempted:
        assert s.rows.requests[request.row] is None and request.output_token_ids == [7] * 6
    while s.has_work():
        s.update(batch, StepOutput.of(batch.sequences, [7] * len(batch.sequences)))
        batch = s.schedule()
    assert all(r.is_finished for r in requests)
    assert pool.num_sequence_blocks == 0 and s.rows.requests.count(None) == 8


def test_a_tenant_with_nothing_running_gets_a_row_at_once_from_the_tenant_over_its_share():
    """Every row is the flood's when a light request arrives: VTC alone would keep it waiting for the next
    turnover; with preempt_for_share the flood's latest request is preempted (it keeps its tokens, waits first
    in its line and resumes with them) and the light request joins in the same step."""
    s = scheduler(max_num_seqs=4, max_queue=1000, preempt_for_share=True)
    refill = keep_backlogged(s, {"flood": 1.0}, depth=50, max_new=40)
    run(s, 10, refill)
    latest = max(s.running, key=lambda r: s._order[id(r)])
    light = make("light", "light", max_new=4)
    s.add(light)
    batch = s.schedule()
    assert batch.prefill == [light] and batch.preempted == [latest] and latest not in batch.decode
    assert latest.status is RequestStatus.WAITING and s.waiting["flood"][0] is latest
    assert s.num_share_preemptions == 1 and s.num_preemptions == 0  # the blocks' counter is the pool's
    had = s.rows.token_ids(latest.row)
    assert len(had) == 10
    s.update(batch, StepOutput.of(batch.sequences, [7] * len(batch.sequences)))
    resumed = None
    for _ in range(10):  # light finishes (4 tokens): its row goes back to the preempted request first
        batch = s.schedule()
        if latest in batch.prefill:
            resumed = batch.resumed[latest.row]
            break
        s.update(batch, StepOutput.of(batch.sequences, [7] * len(batch.sequences)))
    assert light.is_finished and resumed == had
    assert s.num_share_preemptions == 1  # the flood alone again: nobody is starved


def test_no_share_preemption_when_the_tenant_already_runs_or_its_share_is_under_one_row():
    s = scheduler(max_num_seqs=4, max_queue=1000, preempt_for_share=True)
    refill = keep_backlogged(s, {"flood": 1.0}, depth=50, max_new=40)
    run(s, 3, refill)
    for i in range(3):  # a fourth and fifth tenant: 4 rows over 5 tenants is under one row each
        s.add(make(f"t{i}", f"t{i}", max_new=40))
    s.add(make("u", "u", max_new=40))
    run(s, 5, refill)
    assert s.num_share_preemptions == 0
    s2 = scheduler(max_num_seqs=2, max_queue=1000, preempt_for_share=True)
    refill2 = keep_backlogged(s2, {"a": 1.0, "b": 1.0}, depth=20, max_new=30)
    run(s2, 200, refill2)  # both tenants run: a turnover is theirs to share, no preemption churn
    assert s2.num_share_preemptions == 0


def test_rows_grow_when_preempted_requests_keep_theirs():
    """Paged: a preempted request keeps its row while it waits; another tenant's request admitted meanwhile
    needs one more row than there are slots (the rows grow instead of failing the step)."""
    from server.engine.block_pool import BlockPool

    pool = BlockPool(num_blocks=9, block_size=4)
    s = Scheduler(SchedulerConfig(max_num_seqs=2, eos_token_ids=frozenset({EOS})), pool)
    s.add(make("a0", "a", num_prompt=3, max_new=30))
    s.add(make("a1", "a", num_prompt=3, max_new=30))
    added = []
    for _ in range(80):
        batch = s.schedule()
        if batch.preempted and not added:
            added.append(make("b0", "b", num_prompt=1, max_new=2))
            s.add(added[0])
        s.update(batch, StepOutput.of(batch.sequences, [7] * len(batch.sequences)))
        if not s.has_work():
            break
    assert added and added[0].is_finished and not s.has_work()
    assert s.rows.capacity == 4 and pool.num_sequence_blocks == 0


def test_a_row_grown_then_preempted_in_one_schedule_is_not_told_to_grow():
    """Rows grow earliest first; the victim of a later row's shortage may be one grown a moment before in the same
    schedule(): it is preempted (its blocks, the new one too, go back) and the step does not list it as grown."""
    from server.engine.block_pool import BlockPool

    pool = BlockPool(num_blocks=7, block_size=4)  # 6 usable: 3 + 2 at admission, 1 kept in reserve
    s = Scheduler(SchedulerConfig(max_num_seqs=4, eos_token_ids=frozenset({EOS})), pool)
    first = make("b", "busy", num_prompt=8, max_new=12)  # more service (a longer prompt), admitted first
    second = make("a", "light", num_prompt=4, max_new=12)
    s.add(first)
    s.add(second)
    preempted: list[Request] = []
    while not preempted:  # both cross into a new block at their 5th token: one block for two
        batch = s.schedule()
        preempted += batch.preempted
        s.update(batch, StepOutput.of(batch.sequences, [7] * len(batch.sequences)))
    assert preempted == [first] and first.row not in batch.grown and second.row in batch.grown
    assert pool.num_free + pool.num_sequence_blocks == 6
