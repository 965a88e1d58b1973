"""The optional dependencies (pip extras) of wavg, and the one-line error when one is missing.

A plain ``pip install .`` (in wavg's source folder; wavg is not on PyPI) brings only what `wavg combine` needs on local files; the Keras-side
commands, remote storage and Orbax need an extra. This module only asks importlib where a
module would be found: it never imports an optional dependency itself.

A CLI command declares its extra with `wavg.cli.needs_extra`. Library code that needs one
only for some inputs (say an ``s3://`` URL given to `combine`) calls
``require("s3", "reading s3://bucket/run/")`` before it touches them, or wraps the lazy import
in ``with missing_reported("s3", ...)``; both raise `MissingExtra` (exit 2, one line).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from collections.abc import Iterator

from wavg.errors import UsageError

# The modules each extra provides (import names, not pip names). For "keras" the module of the
# selected Keras backend is added by `modules_of`.
EXTRAS: dict[str, tuple[str, ...]] = {
    "keras": ("keras", "sklearn", "matplotlib"),
    "s3": ("fsspec", "s3fs"),
    "gcs": ("fsspec", "gcsfs"),
    "orbax": ("tensorstore",),
    "dask": ("dask", "distributed"),
}
# Keras backends: the module Keras imports for each, and the pip install that brings it.
_BACKEND_MODULES = {
    "tensorflow": "tensorflow",
    "jax": "jax",
    "torch": "torch",
    "openvino": "openvino",
}
_BACKEND_INSTALLS = {
    "tensorflow": "pip install '.[keras]'",
    "jax": "pip install '.[keras-jax]'",
}


class MissingExtra(UsageError):
    """A command needs an optional dependency that is not installed (exit 2, like a usage error).

    The message names what needed it, the missing module and the exact pip command.
    """

    def __init__(self, what: str, module: str, install: str) -> None:
        self.what, self.module, self.install = what, module, install
        role = " (the Keras backend)" if module in _BACKEND_MODULES.values() else ""
        where = " in wavg's source folder" if install.startswith("pip install '.") else ""
        super().__init__(
            f"{what} needs {module}{role}, which is not installed; install it with: "
            f"{install}{where}"
        )


def keras_backend() -> str:
    """The backend Keras will use, decided as Keras decides it, without importing Keras.

    ``KERAS_BACKEND`` wins; else the ``backend`` of ``$KERAS_HOME/keras.json`` (``~/.keras``);
    else TensorFlow.
    """
    chosen = os.environ.get("KERAS_BACKEND")
    if chosen:
        return chosen
    home = os.environ.get("KERAS_HOME")
    if home is None:
        base = os.path.expanduser("~")
        home = os.path.join(base if os.access(base, os.W_OK) else "/tmp", ".keras")
    try:
        with open(os.path.join(os.path.expanduser(home), "keras.json")) as f:
            backend = json.load(f).get("backend")
    except (OSError, ValueError, AttributeError):
        backend = None
    return backend if isinstance(backend, str) and backend else "tensorflow"


def modules_of(extra: str) -> tuple[str, ...]:
    """The top-level modules `extra` provides; for ``keras``, with the selected backend's."""
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; known: {', '.join(EXTRAS)}")
    modules = EXTRAS[extra]
    if extra == "keras":
        backend = _BACKEND_MODULES.get(keras_backend())
        modules = (*modules, backend) if backend else modules
    return modules


def install_command(extra: str, module: str | None = None) -> str:
    """The exact pip command that brings `extra` (for ``keras``: on the selected backend), run
    in wavg's source folder: wavg is installed from a clone, not from PyPI."""
    if extra != "keras":
        return f"pip install '.[{extra}]'"
    backend = keras_backend()
    if backend in _BACKEND_INSTALLS:
        return _BACKEND_INSTALLS[backend]
    if module is not None and module == _BACKEND_MODULES.get(backend):
        return f"pip install {module}"  # torch or openvino: the user's own framework build
    return "pip install '.[keras-jax]'"  # Keras without TensorFlow; any backend added to it


def require(extra: str, what: str) -> None:
    """Raise `MissingExtra` unless every module of `extra` can be imported.

    Call it before any work, so a missing dependency never leaves a half-done run behind.
    `what` names the part of wavg that needs it, e.g. ``"wavg evaluate"``.
    """
    for module in modules_of(extra):
        if importlib.util.find_spec(module) is None:
            raise MissingExtra(what, module, install_command(extra, module))


@contextlib.contextmanager
def missing_reported(extra: str, what: str) -> Iterator[None]:
    """Turn a failed import of one of `extra`'s own modules into `MissingExtra`.

    Only an import of a module the extra provides is translated, by the name of the module
    that failed (`ModuleNotFoundError.name`); any other import error is a bug and propagates.
    """
    try:
        yield
    except ModuleNotFoundError as exc:
        top = (exc.name or "").partition(".")[0]
        backends = _BACKEND_MODULES.values() if extra == "keras" else ()
        if top not in modules_of(extra) and top not in backends:
            raise
        raise MissingExtra(what, top, install_command(extra, top)) from None
