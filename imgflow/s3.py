"""The one way code talks to an S3-compatible store (AWS, MinIO, SeaweedFS).

* ``s3://BUCKET/PREFIX`` URIs: ``parse_s3_uri``, ``is_s3_uri``, ``s3_uri``.
* ``s3_client(settings)``: a boto3 client. Settings win where set (``s3.endpoint_url``,
  ``s3.access_key_id``/``s3.secret_access_key``, ``s3.region``, ``s3.profile``); otherwise
  boto3's own chain applies unchanged, so the standard variables work as boto3 reads them
  (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
  ``AWS_DEFAULT_REGION``, ``AWS_PROFILE``, ``~/.aws/config``).
* ``explain(exc, what)``: an ``S3Error`` whose message names the bucket/key, the setting to
  fix and boto3's error code — and never a credential (secrets are only ever held in
  ``SecretStr`` and handed to boto3).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlparse

from imgflow.errors import BadInput, ImgflowError
from imgflow.settings import Settings

log = logging.getLogger(__name__)

SCHEME = "s3://"


class S3Error(ImgflowError, RuntimeError):
    """An S3 operation failed; the message says what, where, and which setting to check."""

    def __init__(self, message: str, *, retriable: bool = False, code: str = "") -> None:
        super().__init__(message)
        self.retriable = retriable
        self.code = code


@dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str  # a prefix ("" or ending in "/") or an object key

    @property
    def uri(self) -> str:
        return s3_uri(self.bucket, self.key)


def is_s3_uri(value: object) -> bool:
    return isinstance(value, str) and value.startswith(SCHEME)


def parse_s3_uri(uri: str) -> S3Location:
    """``s3://bucket/some/key`` -> S3Location('bucket', 'some/key'). The key is
    percent-decoded (``s3_uri`` quotes it), so keys with spaces or unicode round-trip."""
    if not is_s3_uri(uri):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    parsed = urlparse(uri)
    bucket = parsed.netloc
    if not bucket:
        raise ValueError(f"s3 URI without a bucket: {uri!r}")
    return S3Location(bucket, unquote(parsed.path.lstrip("/")))


def s3_uri(bucket: str, key: str) -> str:
    return f"{SCHEME}{bucket}/{quote(key, safe='/')}"


def s3_client(settings: Settings, *, timeout_s: float | None = None, max_attempts: int | None = None):
    """A boto3 S3 client from settings, falling back to boto3's standard chain."""
    import boto3
    from botocore.config import Config

    s = settings.s3
    session_kwargs: dict = {}
    if s.profile:
        session_kwargs["profile_name"] = s.profile
    session = boto3.session.Session(**session_kwargs)
    client_kwargs: dict = {}
    if s.endpoint_url:
        client_kwargs["endpoint_url"] = s.endpoint_url
    if s.region:
        client_kwargs["region_name"] = s.region
    key, secret = s.access_key_id.get_secret_value(), s.secret_access_key.get_secret_value()
    if key or secret:
        if not (key and secret):
            raise S3Error("s3.access_key_id and s3.secret_access_key (IMGFLOW_S3__ACCESS_KEY_ID / IMGFLOW_S3__SECRET_ACCESS_KEY) must be set together")
        client_kwargs["aws_access_key_id"] = key
        client_kwargs["aws_secret_access_key"] = secret
    timeout = timeout_s if timeout_s is not None else s.timeout_s
    config = Config(
        connect_timeout=timeout,
        read_timeout=timeout,
        retries={"max_attempts": max_attempts if max_attempts is not None else s.max_attempts, "mode": "standard"},
        # Path-style works on every S3-compatible store; virtual-host style needs DNS.
        s3={"addressing_style": s.addressing_style},
    )
    return session.client("s3", config=config, **client_kwargs)


