"""The S3 sink store: `s3://<bucket>/<prefix>/<source-id>/{data,logs}/<generation>/`.

A thin adapter over boto3, imported when the first store is made (or `warm_up` is called),
not when this module is: a command that never talks to S3 does not pay for it. Large files go
up as multipart uploads with concurrent parts; every part carries its SHA-256, which the store
checks on arrival, and the same single read of the file also hashes it whole, so verification
needs no second read. Every call is retried with exponential backoff and jitter on transient
errors, for a bounded total time (`s3_retry`).
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import logging
import threading
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from agent.config import S3Settings
from agent.core import generation, manifest
from agent.core.manifest import Manifest
from agent.stores import VerificationFailed
from agent.stores.s3_retry import retried

logger = logging.getLogger(__name__)

T = TypeVar("T")
ADDRESSING_STYLES: dict[str, Literal["path", "virtual", "auto"]] = {
    "path": "path",
    "virtual": "virtual",
    "auto": "auto",
}


@dataclass(frozen=True)
class Uploaded:
    """What the upload of one file established: its size, the sha256 of the bytes read, and
    the checksum the store must report for the object."""

    key: str
    size: int
    sha256: str
    store_checksum: str


_clients = threading.Lock()
_session: Any = None


def _client(**kwargs: Any) -> Any:
    """A new S3 client from the process's one boto3 session: the session's first client
    loads boto3's S3 model (a few tenths of a second), later ones reuse it. A session is not
    thread-safe: clients are made one at a time."""
    global _session
    with _clients:
        import boto3

        if _session is None:
            _session = boto3.session.Session()
        return _session.client("s3", **kwargs)


def warm_up() -> None:
    """Import boto3 and load its S3 model in a background thread, so the first store this
    process makes later is quick; a command calls it before work that waits on other things
    (the Docker engine, rsync). A failure here is the first store's to report."""

    def load() -> None:
        try:
            _client(region_name="us-east-1", aws_access_key_id="warm-up", aws_secret_access_key="-")
        except Exception as exc:
            logger.debug("warming up boto3 failed: %s", exc)

    threading.Thread(target=load, name="s3-warm-up", daemon=True).start()


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


