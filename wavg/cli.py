"""Command-line interface: parse arguments, call the library, render results, map errors.

No averaging, ordering or file logic lives here. Results go to stdout (tables, ``--json``);
progress and errors go to stderr. Every failure wavg can explain ends as one line,
``wavg: error: <message>``, and an exit code: 0 ok, 1 failure, 2 usage, 130/143 interrupted.
"""

from __future__ import annotations

import signal
import sys

import click

from wavg.errors import EXIT_USAGE, WavgError

# ---------------------------------------------------------------------------------------------
# group and entry point


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="wavg")
def cli() -> None:
    """Average the weights of Keras checkpoints (Polyak-Ruppert averaging)."""


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: run the CLI and turn every known failure into one line."""
    _install_signal_handlers()
    try:
        cli.main(args=argv, prog_name="wavg", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.Abort:
        _fail("interrupted; no output was written")
        return 130
    except click.ClickException as exc:
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
        return 130
    return 0


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
# Both import TensorFlow/Keras only inside the command, so `wavg combine` never pays for it.


@cli.command("train-save")
@click.option("--epochs", type=int, default=500, show_default=True, help="Epochs to train.")
@click.option("--keep", type=int, default=10, show_default=True, help="Keep the last K epochs.")
@click.option(
    "--optimizer",
    type=click.Choice(["adam", "sgd"]),
    default=None,
    help="Built-in model only: adam (default) or sgd (lr 0.01, momentum 0.9).",
)
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
@click.option("--data", default="blobs", show_default=True, help="'blobs' or FILE.npz.")
@click.option("--model", "model_file", default=None, help="Train this compiled FILE.keras.")
@click.option("--custom-objects", default=None, help="Module defining the model's classes.")
@click.option("--trust-file", is_flag=True, help="Load --model even if it holds code.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary.")
def train_save_command(
    epochs: int,
    keep: int,
    optimizer: str | None,
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
    from wavg.train import train_save

    with _epoch_progress(enabled=not quiet) as progress:
        task = progress.add_task("training", total=epochs)
        result = train_save(
            out_dir,
            epochs=epochs,
            keep=keep,
            optimizer=optimizer,
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


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def _epoch_progress(enabled: bool):
    """A rich progress bar on an interactive stderr; renders nothing in pipes, CI or --quiet."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    console = _stderr_console()
    columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    show = enabled and console.is_terminal
    return Progress(*columns, console=console, transient=True, disable=not show)


if __name__ == "__main__":
    sys.exit(main())