# boto3 error codes that mean "fix the configuration", with the setting to look at.
_CONFIG_CODES = {
    "InvalidAccessKeyId": "the access key is not known to the store: check s3.access_key_id (IMGFLOW_S3__ACCESS_KEY_ID) or AWS_ACCESS_KEY_ID",
    "SignatureDoesNotMatch": "the secret key is wrong: check s3.secret_access_key (IMGFLOW_S3__SECRET_ACCESS_KEY) or AWS_SECRET_ACCESS_KEY",
    "AccessDenied": "access denied: check the credentials' permissions",
    "NoSuchBucket": "the bucket does not exist: create it, or fix the s3:// URI",
}
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}
_BAD_KEY_CODES = {"InvalidRequest", "InvalidArgument", "KeyTooLongError", "InvalidObjectName", "InvalidURI"}


def explain(exc: BaseException, what: str) -> S3Error:
    """An S3Error saying what failed (``what``: e.g. 's3://bucket/key'), why, and which
    setting to check. Connection problems are marked retriable."""
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        EndpointConnectionError,
        NoCredentialsError,
        ReadTimeoutError,
    )

    if isinstance(exc, S3Error):
        return exc
    if isinstance(exc, NoCredentialsError):
        return S3Error(
            f"{what}: no S3 credentials: set s3.access_key_id/s3.secret_access_key (IMGFLOW_S3__*) or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY",
            code="NoCredentials",
        )
    if isinstance(exc, (EndpointConnectionError, ConnectionClosedError, ReadTimeoutError, ConnectionError)):
        return S3Error(
            f"{what}: S3 endpoint unreachable ({type(exc).__name__}): check s3.endpoint_url (IMGFLOW_S3__ENDPOINT_URL) or AWS_ENDPOINT_URL",
            retriable=True,
            code="Unreachable",
        )
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in _CONFIG_CODES:
            return S3Error(f"{what}: {code}: {_CONFIG_CODES[code]}", code=code)
        if code in _MISSING_CODES or status == 404:
            return S3Error(f"{what}: object not found", code="NoSuchKey")
        return S3Error(
            f"{what}: {code or status}: {err.get('Message', '')}".rstrip(": "), retriable=status >= 500 or code in {"SlowDown", "RequestTimeout"}, code=code
        )
    return S3Error(f"{what}: {type(exc).__name__}: {exc}", retriable=True, code=type(exc).__name__)


def read_object(client, bucket: str, key: str, max_bytes: int, chunk_size: int = 1 << 20) -> bytes:
    """The object's bytes by streaming GET, refusing more than ``max_bytes`` (checked against
    Content-Length before reading, and while reading). A missing object or one too large
    raises BadInput (permanent); store trouble raises S3Error (``.retriable`` for outages;
    boto3 itself retries each request ``s3.max_attempts`` times)."""

    what = s3_uri(bucket, key)
    try:
        resp = client.get_object(Bucket=bucket, Key=key)
        length = int(resp.get("ContentLength") or 0)
        body = resp["Body"]
        try:
            if length > max_bytes:
                raise BadInput(f"object too large: {what} has {length} bytes (limit models.image_max_bytes = {max_bytes})")
            parts, total = [], 0
            for chunk in body.iter_chunks(chunk_size):
                total += len(chunk)
                if total > max_bytes:
                    raise BadInput(f"object too large: {what} has over {max_bytes} bytes (limit models.image_max_bytes)")
                parts.append(chunk)
        finally:
            body.close()
    except BadInput:
        raise
    except Exception as exc:  # noqa: BLE001 - explained: names the setting, never a secret
        err = explain(exc, what)
        if err.code == "NoSuchKey":
            raise BadInput(f"object not found (deleted after its event?): {what}") from None
        if err.code in _BAD_KEY_CODES:  # e.g. SeaweedFS refuses keys with "../" segments
            raise BadInput(f"the store refuses this key: {err}") from None
        raise err from None
    data = b"".join(parts)
    if len(data) != length:
        raise S3Error(f"{what}: read {len(data)} of {length} bytes (connection cut)", retriable=True, code="Truncated")
    return data


def check_location(client, location: S3Location) -> None:
    """Raises S3Error naming the setting to fix when ``location`` cannot be listed (wrong
    endpoint or credentials, missing bucket)."""
    try:
        client.list_objects_v2(Bucket=location.bucket, Prefix=location.key, MaxKeys=1)
    except Exception as exc:  # noqa: BLE001
        raise explain(exc, location.uri) from None
