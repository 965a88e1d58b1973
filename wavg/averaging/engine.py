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

import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from wavg._runtime import signals_held
from wavg.averaging.onerun import distance_warnings
from wavg.averaging.ordering import epoch_numbers, order_checkpoints
from wavg.averaging.quantized import Requantizer, check_policy, mark_written, plan_quantized
from wavg.averaging.schemes import DEFAULT_ALPHA, raw_weights
from wavg.errors import (
    CheckpointError,
    CheckpointMismatch,
    NonFiniteValues,
    OutputError,
    UsageError,
)
from wavg.formats.registry import (
    Checkpoint,
    Tensor,
    expand_checkpoint_dirs,
    open_checkpoint,
    staged_output,
)
from wavg.storage.atomic import check_output_parent
from wavg.storage.descriptors import OPEN_FILES
from wavg.storage.globs import expand_inputs
from wavg.storage.locations import Location, as_location, identity_key

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

    def to_json(self) -> dict:
        """A JSON-ready dict; the schema is documented in the README and kept stable."""
        data = asdict(self)
        data["inputs"] = [
            {"path": str(p), "epoch": e, "weight": w}
            for p, e, w in zip(self.inputs, self.epochs, self.weights, strict=True)
        ]
        del data["epochs"], data["weights"]
        data["output"] = str(self.output)
        data["seconds"] = round(self.seconds, 6)
        return data


def plan_combine(
    paths: Sequence[str | os.PathLike[str]],
    *,
    scheme: str = "equal",
    alpha: float = DEFAULT_ALPHA,
    weights: Sequence[float] | None = None,
    order: str = "natural",
    last: int | None = None,
) -> CombinePlan:
    """Order the files (oldest first) and weight them; reads no file contents.

    Names may be URLs; quoted globs are expanded (see `wavg.storage.globs.expand_inputs`), and
    a directory of checkpoints (an OrbaxCheckpoint root) stands for its committed steps.
    Custom `weights` are in the final order, oldest first, after `last` is applied.
    """
    found, skipped = expand_checkpoint_dirs(expand_inputs(paths))
    ordered = order_checkpoints(found, order, last)
    if weights is not None:
        scheme = "custom"
    raw = raw_weights(len(ordered), "equal" if weights is not None else scheme, alpha, weights)
    normalised = raw / raw.sum()

    return CombinePlan(
        inputs=ordered,
        epochs=epoch_numbers(ordered),
        weights=[float(w) for w in normalised],
        raw_weights=[float(w) for w in raw],
        scheme=scheme,
        alpha=float(alpha) if scheme == "exp" else None,
        warnings=skipped,
    )


