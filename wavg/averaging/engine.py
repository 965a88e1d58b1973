"""The streaming weighted average: the public API behind ``wavg combine``.

For every averaged tensor of the newest checkpoint, block by block, each input's block is
multiplied by its weight and added into a float64 running sum (extended precision for
float64 tensors), divided by the sum of the weights and written in the tensor's own dtype.
Runs of small tensors are averaged as one block (`plan_units`): real models are mostly
biases and BatchNorm vectors, whose per-tensor overhead would otherwise dominate. Memory is
a few blocks, whatever the model size or the number of inputs; each input byte is read once
and each output byte written once. In the same pass each input is compared with the newest
on a sample of its values, to warn when the inputs do not look like one run (wavg.averaging.onerun).
This module knows no file format: it sees `Checkpoint` readers and a `Writer` (see
wavg.formats.registry).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import warnings
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from wavg._runtime import signals_held
from wavg.averaging.onerun import distance_warnings
from wavg.averaging.ordering import order_checkpoints
from wavg.averaging.partition import split_by_bytes
from wavg.averaging.quantized import Requantizer, check_policy, mark_written, plan_quantized
from wavg.averaging.schemes import DEFAULT_ALPHA, raw_weights
from wavg.averaging.selection import Metric, select_windows
from wavg.errors import (
    CheckpointError,
    CheckpointMismatch,
    CleanupWarning,
    NonFiniteValues,
    OutputError,
    UsageError,
)
from wavg.formats.registry import (
    Checkpoint,
    Tensor,
    check_output_name,
    expand_checkpoint_dirs,
    input_versions,
    open_checkpoint,
    open_output,
    part_run,
    staged_output,
)
from wavg.storage.atomic import check_output_parent
from wavg.storage.descriptors import OPEN_FILES
from wavg.storage.globs import expand_inputs
from wavg.storage.locations import Location, as_location, identity_key
from wavg.storage.remote import requests_in_flight

T = TypeVar("T")

if TYPE_CHECKING:
    from wavg.formats.sharded.parts import PartRun

# Items per block: 256 Ki items keeps a worker's float64 sum and scratch at 4 MiB, within
# the caches the sum is added in, and cuts a small model (MobileNetV2: 3.5 M weights) into
# enough units to keep both workers busy to the end. Measured against 1 Mi items: ResNet50
# x8 -7% wall and -11% CPU, 8 x 256 MB Dense kernels -10% wall and 40 MB less peak RSS.
BLOCK_ITEMS = 1 << 18
# Two workers: the machines wavg targets have two cores or more, and the work is memory-bound.
WORKERS = 2
# The one-run check compares every DISTANCE_STRIDE-th run of SAMPLE_ROW items of each input
# with the newest's (all of a unit under DISTANCE_STRIDE runs): contiguous runs cost far less
# per item than a strided sample, and 1/32 of millions of weights estimates their distance
# far more finely than the 25% limit needs. Measured cost: see README, Performance.
DISTANCE_STRIDE = 32
SAMPLE_ROW = 1024
# ... in 1 large unit in UNIT_STRIDE (every small one): a compared unit copies each input's
# sample until the newest's arrives (measured, when the newest's whole block was held
# instead: ~10% of the averaging's CPU when every unit was compared).
UNIT_STRIDE = 4
_EXTENDED = np.longdouble if np.finfo(np.longdouble).nmant > 52 else np.float64

Progress = Callable[[int, int], None]
Pieces = tuple[Tensor, int, list[np.ndarray]]  # a tensor, a first item, each window's items
WINDOW_FIELD = "{n}"  # in the output name of several windows, replaced by each window's N


@dataclass(frozen=True)
class CombinePlan:
    """What will be averaged: files oldest first, their epochs and normalised weights."""

    inputs: list[Location]
    epochs: list[int | None]
    weights: list[float]
    scheme: str
    alpha: float | None
    raw_weights: list[float]  # unnormalised, as summed (1 for equal, 1..n for linear)
    warnings: list[str] = field(default_factory=list)  # e.g. unfinished Orbax steps skipped
    metric: str | None = None  # the metric selected or reported by (--by)
    values: list[float] | None = None  # its value for each input
    size: int | None = None  # the N of --last N / --best N this window was asked with


@dataclass(frozen=True)
class WindowsPlan:
    """Several windows averaged in one pass: `inputs` is every file a window needs, oldest
    first, each read once; `windows` are the windows' own plans."""

    inputs: list[Location]
    windows: list[CombinePlan]


@dataclass
class CombineSummary:
    """What a combine did (or, with dry_run, would do)."""

    inputs: list[Location]
    epochs: list[int | None]
    weights: list[float]
    scheme: str
    alpha: float | None
    output: Location
    format: str
    tensors: int  # averaged tensors
    copied_tensors: int  # tensors copied from the newest checkpoint
    bytes_read: int
    bytes_written: int
    seconds: float
    dry_run: bool
    dropped_optimizer: bool = False
    warnings: list[str] = field(default_factory=list)
    requantized_layers: int = 0  # quantized layers averaged and requantized
    bytes_fetched: int = 0  # from object storage (0 for local inputs)
    requests: int = 0  # requests made to object storage
    metric: str | None = None  # --by: the metric, whose value each input shows
    values: list[float] | None = None
    part: str | None = None  # "I/N" when only part I of N was written (--part)

    def to_json(self) -> dict:
        """A JSON-ready dict; the schema is documented in docs/json.md and kept stable."""
        data = asdict(self)
        data["inputs"] = [
            {"path": str(p), "epoch": e, "weight": w}
            for p, e, w in zip(self.inputs, self.epochs, self.weights, strict=True)
        ]
        for entry, value in zip(data["inputs"], self.values or (), strict=False):
            entry["value"] = value
        del data["epochs"], data["weights"], data["values"]
        if self.metric is None:  # the keys of a plain combine stay as they were
            del data["metric"]
        if self.part is None:  # only a --part run says which part it wrote
            del data["part"]
        data["output"] = str(self.output)
        data["seconds"] = round(self.seconds, 6)
        return data


