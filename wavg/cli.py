"""Command-line interface: parse arguments, call the library, render results, map errors.

No averaging, ordering or file logic lives here. Results go to stdout (tables, ``--json``);
progress and errors go to stderr. Every failure wavg can explain ends as one line,
``wavg: error: <message>``, and an exit code: 0 ok, 1 failure, 2 usage, 130/143 interrupted.
A failure to write stdout (a full disk, a closed pipe) is such a failure too (exit 1), saying
whether the output file was written.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import click

from wavg import _runtime

_runtime.one_blas_thread()  # first: it must run before numpy loads

from wavg import __version__
from wavg.averaging.engine import (
    CombinePlan,
    CombineSummary,
    WindowsPlan,
    WindowsSummary,
    plan_windows,
    run_plan,
    run_windows,
    window_outputs,
)
from wavg.averaging.ordering import ORDERS
from wavg.averaging.quantized import POLICIES
from wavg.averaging.schemes import DEFAULT_ALPHA, SCHEMES, parse_weight_list
from wavg.averaging.selection import parse_counts
from wavg.errors import EXIT_INTERRUPTED, EXIT_USAGE, CleanupWarning, UsageError, WavgError
from wavg.extras import missing_reported, require

if TYPE_CHECKING:
    from rich.console import Console

# rich is imported where it renders (its progress bars only on a terminal): start-up is a
# large part of the wall time of averaging a small model.
PROGRESS_MIN_BYTES = 64 << 20
PLAN_ROWS = 20

# ---------------------------------------------------------------------------------------------
# group and entry point


class _HelpToStdout(click.Command):
    """A command whose parsing (which prints --help and --version) reports a failed stdout
    in one line, as the commands do for their results (see `_stdout_guard`)."""

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        with _stdout_guard(None, "the help or version"):
            return super().make_context(*args, **kwargs)


class _WavgGroup(_HelpToStdout, click.Group):
    """A group whose every failure ends as one line on stderr and a documented exit code.

    Overriding `main` (rather than wrapping it in the console script) gives tests that use
    Click's CliRunner exactly what a user sees.
    """

    command_class = _HelpToStdout

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        def run() -> object:
            return super(_WavgGroup, self).main(
                args, prog_name, complete_var, standalone_mode=False, **extra
            )

        code = _run_reporting_errors(run)
        if standalone_mode:
            sys.exit(code)
        return code


@click.group(cls=_WavgGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", package_name="wavg")
def cli() -> None:
    """Average the weights of Keras checkpoints (Polyak-Ruppert averaging).

    \b
    Shell completion (bash; zsh and fish alike with zsh_source, fish_source):
      eval "$(_WAVG_COMPLETE=bash_source wavg)"
    """


def quiet_option(command: Callable[..., object]) -> Callable[..., object]:
    """The ``-q/--quiet`` flag every command takes: only errors, warnings and the results
    asked for (``--json``, ``--csv``, evaluate's table) are printed."""
    return click.option(
        "-q",
        "--quiet",
        is_flag=True,
        help="Print only errors, warnings and --json: no plan, progress, notes or summary.",
    )(command)


def order_option(command: Callable[..., object]) -> Callable[..., object]:
    """The ``--order`` flag of every command that takes checkpoints: how they are put oldest
    first (combine, evaluate and soup order them alike)."""
    return click.option(
        "--order",
        type=click.Choice(ORDERS),
        default="natural",
        show_default=True,
        help="natural: by the epoch number in the names; given: as listed. Last = newest.",
    )(command)


class _StdoutFailed(WavgError):
    """stdout could not be written (a full disk, a closed pipe) after the work was done."""

    def __init__(self, exc: OSError, written: str | None, what: str = "the summary") -> None:
        done = f"{written} was written" if written else "no file was written"
        reason = exc.strerror or type(exc).__name__
        super().__init__(f"could not write {what} to stdout ({reason}); {done}")


def _result(text: str, written: str | None, nl: bool = True) -> None:
    """Print `text` on stdout; a failed write becomes one error line saying whether the
    output, `written` (None: no file), was written (see `_stdout_guard`)."""
    with _stdout_guard(written):
        click.echo(text, nl=nl)


@contextlib.contextmanager
def _stdout_guard(written: str | None, what: str = "the summary") -> Iterator[None]:
    """Turn a failed write to stdout into `_StdoutFailed` (and silence stdout)."""
    try:
        yield
        sys.stdout.flush()
    except OSError as exc:
        _silence_stdout()
        raise _StdoutFailed(exc, written, what) from None


def _silence_stdout() -> None:
    """Point a failed stdout at the null device, so that Python's own flush at exit does not
    fail (and print a traceback-like message) a second time."""
    with contextlib.suppress(AttributeError, OSError, ValueError):
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)


