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


if __name__ == "__main__":
    sys.exit(main())