@dataclass
class WindowsSummary:
    """What one pass over several windows did: each window's summary (its inputs, weights,
    output, bytes written) and, for the whole pass, the bytes read and the time."""

    windows: list[CombineSummary]
    bytes_read: int
    bytes_written: int
    seconds: float
    dry_run: bool
    bytes_fetched: int = 0
    requests: int = 0

    def to_json(self) -> dict:
        """``{"windows": [...], "bytes_read": ..., ...}``; a window omits the pass's fields."""
        data = asdict(self)
        per_pass = ("bytes_read", "seconds", "dry_run", "bytes_fetched", "requests")
        data["windows"] = [
            {k: v for k, v in w.to_json().items() if k not in per_pass} for w in self.windows
        ]
        data["seconds"] = round(self.seconds, 6)
        return data


def plan_combine(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    scheme: str = "equal",
    alpha: float = DEFAULT_ALPHA,
    weights: Sequence[float] | None = None,
    order: str = "natural",
    last: int | None = None,
    best: int | None = None,
    by: str | None = None,
    every: int | None = None,
    metrics: str | os.PathLike[str] | None = None,
    metrics_epoch_base: int = 1,
) -> CombinePlan:
    """Order the files (oldest first), select and weight them; reads no checkpoint contents.

    `paths` is a list of names, or one name: ``plan_combine("ckpt/model_49*.h5")``; anything
    else (bytes, a number) is a TypeError. Names may be URLs; quoted globs are expanded (see
    `wavg.storage.globs.expand_inputs`), and a directory of checkpoints (an OrbaxCheckpoint
    root) stands for its committed steps; any other directory is refused, naming the glob of
    the checkpoints it holds. Custom `weights` are in the final order, oldest first, after
    the selection. `every`,
    `best`, `by` (``METRIC[:min|:max]``), `metrics` (a CSVLogger CSV or History JSON) and
    `metrics_epoch_base` select as `wavg.averaging.selection` says.
    """
    counts = {"last": [last] if last is not None else None}
    counts["best"] = [best] if best is not None else None
    selection = dict(every=every, metrics=metrics, metrics_epoch_base=metrics_epoch_base, by=by)
    return plan_windows(
        paths, scheme=scheme, alpha=alpha, weights=weights, order=order, **counts, **selection
    ).windows[0]


def plan_windows(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    scheme: str = "equal",
    alpha: float = DEFAULT_ALPHA,
    weights: Sequence[float] | None = None,
    order: str = "natural",
    last: Sequence[int] | None = None,
    best: Sequence[int] | None = None,
    by: str | None = None,
    every: int | None = None,
    metrics: str | os.PathLike[str] | None = None,
    metrics_epoch_base: int = 1,
) -> WindowsPlan:
    """`plan_combine` for one window per N of `last` (or of `best`), all read in one pass;
    each window is weighted by the scheme over its own members."""
    found, skipped = expand_checkpoint_dirs(expand_inputs(paths))
    ordered = order_checkpoints(found, order)
    for n in [*(last or ()), *(best or ())]:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            option = "--last" if n in (last or ()) else "--best"
            raise UsageError(f"{option} must be a positive whole number, got {n!r}")
    metric = Metric.parse(by) if by is not None else None
    windows = select_windows(
        ordered,
        last=last,
        best=best,
        by=metric,
        every=every,
        metrics_file=metrics,
        epoch_base=metrics_epoch_base,
    )
    if weights is not None:
        if len(windows) > 1:
            raise UsageError("--weights weights one window; give one --last or --best count")
        scheme = "custom"
    plans = []
    for window in windows:
        n = len(window.members)
        raw = raw_weights(n, "equal" if weights is not None else scheme, alpha, weights)
        plans.append(
            CombinePlan(
                inputs=window.members,
                epochs=window.epochs,
                weights=[float(w) for w in raw / raw.sum()],
                raw_weights=[float(w) for w in raw],
                scheme=scheme,
                alpha=float(alpha) if scheme == "exp" else None,
                warnings=list(skipped),
                metric=metric.name if metric is not None else None,
                values=window.values,
                size=window.size,
            )
        )
    needed = {str(p) for plan in plans for p in plan.inputs}
    return WindowsPlan([p for p in ordered if str(p) in needed], plans)


def window_outputs(out: str | os.PathLike[str], plan: WindowsPlan) -> list[str]:
    """The output of each window: `out` with ``{n}`` replaced by the window's N; several
    windows need ``{n}`` in `out` (a usage error otherwise)."""
    text = os.fspath(out)
    if len(plan.windows) == 1 and WINDOW_FIELD not in text:
        return [text]
    if WINDOW_FIELD not in text:
        raise UsageError(
            f"-o {text}: several windows write several files; put {WINDOW_FIELD} in the name "
            "(e.g. -o 'avg_n{n}.h5')"
        )
    return [text.replace(WINDOW_FIELD, str(w.size or len(w.inputs))) for w in plan.windows]