def needs_extra(extra: str) -> Callable[[Callable[..., object]], Callable[..., object]]:
    """Mark a command as needing an optional extra ("keras", "s3", "gcs", "orbax").

    Put it right above the command's function (below its options)::

        @cli.command("soup")
        @click.option(...)
        @needs_extra("keras")
        def soup_command(...): ...

    Before the command runs, every module of the extra must be importable (for "keras", with
    the backend KERAS_BACKEND selects); a later failed import of one of them is reported the
    same way: ``wavg: error: wavg soup needs keras, which is not installed; install it with:
    pip install '.[keras]'``, exit 2. `wavg --help` and `wavg soup --help` work regardless.
    """

    def decorate(command: Callable[..., object]) -> Callable[..., object]:
        @functools.wraps(command)
        def run(*args: object, **kwargs: object) -> object:
            what = click.get_current_context().command_path
            require(extra, what)
            with missing_reported(extra, what):
                return command(*args, **kwargs)

        return run

    return decorate


def _selection_options(by_help: str, best: bool = True) -> Callable[..., object]:
    """The options that choose inputs from the training record (docs/selection.md), shared by
    combine and (without --best: its rows are every n) evaluate; the command receives them
    as one ``selection`` dict of `wavg.plan_windows` / `wavg.evaluate.evaluate` arguments."""
    options = [
        click.option("--by", metavar="METRIC[:min|:max]", help=by_help),
        click.option(
            "--every",
            type=click.IntRange(min=1),
            help="Keep every K-th epoch back from the newest (applied first).",
        ),
        click.option(
            "--metrics",
            type=click.Path(dir_okay=False),
            help="--by values from a CSVLogger CSV or History JSON (else from the names).",
        ),
        click.option(
            "--metrics-epoch-base",
            type=click.Choice(["0", "1"]),
            default="1",
            show_default=True,
            help="1: a file named epoch E is row E-1 (ModelCheckpoint); 0: row E.",
        ),
    ]
    if best:
        options.insert(
            0,
            click.option(
                "--best", metavar="N[,N...]", help="Keep the N best by --by (several N: one each)."
            ),
        )

    def decorate(command: Callable[..., object]) -> Callable[..., object]:
        @functools.wraps(command)
        def run(*args: object, metrics_epoch_base: str, **kwargs: object) -> object:
            chosen = {k: kwargs.pop(k) for k in ("by", "every", "metrics")}
            chosen["metrics_epoch_base"] = int(metrics_epoch_base)
            if best:
                counts = kwargs.pop("best")
                chosen["best"] = parse_counts(counts, "--best") if counts is not None else None
            return command(*args, selection=chosen, **kwargs)

        for option in reversed(options):
            run = option(run)
        return run

    return decorate


# ---------------------------------------------------------------------------------------------
# combine


