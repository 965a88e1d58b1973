"""The only way wavg loads a Keras model: inspect the stored config first, then load safely.

A checkpoint's config can name code: a Lambda layer carries Python bytecode, a TFSMLayer loads
and runs an external SavedModel, any ``module``/``function`` reference can import a function
such as ``os.system``. Keras' ``safe_mode`` has missed some of these (see the advisories in
SECURITY.md), and for legacy ``.h5`` it was ignored before Keras 3.11.3. So before Keras sees a
file, wavg reads its config itself, through the reader `wavg combine` uses (``.h5``: the
``model_config`` attribute; ``.keras`` archive or folder: ``config.json``) and refuses such
references unless the caller trusts the file. Classes from a ``--custom-objects`` module are
allowed: importing it is the user's choice.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from wavg.errors import CheckpointError, UnsafeCheckpoint, UsageError, WavgError
from wavg.formats.quantized import config_dicts

MIN_KERAS = (3, 13, 2)
_CODE_LAYERS = {
    "Lambda": "a Lambda layer (it stores Python code that runs when the model is loaded)",
    "TFSMLayer": "a TFSMLayer (it loads and runs an external SavedModel)",
}
_VOCABULARY_LAYERS = {"StringLookup", "IntegerLookup", "TextVectorization"}
_KERAS_BUILTIN_FAMILIES = (
    "activations",
    "constraints",
    "initializers",
    "losses",
    "metrics",
    "optimizers",
    "regularizers",
)
# How Keras words "this config names a class I do not know" across releases.
_UNKNOWN_CLASS = re.compile(
    r"(?:Could not locate (?:class|function)|Unknown (?:layer|object|class)[^'\"`]*|"
    r"Could not deserialize)\s*['\"`]([^'\"`]+)"
)
_TRUST_HINT = "wavg refuses it unless you trust the file: pass --trust-file (trust=True in Python)"


def import_keras() -> Any:
    """Import Keras quietly and check that it carries the fixes for the load advisories.

    Keras runs on the backend that ``KERAS_BACKEND`` (or ``~/.keras/keras.json``) selects;
    nothing in wavg assumes TensorFlow.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    # The first import of Keras imports its backend (whichever KERAS_BACKEND selects).
    with _native_stderr_silenced("keras" not in sys.modules):
        import keras

    found = tuple(int(part) for part in re.findall(r"\d+", keras.__version__)[:3])
    if found < MIN_KERAS:
        wanted = ".".join(map(str, MIN_KERAS))
        raise WavgError(
            f"keras {keras.__version__} is installed but wavg needs keras >= {wanted} to load "
            "models safely; upgrade it with: pip install -U 'keras>=3.13.2'"
        )
    return keras


def is_weights_only(path: str | os.PathLike[str]) -> bool:
    """A ``.weights.h5`` file holds weights but no architecture, so it is not a model."""
    return os.fspath(path).lower().endswith(".weights.h5")


