"""Orbax steps in a bucket (s3://, gs://), reached through TensorStore's own kvstore drivers.

TensorStore reads the OCDBT store and its zarr3 arrays itself, as it does on disk; this
module lists roots and steps through the kvstores `storage.tensorstore` opens, reads a
step's small metadata files and watches the step for changes. Listing goes through
TensorStore too, not fsspec: the ``orbax`` extra alone reads a bucket, and listing, metadata and
arrays are fetched by one client with one set of credentials, endpoint and retries, so they
cannot disagree.
Imported only when a URL may be an Orbax root or step.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from wavg.errors import CheckpointError, InputChanged
from wavg.formats.orbax.steps import (
    COMMIT_MARKER,
    PYTREE,
    STEP_METADATA,
    TMP_SUFFIX,
    StepUrl,
    check_enough,
)
from wavg.storage.locations import redact
from wavg.storage.tensorstore import (
    SCHEMES,
    context,
    installed,
    kvstore_spec,
    list_keys,
    open_kvstore,
    wait,
)

MANIFEST = f"{PYTREE}/manifest.ocdbt"
FILE_SUFFIXES = (".h5", ".hdf5", ".keras", ".json", ".zip")


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
    return bool(key) and not key.lower().endswith(FILE_SUFFIXES) and installed()


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
        result = wait(self._kv.read(key), self.path)
        self.requests += 1
        if result.state != "value":
            return None
        self.bytes_fetched += len(result.value)
        return bytes(result.value)

    def _generation(self, key: str) -> bytes | None:
        result = wait(self._kv.read(key), self.path)
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