def combine(
    paths: Sequence[str | os.PathLike[str]],
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
) -> CombineSummary:
    """Average checkpoint files into `out` and return a summary.

    The newest file (last in epoch order) provides the architecture, config, metadata,
    non-float tensors and optimizer state; every float model weight is the weighted mean of
    all files. `out` is replaced atomically and never left partial. Raises a `WavgError`
    subclass for every problem with the request, the inputs or the output.

    Quantized layers (``model.quantize``) are refused unless `quantized` is
    ``"requantize"``: then int8/int4 kernels are dequantized, averaged and quantized again
    exactly as Keras would (see `wavg.averaging.quantized`).

    >>> combine(["model_498.h5", "model_499.h5"], "avg.h5", scheme="exp", alpha=2)  # doctest: +SKIP
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
) -> CombineSummary:
    """Carry out a `CombinePlan` (see `combine`).

    `on_ready` is called once every input has been opened and checked, before anything is
    written (the CLI prints its plan table there, so a bad input prints only its error).
    """
    started = time.perf_counter()
    out_location = as_location(out)
    check_policy(quantized)
    _refuse_output_among_inputs(out_location, plan.inputs)
    inputs: list[Checkpoint] = []  # filled as they open, so a failure closes those opened
    with staged_output(out_location) as out_path:
        check_output_parent(out_path)  # what the output may be is the format's to say, once opened
        # One open file per input, all or none (see wavg.storage.descriptors).
        kept_open = len(plan.inputs) if OPEN_FILES.take(len(plan.inputs)) else 0
        try:
            _open_inputs(plan.inputs, inputs, keep_open=kept_open > 0)
            newest = inputs[-1]
            requantizer = plan_quantized(inputs, plan.raw_weights, quantized, block_items)
            _check_compatible(inputs, out_path)
            if requantizer is not None:
                mark_written(newest, requantizer)
            averaged = [t for t in newest.tensors.values() if t.averaged]
            summary = CombineSummary(
                inputs=list(plan.inputs),
                epochs=list(plan.epochs),
                weights=list(plan.weights),
                scheme=plan.scheme,
                alpha=plan.alpha,
                output=out_location,
                format=newest.layout.name,
                tensors=len(averaged),
                copied_tensors=len(newest.tensors) - len(averaged),
                bytes_read=0,
                bytes_written=0,
                seconds=0.0,
                dry_run=dry_run,
                dropped_optimizer=drop_optimizer,
                requantized_layers=requantizer.layers if requantizer is not None else 0,
            )
            summary.warnings.extend(plan.warnings)
            summary.warnings.extend(_copied_weight_warnings(newest))
            if on_ready is not None:
                on_ready(summary)
            if not dry_run:
                _write_average(
                    inputs,
                    plan.raw_weights,
                    out_path,
                    summary,
                    allow_nonfinite,
                    drop_optimizer,
                    progress,
                    block_items,
                    requantizer,
                )
        finally:
            for ckpt in inputs:
                ckpt.close()
            OPEN_FILES.give_back(kept_open)
        summary.bytes_fetched = sum(c.file.bytes_fetched for c in inputs)
        summary.requests = sum(c.file.requests for c in inputs)
    summary.seconds = time.perf_counter() - started
    return summary


def _open_inputs(paths: list, opened: list[Checkpoint], keep_open: bool) -> None:
    """Open every input into `opened`, in order, so the first problem found is
    the oldest input's; without `keep_open` each gives back its descriptors after opening
    and reopens them per read. The oldest is walked and checked in full; every other input, the
    newest included, is verified against the oldest's checked structure rather than walked
    again, and walked only when that comparison fails (see Hdf5Checkpoint._predict_from). The
    newest's structure becomes the output's either way: a predicted one is the oldest's,
    byte for byte outside the tensors' values.
    """
    for i, path in enumerate(paths):
        ckpt = open_checkpoint(path, like=opened[0] if i > 0 else None)
        opened.append(ckpt)
        ckpt.trim()
        if not keep_open:
            ckpt.file.keep_open = False
            ckpt.release()


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


def _check_compatible(inputs: list[Checkpoint], out: Path) -> None:
    """All inputs share the newest's format and averaged tensors (names, shapes, dtypes)."""
    newest = inputs[-1]
    for ckpt in inputs[:-1]:
        if ckpt.layout != newest.layout:
            raise CheckpointMismatch(
                ckpt.path,
                f"is in {ckpt.layout.name} format but {newest.path} is in {newest.layout.name} "
                "format; all inputs must share one format",
            )
    if not newest.layout.accepts_output(out.name):
        wanted = " or ".join(newest.layout.suffixes)
        raise UsageError(
            f"output {out} must end in {wanted} for {newest.layout.name} inputs (Keras picks "
            "the format from the name)"
        )
    newest.check_output(out)
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


def _dtype_name(t: Tensor) -> str:
    return str(t.dtype) if t.dtype == t.storage else f"{t.dtype} (stored as {t.storage})"


