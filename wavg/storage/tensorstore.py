"""TensorStore's view of object storage: kvstore specs and contexts for s3:// and gs:// URLs.

A URL becomes the spec of TensorStore's own kvstore driver for its prefix, with the endpoint,
region, credentials and bounded retries configured the standard way, as for every other URL
wavg reads (`storage.remote`); failures become one safe line. It knows storage only, never
what the keys hold, and imports TensorStore only when a kvstore is opened.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit

from wavg.errors import CheckpointError, UnsafeCheckpoint, WavgError
from wavg.storage import remote
from wavg.storage.locations import is_plain_relative_path, redact

SCHEMES = {"s3": "s3", "gs": "gcs"}  # URL scheme -> TensorStore kvstore driver
_NO_CREDENTIALS = (
    "no credentials found (wavg uses the backend's standard chain: environment, "
    "config files, instance metadata)"
)


def installed() -> bool:
    """Whether TensorStore can be imported (without it, no kvstore is opened)."""
    try:
        import tensorstore  # noqa: F401
    except ImportError:
        return False
    return True


def kvstore_spec(url: str) -> dict:
    """The TensorStore kvstore spec of the prefix `url` names (``bucket/key/``).

    s3: the endpoint is ``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL`` or fsspec's s3
    ``endpoint_url`` (``FSSPEC_S3_ENDPOINT_URL``), as for objects read through s3fs; the
    region ``AWS_REGION``/``AWS_DEFAULT_REGION`` (us-east-1 for a custom endpoint without
    one; without an endpoint TensorStore finds the bucket's region). gs: TensorStore's own
    ``TENSORSTORE_GCS_HTTP_URL`` points it at another endpoint.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    key = parts.path.strip("/")
    spec: dict[str, Any] = {
        "driver": SCHEMES[scheme],
        "bucket": parts.netloc,
        "path": f"{key}/" if key else "",
    }
    if scheme == "s3":
        endpoint = _s3_endpoint()
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if endpoint:
            spec["endpoint"] = endpoint
            region = region or "us-east-1"
        if region:
            spec["aws_region"] = region
    return spec


def _s3_endpoint() -> str | None:
    for var in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(var):
            return os.environ[var]
    try:
        import fsspec.config
    except ImportError:
        return os.environ.get("FSSPEC_S3_ENDPOINT_URL") or None
    conf = fsspec.config.conf.get("s3", {})
    found = conf.get("endpoint_url") or conf.get("client_kwargs", {}).get("endpoint_url")
    return found or os.environ.get("FSSPEC_S3_ENDPOINT_URL") or None


def context(url: str) -> dict:
    """TensorStore context resources for `url`: bounded retries (wavg's, not TensorStore's
    32 tries over minutes) and, for s3, the credentials provider.

    Credentials follow AWS's standard chain. Keys in the environment come first in that
    chain, so they are used directly ("environment"), which spares the chain's probing of
    absent config files (logged by TensorStore as errors on stderr); otherwise TensorStore's
    default chain runs (config files, ECS, instance metadata). With no source at all and
    instance metadata disabled, the run stops here with the same message as for objects.
    """
    scheme = urlsplit(url).scheme.lower()
    retries = {
        "max_retries": remote.ATTEMPTS,
        "initial_delay": f"{remote.BACKOFF_SECONDS}s",
        "max_delay": f"{remote.BACKOFF_SECONDS * 8}s",
    }
    if scheme != "s3":
        return {"gcs_request_retries": retries}
    env = os.environ
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        credentials = {"type": "environment"}
    elif _no_aws_credentials():
        raise CheckpointError(redact(url), _NO_CREDENTIALS)
    else:
        credentials = {"type": "default"}
    return {"s3_request_retries": retries, "aws_credentials": credentials}


def _no_aws_credentials() -> bool:
    env = os.environ
    files = (
        env.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"),
        env.get("AWS_CONFIG_FILE", "~/.aws/config"),
    )
    if any(os.path.isfile(os.path.expanduser(f)) for f in files):
        return False
    if any(
        env.get(var)
        for var in (
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            "AWS_WEB_IDENTITY_TOKEN_FILE",
        )
    ):
        return False
    return env.get("AWS_EC2_METADATA_DISABLED", "").lower() == "true"


def problem(exc: BaseException) -> str:
    """One short line for a TensorStore storage failure, without secrets."""
    text = str(exc)
    if "NoSuchBucket" in text:
        return "no such bucket"
    if "PERMISSION_DENIED" in text or "response_code='403'" in text:
        return "access denied (check the credentials the backend found)"
    if "Failed to get credentials" in text or "UNAUTHENTICATED" in text:
        return _NO_CREDENTIALS
    if "retry attempts failed" in text or "CURL error" in text or "UNAVAILABLE" in text:
        return f"cannot reach the storage endpoint (after {remote.ATTEMPTS} tries)"
    return f"storage error ({remote.scrub(text)})"


def wait(future: Any, display: str) -> Any:
    try:
        return future.result()
    except WavgError:
        raise  # an interruption (SIGINT/SIGTERM) raised while TensorStore waited
    except Exception as exc:
        raise CheckpointError(display, problem(exc)) from None


def open_kvstore(url: str) -> Any:
    """The TensorStore kvstore of the prefix `url`; a failure names `url` (redacted)."""
    import tensorstore as ts

    display = redact(url)
    ctx = ts.Context(context(url))
    return wait(ts.KvStore.open(kvstore_spec(url), context=ctx), display)


def list_keys(kv: Any, display: str, checked: bool = True) -> list[str]:
    """Every key under `kv`'s prefix, relative to it, sorted. With `checked`, each must be a
    plain relative path (a key with ``..`` or an empty part would lead a copy outside its
    directory); a listing that only decides what the prefix holds need not be checked."""
    keys = sorted(k.decode("utf-8", "replace") for k in wait(kv.list(), display))
    for key in keys if checked else ():
        if not is_plain_relative_path(key):
            raise UnsafeCheckpoint(display, f"holds an object with an unusable name {key!r}")
    return keys