@cli.command(short_help="Average checkpoints into one checkpoint.")
@click.argument(
    "checkpoints", nargs=-1, required=True, type=click.Path(path_type=str, readable=False)
)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(path_type=str),
    help="Averaged checkpoint to write (same format as the inputs).",
)
@click.option(
    "--scheme",
    type=click.Choice(SCHEMES),
    default=None,
    help="Weighting: equal (default); linear or exp, newest weighted most; wsm-*, weights "
    "that emulate a decay (not newest-most: 1-sqrt weights the oldest most, cosine the middle).",
)
@click.option(
    "--alpha",
    type=float,
    default=None,
    help=f"Decay of --scheme exp: weight exp(-i/alpha), i=1 newest. Default {DEFAULT_ALPHA}.",
)
@click.option(
    "--weights",
    "weight_list",
    metavar="W1,W2,...",
    default=None,
    help="Custom weights, one per checkpoint, oldest first (normalised to sum 1).",
)
@click.option(
    "--last",
    metavar="N[,N...]",
    default=None,
    help="Average only the N newest checkpoints (several N: one output each, -o with {n}).",
)
@_selection_options("Rank by this metric (min for names with loss/error, else max).")
@order_option
@click.option("--dry-run", is_flag=True, help="Check the inputs and print the plan; write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout.")
@click.option("--allow-nonfinite", is_flag=True, help="Average tensors that hold NaN or Inf.")
@click.option("--drop-optimizer", is_flag=True, help="Leave the optimizer state out of the output.")
@click.option(
    "--quantized",
    type=click.Choice(POLICIES),
    default="refuse",
    show_default=True,
    help="Quantized (int8/int4) inputs: refuse them, or dequantize, average and requantize.",
)
@click.option(
    "--max-shard-size",
    "max_shard_gb",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    metavar="GB",
    help="Shards of a .weights.json output, as Keras' max_shard_size (default 5 GB).",
)
@click.option(
    "--part",
    "part_text",
    metavar="I/N",
    default=None,
    help="Write only part I of N of a .weights.json output; then run wavg commit.",
)
@click.option(
    "--dask",
    "dask_address",
    metavar="ADDRESS",
    default=None,
    help="Run the parts on a Dask cluster (tcp://HOST:PORT, or local:K workers) and commit.",
)
@quiet_option
def combine(
    checkpoints: tuple[str, ...],
    output: str,
    scheme: str | None,
    alpha: float | None,
    weight_list: str | None,
    last: str | None,
    selection: dict,
    order: str,
    dry_run: bool,
    as_json: bool,
    allow_nonfinite: bool,
    drop_optimizer: bool,
    quantized: str,
    max_shard_gb: float | None,
    part_text: str | None,
    dask_address: str | None,
    quiet: bool,
) -> None:
    """Average CHECKPOINTS (one training run's last epochs) into one checkpoint.

    Each of CHECKPOINTS is a file (.h5, .weights.h5, .keras, .weights.json), a quoted glob
    ('ckpt/*.h5', expanded by wavg, also in buckets), an s3:// or gs:// URL, a folder holding
    an unzipped .keras model, or an Orbax checkpoint root (standing for its steps).

    \b
    Example:
      wavg combine --scheme exp --alpha 2 model_49*.h5 -o avg.h5
      wavg combine --best 5 --by val_loss ckpt/*.h5 -o best5.h5
    """
    if weight_list is not None and scheme is not None:
        raise UsageError("give either --scheme or --weights, not both")
    if alpha is not None and scheme != "exp":
        raise UsageError("--alpha applies only to --scheme exp")
    weights = parse_weight_list(weight_list) if weight_list is not None else None
    part = _parse_part(part_text) if part_text is not None else None
    if dask_address is not None and part is not None:
        raise UsageError("give either --dask or --part, not both")
    plans = plan_windows(
        checkpoints,
        scheme=scheme or "equal",
        alpha=DEFAULT_ALPHA if alpha is None else alpha,
        weights=weights,
        order=order,
        last=parse_counts(last, "--last") if last is not None else None,
        **selection,
    )
    outputs = window_outputs(output, plans)
    if len(plans.windows) > 1:
        if part is not None or dask_address is not None:
            raise UsageError("--part and --dask write one output; give one --last or --best count")
        run = dict(
            allow_nonfinite=allow_nonfinite,
            drop_optimizer=drop_optimizer,
            quantized=quantized,
            max_shard_gb=max_shard_gb,
        )
        _combine_windows(plans, outputs, dry_run, as_json, quiet, run)
        return
    (plan,) = plans.windows
    output = outputs[0]
    shown: list[str] = []

    def on_ready(summary: CombineSummary) -> None:
        shown.extend(summary.warnings)
        if quiet:
            for warning in summary.warnings:
                _warn(warning)
            return
        _render_plan(plan, summary.warnings)
        if len(plan.inputs) == 1:
            _note(
                f"one checkpoint given: {summary.output} holds the weights of "
                f"{plan.inputs[0]} unchanged; pass two or more to average them"
            )

    if dask_address is not None and not dry_run:
        from wavg.averaging.distributed import combine_on_dask

        with _progress_bar(enabled=not quiet, unit="parts") as progress:
            summary = combine_on_dask(
                plan,
                output,
                dask_address,
                allow_nonfinite=allow_nonfinite,
                drop_optimizer=drop_optimizer,
                max_shard_gb=max_shard_gb,
                progress=progress,
                on_ready=on_ready,
            )
    else:
        with _progress_bar(enabled=not quiet) as progress:
            summary = run_plan(
                plan,
                output,
                allow_nonfinite=allow_nonfinite,
                drop_optimizer=drop_optimizer,
                dry_run=dry_run,
                progress=progress,
                quantized=quantized,
                on_ready=on_ready,
                max_shard_gb=max_shard_gb,
                part=part or ((1, 1) if dask_address is not None else None),
            )
    for warning in summary.warnings[len(shown) :]:  # found while averaging (one run?)
        _warn(warning)
    written = None if dry_run else str(summary.output)
    if as_json:
        _result(json.dumps(summary.to_json(), indent=2), written)
    elif quiet:
        return
    elif dry_run:
        _result(
            f"dry run: would write {summary.output} ({summary.format}, {summary.tensors} tensors "
            f"averaged, {summary.copied_tensors} copied); nothing written",
            written,
        )
    else:
        requantized = (
            f", {summary.requantized_layers} quantized layers requantized"
            if summary.requantized_layers
            else ""
        )
        part_of = f"part {summary.part} of " if summary.part else ""
        _result(
            f"wrote {part_of}{summary.output} ({summary.format}, {summary.tensors} tensors averaged"
            f"{requantized}, "
            f"{summary.copied_tensors} copied, {_size(summary.bytes_written)}) "
            f"in {summary.seconds:.2f} s",
            written,
        )


