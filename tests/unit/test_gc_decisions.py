from datetime import UTC, datetime

import pytest

from agent.chunks.gc import Inputs, Plan, decide, describe, run_id

A, B, C, D = "a" * 64, "b" * 64, "c" * 64, "d" * 64
RUN_1, RUN_2, RUN_3 = (
    "2026-12-01T02-00-00.000000Z",
    "2026-12-02T02-00-00.000000Z",
    "2026-12-03T02-00-00.000000Z",
)


def test_a_pack_no_generation_lists_is_condemned_not_deleted():
    plan = decide(Inputs(packs={A: 10, B: 10}, complete={"g1": [A]}, run_id=RUN_1))
    assert plan.condemn == (B,)
    assert plan.delete == ()


def test_a_pack_a_complete_generation_lists_is_kept():
    plan = decide(Inputs(packs={A: 10, B: 10}, complete={"g1": [A], "g2": [A, B]}, run_id=RUN_1))
    assert not plan.changes_anything


def test_a_pack_only_a_waiting_generation_lists_is_kept():
    plan = decide(
        Inputs(packs={A: 10, B: 10}, complete={"g1": [A]}, waiting={"g2": [B]}, run_id=RUN_1)
    )
    assert plan.condemn == ()


def test_a_condemned_pack_still_unreferenced_in_a_later_run_is_deleted():
    plan = decide(
        Inputs(packs={A: 10, B: 10}, complete={"g1": [A]}, condemned={B: RUN_1}, run_id=RUN_2)
    )
    assert plan.delete == (B,)
    assert plan.condemned_after_deletion({B: RUN_1}) == {}


def test_a_condemned_pack_is_not_deleted_by_the_run_that_condemned_it():
    plan = decide(
        Inputs(packs={A: 10, B: 10}, complete={"g1": [A]}, condemned={B: RUN_2}, run_id=RUN_2)
    )
    assert plan.delete == ()
    assert plan.waiting_deletion == (B,)


def test_a_condemned_pack_is_not_deleted_by_a_run_whose_clock_went_back():
    plan = decide(Inputs(packs={B: 10}, complete={}, condemned={B: RUN_3}, run_id=RUN_2))
    assert plan.delete == ()
    assert plan.waiting_deletion == (B,)


def test_a_condemned_pack_a_new_generation_lists_again_is_uncondemned():
    plan = decide(
        Inputs(
            packs={A: 10, B: 10},
            complete={"g1": [A], "g2": [B]},
            condemned={B: RUN_1},
            run_id=RUN_2,
        )
    )
    assert plan.uncondemn == (B,)
    assert plan.delete == ()
    assert plan.condemned_after_phase_one({B: RUN_1}) == {}


def test_a_condemned_pack_a_waiting_generation_lists_is_uncondemned_and_kept():
    # the run that started before the rotation and relied on B: its generation waits
    plan = decide(
        Inputs(
            packs={A: 10, B: 10},
            complete={"g1": [A]},
            waiting={"g2": [B]},
            condemned={B: RUN_1},
            run_id=RUN_2,
        )
    )
    assert plan.uncondemn == (B,)
    assert plan.delete == ()


def test_a_condemned_pack_already_gone_is_forgotten():
    plan = decide(Inputs(packs={A: 10}, complete={"g1": [A]}, condemned={B: RUN_1}, run_id=RUN_2))
    assert plan.forget == (B,)
    assert plan.delete == ()
    assert plan.condemned_after_phase_one({B: RUN_1}) == {}


def test_a_condemned_pack_that_is_gone_but_listed_again_is_uncondemned_and_reported_missing():
    plan = decide(Inputs(packs={}, complete={"g1": [B]}, condemned={B: RUN_1}, run_id=RUN_2))
    assert plan.uncondemn == (B,)
    assert plan.forget == ()
    assert plan.missing == (B,)