def combine(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    scheme: str = "equal",
    alpha: float = DEFAULT_ALPHA,
    weights: Sequence[float] | None = None,
    order: str = "natural",
    last: int | None = None,
    allow_nonfinite: bool = False,
    drop_optimizer: bool = False,
    dry_run: bool = False,
    progress: Progress | None = None,
    quantized: str = "refuse",
    max_shard_gb: float | None = None,
    part: tuple[int, int] | None = None,
) -> CombineSummary:
    """Average checkpoint files into `out` and return a summary.

    The newest file (last in epoch order) provides the architecture, config, metadata,
    non-float tensors and optimizer state; every float model weight is the weighted mean of
    all files. `out` is replaced atomically and never left partial. Raises a `WavgError`
    subclass for every problem with the request, the inputs or the output.

    Quantized layers (``model.quantize``) are refused unless `quantized` is
    ``"requantize"``: then int8/int4 kernels are dequantized, averaged and quantized again
    exactly as Keras would (see `wavg.averaging.quantized`).

    `paths` as in `plan_combine`: a list, or one path or quoted glob.

    An `out` ending in ``.weights.json`` from any input whose weights are Keras 3's tree
    (``.weights.h5``, ``.keras``, unzipped folders, sharded) is sharded weights, cut as
    Keras' ``save_weights(out, max_shard_size=max_shard_gb)`` cuts them (5 GB by default;
    sharded inputs keep their own shards unless `max_shard_gb` is given). With `part`
    ``(I, N)`` only part I's shards are written (see `run_plan`).

    >>> combine(["model_498.h5", "model_499.h5"], "avg.h5", scheme="exp", alpha=2)  # doctest: +SKIP
    >>> combine("ckpt/model_49*.h5", "avg.h5")  # doctest: +SKIP
    """
    plan = plan_combine(paths, scheme=scheme, alpha=alpha, weights=weights, order=order, last=last)
    return run_plan(
        plan,
        out,
        allow_nonfinite=allow_nonfinite,
        drop_optimizer=drop_optimizer,
        dry_run=dry_run,
        progress=progress,
        quantized=quantized,
        max_shard_gb=max_shard_gb,
        part=part,
    )


def run_plan(
    plan: CombinePlan,
    out: str | os.PathLike[str],
    *,
    allow_nonfinite: bool = False,
    drop_optimizer: bool = False,
    dry_run: bool = False,
    progress: Progress | None = None,
    on_ready: Callable[[CombineSummary], None] | None = None,
    block_items: int = BLOCK_ITEMS,
    quantized: str = "refuse",
    max_shard_gb: float | None = None,
    part: tuple[int, int] | None = None,
) -> CombineSummary:
    """Carry out a `CombinePlan` (see `combine`).

    `on_ready` is called once every input has been opened and checked, before anything is
    written (the CLI prints its plan table there, so a bad input prints only its error).

    `part` ``(I, N)`` writes only part I's shards of a sharded ``.weights.json`` output and
    its record (`wavg.averaging.partition`); `commit_parts` joins the N parts afterwards.
    """
    done = run_windows(
        WindowsPlan(list(plan.inputs), [plan]),
        [out],
        allow_nonfinite=allow_nonfinite,
        drop_optimizer=drop_optimizer,
        dry_run=dry_run,
        progress=progress,
        on_ready=None if on_ready is None else (lambda ready: on_ready(ready.windows[0])),
        block_items=block_items,
        quantized=quantized,
        max_shard_gb=max_shard_gb,
        part=part,
    )
    (summary,) = done.windows
    summary.bytes_read, summary.seconds = done.bytes_read, done.seconds
    summary.bytes_fetched, summary.requests = done.bytes_fetched, done.requests
    return summary


