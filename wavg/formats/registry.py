"""Checkpoint formats: the one place that says what a location is, and opens it.

A location is recognised by what it offers, never by its name: a local folder's listing, a
bucket prefix's listing (storage says whether a URL names an object or a prefix,
`storage.remote.open_url`), a file's bytes, or an Orbax root. `RECOGNISERS` is the ordered
table of what each kind of location is and which format opens it; `open_checkpoint` and
`expand_checkpoint_dirs` go through it, and so does model loading (`wavg.workflows`), so
every command accepts the same locations. A format's module is imported only when a
location of its kind is met. Recognising reads listings and a few bytes, never a tensor.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wavg.errors import CheckpointError, UsageError
from wavg.formats.base import Checkpoint, Tensor, Writer, iter_blocks
from wavg.formats.orbax import steps as orbax_steps
from wavg.storage.atomic import check_output_dir
from wavg.storage.bytesource import ByteSource
from wavg.storage.local import InputFile
from wavg.storage.locations import Location, Url, as_location

__all__ = [
    "RECOGNISERS",
    "Checkpoint",
    "Recogniser",
    "Tensor",
    "Writer",
    "check_output_name",
    "commit_parts",
    "input_versions",
    "expand_checkpoint_dirs",
    "iter_blocks",
    "local_copies",
    "open_checkpoint",
    "open_output",
    "part_run",
    "open_source",
    "recognise",
    "staged_output",
]

# What a recogniser looks at: what the location offers.
ORBAX_ROOT = "Orbax root"  # a local folder or a URL that may stand for several steps
FOLDER = "local folder"  # its listing
PREFIX = "bucket prefix"  # its listing (`storage.remote.RemotePrefix`)
STEP_URL = "Orbax step URL"  # a URL an Orbax root's listing found to be a step
BYTES = "bytes"  # a file's or object's first bytes (`InputFile`, `RemoteFile`)

# What a folder's files are named when it holds checkpoints (the index first: its shards
# are named like weights files but are no checkpoints of their own).
_CHECKPOINT_SUFFIXES = (".weights.json", ".weights.h5", ".keras", ".h5", ".hdf5")
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_ZIP_SIGNATURE = b"PK\x03\x04"

if TYPE_CHECKING:
    from wavg.formats.sharded.parts import CommittedParts, PartRun

Opener = Callable[[Any, "Checkpoint | None"], Checkpoint]
Expander = Callable[[Any], "tuple[list[Location], list[str]] | None"]


@dataclass(frozen=True)
class Recogniser:
    """One row of the table: a kind of location, what of it the row looks at, how the kind
    is told, and what it is: a checkpoint a format `opens`, or a root that `expands` to the
    checkpoints it stands for (None from `expands`: not one after all, it stands for itself).
    """

    kind: str
    looks_at: str
    matches: Callable[[Any], bool]
    opens: Opener | None = None
    expands: Expander | None = None


# -- how each kind is told (cheap: listings and a few bytes) ----------------------------------


def _is_local_root(location: str | Url) -> bool:
    return not isinstance(location, Url) and orbax_steps.is_root(location)


def _is_remote_root(location: str | Url) -> bool:
    if not isinstance(location, Url) or isinstance(location, orbax_steps.StepUrl):
        return False
    from wavg.formats.orbax import remote as orbax_remote

    return orbax_remote.handles(location.url)


def _is_step_url(location: Url) -> bool:
    return isinstance(location, orbax_steps.StepUrl)


def _is_keras_folder(folder: str) -> bool:
    from wavg.formats.keras_folder import is_keras_folder

    return is_keras_folder(folder)


def _is_keras_prefix(prefix: Any) -> bool:
    from wavg.formats.keras_folder import holds_model_files

    return holds_model_files(prefix.names())


def _is_index(file: ByteSource) -> bool:
    from wavg.formats.sharded.index import looks_like_index

    return looks_like_index(file.read_at(0, min(64, file.size)))


def _is_zip(file: ByteSource) -> bool:
    return file.size >= 8 and file.read_at(0, 8).startswith(_ZIP_SIGNATURE)


def _is_hdf5(file: ByteSource) -> bool:
    # HDF5 looks for its signature at 0, 512, 1024, 2048, ... (after a user block).
    offset = 0
    while offset + 8 <= file.size:
        if file.read_at(offset, 8) == _HDF5_SIGNATURE:
            return True
        offset = 512 if offset == 0 else offset * 2
    return False


# -- what each kind is (a format's module is imported here, when its kind is met) -------------


def _local_root_steps(root: str) -> tuple[list[Location], list[str]]:
    steps, skipped = orbax_steps.expand_root(root)
    return [Path(step) for step in steps], skipped


def _remote_root_steps(url: Url) -> tuple[list[Location], list[str]] | None:
    from wavg.formats.orbax import remote as orbax_remote

    found = orbax_remote.expand_url(url.url)
    return None if found is None else (list(found[0]), found[1])


def _orbax_step(path: Any, like: Checkpoint | None) -> Checkpoint:
    from wavg.formats.orbax.step import OrbaxStep

    return OrbaxStep(path)


def _keras_folder(folder: str, like: Checkpoint | None) -> Checkpoint:
    from wavg.formats.keras_folder import KerasFolderCheckpoint

    return KerasFolderCheckpoint(folder)


def _keras_prefix(prefix: Any, like: Checkpoint | None) -> Checkpoint:
    from wavg.formats.keras_folder import KerasFolderCheckpoint
    from wavg.formats.keras_folder.remote import RemoteTree

    return KerasFolderCheckpoint(prefix.path, RemoteTree(prefix))


def _sharded(file: ByteSource, like: Checkpoint | None) -> Checkpoint:
    from wavg.formats.sharded.reader import ShardedCheckpoint

    return ShardedCheckpoint(file)


def _keras_zip(file: ByteSource, like: Checkpoint | None) -> Checkpoint:
    from wavg.formats.keras_zip import KerasCheckpoint

    return KerasCheckpoint(file, like)


def _hdf5(file: ByteSource, like: Checkpoint | None) -> Checkpoint:
    from wavg.formats.h5file import H5Checkpoint

    return H5Checkpoint(file, like=like)


RECOGNISERS: tuple[Recogniser, ...] = (
    Recogniser("Orbax root", ORBAX_ROOT, _is_local_root, expands=_local_root_steps),
    Recogniser("Orbax root or step", ORBAX_ROOT, _is_remote_root, expands=_remote_root_steps),
    Recogniser("Orbax step", FOLDER, orbax_steps.is_step, opens=_orbax_step),
    Recogniser("Orbax step", STEP_URL, _is_step_url, opens=_orbax_step),
    Recogniser("unzipped .keras folder", FOLDER, _is_keras_folder, opens=_keras_folder),
    Recogniser("unzipped .keras folder", PREFIX, _is_keras_prefix, opens=_keras_prefix),
    Recogniser("sharded weights index", BYTES, _is_index, opens=_sharded),
    Recogniser(".keras archive", BYTES, _is_zip, opens=_keras_zip),
    Recogniser("HDF5 (.h5, .weights.h5)", BYTES, _is_hdf5, opens=_hdf5),
)


# -- the table at work ------------------------------------------------------------------------


def _first(looks_at: str, offered: Any) -> Recogniser | None:
    return next((r for r in RECOGNISERS if r.looks_at == looks_at and r.matches(offered)), None)


def expand_checkpoint_dirs(locations: list[Location]) -> tuple[list[Location], list[str]]:
    """The checkpoints that `locations` name, and warnings about entries skipped.

    A directory of checkpoints (an OrbaxCheckpoint root) stands for its committed steps,
    oldest first, locally or in a bucket (an s3:// or gs:// URL is listed once through
    TensorStore when it is installed: a root or step becomes `StepUrl`s, anything else is
    an object); every other location stands for itself. Reads listings only.
    """
    found: list[Location] = []
    warnings: list[str] = []
    for location in locations:
        offered = location if isinstance(location, Url) else os.fspath(location)
        root = _first(ORBAX_ROOT, offered)
        expanded = root.expands(offered) if root is not None and root.expands else None
        if expanded is None:
            if not isinstance(location, Url) and os.path.isdir(offered):
                _folder(offered)  # before ordering: its name is not what is wrong with it
            found.append(location)
        else:
            found.extend(expanded[0])
            warnings.extend(expanded[1])
    return found, warnings


def recognise(path: str | os.PathLike[str] | Url) -> tuple[Recogniser, Any]:
    """Which row of the table `path` is, and what it offered (a folder's path, a listed
    prefix or an open byte source, which the row's format takes over); raises
    `CheckpointError` if it is no checkpoint. Orbax roots are expanded earlier
    (`expand_checkpoint_dirs`): here a location is one checkpoint.

    A URL is asked of storage once (object or prefix, `storage.remote.open_url`).
    """
    location = as_location(path)
    step = _first(STEP_URL, location)
    if step is not None:
        return step, location
    if isinstance(location, Url):
        from wavg.storage.remote import RemotePrefix, open_url

        offered = open_url(location.url)
        if isinstance(offered, RemotePrefix):
            row = _first(PREFIX, offered)
            if row is None:
                hint = _what_a_folder_holds(offered.names(), 0, f"{location.url.rstrip('/')}/")
                raise CheckpointError(
                    offered.path, f"is a directory (a prefix), not a checkpoint; {hint}"
                )
            return row, offered
        return _recognise_bytes(offered)
    folder = os.fspath(location)
    if os.path.isdir(folder):
        return _folder(folder), folder
    return _recognise_bytes(InputFile(folder))


def _folder(folder: str) -> Recogniser:
    """The row of a local folder that is one checkpoint (an Orbax step, an unzipped model);
    any other folder is refused, saying which checkpoints it holds and how to name them."""
    row = _first(FOLDER, folder)
    if row is not None:
        return row
    try:
        entries = list(os.scandir(folder))
    except OSError as exc:
        raise CheckpointError(folder, f"cannot list this directory ({exc.strerror})") from None
    models = sum(1 for e in entries if e.is_dir() and _first(FOLDER, e.path) is not None)
    hint = _what_a_folder_holds([e.name for e in entries], models, os.path.join(folder, ""))
    raise CheckpointError(folder, f"is a directory, not a checkpoint file; {hint}")


def _what_a_folder_holds(names: Iterable[str], model_folders: int, prefix: str) -> str:
    """Which checkpoints a folder's `names` are, and the quoted glob (under `prefix`, the
    folder's own name and separator) that passes them as inputs."""
    counts = Counter(
        next((s for s in _CHECKPOINT_SUFFIXES if name.lower().endswith(s)), None) for name in names
    )
    counts.pop(None, None)
    if counts:
        suffix = ".weights.json" if ".weights.json" in counts else counts.most_common(1)[0][0]
        held = " and ".join(_count(n, f"{s} file") for s, n in counts.most_common())
        return f"it holds {held}: pass '{prefix}*{suffix}'"
    if model_folders:
        return f"it holds {_count(model_folders, 'model folder')}: pass '{prefix}*/'"
    return (
        "it holds no checkpoint (no .h5, .weights.h5, .keras or .weights.json file, "
        "unzipped .keras model or Orbax step)"
    )


def _count(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


def _recognise_bytes(file: ByteSource) -> tuple[Recogniser, ByteSource]:
    try:
        row = _first(BYTES, file)
        if row is not None:
            return row, file
        formats = "HDF5 nor a .keras archive nor a .weights.json index"
        if file.size < 8:
            head = file.read_at(0, file.size)
            if any(sig.startswith(head) for sig in (_HDF5_SIGNATURE, _ZIP_SIGNATURE)):
                raise CheckpointError(file.path, "too short to be a checkpoint (truncated?)")
            raise CheckpointError(
                file.path, f"too short to be a checkpoint ({file.size} bytes, neither {formats})"
            )
        raise CheckpointError(file.path, f"not a Keras checkpoint (neither {formats})")
    except BaseException:
        file.release()
        raise


def open_checkpoint(
    path: str | os.PathLike[str] | Url, like: Checkpoint | None = None
) -> Checkpoint:
    """Open `path` read-only and list its tensors; raises `CheckpointError` if it is unusable.

    `like`, an open checkpoint likely of the same run (another input), lets a format verify
    that this file has its structure instead of walking it afresh.
    """
    row, offered = recognise(path)
    assert row.opens is not None
    try:
        return row.opens(offered, like)
    except BaseException:
        if row.looks_at == BYTES:
            offered.release()
        raise


def open_source(name: str | os.PathLike[str] | Url) -> ByteSource:
    """The byte source for a checkpoint name: a local `InputFile`, or a `RemoteFile` for a
    URL. Identity is pinned here, at first open."""
    location = as_location(name)
    if isinstance(location, Url):
        from wavg.storage.remote import RemoteFile

        return RemoteFile(location.url)
    return InputFile(os.fspath(location))


def local_copies(locations: list[Location], directory: Path) -> list[Path]:
    """Local paths for `locations`: local ones as they are, URLs downloaded whole into their
    own folders under `directory` (for tools that need a file, like Keras' loaders)."""
    found: list[Path] = []
    for i, location in enumerate(locations):
        if isinstance(location, Url):
            from wavg.storage.remote import download

            folder = directory / str(i)
            folder.mkdir(parents=True)
            found.append(download(location.url, folder))
        else:
            found.append(location)
    return found


@contextlib.contextmanager
def staged_output(out: Location) -> Iterator[Path]:
    """The local path a format commits `out` to: `out` itself when local; for a URL, a path
    in a private temporary directory standing for it: a multi-file format's commit protocol
    writes through it to the bucket, a single file there is uploaded when the block exits
    normally (see `storage.target.staged_upload`)."""
    if not isinstance(out, Url):
        yield out
        return
    from wavg.storage.target import staged_upload

    with staged_upload(out.url) as local:
        yield local


def check_output_name(
    newest: Checkpoint, out: Path, max_shard_gb: float | None, parted: bool = False
) -> None:
    """Refuse an output name Keras would not load as `newest`'s format, or as sharded weights
    cut from it (a ``.weights.json`` from any input whose weights are Keras 3's tree), and
    `max_shard_gb` for any other output; then the format's own `Checkpoint.check_output`.
    `parted`: the output is written in parts, so it must be sharded weights."""
    from wavg.formats.sharded.reshard import writes_as_shards

    if parted:
        from wavg.formats.sharded.parts import check_parts_possible

        check_parts_possible(newest, out)
    if parted or writes_as_shards(newest, out.name, max_shard_gb):
        check_output_dir(out)
        return
    if max_shard_gb is not None:
        raise UsageError(f"--max-shard-size applies only to a .weights.json output, not {out}")
    if not newest.layout.accepts_output(out.name):
        wanted = " or ".join(newest.layout.suffixes)
        raise UsageError(
            f"output {out} must end in {wanted} for {newest.layout.name} inputs (Keras picks "
            "the format from the name)"
        )
    newest.check_output(out)


def open_output(
    newest: Checkpoint,
    out: Path,
    keep: Callable[[str], bool] | None,
    max_shard_gb: float | None,
    part: PartRun | None = None,
) -> contextlib.AbstractContextManager[Writer]:
    """The writer of the output at `out` (see `Checkpoint.output`): `newest`'s own format, or
    its weights cut into Keras shards when `check_output_name` found a sharded output, or
    one `part` of those (`formats.sharded.parts`)."""
    from wavg.formats.sharded.reshard import resharded_output, writes_as_shards

    if part is not None:
        from wavg.formats.sharded.parts import part_output

        return part_output(newest, out, keep, max_shard_gb, part)
    if writes_as_shards(newest, out.name, max_shard_gb):
        return resharded_output(newest, out, keep, max_shard_gb)
    return newest.output(out, keep)


def part_run(
    index: int, count: int, plan: dict[str, Any], split: Callable[[Any, int], list[range]]
) -> PartRun:
    """Part `index` of `count` of a sharded output (see `formats.sharded.parts.PartRun`)."""
    from wavg.formats.sharded.parts import PartRun

    return PartRun(index, count, plan, split)


def input_versions(ckpt: Checkpoint) -> list[list[Any]]:
    """What identifies the stored version of every file `ckpt` was read from (for a plan
    that processes on other machines must share)."""
    from wavg.formats.sharded.parts import input_versions as versions

    return versions(ckpt)


def commit_parts(out: Location) -> CommittedParts:
    """Join the parts written beside `out` into one sharded output (see
    `formats.sharded.parts.commit_parts`), locally or in a bucket."""
    from wavg.formats.sharded.parts import commit_parts as commit

    with staged_output(out) as path:
        return commit(path)
