"""KeepLastEpochs: exactly the K newest epochs on disk, in one fit call, in every format."""

from __future__ import annotations

import numpy as np
import pytest
from support.kerasfiles import tiny_model

from wavg.workflows.model_loading import import_keras

# Keras' own numpy-2 deprecation notices are not about wavg.
# `backend`: `make test` runs these again on JAX (KERAS_BACKEND=jax).
pytestmark = [pytest.mark.backend, pytest.mark.filterwarnings("ignore::DeprecationWarning")]
keras = import_keras()
from wavg.keras import KeepLastEpochs  # noqa: E402  (after the quiet Keras import)

X = np.random.default_rng(0).normal(size=(16, 2)).astype("float32")
Y = np.eye(3, dtype="float32")[np.arange(16) % 3]


class StopAfter(keras.callbacks.Callback):
    """Stops training after a given epoch, as EarlyStopping would, but predictably."""

    def __init__(self, epoch: int) -> None:
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch >= self.epoch:
            self.model.stop_training = True


def _fit(callbacks, epochs):
    tiny_model(keras).fit(X, Y, epochs=epochs, batch_size=8, verbose=0, callbacks=callbacks)


def _names(directory):
    return sorted(p.name for p in directory.iterdir())


def test_callback_keeps_only_the_last_k_epochs_when_the_total_is_known(tmp_path):
    _fit([KeepLastEpochs(tmp_path, keep=3, total_epochs=8)], epochs=8)
    assert _names(tmp_path) == ["model_5.h5", "model_6.h5", "model_7.h5"]


def test_callback_keeps_a_rolling_window_of_the_k_newest_when_training_stops_early(tmp_path):
    keeper = KeepLastEpochs(tmp_path, keep=3)
    _fit([keeper, StopAfter(5)], epochs=50)
    assert _names(tmp_path) == ["model_3.h5", "model_4.h5", "model_5.h5"]
    assert [p.name for p in keeper.written] == ["model_3.h5", "model_4.h5", "model_5.h5"]


def test_callback_works_with_keras_early_stopping(tmp_path):
    stop = keras.callbacks.EarlyStopping(monitor="loss", patience=0, min_delta=10.0)
    _fit([KeepLastEpochs(tmp_path, keep=2), stop], epochs=50)
    assert _names(tmp_path) == ["model_0.h5", "model_1.h5"]  # stops after epoch 1


def test_callback_never_deletes_files_it_did_not_write(tmp_path):
    (tmp_path / "model_99.h5").write_text("an older run's")
    (tmp_path / "notes.txt").write_text("keep me")
    _fit([KeepLastEpochs(tmp_path, keep=2)], epochs=6)
    assert _names(tmp_path) == ["model_4.h5", "model_5.h5", "model_99.h5", "notes.txt"]
    assert (tmp_path / "model_99.h5").read_text() == "an older run's"


@pytest.mark.parametrize(
    ("fmt", "suffix"), [("keras", ".keras"), ("weights.h5", ".weights.h5"), ("h5", ".h5")]
)
def test_callback_writes_the_chosen_format_that_keras_can_read_back(tmp_path, fmt, suffix):
    _fit([KeepLastEpochs(tmp_path, keep=1, total_epochs=3, fmt=fmt)], epochs=3)
    (path,) = tmp_path.iterdir()
    assert path.name == f"model_2{suffix}"
    net = tiny_model(keras)
    net.load_weights(path)


def test_callback_creates_its_directory(tmp_path):
    _fit([KeepLastEpochs(tmp_path / "a" / "b", keep=1, total_epochs=2)], epochs=2)
    assert _names(tmp_path / "a" / "b") == ["model_1.h5"]


def test_callback_refuses_keep_below_one_and_unknown_formats(tmp_path):
    with pytest.raises(ValueError, match="keep"):
        KeepLastEpochs(tmp_path, keep=0)
    with pytest.raises(ValueError, match="format"):
        KeepLastEpochs(tmp_path, fmt="pt")
