"""The S3 sink store: `s3://<bucket>/<prefix>/<source-id>/{data,logs}/<generation>/`.

A thin adapter over boto3. Large files go up as multipart uploads with concurrent parts; every
part carries its SHA-256, which the store checks on arrival, and the same single read of the
file also hashes it whole, so verification needs no second read. Every call is retried with
exponential backoff and jitter on transient errors, for a bounded total time.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import itertools
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import botocore.config
import botocore.exceptions
from tenacity import (RetryCallState, Retrying, retry_if_exception, stop_after_delay,
                      wait_exponential_jitter)

from agent import generation, manifest
from agent.manifest import Manifest
from agent.stores import S3Settings, StoreError, VerificationFailed

logger = logging.getLogger(__name__)

_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                    "RequestLimitExceeded", "InternalError", "ServiceUnavailable",
                    "TooManyRequests", "OperationAborted"}
_USER_ERRORS = {
    "InvalidAccessKeyId": "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
    "SignatureDoesNotMatch": "check AWS_SECRET_ACCESS_KEY (and S3_REGION)",
    "AccessDenied": "this source's S3 identity may not do this: grant it read, write and list "
                    "on its own prefix (see the README's least-privilege policy)",
    "NoSuchBucket": "create the bucket or fix S3_BUCKET",
    "InvalidBucketName": "fix S3_BUCKET",
    "AuthorizationHeaderMalformed": "check S3_REGION",
}


@dataclass(frozen=True)
class Uploaded:
    """What the upload of one file established: its size, the sha256 of the bytes read, and
    the checksum the store must report for the object."""

    key: str
    size: int
    sha256: str
    store_checksum: str


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, (botocore.exceptions.EndpointConnectionError,
                        botocore.exceptions.ConnectionClosedError,
                        botocore.exceptions.ReadTimeoutError,
                        botocore.exceptions.ConnectTimeoutError,
                        botocore.exceptions.IncompleteReadError,
                        botocore.exceptions.ResponseStreamingError)):
        return True
    if isinstance(exc, botocore.exceptions.ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return code in _TRANSIENT_CODES or status >= 500
    return False


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


class S3Store:
    """One source's part of an S3 sink store."""

    def __init__(self, settings: S3Settings, source_id: str) -> None:
        self.settings = settings
        self.bucket = settings.bucket
        self.root = "/".join(p for p in (settings.prefix.strip("/"), source_id) if p)
        self.client = boto3.session.Session().client(
            "s3",
            endpoint_url=settings.endpoint_url or None,
            region_name=settings.region,
            aws_access_key_id=settings.access_key_id or None,
            aws_secret_access_key=settings.secret_access_key or None,
            aws_session_token=settings.session_token or None,
            verify=settings.ca_bundle or None,
            config=botocore.config.Config(
                # The body is not hashed a third time for the signature: every part's SHA-256
                # header is signed and the store checks the body against it.
                s3={"addressing_style": settings.addressing_style,
                    "payload_signing_enabled": False},
                retries={"max_attempts": 1},
                connect_timeout=10, read_timeout=120,
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

    def _retried(self, operation: str, where: dict[str, Any], function: Callable[..., Any],
                 *args: Any, **kwargs: Any) -> Any:
        def log_retry(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            logger.warning("S3 %s failed (%s); retry %d in %.1f s", operation, exc,
                           state.attempt_number, state.next_action.sleep if state.next_action
                           else 0)

        retrying = Retrying(
            retry=retry_if_exception(is_transient),
            stop=stop_after_delay(self.settings.retry_seconds),
            wait=wait_exponential_jitter(multiplier=0.5, max=30),
            before_sleep=log_retry, reraise=True)
        try:
            return retrying(function, *args, **kwargs)
        except botocore.exceptions.ClientError as exc:
            raise StoreError(self._explain(operation, where, exc)) from None
        except botocore.exceptions.BotoCoreError as exc:
            hint = ("check S3_ENDPOINT_URL and that the store is up" if is_transient(exc)
                    else "check the S3_* settings")
            raise StoreError(f"S3 {operation} on {self._where(where)} failed: {exc}; "
                             f"{hint}") from None

    def _where(self, kwargs: dict[str, Any]) -> str:
        return f"s3://{kwargs.get('Bucket', self.bucket)}/{kwargs.get('Key', kwargs.get('Prefix', ''))}"

    def _explain(self, operation: str, kwargs: dict[str, Any],
                 exc: botocore.exceptions.ClientError) -> str:
        error = exc.response.get("Error", {})
        code = error.get("Code", "?")
        hint = _USER_ERRORS.get(code, "see the store's logs")
        endpoint = self.settings.endpoint_url or "AWS"
        return (f"the S3 store at {endpoint} refused {operation} on {self._where(kwargs)}: "
                f"{code} ({error.get('Message', '')}); {hint}")

    # -- writing

    def upload_file(self, path: Path, key: str) -> Uploaded:
        """Upload the file at `path` to `key` (multipart above one part size) and return what
        the store must now hold. The file is read once."""
        size = path.stat().st_size
        if size <= self.settings.part_size:
            data = path.read_bytes()
            digest = hashlib.sha256(data).digest()
            self.call("put_object", Bucket=self.bucket, Key=key, Body=data,
                      ChecksumSHA256=_b64(digest))
            return Uploaded(key, size, digest.hex(), _b64(digest))
        return self._upload_multipart(path, key, size)

    def _upload_multipart(self, path: Path, key: str, size: int) -> Uploaded:
        upload_id = self.call("create_multipart_upload", Bucket=self.bucket, Key=key,
                              ChecksumAlgorithm="SHA256")["UploadId"]
        whole = hashlib.sha256()
        parts: dict[int, dict[str, Any]] = {}
        try:
            with open(path, "rb") as handle, \
                    ThreadPoolExecutor(self.settings.concurrency) as pool:
                pending: set[Future[dict[str, Any]]] = set()
                for number, data in enumerate(_chunks(handle, self.settings.part_size), 1):
                    whole.update(data)
                    if len(pending) >= self.settings.concurrency:
                        done, pending = wait(pending, return_when=FIRST_COMPLETED)
                        _collect(done, parts)
                    pending.add(pool.submit(self._upload_part, key, upload_id, number, data))
                _collect(wait(pending).done, parts)
            ordered = [parts[n] for n in sorted(parts)]
            self.call("complete_multipart_upload", Bucket=self.bucket, Key=key,
                      UploadId=upload_id, MultipartUpload={"Parts": ordered})
        except BaseException:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
                logger.warning("could not abort the multipart upload of %s: %s", key, exc)
            raise
        composite = hashlib.sha256(b"".join(base64.b64decode(p["ChecksumSHA256"])
                                            for p in ordered)).digest()
        return Uploaded(key, size, whole.hexdigest(), f"{_b64(composite)}-{len(ordered)}")

    def _upload_part(self, key: str, upload_id: str, number: int, data: bytes) -> dict[str, Any]:
        checksum = _b64(hashlib.sha256(data).digest())
        response = self.call("upload_part", Bucket=self.bucket, Key=key, UploadId=upload_id,
                             PartNumber=number, Body=data, ChecksumSHA256=checksum)
        return {"PartNumber": number, "ETag": response["ETag"], "ChecksumSHA256": checksum}

    def put_manifest(self, kind: str, m: Manifest) -> Uploaded:
        data = m.to_json().encode()
        digest = hashlib.sha256(data).digest()
        key = self.key(kind, m.generation, manifest.NAME)
        self.call("put_object", Bucket=self.bucket, Key=key, Body=data,
                  ChecksumSHA256=_b64(digest), ContentType="application/json")
        return Uploaded(key, len(data), digest.hex(), _b64(digest))

    # -- verifying

    def verify(self, uploaded: Uploaded, mode: str) -> str:
        """Check that the store holds exactly what was uploaded: by the store's own SHA-256
        checksum (`checksum`; falls back to `download` when the store reports none), by reading
        it back and hashing it (`download`), or not at all (`off`). Return the method used.
        Raise VerificationFailed on a mismatch."""
        if mode == "off":
            return "off"
        if mode == "checksum":
            head = self.call("head_object", Bucket=self.bucket, Key=uploaded.key,
                             ChecksumMode="ENABLED")
            if head["ContentLength"] != uploaded.size:
                raise VerificationFailed(f"{uploaded.key}: the store holds "
                                         f"{head['ContentLength']} bytes, expected {uploaded.size}")
            stored = head.get("ChecksumSHA256")
            if stored is not None:
                if stored != uploaded.store_checksum:
                    raise VerificationFailed(f"{uploaded.key}: the store's SHA-256 checksum "
                                             f"{stored} differs from the uploaded {uploaded.store_checksum}")
                return "checksum"
            logger.info("the store reports no SHA-256 for %s; reading it back", uploaded.key)
        size, sha256 = self.hash_object(uploaded.key)
        if (size, sha256) != (uploaded.size, uploaded.sha256):
            raise VerificationFailed(f"{uploaded.key}: read back {size} bytes with sha256 "
                                     f"{sha256}, expected {uploaded.size} bytes, {uploaded.sha256}")
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
        body = self.client.get_object(Bucket=self.bucket, Key=key,
                                      Range=f"bytes={start}-{end - 1}")["Body"]
        return body.read()

    def chunks(self, kind: str, gen: str, name: str) -> Iterator[memoryview]:
        return self.read_object(self.key(kind, gen, manifest.check_relative_path(name)))

    # -- listing and removing

    def generations(self, kind: str) -> tuple[list[str], list[str]]:
        """Return (complete, incomplete) generation ids of `kind`, oldest first. A generation is
        complete when its MANIFEST.json is there. Keys that are not of a generation are
        ignored."""
        names: dict[str, set[str]] = defaultdict(set)
        for key in self._keys(f"{self.root}/{kind}/"):
            gen, _, name = key[len(self.root) + len(kind) + 2:].partition("/")
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
            batch = [{"Key": k} for k in keys[start:start + 1000]]
            self.call("delete_objects", Bucket=self.bucket, Delete={"Objects": batch,
                                                                    "Quiet": True})

    def read_manifest(self, kind: str, gen: str) -> Manifest:
        body = self.call("get_object", Bucket=self.bucket,
                         Key=self.key(kind, gen, manifest.NAME))["Body"]
        return manifest.from_json(body.read().decode())


def _slices(data: bytes, size: int = 1 << 20) -> Iterator[memoryview]:
    view = memoryview(data)
    for start in range(0, len(view), size):
        yield view[start:start + size]


def _chunks(handle: Any, size: int) -> Iterator[bytes]:
    while data := handle.read(size):
        yield data


def _collect(done: set[Future[dict[str, Any]]], parts: dict[int, dict[str, Any]]) -> None:
    for future in done:
        part = future.result()
        parts[part["PartNumber"]] = part