def _write_average(
    inputs: list[Checkpoint],
    weights: list[float],
    out: Path,
    summary: CombineSummary,
    allow_nonfinite: bool,
    drop_optimizer: bool,
    progress: Progress | None,
    block_items: int,
    requantizer: Requantizer | None = None,
) -> None:
    newest = inputs[-1]
    layout = newest.layout
    averager = BlockAverager(inputs, weights, block_items, allow_nonfinite)

    def keep(name: str) -> bool:
        return not layout.is_optimizer(name)

    try:
        with newest.output(out, keep if drop_optimizer else None) as writer:
            for ckpt, _ in averager.members:
                ckpt.will_read(writer.order, len(averager.members))
            tensors = [newest.tensors[name] for name in writer.order]
            total = sum(t.nbytes for t in tensors) * len(averager.members)
            done = 0
            units = _ordered_blocks(averager, requantizer, tensors, newest, block_items)
            for tensor, start, data in units:
                writer.write(tensor, start, data)
                done += data.nbytes * len(averager.members)
                if progress is not None:
                    progress(done, total)
            summary.bytes_read = done
            for ckpt in inputs:
                ckpt.file.check_unchanged()
            summary.bytes_written = writer.finish()
        summary.warnings.extend(averager.one_run_warnings())
    except OSError as exc:
        raise OutputError(out, f"cannot write ({_reason(exc)})") from None


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
) -> Iterator[tuple[Tensor, int, np.ndarray]]:
    """Every block in file order: a requantized layer's tensors from the requantizer, the
    runs of other tensors between them from the averager (in units, see `plan_units`)."""
    if requantizer is None:
        yield from averager.blocks(plan_units(newest, tensors, block_items))
        return
    run: list[Tensor] = []
    for tensor in tensors:
        if requantizer.owns(tensor.name):
            if run:  # (each call starts a pool: none for the empty run between two layers)
                yield from averager.blocks(plan_units(newest, run, block_items))
            run = []
            yield from requantizer.blocks(tensor)
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
    and the sum is divided by the total weight once at the end. Memory is a
    few blocks per worker plus the blocks in flight, whatever the model size or input count.
    """

    def __init__(
        self,
        inputs: list[Checkpoint],
        weights: list[float],
        block_items: int,
        allow_nonfinite: bool,
    ) -> None:
        self.members = [(c, w) for c, w in zip(inputs, weights, strict=True) if w > 0]
        self.block_items = block_items
        self.allow_nonfinite = allow_nonfinite
        self._local = threading.local()
        # Sums, over every unit, of each member's squared distance to the newest member
        # and (last) of the newest's squared norm, on the items `_sample` picks.
        self.distances = np.zeros(len(self.members) + 1)

    def blocks(self, units: Iterable[Unit]) -> Iterator[tuple[Tensor, int, np.ndarray]]:
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

    def _collect(self, future: Future) -> list[tuple[Tensor, int, np.ndarray]]:
        pieces, distances = future.result()
        self.distances += distances
        return pieces

    def _buffers(self, dtype: type, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sum, term and read buffers for a unit of `count` items.

        Up to `block_items` items they are this thread's, reused from unit to unit. A larger
        unit (a whole chunk of a chunked format) gets a sum and a read buffer of its own,
        freed with it, so that no worker keeps the largest chunk's float64 sum for the rest
        of the run; the term buffer is used `block_items` items at a time either way.
        """
        cache = self._local.__dict__.setdefault("buffers", {})
        found = cache.get(dtype)
        if found is None:
            size = self.block_items
            found = (np.empty(size, dtype), np.empty(size, dtype), np.empty(size * 8, np.uint8))
            cache[dtype] = found
        if count <= self.block_items:
            return found
        return np.empty(count, dtype), found[1], np.empty(count * 8, np.uint8)

    def _average(
        self, unit: Unit, compare: bool
    ) -> tuple[list[tuple[Tensor, int, np.ndarray]], np.ndarray]:
        """Average `unit`; with `compare`, also measure each input's distance to the newest
        on a sample of it (see `DISTANCE_STRIDE`).

        Each input's block is added to the float64 sum as it is read and dropped before the
        next read (a chunked format hands over a fresh array per read); the compared
        samples (1/`DISTANCE_STRIDE` of a large unit) are kept until the newest's arrives
        last, so no input's whole block waits for it.
        """
        count = unit.count
        acc_dtype = _EXTENDED if unit.dtype == np.float64 else np.float64
        acc_buf, term_buf, scratch = self._buffers(acc_dtype, count)
        acc = acc_buf[:count]
        total = acc_dtype(0)
        last = len(self.members) - 1
        distances = np.zeros(last + 2)
        compare = compare and last > 0
        diff_dtype = np.float64 if unit.dtype == np.float64 else np.float32
        samples: list[np.ndarray] = []
        for i, (ckpt, w) in enumerate(self.members):
            block = unit.read(ckpt, scratch)
            if compare:
                samples.append(_sample(block).astype(diff_dtype).ravel())
            total += acc_dtype(w)
            if i == 0:
                if w == 1.0:
                    np.copyto(acc, block)
                else:
                    np.multiply(block, acc_dtype(w), out=acc)
            elif w == 1.0:
                np.add(acc, block, out=acc)
            else:
                for lo in range(0, count, term_buf.size):
                    hi = min(count, lo + term_buf.size)
                    term = term_buf[: hi - lo]
                    np.multiply(block[lo:hi], acc_dtype(w), out=term)
                    np.add(acc[lo:hi], term, out=acc[lo:hi])
            del block  # before the next read: a chunk may be all of a large array
        if compare:
            reference = samples[-1]
            for i, sample in enumerate(samples[:-1]):
                np.subtract(sample, reference, out=sample)
                distances[i] = _squared_norm(sample, sample)
            distances[-1] = _squared_norm(reference, reference)
        acc /= total
        # A sum is finite exactly when every term is (no overflow: |values| <= dtype max).
        if not self.allow_nonfinite and not np.isfinite(acc.sum()):
            self._raise_nonfinite(unit, scratch)
        out = np.empty(count, dtype=unit.dtype)
        np.copyto(out, acc, casting="unsafe")
        return list(unit.pieces(out.view(unit.storage))), distances

    def one_run_warnings(self) -> list[str]:
        """Warnings when an input is far from the newest (not one run; see wavg.averaging.onerun)."""
        paths = [Path(ckpt.path) for ckpt, _ in self.members]
        return distance_warnings(paths, list(self.distances[:-1]), float(self.distances[-1]))

    def _raise_nonfinite(self, unit: Unit, scratch: np.ndarray) -> None:
        """Name the first input (and tensor) whose part of `unit` holds NaN or Inf."""
        for ckpt, _ in self.members:
            block = unit.read(ckpt, scratch)
            for tensor, _, values in unit.pieces(block):
                if not np.isfinite(values.astype(np.float64)).all():
                    raise NonFiniteValues(
                        ckpt.path,
                        f"tensor {tensor.name} holds NaN or Inf values "
                        "(pass --allow-nonfinite to average it anyway)",
                    )
        names = ", ".join(t.name for t in unit.tensors[:3])
        raise CheckpointError(
            self.members[-1][0].path, f"the average of tensor {names} is not finite"
        )


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