def run_windows(
    plan: WindowsPlan,
    outs: Sequence[str | os.PathLike[str]],
    *,
    allow_nonfinite: bool = False,
    drop_optimizer: bool = False,
    dry_run: bool = False,
    progress: Progress | None = None,
    on_ready: Callable[[WindowsSummary], None] | None = None,
    block_items: int = BLOCK_ITEMS,
    quantized: str = "refuse",
    max_shard_gb: float | None = None,
    part: tuple[int, int] | None = None,
) -> WindowsSummary:
    """Carry out a `WindowsPlan`, writing window i to ``outs[i]`` (see `window_outputs`).

    Each input is opened and read once; each window keeps its own float64 sum of a block and
    adds the inputs it holds with its own weights, in the order its separate run would, so
    each output equals that run's bit for bit. Each output is committed atomically; a failure
    before the first commit leaves every output as it was. `max_shard_gb` and `part` as in
    `run_plan`; `part` writes one window only.
    """
    started = time.perf_counter()
    if len(outs) != len(plan.windows):
        raise UsageError(f"{len(plan.windows)} windows need as many outputs, got {len(outs)}")
    out_locations = [as_location(out) for out in outs]
    if len({str(o) for o in out_locations}) != len(out_locations):
        raise UsageError("two windows would write the same output; put {n} in the output name")
    check_policy(quantized)
    if part is not None and quantized != "refuse":
        raise UsageError("--quantized requantize cannot be combined with --part or --dask")
    if part is not None and len(plan.windows) > 1:
        raise UsageError("--part and --dask write one output; give one --last or --best count")
    for out_location in out_locations:
        _refuse_output_among_inputs(out_location, plan.inputs)
    inputs: list[Checkpoint] = []  # filled as they open, so a failure closes those opened
    with contextlib.ExitStack() as staged:
        out_paths = [staged.enter_context(staged_output(o)) for o in out_locations]
        for out_path in out_paths:  # what the output may be is the format's to say, once opened
            check_output_parent(out_path)
        # One open file per input, all or none (see wavg.storage.descriptors).
        kept_open = len(plan.inputs) if OPEN_FILES.take(len(plan.inputs)) else 0
        try:
            _open_inputs(plan.inputs, inputs, keep_open=kept_open > 0)
            by_path = {str(p): ckpt for p, ckpt in zip(plan.inputs, inputs, strict=True)}
            members = [[by_path[str(p)] for p in window.inputs] for window in plan.windows]
            raw = [_spread(window, plan.inputs) for window in plan.windows]
            requantizer = plan_quantized(inputs, raw[0], quantized, block_items)
            if requantizer is not None and len(plan.windows) > 1:
                raise UsageError("--quantized requantize averages one window at a time")
            _check_one_format(inputs)
            for own, out_path in zip(members, out_paths, strict=True):
                check_output_name(own[-1], out_path, max_shard_gb, part is not None)
            _check_tensors(inputs)
            summaries = []
            for window, own, out_location in zip(plan.windows, members, out_locations, strict=True):
                newest = own[-1]
                if requantizer is not None:
                    mark_written(newest, requantizer)
                summaries.append(
                    _window_summary(window, newest, out_location, dry_run, drop_optimizer)
                )
                summaries[-1].requantized_layers = requantizer.layers if requantizer else 0
                summaries[-1].part = f"{part[0]}/{part[1]}" if part is not None else None
            result = WindowsSummary(summaries, 0, 0, 0.0, dry_run)
            if on_ready is not None:
                on_ready(result)
            if not dry_run:
                _write_average(
                    inputs,
                    raw,
                    [m[-1] for m in members],
                    out_paths,
                    result,
                    allow_nonfinite,
                    drop_optimizer,
                    progress,
                    block_items,
                    requantizer,
                    max_shard_gb,
                    _part_run(part, plan.windows[0], inputs, drop_optimizer, allow_nonfinite),
                )
        finally:
            for ckpt in inputs:
                ckpt.close()
            OPEN_FILES.give_back(kept_open)
        result.bytes_fetched = sum(c.file.bytes_fetched for c in inputs)
        result.requests = sum(c.file.requests for c in inputs)
    result.seconds = time.perf_counter() - started
    return result


def _spread(window: CombinePlan, inputs: list[Location]) -> list[float]:
    """The window's raw weights over all the pass's `inputs` (0 where it does not use one)."""
    own = dict(zip(map(str, window.inputs), window.raw_weights, strict=True))
    return [own.get(str(p), 0.0) for p in inputs]


def _window_summary(
    window: CombinePlan, newest: Checkpoint, out: Location, dry_run: bool, drop_optimizer: bool
) -> CombineSummary:
    """A window's summary before anything is written: its plan, format and tensor counts."""
    averaged = sum(1 for t in newest.tensors.values() if t.averaged)
    summary = CombineSummary(
        inputs=list(window.inputs),
        epochs=list(window.epochs),
        weights=list(window.weights),
        scheme=window.scheme,
        alpha=window.alpha,
        output=out,
        format=newest.layout.name,
        tensors=averaged,
        copied_tensors=len(newest.tensors) - averaged,
        bytes_read=0,
        bytes_written=0,
        seconds=0.0,
        dry_run=dry_run,
        dropped_optimizer=drop_optimizer,
        metric=window.metric,
        values=window.values,
    )
    summary.warnings.extend(window.warnings)
    summary.warnings.extend(_copied_weight_warnings(newest))
    return summary


def _part_run(
    part: tuple[int, int] | None,
    plan: CombinePlan,
    inputs: list[Checkpoint],
    drop_optimizer: bool,
    allow_nonfinite: bool,
) -> PartRun | None:
    """What part `part` writes, with the plan every part must share: the inputs at their
    stored versions, the weights and the options that change the output."""
    if part is None:
        return None
    shared = {
        "inputs": [input_versions(ckpt) for ckpt in inputs],
        "weights": list(plan.raw_weights),
        "drop_optimizer": drop_optimizer,
        "allow_nonfinite": allow_nonfinite,
    }
    return part_run(part[0], part[1], shared, split_by_bytes)


def _open_inputs(paths: list, opened: list[Checkpoint], keep_open: bool) -> None:
    """Open every input into `opened`, in order; the problem reported is the oldest
    input's; without `keep_open` each gives back its descriptors after opening and reopens
    them per read. The oldest is walked and checked in full; every other input, the newest
    included, is verified against the oldest's checked structure rather than walked again,
    and walked only when that comparison fails (see Hdf5Checkpoint._predict_from). The
    newest's structure becomes the output's either way: a predicted one is the oldest's,
    byte for byte outside the tensors' values.

    The others are opened at once, at most `requests_in_flight` at a time: an input in
    object storage costs round trips to open (its object, its first bytes, its structure),
    and concurrent opens wait for them together rather than one input after another.
    """

    def open_one(i: int) -> Checkpoint:
        ckpt = open_checkpoint(paths[i], like=opened[0] if i > 0 else None)
        ckpt.trim()
        if not keep_open:
            ckpt.file.keep_open = False
            ckpt.release()
        return ckpt

    if paths:
        opened.append(open_one(0))
    done = _each_at_once(open_one, range(1, len(paths)))
    opened.extend(f.result() for f in done if f.exception() is None)  # closed on failure
    _first_error(done)


