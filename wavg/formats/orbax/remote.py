"""Orbax steps in a bucket (s3://, gs://), reached through TensorStore's own kvstore drivers.

TensorStore reads the OCDBT store and its zarr3 arrays itself, as it does on disk; this
module builds the kvstore specs (endpoint, region and credentials configured the standard
way, as for every other URL wavg reads), lists roots and steps, reads a step's small
metadata files and watches the step for changes. Listing goes through TensorStore too, not
fsspec: `wavg[orbax]` alone reads a bucket, and listing, metadata and arrays are fetched by
one client with one set of credentials, endpoint and retries, so they cannot disagree.
Imported only when a URL may be an Orbax root or step.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit

from wavg.errors import CheckpointError, InputChanged, UnsafeCheckpoint, WavgError
from wavg.formats.orbax.steps import (
    COMMIT_MARKER,
    PYTREE,
    STEP_METADATA,
    TMP_SUFFIX,
    StepUrl,
    check_enough,
)
from wavg.storage import remote
from wavg.storage.locations import is_plain_relative_path, redact

SCHEMES = {"s3": "s3", "gs": "gcs"}  # URL scheme -> TensorStore kvstore driver
MANIFEST = f"{PYTREE}/manifest.ocdbt"
FILE_SUFFIXES = (".h5", ".hdf5", ".keras", ".json", ".zip")
_NO_CREDENTIALS = (
    "no credentials found (wavg uses the backend's standard chain: environment, "
    "config files, instance metadata)"
)


def handles(url: str) -> bool:
    """Whether `url` may name an Orbax root or step TensorStore can read: an s3:// or gs://
    URL of a key (not a whole bucket) without a query string, with TensorStore installed
    (without it, the URL is read as an object, and a prefix is refused as one).

    A key named like a checkpoint file (``.h5``, ``.keras``, ``.json`` ...) is an object and
    is not listed: Orbax names steps by number and roots as the user chose, and a listing
    per object would add a request (and TensorStore's credential lookup) to every run that
    reads files from a bucket.
    """
    parts = urlsplit(url)
    if parts.scheme.lower() not in SCHEMES or parts.query or not parts.netloc:
        return False
    key = parts.path.strip("/")
    if not key or key.lower().endswith(FILE_SUFFIXES):
        return False
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


def _wait(future: Any, display: str) -> Any:
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
    return _wait(ts.KvStore.open(kvstore_spec(url), context=ctx), display)


def list_keys(kv: Any, display: str, checked: bool = True) -> list[str]:
    """Every key under `kv`'s prefix, relative to it, sorted. With `checked`, each must be a
    plain relative path (a key with ``..`` or an empty part would lead a copy outside its
    directory); a listing that only decides whether the prefix is Orbax's is not checked."""
    keys = sorted(k.decode("utf-8", "replace") for k in _wait(kv.list(), display))
    for key in keys if checked else ():
        if not is_plain_relative_path(key):
            raise UnsafeCheckpoint(display, f"holds an object with an unusable name {key!r}")
    return keys


def expand_url(url: str) -> tuple[list[StepUrl], list[str]] | None:
    """The committed steps `url` stands for, oldest first, and a warning per skipped entry;
    None if `url` is neither an Orbax root nor a step (then it is read as an object).

    One listing of the prefix decides, by content as on disk: a step holds
    ``_CHECKPOINT_METADATA`` or ``pytree/_METADATA``; a root holds digit-named steps (or
    unfinished ``*.orbax-checkpoint-tmp`` ones). On object storage Orbax marks a finished
    step with ``commit_success.txt``: a step without one, where others have it, is skipped.
    """
    display = redact(url)
    # Unchecked: a prefix that is no Orbax root (a model folder, say) is its reader's to
    # judge; every step found is listed and checked again when it is opened.
    keys = list_keys(open_kvstore(url), display, checked=False)
    if not keys:
        return None
    if STEP_METADATA in keys or f"{PYTREE}/_METADATA" in keys:
        return [StepUrl(url)], []
    base = url.rstrip("/")
    children: dict[str, set[str]] = {}
    for key in keys:
        head, _, rest = key.partition("/")
        if rest:
            children.setdefault(head, set()).add(rest)
    skipped = [
        f"{display.rstrip('/')}/{name}: skipped, an unfinished Orbax step (being written?)"
        for name in children
        if name.endswith(TMP_SUFFIX)
    ]
    candidates = {n: files for n, files in children.items() if n.isdigit()}
    if not candidates and not skipped:
        return None
    marked = any(COMMIT_MARKER in files for files in candidates.values())
    steps = []
    for name, files in sorted(candidates.items(), key=lambda item: int(item[0])):
        shown = f"{display.rstrip('/')}/{name}"
        if STEP_METADATA not in files and f"{PYTREE}/_METADATA" not in files:
            skipped.append(f"{shown}: skipped, not an Orbax step")
        elif marked and COMMIT_MARKER not in files:
            skipped.append(f"{shown}: skipped, no {COMMIT_MARKER} (an unfinished Orbax step)")
        else:
            steps.append(name)
    check_enough(display, steps)
    return [StepUrl(f"{base}/{name}") for name in steps], skipped


class RemoteStepFiles:
    """The objects of one step in a bucket: what `StepFiles` is for a local step.

    The step's keys are listed once at open and its metadata files read then; at the end the
    listing and the OCDBT manifest's generation are compared with the ones seen (OCDBT data
    files are never rewritten: new data gets new names), so a step deleted or rewritten by a
    training job while wavg reads it is reported, not averaged.
    """

    def __init__(self, url: str) -> None:
        self._url = url.rstrip("/")
        self.path = redact(self._url)
        self.keep_open = True
        self.bytes_fetched = 0
        self.requests = 0
        self.size = 0  # stored bytes, set by the reader from the OCDBT tree it walks
        self._kv = open_kvstore(self._url)
        self._keys = list_keys(self._kv, self.path)
        self.requests += 1
        if not self._keys:
            raise CheckpointError(self.path, "no such Orbax step (nothing under this prefix)")
        self._manifest = self._generation(MANIFEST)

    @property
    def name(self) -> str:
        return self._url.rsplit("/", 1)[-1]

    def file_keys(self) -> list[str]:
        return list(self._keys)

    def read(self, key: str) -> bytes | None:
        """The bytes of the step's object `key`, or None if it does not exist."""
        result = _wait(self._kv.read(key), self.path)
        self.requests += 1
        if result.state != "value":
            return None
        self.bytes_fetched += len(result.value)
        return bytes(result.value)

    def _generation(self, key: str) -> bytes | None:
        result = _wait(self._kv.read(key), self.path)
        self.requests += 1
        return result.stamp.generation if result.state == "value" else None

    def kvstore(self, key: str) -> dict:
        return kvstore_spec(f"{self._url}/{key}")

    def context(self) -> dict:
        return context(self._url)

    def check_unchanged(self) -> None:
        """Raise `InputChanged` if an object of the step was added or removed, or the OCDBT
        manifest rewritten."""
        keys = list_keys(self._kv, self.path)
        self.requests += 1
        if not keys:
            raise InputChanged(self.path, "disappeared while it was being read")
        if keys != self._keys or self._generation(MANIFEST) != self._manifest:
            raise InputChanged(self.path, "changed while it was being read")

    def release(self) -> None:
        """Nothing to give back: TensorStore holds no connection per step."""
