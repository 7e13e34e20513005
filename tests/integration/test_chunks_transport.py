"""The packs of a chunked generation into the real stores (SeaweedFS, a local directory):
only what a store lacks travels, each pack checked against its id on the way, and the check
before a manifest finds a pack that is not there."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from agent import config
from agent.chunks import handover as chunked
from agent.chunks import ids, transport
from agent.chunks.builder import BuildSettings
from agent.core import manifest
from agent.core.handover import Handover
from agent.core.manifest import Manifest, PackRef
from agent.stores import VerificationFailed
from agent.stores.local import LocalStore
from agent.stores.s3 import S3Store
from tests.chunked import MiB
from tests.conftest import S3_BUCKET, S3_PREFIX
from tests.generations import SOURCE


@pytest.fixture
def built(tmp_path: Path, s3):
    """A handover with three packs built from random data, the S3 sink store and a source
    store."""
    handover = Handover(tmp_path / "handover")
    data = handover.mirror("data") / "srv"
    data.mkdir(parents=True)
    for name in "abc":
        (data / name).write_bytes(os.urandom(MiB))
    env = {"SOURCE_ID": SOURCE, "DATA_PATHS": "/srv", **s3.env()}
    sink = S3Store(config.parse_source(env, push=True).s3, SOURCE)
    source_store = LocalStore(tmp_path / "store")
    staging = handover.fresh_staging("data")
    result = chunked.build(
        handover,
        [sink, source_store],
        staging,
        ["srv"],
        BuildSettings(1, (), None, MiB + 4096, 2),
        "",
    ).result
    refs = [PackRef(p, s) for p, s in sorted(result.packs.items())]
    assert len(refs) == 3
    return handover, sink, source_store, refs


def pack_keys(s3) -> list[str]:
    return [k for k in s3.keys(f"{S3_PREFIX}/{SOURCE}/packs/") if k.endswith(".pack")]


def test_only_the_packs_the_store_lacks_are_uploaded(built, s3):
    handover, sink, _, refs = built
    first = transport.send_packs(sink, refs[:2], handover, None)
    assert first.packs == 2 and len(pack_keys(s3)) == 2
    second = transport.send_packs(sink, refs, handover, None)
    assert second.packs == 1 and second.hashed == {refs[2].id}
    assert sorted(pack_keys(s3)) == sorted(
        f"{S3_PREFIX}/{SOURCE}/{ids.pack_key(r.id)}" for r in refs
    )
    assert transport.missing(sink, refs) == []


def test_a_pack_changed_on_disk_is_not_uploaded(built, s3):
    handover, sink, _, refs = built
    path = handover.root / ids.pack_key(refs[0].id)
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(VerificationFailed, match="changed on disk"):
        transport.send_packs(sink, refs[:1], handover, None)
    assert pack_keys(s3) == []


def test_packs_move_into_the_source_store_and_leave_the_handover(built):
    handover, _, source_store, refs = built
    sent = transport.send_packs(source_store, refs, handover, None)
    assert sent.packs == 3
    assert all((source_store.root / ids.pack_key(r.id)).is_file() for r in refs)
    assert not any((handover.root / ids.pack_key(r.id)).exists() for r in refs)


def test_a_pack_the_handover_no_longer_holds_comes_from_the_other_store(built, s3):
    handover, sink, source_store, refs = built
    transport.send_packs(source_store, refs, handover, None)  # a run killed after 2.c's packs
    sent = transport.send_packs(sink, refs, handover, source_store)
    assert sent.packs == 3 and len(pack_keys(s3)) == 3
    assert transport.missing(sink, refs) == []
    assert (
        list((handover.root / ".staging").rglob("*.pack"))
        + list((handover.root / ".staging").rglob("pack-cop*/*"))
        == []
    ), "a scratch copy of a fetched pack was left"


def test_two_packs_go_up_at_once_with_half_the_parts_in_flight_each(built):
    _, sink, _, _ = built
    assert (sink.settings.concurrency, sink.settings.part_size) == (4, 16 * MiB)
    assert transport.upload_shape(sink) == transport.UploadShape(2, 2, 8 * MiB)
    alone = dataclasses.replace(sink.settings, concurrency=1, part_size=5 * MiB)
    assert transport.upload_shape(S3Store(alone, SOURCE)) == transport.UploadShape(1, 1, 5 * MiB)


def test_a_pack_of_several_parts_goes_up_whole_in_the_smaller_parts(built, s3, tmp_path):
    handover, sink, _, _ = built
    data = os.urandom(17 * MiB + 5)  # 8 MiB parts: three
    (handover.root / "big").write_bytes(data)
    uploaded = sink.upload_file(handover.root / "big", sink.object_key("big"), 8 * MiB, 2)
    assert uploaded.store_checksum.endswith("-3")
    got = s3.client().get_object(Bucket=S3_BUCKET, Key=f"{S3_PREFIX}/{SOURCE}/big")["Body"].read()
    assert got == data
    sink.verify(uploaded, "checksum")


def test_a_pack_changed_on_disk_among_packs_uploaded_at_once_is_not_uploaded(built, s3):
    handover, sink, _, refs = built
    path = handover.root / ids.pack_key(refs[1].id)
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(VerificationFailed, match="changed on disk"):
        transport.send_packs(sink, refs, handover, None)
    assert f"{S3_PREFIX}/{SOURCE}/{ids.pack_key(refs[1].id)}" not in pack_keys(s3)
    assert transport.missing(sink, refs) != []


def test_a_pack_in_neither_the_handover_nor_the_other_store_fails_with_its_id(built):
    handover, sink, source_store, refs = built
    (handover.root / ids.pack_key(refs[0].id)).unlink()
    with pytest.raises(VerificationFailed, match=refs[0].id):
        transport.send_packs(sink, refs[:1], handover, source_store)


def test_the_check_before_the_manifest_names_the_missing_packs(built, s3):
    handover, sink, _, refs = built
    transport.send_packs(sink, refs, handover, None)
    s3.client().delete_object(
        Bucket=S3_BUCKET, Key=f"{S3_PREFIX}/{SOURCE}/{ids.pack_key(refs[1].id)}"
    )
    m = Manifest(
        source_id=SOURCE,
        kind="data",
        generation="2026-11-28T02-00-00Z",
        created_at="x",
        downtime_seconds=0,
        agent_version="t",
        files=(),
        packs=tuple(refs),
        data_format="chunks",
        format=manifest.CHUNKS_FORMAT_VERSION,
    )
    with pytest.raises(VerificationFailed, match="lacks 1 pack"):
        transport.check_present(sink, m)
