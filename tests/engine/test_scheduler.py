"""The scheduler on hand-built requests: no model, no torch."""

from __future__ import annotations

import pytest

from server.engine.block_pool import BlockPool
from server.engine.request import Request, SamplingParams
from server.engine.scheduler import QueueFull, Scheduler, SchedulerConfig
from server.engine.step import StepOutput

EOS = 0


def make(request_id: str, num_prompt: int = 3, max_new: int = 4, **params) -> Request:
    return Request(
        request_id, list(range(1, num_prompt + 1)), SamplingParams(max_new_tokens=max_new, **params)
    )


def scheduler(**kwargs) -> Scheduler:
    return Scheduler(SchedulerConfig(eos_token_ids=frozenset({EOS}), **kwargs))


def test_admits_in_arrival_order_up_to_slots():
    s = scheduler(max_num_seqs=2)
    for name in "abc":
        s.add(make(name))
    batch = s.schedule()
    assert [r.request_id for r in batch.prefill] == ["a", "b"]
    assert batch.decode == [] and s.num_waiting == 1
    s.update(batch, StepOutput.of(batch.sequences, [5, 5]))
    batch = s.schedule()
    assert [r.request_id for r in batch.decode] == ["a", "b"] and batch.prefill == []


def test_prefill_token_budget_always_admits_one():
    s = scheduler(max_prefill_tokens=4)
    s.add(make("long", num_prompt=10))
    s.add(make("short", num_prompt=2))
    batch = s.schedule()
    assert [r.request_id for r in batch.prefill] == ["long"]
    s.update(batch, StepOutput.of(batch.sequences, [7]))
    assert [r.request_id for r in s.schedule().prefill] == ["short"]


def test_eos_finishes_without_appending_and_length_finishes():
    s = scheduler()
    a, b = make("a", max_new=2), make("b", max_new=2)
    s.add(a)
    s.add(b)
    batch = s.schedule()
    s.update(batch, StepOutput.of(batch.sequences, [EOS, 9]))
    assert a.finish_reason == "stop" and a.output_token_ids == []
    batch = s.schedule()
    assert batch.finished == [a] and batch.decode == [b]
    s.update(batch, StepOutput.of(batch.sequences, [8]))
    assert b.finish_reason == "length" and b.output_token_ids == [9, 8]


def test_ignore_eos_keeps_going():
    s = scheduler()
    r = make("a", max_new=3, ignore_eos=True)
    s.add(r)
    s.update(batch := s.schedule(), StepOutput.of(batch.sequences, [EOS]))
    assert s.rows.token_ids(r.row) == [EOS] and not r.is_finished  # its tokens live in its row until it ends


def test_requests_join_and_leave_every_step():
    s = scheduler(max_num_seqs=3)
    s.add(make("a", max_new=1))
    s.add(make("b", max_new=3))
    batch = s.schedule()
    s.update(batch, StepOutput.of(batch.sequences, [4, 4]))  # a is done after one token
    s.add(make("c"))
    batch = s.schedule()
    assert [r.request_id for r in batch.finished] == ["a"]
    assert [r.request_id for r in batch.decode] == ["b"]
    assert [r.request_id for r in batch.prefill] == ["c"]
    assert [r.request_id for r in batch.sequences] == ["c", "b"]


def test_abort_running_and_waiting():
    s = scheduler(max_num_seqs=1)
    running, waiting = make("run"), make("wait")
    s.add(running)
    s.add(waiting)
    s.update(batch := s.schedule(), StepOutput.of(batch.sequences, [3]))
    assert s.abort("run") is running and s.abort("wait") is waiting
    assert s.abort("nope") is None
    batch = s.schedule()
    assert set(batch.finished) == {running, waiting}
    assert batch.sequences == [] and not s.has_work()


def test_token_of_request_aborted_during_step_is_dropped():
    s = scheduler()
    r = make("a")
    s.add(r)
    batch = s.schedule()
    r.finish("abort")
    s.update(batch, StepOutput.of(batch.sequences, [5]))
    assert r.output_token_ids == []


def test_rows_are_held_until_the_request_leaves_and_finishes_found_without_a_scan():
    """A running request keeps its row; one that finishes anywhere (EOS here, an abort from the front) is
    reported to schedule() by its hook, which gives the row back; the next request takes it with fresh state."""
    s = scheduler(max_num_seqs=2)
    a, b, c = make("a", max_new=8), make("b", max_new=8), make("c", max_new=8)
    for r in (a, b, c):
        s.add(r)
    batch = s.schedule()
    rows = {a.row, b.row}
    assert rows == {0, 1} and c.row == -1
    progress = s.update(batch, StepOutput.of(batch.sequences, [5, 6]))
    assert sorted(progress.rows.tolist()) == [0, 1] and progress.finished == []
    a.finish("abort")  # from the front, between steps
    assert s.rows.is_done[a.row] and a.output_token_ids == [5]  # its tokens, read from its row once
    batch = s.schedule()
    assert batch.finished == [a] and batch.prefill == [c] and c.row == a.row
    assert s.rows.token_ids(c.row) == [] and not s.rows.is_done[c.row]
    progress = s.update(batch, StepOutput.of(batch.sequences, [7, EOS]))
    assert progress.finished == [b] and b.output_token_ids == [6] and b.finish_reason == "stop"
    assert progress.rows.tolist() == [c.row] and s.rows.token_ids(c.row) == [7]


