"""When the pre-copy stops repeating its passes (pure logic)."""

from __future__ import annotations

from agent.source.mirror import next_pass

MiB = 1 << 20


def test_passes_repeat_while_the_changes_shrink():
    assert next_pass([None], 1.0, 5, 120) is None
    assert next_pass([None, 400 * MiB], 5.0, 5, 120) is None
    assert next_pass([None, 400 * MiB, 90 * MiB], 8.0, 5, 120) is None


def test_the_pre_copy_stops_when_the_changes_stop_shrinking():
    assert "stopped shrinking" in next_pass([50 * MiB, 20 * MiB, 21 * MiB], 3.0, 5, 120)


def test_the_pre_copy_stops_when_the_last_pass_changed_almost_nothing():
    assert "only 4096 bytes" in next_pass([4096], 0.2, 5, 120)


def test_the_pre_copy_stops_at_its_bounds():
    assert "PRECOPY_MAX_PASSES" in next_pass([None, 80 * MiB, 40 * MiB], 9.0, 3, 120)
    assert "PRECOPY_MAX_SECONDS" in next_pass([None, 80 * MiB], 130.0, 5, 120)