def _each_at_once(call: Callable[[T], object], items: Iterable[T]) -> list[Future]:
    """``call(item)`` for every item, at most `requests_in_flight` at a time; every call has
    finished on return, failed or not (their futures, in the items' order)."""
    items = list(items)
    if len(items) <= 1:
        return [_done(call, item) for item in items]
    pool = ThreadPoolExecutor(min(requests_in_flight(), len(items)), "wavg-open")
    try:
        with signals_held():  # one raised while a thread starts breaks threading's books
            futures = [pool.submit(call, item) for item in items]
    finally:
        pool.shutdown(wait=True)
    return futures


def _done(call: Callable[[T], object], item: T) -> Future:
    future: Future = Future()
    try:
        future.set_result(call(item))
    except Exception as exc:
        future.set_exception(exc)
    return future


def _first_error(futures: Sequence[Future]) -> None:
    """Raise the first item's failure, in the items' order (the oldest input's problem)."""
    for future in futures:
        if future.exception() is not None:
            raise future.exception()


def _copied_weight_warnings(newest: Checkpoint) -> list[str]:
    """Say so when model weights (not optimizer state) are copied rather than averaged.

    Integer tensors of some size in the model's weights are usually quantized kernels: they
    cannot be averaged, and the newest file's values are kept. Small ones (seed-generator
    states, counters) are not worth a warning.
    """
    copied = [
        t
        for t in newest.tensors.values()
        if not t.averaged
        and t.storage.kind in "iub"
        and t.size >= 16
        and not newest.layout.is_optimizer(t.name)
    ]
    if not copied:
        return []
    first = copied[0]
    return [
        f"{len(copied)} non-float weight tensor(s), e.g. {first.name} ({first.storage}), are "
        "copied from the newest checkpoint, not averaged"
    ]


def _refuse_output_among_inputs(out: Location, inputs: list[Location]) -> None:
    """Refuse an output that is one of the inputs, also through a symlink or a hard link."""
    out_key = identity_key(out)
    seen: dict[object, Location] = {}
    for path in inputs:
        key = identity_key(path)
        if key is None:
            continue  # opening it reports the problem, naming the file
        if key in seen:
            raise UsageError(f"{seen[key]} and {path} are the same file; give each checkpoint once")
        seen[key] = path
        if out_key is not None and key == out_key:
            raise UsageError(f"output {out} is the input {path}; inputs are never overwritten")


def _check_tensors(inputs: list[Checkpoint]) -> None:
    """All inputs hold the newest's averaged tensors (names, shapes, dtypes)."""
    newest = inputs[-1]
    expected = {n: t for n, t in newest.tensors.items() if t.averaged}
    for ckpt in inputs[:-1]:
        ckpt.check_matches(newest)
        mine = {n: t for n, t in ckpt.tensors.items() if t.averaged}
        for name, ref in expected.items():
            other = mine.get(name)
            if other is None:
                raise CheckpointMismatch(
                    ckpt.path, f"has no tensor {name}, which {newest.path} has"
                )
            if other.shape != ref.shape:
                raise CheckpointMismatch(
                    ckpt.path,
                    f"tensor {name} has shape {other.shape} but {ref.shape} in {newest.path}",
                )
            if other.dtype != ref.dtype or other.storage != ref.storage:
                raise CheckpointMismatch(
                    ckpt.path,
                    f"tensor {name} is {_dtype_name(other)} but {_dtype_name(ref)} in {newest.path}",
                )
        extra = next((n for n in mine if n not in expected), None)
        if extra is not None:
            raise CheckpointMismatch(ckpt.path, f"has tensor {extra}, which {newest.path} lacks")


def _check_one_format(inputs: list[Checkpoint]) -> None:
    """All inputs share one format; if not, blame the first input of a minority format
    (the newest's format wins a tie), since that is the file most likely given by mistake."""
    counts = Counter(ckpt.layout for ckpt in inputs)
    if len(counts) == 1:
        return
    newest = inputs[-1].layout
    usual = max(counts, key=lambda layout: (counts[layout], layout == newest))
    odd = next(ckpt for ckpt in inputs if ckpt.layout != usual)
    others = len(inputs) - 1
    if counts[usual] == others:
        in_usual = (
            f"the other input, {next(c.path for c in inputs if c is not odd)}, is"
            if others == 1
            else f"the other {others} inputs are"
        )
    else:
        in_usual = f"{counts[usual]} of the {len(inputs)} inputs are"
    raise CheckpointMismatch(
        odd.path,
        f"is in {odd.layout.name} format but {in_usual} in {usual.name} format; "
        "all inputs must share one format",
    )


def _dtype_name(t: Tensor) -> str:
    return str(t.dtype) if t.dtype == t.storage else f"{t.dtype} (stored as {t.storage})"


