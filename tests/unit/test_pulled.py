"""What the sink tells the source with an acknowledgement (chunks.pulled): only two lists of
pack ids are taken, and the source's record of them."""

from __future__ import annotations

import json

import pytest

from agent.chunks import pulled
from agent.chunks.pulled import SinkReport
from agent.core.handover import Handover

A, B, C = "a" * 64, "b" * 64, "c" * 64


def test_a_report_round_trips_sorted_and_without_duplicates():
    report = SinkReport.decode(json.dumps({"condemned": [B, A, B], "deleted": [C]}).encode())
    assert report == SinkReport((A, B), (C,))
    assert SinkReport.decode(report.encode()) == report
    assert SinkReport.decode(b"") == SinkReport()  # a sink that sends none


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        json.dumps({"condemned": ["../../etc/passwd"]}).encode(),
        json.dumps({"condemned": [A.upper()]}).encode(),
        json.dumps({"condemned": A}).encode(),
        json.dumps({"deleted": [1]}).encode(),
        json.dumps({"condemned": [], "run": "rm -rf /"}).encode(),
        b" " * (pulled.REPORT_LIMIT + 1),
    ],
)
def test_anything_but_two_lists_of_pack_ids_is_refused(body):
    with pytest.raises(ValueError):
        SinkReport.decode(body)


def test_the_source_keeps_the_condemned_as_reported_and_every_deleted_until_its_store_drops_it(
    tmp_path,
):
    handover = Handover(tmp_path)
    assert pulled.given_up(handover) == set()
    pulled.record_report(handover, SinkReport((A,), (B,)))
    pulled.record_report(handover, SinkReport((), (C,)))  # A live again on the sink
    assert pulled.given_up(handover) == {B, C}
    pulled.forget_gone(handover, [C])  # the source store no longer holds B
    assert pulled.given_up(handover) == {C}


def test_an_unreadable_record_is_taken_as_empty(tmp_path):
    handover = Handover(tmp_path)
    (tmp_path / pulled.RECORD).parent.mkdir()
    (tmp_path / pulled.RECORD).write_text("{broken")
    assert pulled.given_up(handover) == set()