def test_stop_token_ids_finish_with_the_token_kept_by_row():
    """A row's own stop token ids end it (the token kept, reason stop, before length); the same token ends no
    row that did not ask for it, and an EOS still ends a row without being kept."""
    s = scheduler()
    a, b = make("a", max_new=3, stop_token_ids=(9, 11)), make("b", max_new=3)
    c = make("c", max_new=2, stop_token_ids=(12,))
    for r in (a, b, c):
        s.add(r)
    batch = s.schedule()
    s.update(batch, StepOutput.of(batch.sequences, [5, 9, 6]))
    assert not any(r.is_finished for r in (a, b, c))
    batch = s.schedule()
    progress = s.update(batch, StepOutput.of(batch.sequences, [11, 9, 12]))
    assert a.finish_reason == "stop" and a.output_token_ids == [5, 11]
    assert c.finish_reason == "stop" and c.output_token_ids == [6, 12]  # its last token: stop, not length
    assert not b.is_finished and sorted(progress.finished, key=lambda r: r.request_id) == [a, c]
    batch = s.schedule()
    s.update(batch, StepOutput.of(batch.sequences, [EOS]))
    assert b.finish_reason == "stop" and b.output_token_ids == [9, 9]


def choices(group: str, n: int, tenant: str | None = None, num_prompt: int = 6) -> list[Request]:
    requests = [make(f"{group}-{i}", num_prompt=num_prompt, max_new=2) for i in range(n)]
    for request in requests:
        request.group, request.tenant = group, tenant
    return requests


def test_paged_choices_join_together_as_rows_allow_and_fork_from_the_first():
    """5 choices, 3 free rows: 3 join (one prefill, 2 forks, the prompt's whole block shared), then the other 2."""
    s = Scheduler(SchedulerConfig(max_num_seqs=3, eos_token_ids=frozenset({EOS})), BlockPool(40, 4))
    group = choices("g", 5)
    for request in group:
        s.add(request)
    step = s.schedule()
    assert step.prefill == group[:3]
    assert step.forks == {group[1].row: group[0].row, group[2].row: group[0].row}
    tables = [step.blocks[r.row][0].table for r in group[:3]]
    assert tables[0][0] == tables[1][0] == tables[2][0] and len({t[1] for t in tables}) == 3
    assert s.counters[""] == 6  # the prompt ran once
    s.update(step, StepOutput.of(step.prefill, [5, 5, 5]))
    s.update(step, StepOutput.of(step.prefill, [6, 6, 6]))  # length: they leave at the next step
    step = s.schedule()
    assert step.prefill == group[3:] and step.forks == {group[4].row: group[3].row}
    assert s.blocks is not None and s.blocks.num_sequence_blocks == 1 + 2


def test_choices_queue_together_or_not_at_all_and_the_slot_layout_runs_them_alone():
    s = scheduler(max_num_seqs=2, max_queue=4)
    s.check_room("", 1.0, 6)  # 4 waiting places + 2 free rows
    with pytest.raises(QueueFull):
        s.check_room("", 1.0, 7)
    group = choices("g", 2)
    for request in group:
        s.add(request)
    step = s.schedule()
    assert step.prefill == group and not step.forks and not step.blocks


def test_overlapped_paged_rows_grow_a_token_ahead_and_a_row_preempted_in_flight_finishes_on_its_token():
    """Steps overlapped (step k+1 scheduled before step k is recorded), 3 blocks of 4: the step in flight writes
    a position the recorded tokens do not count, so a row's next block comes a token early; the row preempted
    for it gets the in-flight step's token, which is its last: it is reported finished with it."""
    config = SchedulerConfig(max_num_seqs=2, eos_token_ids=frozenset({EOS}), row_cooldown=True, num_ahead=1)
    s = Scheduler(config, BlockPool(4, 4))
    a, b = make("a", max_new=3), make("b", max_new=2)
    s.add(a)
    s.add(b)
    first = s.schedule()
    second = s.schedule()  # before the first is recorded: the second writes own entry 3, in the first block
    assert first.prefill == [a, b] and second.decode == [a, b] and second.grown == {}
    s.update(first, StepOutput.of(first.prefill, [5, 5]))
    third = s.schedule()  # the second in flight: the third writes own entry 4, in a second block
    assert list(third.grown) == [a.row] and third.preempted == [b]
    progress = s.update(second, StepOutput.of(second.decode, [6, 6]))
    assert progress.finished == [b] and b.finish_reason == "length" and b.output_token_ids == [5, 6]
    s.update(third, StepOutput.of([a], [7]))
    fourth = s.schedule()
    assert set(fourth.finished) == {a, b} and s.blocks is not None and s.blocks.num_sequence_blocks == 0