def _parse_part(text: str) -> tuple[int, int]:
    from wavg.averaging.partition import parse_part

    try:
        return parse_part(text)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


@cli.command(short_help="Join the parts of a --part run into one sharded output.")
@click.argument("output", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout.")
@quiet_option
def commit(output: str, as_json: bool, quiet: bool) -> None:
    """Join the N parts that `wavg combine --part I/N -o OUTPUT` wrote into OUTPUT.

    \b
    Example:
      wavg commit avg.weights.json
    """
    from wavg.averaging.partition import commit as commit_parts

    summary = commit_parts(output)
    if as_json:
        _result(json.dumps(summary.to_json(), indent=2), str(summary.output))
    elif not quiet:
        _result(
            f"committed {summary.output} ({summary.parts} parts, {summary.shards} shards, "
            f"{_size(summary.bytes_written)}) in {summary.seconds:.2f} s",
            str(summary.output),
        )


def _combine_windows(
    plans: WindowsPlan,
    outputs: list[str],
    dry_run: bool,
    as_json: bool,
    quiet: bool,
    run: dict,
) -> None:
    """combine for several windows: one plan table and one output per window, one pass;
    `run` holds the other `run_windows` options."""

    shown: list[int] = []  # warnings printed with each window's plan

    def on_ready(ready: WindowsSummary) -> None:
        for plan, summary in zip(plans.windows, ready.windows, strict=True):
            shown.append(len(summary.warnings))
            if quiet:
                for warning in summary.warnings:
                    _warn(warning)
            else:
                _render_plan(plan, summary.warnings, f" -> {summary.output}")

    with _progress_bar(enabled=not quiet) as progress:
        result = run_windows(
            plans, outputs, dry_run=dry_run, progress=progress, on_ready=on_ready, **run
        )
    for summary, printed in zip(result.windows, shown, strict=True):
        for warning in summary.warnings[printed:]:  # found while averaging (one run?)
            _warn(warning)
    written = None if dry_run else ", ".join(str(s.output) for s in result.windows)
    if as_json:
        _result(json.dumps(result.to_json(), indent=2), written)
        return
    if quiet:
        return
    verb = "would write" if dry_run else "wrote"
    lines = [f"{verb} {s.output} ({len(s.inputs)} inputs)" for s in result.windows]
    if not dry_run:
        lines.append(
            f"{len(result.windows)} windows in one pass: read {_size(result.bytes_read)}, "
            f"wrote {_size(result.bytes_written)} in {result.seconds:.2f} s"
        )
    _result("\n".join(lines), written)


def _on_terminal() -> bool:
    """Whether stderr is a terminal (False when it is closed or missing)."""
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


@functools.cache
def _stderr() -> Console:
    """The console for tables, warnings and progress on stderr (created on first use)."""
    from rich.console import Console

    return Console(stderr=True)


def _render_plan(plan: CombinePlan, warnings: list[str], target: str = "") -> None:
    """The plan as a table on stderr: drawn by rich on a terminal, plain aligned columns in
    a log or pipe (loading and running rich costs ~30 ms, a sixth of averaging a small
    model, for a table nobody watches). With --by, the metric's value is beside each input."""
    alpha = f" (alpha {plan.alpha:g})" if plan.alpha is not None else ""
    title = f"wavg combine: {plan.scheme}{alpha}{target}"
    values = plan.values or [None] * len(plan.inputs)
    header = ("#", "checkpoint", "epoch", *([plan.metric] if plan.metric else []), "weight")
    one_directory = len({p.parent for p in plan.inputs}) == 1
    caption = f"in {plan.inputs[0].parent}" if one_directory else None
    rows = list(zip(plan.inputs, plan.epochs, values, plan.weights, strict=True))
    shown = list(range(len(rows)))
    if len(rows) > PLAN_ROWS:  # e.g. a thousand inputs: the oldest few, then the newest
        shown = [*range(3), -1, *range(len(rows) - PLAN_ROWS + 4, len(rows))]
    cells = []
    for i in shown:
        if i < 0:
            cells.append(("…", f"({len(rows) - PLAN_ROWS + 1} more)", *[""] * (len(header) - 2)))
            continue
        path, epoch, value, weight = rows[i]
        name = path.name if one_directory else str(path)
        label = f"{name} (newest)" if i == len(rows) - 1 else name
        shown_value = [] if plan.metric is None else [f"{value:.6g}"]
        epoch_text = "" if epoch is None else str(epoch)
        cells.append((str(i + 1), label, epoch_text, *shown_value, f"{weight:.4f}"))
    if not _on_terminal():
        widths = [max(len(row[c]) for row in [header, *cells]) for c in range(len(header))]
        lines = [title]
        for row in [header, *cells]:
            texts = [
                text.rjust(w) if c != 1 else text.ljust(w)
                for c, (text, w) in enumerate(zip(row, widths, strict=True))
            ]
            lines.append(("  " + "  ".join(texts)).rstrip())
        if caption:
            lines.append(caption)
        click.echo("\n".join(lines), err=True)
        for warning in warnings:
            _warn(warning)
        return
    from rich.table import Table

    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    for column in header:
        table.add_column(column, justify="left" if column == "checkpoint" else "right")
    table.columns[1].overflow = "fold"
    for row in cells:
        table.add_row(*row)
    _stderr().print(table)
    for warning in warnings:
        _warn(warning)


def _note(note: str) -> None:
    """A note on stderr (what wavg did that the user may not expect; not a problem)."""
    click.echo(f"wavg: note: {note}", err=True)


def _warn(warning: str) -> None:
    """A warning on stderr: wrapped to a terminal's width, one line in a log."""
    if _on_terminal():
        _stderr().print(f"wavg: warning: {warning}", markup=False, highlight=False)
    else:
        click.echo(f"wavg: warning: {warning}", err=True)


@contextlib.contextmanager
def _progress_bar(
    enabled: bool, unit: str = "bytes"
) -> Iterator[Callable[[int, int], None] | None]:
    """A progress bar on stderr, only on a terminal and only for work worth watching; in
    bytes, or in parts done (a --dask run, fed by task completion)."""
    if not enabled or not _on_terminal() or not _stderr().is_terminal:
        yield None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    parts = unit == "parts"
    with Progress(
        TextColumn("averaging parts" if parts else "averaging"),
        BarColumn(),
        MofNCompleteColumn() if parts else DownloadColumn(),
        TimeRemainingColumn(),
        console=_stderr(),
        transient=True,
    ) as bar:
        task = None

        def update(done: int, total: int) -> None:
            nonlocal task
            if total < PROGRESS_MIN_BYTES and not parts:
                return
            if task is None:
                task = bar.add_task("averaging", total=total)
            bar.update(task, completed=done)

        yield update


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point."""
    _install_signal_handlers()
    _report_cleanup_warnings()
    return cli.main(args=argv, prog_name="wavg", standalone_mode=False)


def _run_reporting_errors(run: Callable[[], object]) -> int:
    """Run the CLI; turn every failure wavg knows into one line and an exit code."""
    try:
        result = run()
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.Abort:
        _fail("interrupted; no output was written")
        return EXIT_INTERRUPTED
    except click.ClickException as exc:
        if type(exc).__name__ == "NoArgsIsHelpError" and exc.ctx is not None:
            click.echo(exc.ctx.get_help(), err=True)  # bare `wavg`: show what it can do
            return EXIT_USAGE
        hint = ""
        if isinstance(exc, click.UsageError) and exc.ctx is not None:
            hint = f" (see '{exc.ctx.command_path} --help')"
        _fail(f"{exc.format_message()}{hint}")
        return exc.exit_code if exc.exit_code else EXIT_USAGE
    except WavgError as exc:
        _fail(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        _fail("interrupted; no output was written")
        return EXIT_INTERRUPTED
    return result if isinstance(result, int) else 0


def _report_cleanup_warnings() -> None:
    """A cleanup that failed after a commit (`CleanupWarning`, e.g. from `wavg commit` or a
    --dask run's commit) is one ``wavg: warning:`` line like every other warning."""
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, CleanupWarning):
            _warn(str(message))
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def _fail(message: str) -> None:
    first_line = " ".join(message.split())
    click.echo(f"wavg: error: {first_line}", err=True)


def _install_signal_handlers() -> None:
    """SIGTERM unwinds like Ctrl-C so temporary files are removed; SIGXFSZ becomes an error."""

    def _terminate(signum: int, frame: object) -> None:
        from wavg.errors import EXIT_TERMINATED, Interrupted

        raise Interrupted("SIGTERM", EXIT_TERMINATED)

    signal.signal(signal.SIGTERM, _terminate)
    if hasattr(signal, "SIGXFSZ"):
        # Past a file-size limit, write() then fails with EFBIG instead of killing the process.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


# --- train-save and evaluate ---
# Both import Keras only inside the command, so `wavg combine` never pays for it, and both need
# the `keras` extra (see `needs_extra`).


@cli.command("train-save", short_help="Train the case-study model; keep its last epochs.")
@click.option("--epochs", type=int, default=500, show_default=True, help="Epochs to train.")
@click.option("--keep", type=int, default=10, show_default=True, help="Keep the last K epochs.")
@click.option(
    "--optimizer",
    type=click.Choice(["adam", "sgd"]),
    default=None,
    help="Built-in model only: adam (default) or sgd (lr 0.01, momentum 0.9).",
)
@click.option(
    "--lr",
    "learning_rate",
    type=float,
    default=None,
    help="Built-in model only: constant learning rate (adam 0.001, sgd 0.01).",
)
@click.option("--batch-size", type=int, default=32, show_default=True, help="Batch size.")
@click.option("--seed", type=int, default=None, help="Make the run deterministic.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["h5", "keras", "weights.h5"]),
    default="h5",
    show_default=True,
    help="Checkpoint format: legacy .h5 model, .keras model, or .weights.h5.",
)
@click.option("--out-dir", default="checkpoints", show_default=True, help="Where to save.")
@click.option("--data", default="blobs", show_default=True, help="'blobs', 'digits' or FILE.npz.")
@click.option("--model", "model_file", default=None, help="Train this compiled FILE.keras.")
@click.option("--custom-objects", default=None, help="Module defining the model's classes.")
@click.option("--trust-file", is_flag=True, help="Load --model even if it holds code.")
@quiet_option
@needs_extra("keras")
def train_save_command(
    epochs: int,
    keep: int,
    optimizer: str | None,
    learning_rate: float | None,
    batch_size: int,
    seed: int | None,
    fmt: str,
    out_dir: str,
    data: str,
    model_file: str | None,
    custom_objects: str | None,
    trust_file: bool,
    quiet: bool,
) -> None:
    """Train the case-study model (or --model) and keep its last K epochs as checkpoints."""
    from wavg.workflows.train import train_save

    with _step_progress(enabled=not quiet) as progress:
        task = progress.add_task("training", total=epochs)
        result = train_save(
            out_dir,
            epochs=epochs,
            keep=keep,
            optimizer=optimizer,
            learning_rate=learning_rate,
            batch_size=batch_size,
            seed=seed,
            fmt=fmt,
            data=data,
            model=model_file,
            custom_objects=custom_objects,
            trust=trust_file,
            on_epoch=lambda done, total, logs: progress.update(task, completed=done),
        )
    if not quiet:
        scores = ", ".join(f"{name} {value:.4f}" for name, value in result.metrics.items())
        click.echo(
            f"saved {len(result.files)} checkpoints {result.files[0].name} ... "
            f"{result.files[-1].name} in {result.files[0].parent} "
            f"({result.epochs} epochs in {result.seconds:.1f} s; last epoch: {scores})"
        )


@cli.command(
    "evaluate",
    no_args_is_help=True,
    short_help="Score checkpoints, averages, soup and ensemble per n.",
)
@click.argument("checkpoints", nargs=-1, required=True)
@click.option("--data", default="blobs", show_default=True, help="'blobs', 'digits' or FILE.npz.")
@click.option("--schemes", default="equal,linear,exp", show_default=True, help="Averages.")
@click.option("--alpha", type=float, default=2.0, show_default=True, help="Decay of 'exp'.")
@click.option("--alphas", default=None, help="Extra exp columns, e.g. 0.5,1,2,4,8.")
@click.option("--max-n", type=int, default=None, help="Evaluate n = 1 ... N (default: all).")
@_selection_options("Add best:<average> columns: the n best by METRIC.", best=False)
@click.option("--no-ensemble", is_flag=True, help="Skip the output-averaging column.")
@click.option(
    "--soup-data",
    default=None,
    help="Held-out FILE.npz (x_test, y_test) the greedy soup is chosen on; not --data. "
    "Default with --data blobs: the blobs validation split.",
)
@click.option("--no-greedy", is_flag=True, help="Skip the greedy-soup column.")
@click.option(
    "--bn-data",
    default=None,
    help="'blobs', 'digits' or FILE.npz: add each average after bn-update on its x_train (name+bn).",
)
@click.option("--metric", default=None, help="Score to show (default: accuracy, else loss).")
@click.option("--plot", "plot_path", default=None, help="Save a plot to FILE.png.")
@click.option("--json", "as_json", is_flag=True, help="JSON on stdout (wavg.evaluate/1).")
@click.option("--csv", "as_csv", is_flag=True, help="CSV on stdout, one score per line.")
@click.option("--model", "model_file", default=None, help="Architecture (FILE.keras).")
@click.option("--custom-objects", default=None, help="Module defining the model's classes.")
@click.option("--trust-file", is_flag=True, help="Load files even if they hold code.")
@order_option
@quiet_option
@needs_extra("keras")
def evaluate_command(
    checkpoints: tuple[str, ...],
    data: str,
    schemes: str,
    alpha: float,
    alphas: str | None,
    max_n: int | None,
    selection: dict,
    no_ensemble: bool,
    soup_data: str | None,
    no_greedy: bool,
    bn_data: str | None,
    metric: str | None,
    plot_path: str | None,
    as_json: bool,
    as_csv: bool,
    model_file: str | None,
    custom_objects: str | None,
    trust_file: bool,
    order: str,
    quiet: bool,
) -> None:
    """Score single checkpoints, weight averages, the greedy soup and the ensemble of the n
    newest, n = 1...N."""
    from wavg.workflows.evaluate import evaluate, parse_list
    from wavg.workflows.plot import check_plot_path, plot_evaluation

    if as_json and as_csv:
        raise UsageError("give --json or --csv, not both")
    if plot_path is not None:
        check_plot_path(plot_path)
    with _step_progress(enabled=not quiet) as progress:
        task = progress.add_task("evaluating", total=None)
        result = evaluate(
            checkpoints,
            data=data,
            schemes=parse_list(schemes, "--schemes"),
            alpha=alpha,
            alphas=parse_list(alphas, "--alphas", float),
            max_n=max_n,
            ensemble=not no_ensemble,
            greedy=not no_greedy,
            soup_data=soup_data,
            bn_data=bn_data,
            model=model_file,
            custom_objects=custom_objects,
            trust=trust_file,
            order=order,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
            **selection,
        )
    for warning in result.warnings:
        click.echo(f"wavg: warning: {warning}", err=True)
    metric = result.check_metric(metric)
    if plot_path is not None:
        plot_evaluation(result, plot_path, metric)
    if as_json:
        _result(result.to_json(), plot_path)
    elif as_csv:
        _result(result.to_csv(), plot_path, nl=False)
    else:
        with _stdout_guard(plot_path):
            _render_evaluation(result, metric)
        if plot_path is not None and not quiet:
            click.echo(f"plot saved to {plot_path}", err=True)


@cli.command(
    "bn-update",
    no_args_is_help=True,
    short_help="Recompute an average's BatchNorm statistics on data.",
)
@click.argument("avg")
@click.option(
    "--data", required=True, help="Training inputs: 'blobs', 'digits' or FILE.npz (x_train)."
)
@click.option("-o", "--output", required=True, help="Checkpoint to write (AVG's format).")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Batch size.")
@click.option("--model", "model_file", default=None, help="Architecture for a .weights.h5 AVG.")
@click.option("--custom-objects", default=None, help="Module defining the model's classes.")
@click.option("--trust-file", is_flag=True, help="Load files even if they hold code.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary.")
@quiet_option
@needs_extra("keras")
def bn_update_command(
    avg: str,
    data: str,
    output: str,
    batch_size: int,
    model_file: str | None,
    custom_objects: str | None,
    trust_file: bool,
    as_json: bool,
    quiet: bool,
) -> None:
    """Recompute the BatchNormalization statistics of AVG (an averaged model) on training data.

    \b
    Example:
      wavg bn-update avg.keras --data train.npz -o avg_bn.keras
    """
    from wavg.workflows.bn_update import bn_update

    result = bn_update(
        avg,
        data,
        output,
        model=model_file,
        batch_size=batch_size,
        custom_objects=custom_objects,
        trust=trust_file,
    )
    if result.frozen and not quiet:
        _note(
            f"left {len(result.frozen)} frozen BatchNormalization layer(s) "
            f"alone (trainable=False): {', '.join(result.frozen)}"
        )
    written = None if result.output is None else output
    if as_json:
        _result(json.dumps(result.to_json(), indent=2), written)
    elif quiet:
        return
    elif result.output is None:
        _note(
            f"{avg} has no trainable BatchNormalization layer; nothing to "
            f"recalibrate, {output} not written"
        )
    else:
        _result(
            f"wrote {output} ({len(result.updated)} BatchNormalization layer(s) recalibrated "
            f"on {result.samples} samples in {result.batches} batches, "
            f"{_size(result.bytes_written)}) in {result.seconds:.2f} s",
            written,
        )


@cli.command(
    "soup",
    no_args_is_help=True,
    short_help="Average the checkpoints a greedy soup picks on held-out data.",
)
@click.argument("checkpoints", nargs=-1, required=True)
@click.option(
    "--data",
    required=True,
    help="Held-out data to choose on: 'blobs' or 'digits' (their validation splits) or "
    "VAL.npz (x_test, y_test).",
)
@click.option("-o", "--output", required=True, help="The soup to write (the inputs' format).")
@click.option("--metric", default=None, help="Score to choose by (default: accuracy, else loss).")
@click.option(
    "--bn-data", default=None, help="Recalibrate BatchNorm on 'blobs', 'digits' or FILE.npz."
)
@click.option("--batch-size", type=int, default=32, show_default=True, help="For --bn-data.")
@order_option
@click.option("--json", "as_json", is_flag=True, help="JSON on stdout (wavg.soup/1).")
@click.option("--model", "model_file", default=None, help="Architecture (FILE.keras).")
@click.option("--custom-objects", default=None, help="Module defining the model's classes.")
@click.option("--trust-file", is_flag=True, help="Load files even if they hold code.")
@quiet_option
@needs_extra("keras")
def soup_command(
    checkpoints: tuple[str, ...],
    data: str,
    output: str,
    metric: str | None,
    bn_data: str | None,
    batch_size: int,
    order: str,
    as_json: bool,
    model_file: str | None,
    custom_objects: str | None,
    trust_file: bool,
    quiet: bool,
) -> None:
    """Average the checkpoints a greedy soup picks on held-out data into one checkpoint.

    \b
    Example:
      wavg soup ckpt/model_49*.h5 --data blobs -o soup.h5
    """
    from wavg.workflows.soup import soup

    def show(step, path) -> None:
        if not quiet:
            verdict = "kept" if step.kept else "left out"
            click.echo(f"soup: {path.name:<24} {step.score:.4f}  {verdict}", err=True)

    result = soup(
        checkpoints,
        data,
        output,
        metric=metric,
        bn_data=bn_data,
        batch_size=batch_size,
        model=model_file,
        custom_objects=custom_objects,
        trust=trust_file,
        order=order,
        on_step=show,
    )
    for warning in result.warnings:
        click.echo(f"wavg: warning: {warning}", err=True)
    if as_json:
        _result(json.dumps(result.to_json(), indent=2), output)
        return
    if quiet:
        return
    best = result.best_single
    _result(
        f"wrote {output}: the average of {len(result.ingredients)} of {len(result.members)} "
        f"checkpoints; {result.metric} on {result.data}: soup {result.soup_score:.4f}, "
        f"best single {result.single_scores[best]:.4f} ({result.members[best].name}), "
        f"uniform average {result.uniform_score:.4f}",
        output,
    )


def _render_evaluation(result, metric: str) -> None:
    """`metric` per n and column; each column's best in bold with '*' (unless flat)."""
    from rich.console import Console
    from rich.table import Table

    from wavg.workflows.evaluate import higher_is_better

    direction = "higher" if higher_is_better(metric) else "lower"
    table = Table(title=f"test {metric} on {result.data} ({direction} is better, * best)")
    if result.best_by is not None:  # row n: --last n (an average) beside --best n (best:...)
        table.caption = f"best:<average> averages the n best by {result.best_by}, not the n newest"
    table.add_column("n", justify="right")
    table.add_column("epoch", justify="right")
    for column in result.columns:
        table.add_column(column, justify="right")
    # Compared as shown (4 decimals), so a mark never hangs on an invisible difference.
    shown = {c: [f"{row[c][metric]:.4f}" for row in result.scores] for c in result.columns}
    best = {c: f"{result.best(c, metric)[1]:.4f}" for c in result.columns}
    for n in range(1, len(result.scores) + 1):
        cells = []
        for column in result.columns:
            text = shown[column][n - 1]
            marked = len(set(shown[column])) > 1 and text == best[column]
            cells.append(f"[bold]{text}*[/]" if marked else f"{text} ")
        epoch = result.epochs[-n]
        table.add_row(str(n), "" if epoch is None else str(epoch), *cells)
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # a pipe or file: never squeeze the columns to 80
    console.print(table)


def _step_progress(enabled: bool):
    """A rich progress bar on an interactive stderr; renders nothing in pipes, CI or --quiet."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    show = enabled and _stderr().is_terminal
    return Progress(*columns, console=_stderr(), transient=True, disable=not show)


if __name__ == "__main__":
    sys.exit(main())