def _write_average(
    inputs: list[Checkpoint],
    windows: list[list[float]],
    newest: list[Checkpoint],
    outs: list[Path],
    result: WindowsSummary,
    allow_nonfinite: bool,
    drop_optimizer: bool,
    progress: Progress | None,
    block_items: int,
    requantizer: Requantizer | None = None,
    max_shard_gb: float | None = None,
    part: PartRun | None = None,
) -> None:
    """Average `inputs` with each window's raw weights and write window i, whose newest
    input is ``newest[i]``, to ``outs[i]``; the units are planned on the newest input of all,
    whose tensors every input was checked against."""
    averager = BlockAverager(inputs, windows, block_items, allow_nonfinite)
    readers = len(averager.members)
    current = outs[0]  # the output an OSError is reported for

    def keep(name: str) -> bool:
        return not newest[0].layout.is_optimizer(name)

    try:
        with (
            warnings.catch_warnings(record=True, action="always", category=CleanupWarning) as seen,
            contextlib.ExitStack() as stack,
        ):
            writers = []
            keeping = keep if drop_optimizer else None
            for ckpt, out in zip(newest, outs, strict=True):
                current = out
                writers.append(
                    stack.enter_context(open_output(ckpt, out, keeping, max_shard_gb, part))
                )
            order = writers[0].order
            for writer, out in zip(writers[1:], outs[1:], strict=False):
                if writer.order != order:
                    raise UsageError(
                        f"{out}: its tensors are laid out differently; average it alone"
                    )
            for ckpt, _ in averager.members:
                ckpt.will_read(order, readers)
            tensors = [inputs[-1].tensors[name] for name in order]
            total = sum(t.nbytes for t in tensors) * readers
            done = 0
            units = _ordered_blocks(averager, requantizer, tensors, inputs[-1], block_items)
            for tensor, start, datas in units:
                for writer, ckpt, data, out in zip(writers, newest, datas, outs, strict=True):
                    current = out
                    writer.write(ckpt.tensors[tensor.name], start, data)
                done += datas[0].nbytes * readers
                if progress is not None:
                    progress(done, total)
            result.bytes_read = done
            _first_error(_each_at_once(lambda ckpt: ckpt.file.check_unchanged(), inputs))
            for writer, summary, out in zip(writers, result.windows, outs, strict=True):
                current = out
                summary.bytes_written = writer.finish()
            result.bytes_written = sum(w.bytes_written for w in result.windows)
        for warning in seen:  # a committed output's failed cleanup is the run's warning
            if issubclass(warning.category, CleanupWarning):
                message = str(warning.message)
                owner = next(
                    (w for w in result.windows if str(w.output) in message), result.windows[0]
                )
                owner.warnings.append(message)
            else:
                warnings.showwarning(
                    warning.message, warning.category, warning.filename, warning.lineno
                )
        for summary, found in zip(result.windows, averager.one_run_warnings(), strict=True):
            summary.warnings.extend(found)
    except OSError as exc:
        raise OutputError(current, f"cannot write ({_reason(exc)})") from None


@dataclass(frozen=True)
class Unit:
    """One unit of averaging work: a block of one large tensor, or a batch of whole small
    tensors (consecutive in the output, one dtype) averaged as one flat array.

    Real models are mostly small tensors (biases, BatchNorm vectors, depthwise kernels):
    batching them costs one read per input per run of them and one numpy call per input
    per batch, instead of per tensor.
    """

    tensors: tuple[Tensor, ...]
    start: int  # first item, in the tensor's flat C order (0 for a batch)
    count: int  # items: of the block, or of all the batch's tensors together
    slices: tuple[slice, ...] | None  # the block as a hyperslab; None for a batch

    @property
    def dtype(self) -> np.dtype:
        return self.tensors[0].dtype

    @property
    def storage(self) -> np.dtype:
        return self.tensors[0].storage

    def read(self, ckpt: Checkpoint, scratch: np.ndarray) -> np.ndarray:
        """This unit's items from one input, in its numeric dtype (valid until the next
        read into `scratch`)."""
        if self.slices is not None:
            (tensor,) = self.tensors
            return ckpt.read(
                ckpt.tensors[tensor.name], self.start, self.count, self.slices, scratch
            )
        data = scratch[: self.count * self.storage.itemsize]
        ckpt.read_many([ckpt.tensors[t.name] for t in self.tensors], data)
        return data.view(self.storage).view(self.dtype)

    def pieces(self, data: np.ndarray) -> Iterator[tuple[Tensor, int, np.ndarray]]:
        """``(tensor, start, items)`` writes for the unit's averaged `data`."""
        if self.slices is not None:
            yield self.tensors[0], self.start, data
            return
        position = 0
        for tensor in self.tensors:
            yield tensor, 0, data[position : position + tensor.size]
            position += tensor.size


def plan_units(newest: Checkpoint, tensors: list[Tensor], block_items: int) -> Iterator[Unit]:
    """Cut the averaged `tensors` (in output order) into units of about `block_items` items.

    A tensor is cut into the blocks its format asks for (`Checkpoint.blocks`: hyperslabs of
    about `block_items` items, or whole chunks where reads decode chunks); runs of tensors
    that the format reads as one block, small and of one dtype, become batches of at most
    `block_items` items. Empty tensors have nothing to average and are skipped.
    """
    batch: list[Tensor] = []
    items = 0
    for tensor in tensors:
        if tensor.size == 0:
            continue
        blocks = list(newest.blocks(tensor, block_items)) if tensor.size <= block_items else None
        batchable = blocks is not None and len(blocks) == 1
        fits = batch and tensor.storage == batch[0].storage and tensor.dtype == batch[0].dtype
        if batch and (not batchable or not fits or items + tensor.size > block_items):
            yield Unit(tuple(batch), 0, items, None)
            batch, items = [], 0
        if batchable:
            batch.append(tensor)
            items += tensor.size
            continue
        for start, count, slices in blocks or newest.blocks(tensor, block_items):
            yield Unit((tensor,), start, count, slices)
    if batch:
        yield Unit(tuple(batch), 0, items, None)


