"""A Keras callback that keeps the models of the last K epochs of one `fit` call.

It imports Keras at import time (the callbacks live in `wavg.workflows.callbacks`; this
module checks first that Keras is installed); ``import wavg`` does not load it. Use it in your own training script::

    from wavg.keras import KeepLastEpochs

    model.fit(x, y, epochs=500, callbacks=[KeepLastEpochs("ckpt", keep=10, total_epochs=500)])
    # ckpt/model_490.h5 ... ckpt/model_499.h5, ready for `wavg combine ckpt/model_49*.h5`
"""

from __future__ import annotations

from wavg.extras import install_command

try:
    import keras  # noqa: F401  (only to name the missing extra)
except ModuleNotFoundError as exc:  # only Keras itself missing gets the hint; else a real bug
    if exc.name != "keras":
        raise
    raise ModuleNotFoundError(
        f"wavg.keras needs keras, which is not installed; install it with: "
        f"{install_command('keras')} in wavg's source folder",
        name="keras",
    ) from None

from wavg.workflows.callbacks import (  # noqa: E402  (after the Keras check)
    FORMATS,
    KeepLastEpochs,
    ReportEpochs,
    checkpoint_name,
)

__all__ = ["FORMATS", "KeepLastEpochs", "ReportEpochs", "checkpoint_name"]
