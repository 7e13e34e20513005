import json
from datetime import UTC, datetime

import pytest

from agent.core import generation, manifest
from agent.core.generation import InvalidGenerationId
from agent.core.manifest import FileEntry, InvalidManifest, Manifest

SHA = "a" * 64


def test_ids_are_utc_timestamps_that_sort_as_text():
    moment = datetime(2026, 11, 28, 2, 0, 0, 700_000, tzinfo=UTC)
    assert generation.new_id(moment, []) == "2026-11-28T02-00-00Z"
    assert generation.parse("2026-11-28T02-00-00Z") == moment.replace(microsecond=0)


def test_a_second_run_in_the_same_second_gets_the_next_id():
    moment = datetime(2026, 11, 28, 2, 0, 0, tzinfo=UTC)
    existing = ["2026-11-28T02-00-00Z", "not-an-id"]
    assert generation.new_id(moment, existing) == "2026-11-28T02-00-01Z"


@pytest.mark.parametrize(
    "text",
    [
        "../../etc",
        "2026-11-28T02-00-00Z/..",
        "2026-13-01T00-00-00Z",
        "2026-11-28T02:00:00Z",
        "2026-11-28T02-00-00Z\n",
        "",
        "latest",
    ],
)
def test_malformed_ids_are_refused(text):
    with pytest.raises(InvalidGenerationId):
        generation.parse(text)


def sample(**overrides) -> Manifest:
    fields = dict(
        source_id="s",
        kind="data",
        generation="2026-11-28T02-00-00Z",
        created_at="2026-11-28T02:00:00Z",
        downtime_seconds=0.5,
        agent_version="0",
        files=(FileEntry("data.tar.zst", 10, SHA),),
        paths=("/srv/data",),
    )
    fields.update(overrides)
    return Manifest(**fields)


def test_manifest_round_trips_through_json():
    original = sample(files=(FileEntry("var/log/bad-\udcff.log", 3, SHA),))
    assert manifest.from_json(original.to_json()) == original


@pytest.mark.parametrize(
    "path",
    ["/etc/passwd", "../x", "a/../../x", "a//b", "", "a/./b", "MANIFEST.json", "a\0b", "dir/"],
)
def test_unsafe_paths_in_a_manifest_are_refused(path):
    text = sample(files=(FileEntry(path, 1, SHA),)).to_json()
    with pytest.raises(InvalidManifest):
        manifest.from_json(text)


@pytest.mark.parametrize(
    "change",
    [
        {"generation": "../../etc"},
        {"kind": "secrets"},
        {"files": (FileEntry("x", 1, "zz"),)},
    ],
)
def test_malformed_manifests_are_refused(change):
    with pytest.raises(InvalidManifest):
        manifest.from_json(sample(**change).to_json())


@pytest.mark.parametrize(
    "extra",
    ["[" * 100_000 + "]" * 100_000, "[" + "[]," * 100_000 + "[]]"],
    ids=["nested too deep", "more arrays than entries"],
)
def test_a_manifest_that_would_take_far_more_memory_than_its_size_is_refused(extra):
    text = sample().to_json().rstrip().removesuffix("}") + f', "extra": {{"x": {extra}}}}}'
    with pytest.raises(InvalidManifest):
        manifest.from_json(text)


def test_the_largest_manifests_of_honest_generations_are_read(tmp_path):
    files = tuple(FileEntry(f"srv/app/logs/[{i}]/app-{i}.log", i, SHA) for i in range(90_000))
    manifest.write(tmp_path, sample(files=files))
    assert (tmp_path / manifest.NAME).stat().st_size < manifest.MAX_SIZE
    assert manifest.read(tmp_path, manifest.MAX_SIZE).files == files


def test_a_manifest_read_from_the_other_side_is_bounded_and_never_a_link(tmp_path):
    (tmp_path / "big").mkdir()
    manifest.write(tmp_path / "big", sample())
    with open(tmp_path / "big" / manifest.NAME, "a") as handle:
        handle.write(" " * manifest.MAX_SIZE)
    (tmp_path / "link").mkdir()
    (tmp_path / "link" / manifest.NAME).symlink_to(tmp_path / "big" / manifest.NAME)
    with pytest.raises(InvalidManifest, match="larger than"):
        manifest.read(tmp_path / "big", manifest.MAX_SIZE)
    with pytest.raises(InvalidManifest, match="symbolic link"):
        manifest.read(tmp_path / "link")


def test_manifest_is_written_atomically_and_read_back(tmp_path):
    manifest.write(tmp_path, sample())
    assert manifest.read(tmp_path) == sample()
    assert [p.name for p in tmp_path.iterdir()] == ["MANIFEST.json"]


# ---------------------------------------------------------------- encrypted files


def _encrypted_manifest():
    return Manifest(
        source_id="s",
        kind="data",
        generation="2026-11-28T02-00-00Z",
        created_at="2026-11-28T02:00:00Z",
        downtime_seconds=0.5,
        agent_version="t",
        paths=("/srv",),
        files=(FileEntry("data.tar.zst.age", 120, "a" * 64, 100, "b" * 64),),
    )


def test_an_encrypted_entry_keeps_its_plaintext_digest_through_json():
    m = _encrypted_manifest()
    again = manifest.from_json(m.to_json())
    assert again == m and again.files[0].encrypted


def test_an_unencrypted_entry_is_written_exactly_as_before():
    m = _encrypted_manifest()
    plain = type(m)(**{**m.__dict__, "files": (FileEntry("data.tar.zst", 100, "b" * 64),)})
    [entry] = json.loads(plain.to_json())["files"]
    assert entry == {"path": "data.tar.zst", "size": 100, "sha256": "b" * 64}
    assert not manifest.from_json(plain.to_json()).files[0].encrypted


def test_a_plaintext_digest_without_its_size_is_refused():
    body = json.loads(_encrypted_manifest().to_json())
    del body["files"][0]["plaintext_size"]
    with pytest.raises(InvalidManifest, match="come together"):
        manifest.from_json(json.dumps(body))
    body["files"][0].update(plaintext_size=100, plaintext_sha256="not hex")
    with pytest.raises(InvalidManifest):
        manifest.from_json(json.dumps(body))