def _ordered_blocks(
    averager: BlockAverager,
    requantizer: Requantizer | None,
    tensors: list[Tensor],
    newest: Checkpoint,
    block_items: int,
) -> Iterator[Pieces]:
    """Every block in file order, one array per window: a requantized layer's tensors from
    the requantizer, the runs of other tensors between them from the averager (in units,
    see `plan_units`)."""
    if requantizer is None:
        yield from averager.blocks(plan_units(newest, tensors, block_items))
        return
    run: list[Tensor] = []
    for tensor in tensors:
        if requantizer.owns(tensor.name):
            if run:  # (each call starts a pool: none for the empty run between two layers)
                yield from averager.blocks(plan_units(newest, run, block_items))
            run = []
            for piece, start, data in requantizer.blocks(tensor):  # one window only
                yield piece, start, [data]
        else:
            run.append(tensor)
    if run:
        yield from averager.blocks(plan_units(newest, run, block_items))


def _started_pool(workers: int) -> ThreadPoolExecutor:
    """A pool whose `workers` threads are all running.

    They are started with SIGINT and SIGTERM held (`signals_held`): the CLI raises on those
    signals in the main thread, and one raised while `Thread.start` waits for its thread
    breaks threading's bookkeeping, so the thread dies printing a traceback instead of the
    run ending in one line.
    """
    pool = ThreadPoolExecutor(workers, thread_name_prefix="wavg-average")
    with signals_held():
        everyone = threading.Barrier(workers)  # each submit starts a thread: none is idle
        for started in [pool.submit(everyone.wait, 60) for _ in range(workers)]:
            started.result()
    return pool


class BlockAverager:
    """Computes averaged units on worker threads and yields their pieces in file order.

    Reads (``preadv``) and numpy arithmetic both release the GIL, so two workers keep both
    cores busy while the caller writes the previous unit. The weights are the scheme's raw
    ones (all 1 for equal, 1..n for linear): inputs of weight 1 are added without a multiply,
    and the sum is divided by the total weight once at the end. Memory is
    few blocks per worker plus the blocks in flight, whatever the model size or input count.

    Several windows (one list of raw weights over `inputs` each, 0 for an input a window
    does not hold) share the reads: each input's block is read once and added to the sum of
    every window that holds it, in input order, as that window's own run would add it.
    """

    def __init__(
        self,
        inputs: list[Checkpoint],
        windows: list[list[float]],
        block_items: int,
        allow_nonfinite: bool,
    ) -> None:
        used = [i for i in range(len(inputs)) if any(ws[i] > 0 for ws in windows)]
        self.members = [(inputs[i], max(ws[i] for ws in windows)) for i in used]
        # Per window: (position in members, weight) of each input it holds, oldest first.
        self.windows = [[(j, ws[i]) for j, i in enumerate(used) if ws[i] > 0] for ws in windows]
        self.block_items = block_items
        self.allow_nonfinite = allow_nonfinite
        self._local = threading.local()
        # Per window, sums over every unit of each of its members' squared distance to its
        # newest member and (last) of the newest's squared norm, on the items `_sample` picks.
        self.distances = [np.zeros(len(w) + 1) for w in self.windows]

    def blocks(self, units: Iterable[Unit]) -> Iterator[Pieces]:
        pending: deque[Future] = deque()
        pool = _started_pool(WORKERS)
        try:
            for index, unit in enumerate(units):
                compare = index % UNIT_STRIDE == 0 or unit.count < DISTANCE_STRIDE * SAMPLE_ROW
                # A unit larger than a block is a whole chunk of a chunked format (an Orbax
                # shard): it runs alone and is written before the next one is read, so memory
                # stays at one chunk's sum, read and output whatever the model holds.
                alone = unit.count > self.block_items
                while alone and pending:
                    yield from self._collect(pending.popleft())
                pending.append(pool.submit(self._average, unit, compare))
                if alone or len(pending) > WORKERS:
                    yield from self._collect(pending.popleft())
            while pending:
                yield from self._collect(pending.popleft())
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _collect(self, future: Future) -> list[Pieces]:
        pieces, distances = future.result()
        for total, found in zip(self.distances, distances, strict=True):
            total += found
        return pieces

    def _buffers(self, dtype: type, count: int) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        """Sum (one per window), term and read buffers for a unit of `count` items.

        Up to `block_items` items they are this thread's, reused from unit to unit. A larger
        unit (a whole chunk of a chunked format) gets sums and a read buffer of its own,
        freed with it, so that no worker keeps the largest chunk's float64 sum for the rest
        of the run; the term buffer is used `block_items` items at a time either way.
        """
        cache = self._local.__dict__.setdefault("buffers", {})
        found = cache.get(dtype)
        if found is None:
            size = self.block_items
            sums = [np.empty(size, dtype) for _ in self.windows]
            found = (sums, np.empty(size, dtype), np.empty(size * 8, np.uint8))
            cache[dtype] = found
        if count <= self.block_items:
            return found
        sums = [np.empty(count, dtype) for _ in self.windows]
        return sums, found[1], np.empty(count * 8, np.uint8)

    def _average(self, unit: Unit, compare: bool) -> tuple[list[Pieces], list[np.ndarray]]:
        """Average `unit` for every window; with `compare`, also measure each window's
        inputs' distance to its newest on a sample of them (see `DISTANCE_STRIDE`).

        Each input's block is added to the float64 sums as it is read and dropped before the
        next read (a chunked format hands over a fresh array per read); the compared
        samples (1/`DISTANCE_STRIDE` of a large unit) are kept until the newest's arrives
        last, so no input's whole block waits for it.
        """
        count = unit.count
        acc_dtype = _EXTENDED if unit.dtype == np.float64 else np.float64
        acc_bufs, term_buf, scratch = self._buffers(acc_dtype, count)
        accs = [buf[:count] for buf in acc_bufs]
        totals = [acc_dtype(0) for _ in self.windows]
        started = [False for _ in self.windows]
        weights = [dict(window) for window in self.windows]
        diff_dtype = np.float64 if unit.dtype == np.float64 else np.float32
        samples: list[np.ndarray] = []
        for i, (ckpt, _) in enumerate(self.members):
            block = unit.read(ckpt, scratch)
            if compare:
                samples.append(_sample(block).astype(diff_dtype).ravel())
            for k, acc in enumerate(accs):
                w = weights[k].get(i)
                if w is None:
                    continue
                totals[k] += acc_dtype(w)
                _accumulate(acc, block, acc_dtype(w), term_buf, first=not started[k])
                started[k] = True
            del block  # before the next read: a chunk may be all of a large array
        distances = [np.zeros(len(window) + 1) for window in self.windows]
        if compare:
            self._distances(samples, distances)
        outs = []
        for k, acc in enumerate(accs):
            acc /= totals[k]
            # A sum is finite exactly when every term is (no overflow: |values| <= dtype max).
            if not self.allow_nonfinite and not np.isfinite(acc.sum()):
                self._raise_nonfinite(unit, scratch, k)
            out = np.empty(count, dtype=unit.dtype)
            np.copyto(out, acc, casting="unsafe")
            outs.append(list(unit.pieces(out.view(unit.storage))))
        pieces = [(t, start, [o[n][2] for o in outs]) for n, (t, start, _) in enumerate(outs[0])]
        return pieces, distances

    def _distances(self, samples: list[np.ndarray], distances: list[np.ndarray]) -> None:
        """Each window's members' squared distances to its newest member (computed once per
        pair of inputs: windows of --last share their newest) and the newest's squared norm."""
        found: dict[tuple[int, int], float] = {}
        for window, into in zip(self.windows, distances, strict=True):
            if len(window) < 2:
                continue
            newest = window[-1][0]
            reference = samples[newest]
            for m, (i, _) in enumerate(window[:-1]):
                if (i, newest) not in found:
                    diff = np.subtract(samples[i], reference)
                    found[i, newest] = _squared_norm(diff, diff)
                into[m] = found[i, newest]
            if (newest, newest) not in found:
                found[newest, newest] = _squared_norm(reference, np.empty_like(reference))
            into[-1] = found[newest, newest]

    def one_run_warnings(self) -> list[list[str]]:
        """Each window's warnings when an input is far from its newest (not one run; see
        wavg.averaging.onerun)."""
        warnings = []
        for window, distances in zip(self.windows, self.distances, strict=True):
            paths = [Path(self.members[i][0].path) for i, _ in window]
            warnings.append(distance_warnings(paths, list(distances[:-1]), float(distances[-1])))
        return warnings

    def _raise_nonfinite(self, unit: Unit, scratch: np.ndarray, window: int) -> None:
        """Name the first input (and tensor) of a window whose part of `unit` holds NaN or Inf."""
        for i, _ in self.windows[window]:
            ckpt = self.members[i][0]
            block = unit.read(ckpt, scratch)
            for tensor, _, values in unit.pieces(block):
                if not np.isfinite(values.astype(np.float64)).all():
                    raise NonFiniteValues(
                        ckpt.path,
                        f"tensor {tensor.name} holds NaN or Inf values "
                        "(pass --allow-nonfinite to average it anyway)",
                    )
        names = ", ".join(t.name for t in unit.tensors[:3])
        newest = self.members[self.windows[window][-1][0]][0]
        raise CheckpointError(newest.path, f"the average of tensor {names} is not finite")