def test_the_record_after_phase_one_keeps_what_is_deleted_until_it_is_gone():
    record = {B: RUN_1, C: RUN_2}
    plan = decide(
        Inputs(
            packs={A: 10, B: 10, C: 10, D: 10}, complete={"g1": [A]}, condemned=record, run_id=RUN_2
        )
    )
    assert plan.condemn == (D,)
    assert plan.delete == (B,)
    assert plan.condemned_after_phase_one(record) == {B: RUN_1, C: RUN_2, D: RUN_2}
    assert plan.condemned_after_deletion(record) == {C: RUN_2, D: RUN_2}


def test_a_mostly_dead_pack_is_repacked():
    plan = decide(
        Inputs(
            packs={A: 100, B: 100},
            complete={"g1": [A, B]},
            run_id=RUN_1,
            live_bytes={A: 49, B: 50},
            repack_below=0.5,
        )
    )
    assert plan.repack == (A,)


def test_a_pack_a_waiting_generation_lists_is_not_repacked():
    plan = decide(
        Inputs(
            packs={A: 100},
            complete={"g1": [A]},
            waiting={"g2": [A]},
            run_id=RUN_1,
            live_bytes={A: 1},
        )
    )
    assert plan.repack == ()


def test_a_pack_of_unknown_live_bytes_is_not_repacked():
    plan = decide(
        Inputs(packs={A: 100, B: 100}, complete={"g1": [A, B]}, run_id=RUN_1, live_bytes={B: 1})
    )
    assert plan.repack == (B,)


def test_an_unreferenced_pack_is_condemned_rather_than_repacked():
    plan = decide(Inputs(packs={A: 100}, complete={}, run_id=RUN_1, live_bytes={A: 0}))
    assert plan.repack == ()
    assert plan.condemn == (A,)


def test_repack_below_zero_repacks_nothing():
    plan = decide(
        Inputs(
            packs={A: 100}, complete={"g1": [A]}, run_id=RUN_1, live_bytes={A: 0}, repack_below=0
        )
    )
    assert plan.repack == ()


def test_a_pack_a_complete_generation_lists_but_the_store_lacks_is_reported_missing():
    plan = decide(Inputs(packs={}, complete={"g1": [A]}, run_id=RUN_1))
    assert plan.missing == (A,)
    assert not plan.changes_anything


def test_a_run_without_an_id_is_refused():
    with pytest.raises(ValueError, match="run id"):
        decide(Inputs(packs={}, complete={}))


def test_a_repack_threshold_outside_zero_to_one_is_refused():
    with pytest.raises(ValueError, match="repack_below"):
        decide(Inputs(packs={}, complete={}, run_id=RUN_1, repack_below=50))


def test_run_ids_sort_in_time_order_within_one_second():
    first = run_id(datetime(2026, 12, 1, 2, 0, 0, 1, tzinfo=UTC))
    second = run_id(datetime(2026, 12, 1, 2, 0, 0, 2, tzinfo=UTC))
    later = run_id(datetime(2026, 12, 1, 2, 0, 1, tzinfo=UTC))
    assert first < second < later


def test_the_description_says_what_would_go_in_a_dry_run():
    plan = Plan(RUN_2, condemn=(A,), delete=(B,))
    lines = describe(plan, {A: 10, B: 20}, dry_run=True)
    assert lines == [
        f"would condemn 1 pack(s), 10 bytes: {A}",
        f"would delete 1 pack(s), 20 bytes: {B}",
    ]


def test_the_description_of_a_clean_store_says_so():
    assert describe(Plan(RUN_1), {}, dry_run=False) == ["nothing to collect"]


def test_the_description_names_ten_packs_and_counts_the_rest():
    many = tuple(f"{i:064x}" for i in range(12))
    [line] = describe(Plan(RUN_1, delete=many), {}, dry_run=False)
    assert line.endswith(f"{many[9]} and 2 more")
    assert many[10] not in line
