"""Which S3 failures are retried, how, and what a refusal tells the user to fix: every call of
the S3 store goes through `retried`."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_delay,
    wait_exponential_jitter,
)

from agent.stores import StoreError

if TYPE_CHECKING:
    import botocore.exceptions

logger = logging.getLogger(__name__)

T = TypeVar("T")

_TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestLimitExceeded",
    "InternalError",
    "ServiceUnavailable",
    "TooManyRequests",
    "OperationAborted",
}
_USER_ERRORS = {
    "InvalidAccessKeyId": "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
    "SignatureDoesNotMatch": "check AWS_SECRET_ACCESS_KEY (and S3_REGION)",
    "AccessDenied": "this source's S3 identity may not do this: check that the bucket "
    "S3_BUCKET exists (an administrator creates it; this identity cannot create "
    "it) and that the identity may read, write and list its own prefix "
    "(docs/push-setup.md)",
    "NoSuchBucket": "create the bucket (with an administrator's identity) or fix S3_BUCKET",
    "InvalidBucketName": "fix S3_BUCKET",
    "AuthorizationHeaderMalformed": "check S3_REGION",
}


def is_transient(exc: BaseException) -> bool:
    import botocore.exceptions  # boto3 is imported where S3 is used (see stores.s3)

    if isinstance(
        exc,
        (
            botocore.exceptions.EndpointConnectionError,
            botocore.exceptions.ConnectionClosedError,
            botocore.exceptions.ReadTimeoutError,
            botocore.exceptions.ConnectTimeoutError,
            botocore.exceptions.IncompleteReadError,
            botocore.exceptions.ResponseStreamingError,
        ),
    ):
        return True
    if isinstance(exc, botocore.exceptions.ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return code in _TRANSIENT_CODES or status >= 500
    return False


def retried(
    operation: str,
    where: str,
    endpoint: str,
    seconds: float,
    function: Callable[..., T],
    *args: Any,
    **kwargs: Any,
) -> T:
    """Call `function`, retrying transient failures with exponential backoff and jitter for up
    to `seconds`. Return its result. Raise StoreError naming the operation, `where` (an
    s3:// URL) and the fix when it fails for good."""
    import botocore.exceptions

    def log_retry(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        logger.warning(
            "S3 %s failed (%s); retry %d in %.1f s",
            operation,
            exc,
            state.attempt_number,
            state.next_action.sleep if state.next_action else 0,
        )

    retrying = Retrying(
        retry=retry_if_exception(is_transient),
        stop=stop_after_delay(seconds),
        wait=wait_exponential_jitter(multiplier=0.5, max=30),
        before_sleep=log_retry,
        reraise=True,
    )
    try:
        return retrying(function, *args, **kwargs)
    except botocore.exceptions.ClientError as exc:
        raise StoreError(explain(operation, where, endpoint, exc)) from None
    except botocore.exceptions.BotoCoreError as exc:
        hint = (
            "check S3_ENDPOINT_URL and that the store is up"
            if is_transient(exc)
            else "check the S3_* settings"
        )
        raise StoreError(f"S3 {operation} on {where} failed: {exc}; {hint}") from None


def explain(operation: str, where: str, endpoint: str, exc: botocore.exceptions.ClientError) -> str:
    """The message of a refusal: the store, the operation, its code and what to fix."""
    error = exc.response.get("Error", {})
    code = error.get("Code", "?")
    hint = _USER_ERRORS.get(code, "see the store's logs")
    return (
        f"the S3 store at {endpoint} refused {operation} on {where}: "
        f"{code} ({error.get('Message', '')}); {hint}"
    )