def read_model_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The model config stored in a checkpoint that keeps one (a legacy ``.h5``, a ``.keras``
    archive or an unzipped ``.keras`` folder, locally or at a URL), as parsed JSON.

    The location is recognised and read exactly as `wavg combine` reads it
    (`formats.registry`), so every command accepts the same ones; a legacy ``.h5``'s training
    config (what ``compile=True`` deserializes) comes with its model config, to be checked too.
    """
    from wavg.formats.layouts import KERAS3_WEIGHTS, KERAS_ARCHIVE, SHARDED_WEIGHTS
    from wavg.formats.registry import open_checkpoint

    ckpt = open_checkpoint(path)
    try:
        if ckpt.layout in (KERAS3_WEIGHTS, SHARDED_WEIGHTS):
            raise CheckpointError(
                ckpt.path,
                "is a weights-only file and holds no architecture; pass --model FILE.keras "
                "with the model it was saved from",
            )
        config = ckpt.model_config()
        training = ckpt.training_config()
        if config is None and ckpt.layout is KERAS_ARCHIVE:
            raise CheckpointError(ckpt.path, "is a zip without config.json; not a .keras model")
        if config is None:
            raise CheckpointError(ckpt.path, "holds no model config; it is not a saved Keras model")
    finally:
        ckpt.close()
    return config if training is None else {"model_config": config, "training_config": training}


def unsafe_references(config: Any, allowed: frozenset[str] = frozenset()) -> list[str]:
    """Describe every part of a config that could run code outside Keras when loaded.

    Refused: Lambda and TFSMLayer layers; lookup layers whose vocabulary is a file path; any
    ``module`` that is not ``keras`` or ``keras.*`` (a custom class or a function such as
    ``os.system``) unless its class or registered name is in `allowed`.
    """
    found = []
    for node in config_dicts(config):
        class_name = node.get("class_name")
        if class_name in _CODE_LAYERS:
            found.append(_CODE_LAYERS[class_name])
        if class_name in _VOCABULARY_LAYERS and isinstance(
            (node.get("config") or {}).get("vocabulary"), str
        ):
            found.append(f"a {class_name} that reads its vocabulary from a file")
        module = node.get("module")
        if isinstance(module, str) and not _is_keras_module(module) and not _keras_builtin(node):
            names = {str(node.get(key)) for key in ("class_name", "registered_name", "config")}
            if not names & allowed:
                what = node.get("config") if class_name == "function" else class_name
                found.append(f"a reference to {module}.{what} (outside keras)")
    return list(dict.fromkeys(found))


def check_self_contained(path: str | os.PathLike[str]) -> None:
    """Run `wavg.combine`'s reader over the file (a dry run, nothing written): it refuses
    HDF5 links and datasets that point outside the file, zip entries that escape the archive,
    size bombs and quantized layers, before Keras reads a byte of it."""
    from wavg.averaging.engine import combine

    with tempfile.TemporaryDirectory(prefix="wavg-check-") as tmp:
        combine([path], Path(tmp) / Path(path).name, order="given", dry_run=True)


def refuse_quantized(path: str | os.PathLike[str]) -> None:
    """Raise `QuantizedCheckpoint` if the file holds quantized layers (``model.quantize``).

    Every Keras-side command (evaluate, bn-update, soup) averages with `wavg.combine`, which
    refuses them; this says so before Keras loads anything. `check_self_contained` runs it
    too (through combine's dry run), so `load_model` refuses them; `load_weights` calls it.
    """
    from wavg.formats.quantized import refuse_quantized as refuse
    from wavg.formats.registry import open_checkpoint

    ckpt = open_checkpoint(os.fspath(path))
    try:
        refuse(ckpt)
    finally:
        ckpt.close()


def check_config(
    path: str | os.PathLike[str], *, trust: bool = False, allowed: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """Read the stored config and raise `UnsafeCheckpoint` if it could run code (unless trusted)."""
    config = read_model_config(path)
    problems = unsafe_references(config, allowed)
    if problems and not trust:
        custom = " (for your own layers, --custom-objects MODULE)"
        raise UnsafeCheckpoint(
            path, f"its config holds {'; '.join(problems)}; {_TRUST_HINT}{custom}"
        )
    return config


def custom_objects_from(module_name: str | None) -> dict[str, Any]:
    """Import a ``--custom-objects`` module and return the classes it makes known to Keras.

    The module may register its classes with ``keras.saving.register_keras_serializable``
    (importing it is enough) or define a ``CUSTOM_OBJECTS`` dict of name -> class.
    """
    if not module_name:
        return {}
    keras = import_keras()
    before = set(keras.saving.get_custom_objects())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the user's module can fail in any way; report it in one line
        raise UsageError(f"--custom-objects: cannot import {module_name!r}: {exc}") from None
    objects = dict(getattr(module, "CUSTOM_OBJECTS", {}) or {})
    registered = keras.saving.get_custom_objects()
    for name in set(registered) - before:
        objects[name] = registered[name]
    for name, obj in registered.items():
        if getattr(obj, "__module__", None) == module.__name__:
            objects[name] = obj
    return objects


def allowed_names(custom_objects: Mapping[str, Any]) -> frozenset[str]:
    """Names under which a config may refer to the given custom objects."""
    names = set(custom_objects)
    for name, obj in custom_objects.items():
        names.add(name.split(">")[-1])
        names.add(getattr(obj, "__name__", name))
    return frozenset(names)


def load_model(
    path: str | os.PathLike[str],
    *,
    trust: bool = False,
    custom_objects: str | Mapping[str, Any] | None = None,
    compile: bool = True,
) -> Any:
    """Load a legacy ``.h5`` or ``.keras`` model after checking its config.

    `custom_objects` is a module name (the CLI's ``--custom-objects``) or a dict. With
    `trust`, the config check is skipped and Keras' ``safe_mode`` is off (Lambda layers load).
    Raises `UnsafeCheckpoint`, or `CheckpointError` for anything Keras cannot load.
    """
    keras = import_keras()
    objects = (
        custom_objects_from(custom_objects)
        if isinstance(custom_objects, str) or custom_objects is None
        else dict(custom_objects)
    )
    check_self_contained(path)
    check_config(path, trust=trust, allowed=allowed_names(objects))
    try:
        with keras_logs_quiet():
            return keras.models.load_model(
                path, custom_objects=objects or None, compile=compile, safe_mode=not trust
            )
    except Exception as exc:  # Keras raises many types for a bad file; all mean "cannot load"
        raise CheckpointError(path, _load_problem(exc)) from None


def load_weights(model: Any, path: str | os.PathLike[str]) -> None:
    """Load one checkpoint's weights into `model`, refusing files whose layout differs and
    quantized files (see `refuse_quantized`)."""
    refuse_quantized(path)
    try:
        with keras_logs_quiet():
            model.load_weights(os.fspath(path))
    except Exception as exc:  # as above: any failure means the file does not fit the model
        raise CheckpointError(path, f"its weights do not fit the model: {_oneline(exc)}") from None


def _load_problem(exc: Exception) -> str:
    text = _oneline(exc)
    unknown = _UNKNOWN_CLASS.search(text)
    if unknown:
        return (
            f"cannot load the model: unknown class {unknown.group(1)!r}; pass "
            "--custom-objects MODULE naming a module that defines it (registered with "
            "keras.saving.register_keras_serializable, or listed in a CUSTOM_OBJECTS dict)"
        )
    return f"cannot load the model: {text}"


def _oneline(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    text = text if len(text) <= 300 else text[:297] + "..."
    return text or type(exc).__name__


def _is_keras_module(module: str) -> bool:
    return module == "keras" or module.startswith("keras.")


def _keras_builtin(node: dict[str, Any]) -> bool:
    """Keras stores its own losses and activations as functions of module "builtins" and, on
    load, looks the name up only in keras.activations, keras.losses, ... ; allow exactly those."""
    name = node.get("config")
    if node.get("module") != "builtins" or node.get("class_name") != "function":
        return False
    if not isinstance(name, str) or not name.isidentifier():
        return False
    keras = import_keras()
    return any(
        callable(getattr(getattr(keras, family, None), name, None))
        for family in _KERAS_BUILTIN_FAMILIES
    )


@contextlib.contextmanager
def keras_logs_quiet() -> Iterator[None]:
    """Hide Keras' absl warnings (legacy-format notices, "metrics not built yet") for a block,
    and TensorFlow's native start-up lines if Keras imports it lazily within the block."""
    from absl import logging as absl_logging

    level = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        with _native_stderr_silenced(_tensorflow_may_load()):
            yield
    finally:
        absl_logging.set_verbosity(level)


def _tensorflow_may_load() -> bool:
    """True while TensorFlow is installed but not imported: on another backend (JAX, torch),
    Keras imports it lazily when it saves or loads a model, and its native runtime then
    prints its banner lines."""
    return "tensorflow" not in sys.modules and importlib.util.find_spec("tensorflow") is not None


@contextlib.contextmanager
def _native_stderr_silenced(active: bool) -> Iterator[None]:
    # A backend's native runtime can log banner lines at import time (TensorFlow's oneDNN and
    # CUDA notes, before it reads TF_CPP_MIN_LOG_LEVEL); only pointing file descriptor 2
    # elsewhere for the import hides them.
    if not active:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
