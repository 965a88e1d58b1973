"""Read the metric values a Keras run logged: a `CSVLogger` CSV, a `History.history` JSON, or
the values `ModelCheckpoint` wrote into the file names.

It only reads and parses: which checkpoints to keep is `wavg.averaging.selection`'s job, and
it never opens a checkpoint.

How a name is read (``STEM`` is the name without its checkpoint suffix):

- labelled: ``METRIC=VALUE`` (also ``METRIC_VALUE`` or ``METRIC-VALUE``), where METRIC is
  not part of a longer name (``loss`` never matches inside ``val_loss``);
- unlabelled, as ``model.{epoch:02d}-{val_loss:.2f}.h5`` writes it: the one number written
  with a decimal point (or ``nan``/``inf``) right after a ``-`` or ``_`` (``-0.4312``). A
  name holding two such numbers is ambiguous (which one is the metric?) and is refused, as
  is an unlabelled value in a name that labels other values.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re

from wavg.errors import MetricsError

_NUMBER = r"[-+]?(?:\d+\.\d*(?:[eE][-+]?\d+)?|\d+(?:[eE][-+]?\d+)?|nan|inf)"
_DECIMAL = r"-?(?:\d+\.\d+(?:[eE][-+]?\d+)?|nan|inf)"
_UNLABELLED = re.compile(rf"(?<=[-_])({_DECIMAL})(?![\d.])", re.IGNORECASE)
_LABEL = re.compile(rf"([A-Za-z][A-Za-z0-9_]*?)[=]({_NUMBER})", re.IGNORECASE)


def lower_is_better(metric: str) -> bool:
    """The inferred direction: lower for names with "loss" or "error" in them, else higher."""
    name = metric.lower()
    return "loss" in name or "error" in name


def read_metrics_file(path: str | os.PathLike[str]) -> dict[int, dict[str, float]]:
    """The rows of a metrics file, keyed by the 0-based epoch Keras counts them with.

    A ``.json`` file is `History.history` (``{"loss": [...], "val_loss": [...]}``, also
    nested under ``"history"``), row i being index i; anything else is read as a
    `CSVLogger` CSV, keyed by its ``epoch`` column. Raises an error naming the file
    when it cannot be read or parsed (`MetricsError`).
    """
    name = os.fspath(path)
    try:
        with open(name, newline="", encoding="utf-8") as handle:
            if name.lower().endswith(".json"):
                return _history_rows(name, json.load(handle))
            return _csv_rows(name, list(csv.DictReader(handle)))
    except OSError as exc:
        raise MetricsError(name, f"cannot read the metrics file ({exc.strerror or exc})") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise MetricsError(name, f"not a CSVLogger CSV or History JSON ({exc})") from None


def _history_rows(name: str, history: object) -> dict[int, dict[str, float]]:
    if isinstance(history, dict) and isinstance(history.get("history"), dict):
        history = history["history"]
    if not isinstance(history, dict) or not all(isinstance(v, list) for v in history.values()):
        raise MetricsError(name, "a History JSON maps each metric to a list of values")
    rows: dict[int, dict[str, float]] = {}
    for metric, values in history.items():
        for epoch, value in enumerate(values):
            rows.setdefault(epoch, {})[metric] = _as_float(value)
    return rows


def _csv_rows(name: str, records: list[dict[str, str]]) -> dict[int, dict[str, float]]:
    if not records or "epoch" not in records[0]:
        raise MetricsError(name, "a CSVLogger CSV has a header with an 'epoch' column")
    rows = {}
    for record in records:
        epoch = int(record.pop("epoch"))
        rows[epoch] = {metric: _as_float(value) for metric, value in record.items() if metric}
    return rows


def _as_float(value: object) -> float:
    """A logged value as a float; an empty cell (a metric not logged that epoch) is NaN."""
    if value is None or value == "":
        return math.nan
    return float(value)  # type: ignore[arg-type]


def value_in_name(stem: str, metric: str, path: str | None = None) -> float | None:
    """The value of `metric` written in the file name `stem`, or None when it holds none.

    Raises `MetricsError` naming `path` (default `stem`) when the name is ambiguous (see the
    module docstring).
    """
    labelled = {label.lower(): value for label, value in _LABEL.findall(stem)}
    pattern = rf"(?<![A-Za-z0-9_]){re.escape(metric)}[=_-]?({_NUMBER})(?![\d.])"
    found = re.search(pattern, stem, re.IGNORECASE)
    if found:
        return float(found.group(1))
    if labelled:
        return None
    values = _UNLABELLED.findall(stem)
    if len(values) > 1:
        raise MetricsError(
            path or stem,
            f"the name holds {len(values)} unlabelled values ({', '.join(values)}); "
            f"cannot tell which is {metric}: name the files with {metric}={{{metric}:.4f}} "
            "or pass --metrics FILE",
        )
    return float(values[0]) if values else None