class S3Store:
    """One source's part of an S3 sink store."""

    def __init__(self, settings: S3Settings, source_id: str) -> None:
        self.settings = settings
        self.bucket = settings.bucket
        self.root = "/".join(p for p in (settings.prefix.strip("/"), source_id) if p)
        import botocore.config

        self.client = _client(
            endpoint_url=settings.endpoint_url or None,
            region_name=settings.region,
            aws_access_key_id=settings.access_key_id or None,
            aws_secret_access_key=settings.secret_access_key or None,
            aws_session_token=settings.session_token or None,
            verify=settings.ca_bundle or None,
            config=botocore.config.Config(
                # The body is not hashed a third time for the signature: every part's SHA-256
                # header is signed and the store checks the body against it.
                s3={
                    "addressing_style": ADDRESSING_STYLES[settings.addressing_style],
                    "payload_signing_enabled": False,
                },
                retries={"max_attempts": 1},
                connect_timeout=10,
                read_timeout=120,
                max_pool_connections=settings.concurrency + 2,
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.root}"

    def key(self, kind: str, gen: str, name: str = "") -> str:
        generation.parse(gen)
        return f"{self.root}/{kind}/{gen}/{name}"

    # -- calls, retried

    def call(self, operation: str, **kwargs: Any) -> Any:
        """Call the S3 operation, retrying transient errors with exponential backoff and jitter
        for at most S3_RETRY_SECONDS. Raise StoreError with the cause and the fix otherwise."""
        return self._retried(operation, kwargs, getattr(self.client, operation), **kwargs)

    def call_once(self, operation: str, **kwargs: Any) -> Any:
        """Call the S3 operation once, for housekeeping a later run can do as well. Raise
        StoreError with the cause and the fix."""
        return self._retried(
            operation, kwargs, getattr(self.client, operation), patience=0, **kwargs
        )

    def _retried(
        self,
        operation: str,
        where: dict[str, Any],
        function: Callable[..., T],
        *args: Any,
        patience: float | None = None,
        **kwargs: Any,
    ) -> T:
        seconds = self.settings.retry_seconds if patience is None else patience
        return retried(
            operation,
            self._where(where),
            self.settings.endpoint_url or "AWS",
            seconds,
            function,
            *args,
            **kwargs,
        )

    def _where(self, kwargs: dict[str, Any]) -> str:
        key = kwargs.get("Key", kwargs.get("Prefix", ""))
        return f"s3://{kwargs.get('Bucket', self.bucket)}/{key}"

    # -- writing

    def upload_file(
        self, path: Path, key: str, part_size: int = 0, concurrency: int = 0
    ) -> Uploaded:
        """Upload the file at `path` to `key` (multipart above one part size) and return what
        the store must now hold; `part_size` and `concurrency` (parts in flight) default to
        the settings'. The file is read once."""
        part_size = part_size or self.settings.part_size
        concurrency = concurrency or self.settings.concurrency
        size = path.stat().st_size
        if size <= part_size:
            data = path.read_bytes()
            digest = hashlib.sha256(data).digest()
            self.call(
                "put_object", Bucket=self.bucket, Key=key, Body=data, ChecksumSHA256=_b64(digest)
            )
            return Uploaded(key, size, digest.hex(), _b64(digest))
        return self._upload_multipart(path, key, size, part_size, concurrency)

    def _upload_multipart(
        self, path: Path, key: str, size: int, part_size: int, concurrency: int
    ) -> Uploaded:
        upload_id = self.call(
            "create_multipart_upload", Bucket=self.bucket, Key=key, ChecksumAlgorithm="SHA256"
        )["UploadId"]
        whole = hashlib.sha256()
        parts: dict[int, dict[str, Any]] = {}
        try:
            with open(path, "rb") as handle, ThreadPoolExecutor(concurrency) as pool:
                pending: set[Future[dict[str, Any]]] = set()
                number = 0
                while True:
                    if len(pending) >= concurrency:  # a slot first: `concurrency` parts in memory
                        done, pending = wait(pending, return_when=FIRST_COMPLETED)
                        _collect(done, parts)
                    data = handle.read(part_size)
                    if not data:
                        break
                    number += 1
                    whole.update(data)
                    pending.add(pool.submit(self._upload_part, key, upload_id, number, data))
                _collect(wait(pending).done, parts)
            ordered = [parts[n] for n in sorted(parts)]
            self.call(
                "complete_multipart_upload",
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": ordered},
            )
        except BaseException:
            import botocore.exceptions

            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
                logger.warning("could not abort the multipart upload of %s: %s", key, exc)
            raise
        composite = hashlib.sha256(
            b"".join(base64.b64decode(p["ChecksumSHA256"]) for p in ordered)
        ).digest()
        return Uploaded(key, size, whole.hexdigest(), f"{_b64(composite)}-{len(ordered)}")

    def _upload_part(self, key: str, upload_id: str, number: int, data: bytes) -> dict[str, Any]:
        checksum = _b64(hashlib.sha256(data).digest())
        response = self.call(
            "upload_part",
            Bucket=self.bucket,
            Key=key,
            UploadId=upload_id,
            PartNumber=number,
            Body=data,
            ChecksumSHA256=checksum,
        )
        return {"PartNumber": number, "ETag": response["ETag"], "ChecksumSHA256": checksum}

    def put_manifest(self, kind: str, m: Manifest) -> Uploaded:
        data = m.to_json().encode()
        digest = hashlib.sha256(data).digest()
        key = self.key(kind, m.generation, manifest.NAME)
        self.call(
            "put_object",
            Bucket=self.bucket,
            Key=key,
            Body=data,
            ChecksumSHA256=_b64(digest),
            ContentType="application/json",
        )
        return Uploaded(key, len(data), digest.hex(), _b64(digest))

    def replace_manifest(self, kind: str, m: Manifest, verify: str) -> None:
        """Replace the manifest of the generation `m` names in one PUT (atomic: a reader sees
        the old or the new), then verify it per `verify`."""
        self.verify(self.put_manifest(kind, m), verify)

    # -- verifying

    def verify(self, uploaded: Uploaded, mode: str) -> str:
        """Check that the store holds exactly what was uploaded: by the store's own SHA-256
        checksum (`checksum`; falls back to `download` when the store reports none), by reading
        it back and hashing it (`download`), or not at all (`off`). Return the method used.
        Raise VerificationFailed on a mismatch."""
        if mode == "off":
            return "off"
        if mode == "checksum":
            head = self.call(
                "head_object", Bucket=self.bucket, Key=uploaded.key, ChecksumMode="ENABLED"
            )
            if head["ContentLength"] != uploaded.size:
                raise VerificationFailed(
                    f"{uploaded.key}: the store holds "
                    f"{head['ContentLength']} bytes, expected {uploaded.size}"
                )
            stored = head.get("ChecksumSHA256")
            if stored is not None:
                if stored != uploaded.store_checksum:
                    raise VerificationFailed(
                        f"{uploaded.key}: the store's SHA-256 checksum "
                        f"{stored} differs from the uploaded {uploaded.store_checksum}"
                    )
                return "checksum"
            logger.info("the store reports no SHA-256 for %s; reading it back", uploaded.key)
        size, sha256 = self.hash_object(uploaded.key)
        if (size, sha256) != (uploaded.size, uploaded.sha256):
            raise VerificationFailed(
                f"{uploaded.key}: read back {size} bytes with sha256 "
                f"{sha256}, expected {uploaded.size} bytes, {uploaded.sha256}"
            )
        return "download"

    def hash_object(self, key: str) -> tuple[int, str]:
        digest = hashlib.sha256()
        size = 0
        for chunk in self.read_object(key):
            digest.update(chunk)
            size += len(chunk)
        return size, digest.hexdigest()

    def read_object(self, key: str) -> Iterator[memoryview]:
        """Yield the object's content in order. Large objects are read as ranges of one part
        size, several at once (S3_CONCURRENCY), each retried on its own; memory stays at
        about concurrency × part size."""
        size = self.call("head_object", Bucket=self.bucket, Key=key)["ContentLength"]
        step = self.settings.part_size
        if size <= step:
            yield from _slices(self._range_bytes(key, 0, size, step))
            return
        with ThreadPoolExecutor(self.settings.concurrency) as pool:
            pending: deque[Future[bytes]] = deque()
            offsets = iter(range(0, size, step))
            for offset in itertools.islice(offsets, self.settings.concurrency):
                pending.append(pool.submit(self._range_bytes, key, offset, size, step))
            while pending:
                data = pending.popleft().result()
                for offset in itertools.islice(offsets, 1):
                    pending.append(pool.submit(self._range_bytes, key, offset, size, step))
                yield from _slices(data)

    def _range_bytes(self, key: str, offset: int, size: int, step: int) -> bytes:
        end = min(size, offset + step)
        return self._retried("get_object", {"Key": key}, self._read_range, key, offset, end)

    def _read_range(self, key: str, start: int, end: int) -> bytes:
        """The bytes [start, end) of the object; a read that breaks off is retried whole."""
        if end == start:
            return b""
        body = self.client.get_object(
            Bucket=self.bucket, Key=key, Range=f"bytes={start}-{end - 1}"
        )["Body"]
        data: bytes = body.read()
        return data

    def chunks(self, kind: str, gen: str, name: str) -> Iterator[memoryview]:
        return self.read_object(self.key(kind, gen, manifest.check_relative_path(name)))

    # -- listing and removing

    def generations(self, kind: str) -> tuple[list[str], list[str]]:
        """Return (complete, incomplete) generation ids of `kind`, oldest first. A generation is
        complete when its MANIFEST.json is there. Keys that are not of a generation are
        ignored."""
        names: dict[str, set[str]] = defaultdict(set)
        for key in self._keys(f"{self.root}/{kind}/"):
            gen, _, name = key[len(self.root) + len(kind) + 2 :].partition("/")
            if generation.is_valid(gen):
                names[gen].add(name)
        complete = sorted(g for g, n in names.items() if manifest.NAME in n)
        incomplete = sorted(g for g, n in names.items() if manifest.NAME not in n)
        return complete, incomplete

    def _keys(self, prefix: str) -> Iterator[str]:
        token: dict[str, str] = {}
        while True:
            page = self.call("list_objects_v2", Bucket=self.bucket, Prefix=prefix, **token)
            yield from (obj["Key"] for obj in page.get("Contents", []))
            if not page.get("IsTruncated"):
                return
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def delete_generation(self, kind: str, gen: str) -> None:
        """Remove a generation, its manifest first, so a half-removed generation is never
        taken for a complete one."""
        prefix = self.key(kind, gen)
        keys = list(self._keys(prefix))
        manifest_key = prefix + manifest.NAME
        if manifest_key in keys:
            self.call("delete_object", Bucket=self.bucket, Key=manifest_key)
            keys.remove(manifest_key)
        for start in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[start : start + 1000]]
            self.call(
                "delete_objects", Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
            )

    # -- objects by name below this source's root: packs, the garbage collection record

    def object_key(self, name: str) -> str:
        """The key of `name` (a path below this source's root, e.g. `packs/ab/<id>.pack`)."""
        return f"{self.root}/{manifest.check_relative_path(name)}"

    def list_objects(self, prefix: str) -> Iterator[tuple[str, int]]:
        """Yield (name below the root, size) of every object whose name starts with `prefix`,
        page by page (memory flat in the number of objects)."""
        token: dict[str, str] = {}
        start = len(self.root) + 1
        while True:
            page = self.call(
                "list_objects_v2", Bucket=self.bucket, Prefix=f"{self.root}/{prefix}", **token
            )
            for obj in page.get("Contents", []):
                yield obj["Key"][start:], int(obj["Size"])
            if not page.get("IsTruncated"):
                return
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def read_range(self, name: str, offset: int, length: int) -> bytes:
        """The `length` bytes of object `name` from `offset` (one ranged GET, retried)."""
        key = self.object_key(name)
        return bytes(
            self._retried(
                "get_object", {"Key": key}, self._read_range, key, offset, offset + length
            )
        )

    def read_named(self, name: str) -> Iterator[memoryview]:
        """Yield the content of object `name` in order (see read_object)."""
        return self.read_object(self.object_key(name))

    def get_bytes(self, name: str) -> bytes | None:
        """The content of the small object `name`, or None if there is none."""
        key = self.object_key(name)
        data: bytes | None = self._retried("get_object", {"Key": key}, self._get_or_none, key)
        return data

    def _get_or_none(self, key: str) -> bytes | None:
        import botocore.exceptions

        try:
            return bytes(self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read())
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise

    def put_bytes(self, name: str, data: bytes) -> None:
        """Write the small object `name` in one PUT (atomic: readers see the old or the new),
        its SHA-256 checked by the store."""
        self.call(
            "put_object",
            Bucket=self.bucket,
            Key=self.object_key(name),
            Body=data,
            ChecksumSHA256=_b64(hashlib.sha256(data).digest()),
        )

    def put_file(self, name: str, path: Path, verify: str) -> None:
        """Upload the file at `path` as object `name` and verify it per `verify` (see
        verify). Raise VerificationFailed if the store holds something else."""
        self.verify(self.upload_file(path, self.object_key(name)), verify)

    def delete_object(self, name: str) -> None:
        """Delete object `name`; one already gone is no error."""
        self.call("delete_object", Bucket=self.bucket, Key=self.object_key(name))

    def remove_temporaries(self, prefix: str) -> int:
        """Nothing to do: an S3 upload is invisible until it is complete (the multipart
        uploads earlier runs left are aborted by push)."""
        return 0

    # -- multipart uploads an earlier run left

    def uploads_in_progress(self) -> list[tuple[str, str]]:
        """Return (key, upload id) of every multipart upload in progress below this source's
        prefix, asking once. Raise StoreError if the store cannot be asked."""
        found: list[tuple[str, str]] = []
        markers: dict[str, str] = {}
        while True:
            page = self.call_once(
                "list_multipart_uploads", Bucket=self.bucket, Prefix=f"{self.root}/", **markers
            )
            found += [(upload["Key"], upload["UploadId"]) for upload in page.get("Uploads", [])]
            if not page.get("IsTruncated"):
                return found
            markers = {
                "KeyMarker": page["NextKeyMarker"],
                "UploadIdMarker": page["NextUploadIdMarker"],
            }

    def abort_upload(self, key: str, upload_id: str) -> None:
        """Abort the multipart upload, freeing its parts; one already gone is no error."""
        self._retried("abort_multipart_upload", {"Key": key}, self._abort, key, upload_id)

    def _abort(self, key: str, upload_id: str) -> None:
        import botocore.exceptions

        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "NoSuchUpload":
                raise

    def read_manifest(self, kind: str, gen: str) -> Manifest:
        body = self.call("get_object", Bucket=self.bucket, Key=self.key(kind, gen, manifest.NAME))[
            "Body"
        ]
        return manifest.from_json(body.read().decode())


def _slices(data: bytes, size: int = 1 << 20) -> Iterator[memoryview]:
    view = memoryview(data)
    for start in range(0, len(view), size):
        yield view[start : start + size]


def _collect(done: set[Future[dict[str, Any]]], parts: dict[int, dict[str, Any]]) -> None:
    for future in done:
        part = future.result()
        parts[part["PartNumber"]] = part