def _accumulate(
    acc: np.ndarray, block: np.ndarray, w: np.floating, term_buf: np.ndarray, first: bool
) -> None:
    """``acc = w * block`` (`first`) or ``acc += w * block``; no multiply for a weight of 1,
    and the product made `term_buf`'s size at a time otherwise."""
    if first:
        if w == 1.0:
            np.copyto(acc, block)
        else:
            np.multiply(block, w, out=acc)
    elif w == 1.0:
        np.add(acc, block, out=acc)
    else:
        for lo in range(0, acc.size, term_buf.size):
            hi = min(acc.size, lo + term_buf.size)
            term = term_buf[: hi - lo]
            np.multiply(block[lo:hi], w, out=term)
            np.add(acc[lo:hi], term, out=acc[lo:hi])


def _squared_norm(values: np.ndarray, scratch: np.ndarray) -> float:
    """The sum of squares of `values` (`scratch`, of its shape, may be `values` itself).

    Not ``np.dot``: that is BLAS, and OpenBLAS's threads spin-wait after each call, taking
    the cores from the averaging workers (17% of the CPU time on ResNet50 checkpoints).
    """
    np.multiply(values, values, out=scratch)
    return float(scratch.sum(dtype=np.float64))


def _sample(values: np.ndarray) -> np.ndarray:
    """The items of a unit the one-run check compares (see `DISTANCE_STRIDE`)."""
    rows = values.size // SAMPLE_ROW
    if rows < DISTANCE_STRIDE:
        return values
    return values[: rows * SAMPLE_ROW].reshape(rows, SAMPLE_ROW)[::DISTANCE_STRIDE]


def _reason(exc: OSError) -> str:
    return exc.strerror or " ".join(str(exc).split())[:200] or type(exc).__name__
