"""One short Keras run saved in every format whose weights are Keras 3's ``layers/.../vars``
tree: ``.weights.h5``, ``.keras``, an unzipped folder and sharded ``.weights.json`` (tiny
shards). The same model states in each format, so every format's average is the same
tensors; `keras_state` is what Keras itself loads from any of them, optimizer included.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

FORMATS = ("weights.h5", "keras", "folder", "weights.json")
SHARD_GB = 1e-6  # ~1 kB shards: a few per checkpoint


def build(keras):
    """A small model with a bfloat16 layer (Keras stores it as opaque HDF5 data)."""
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(8, dtype="bfloat16"),
            keras.layers.Dense(3),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(name="adam"), loss="mse")
    return model


def save_run(directory: Path, epochs: int = 3) -> dict[str, list[Path]]:
    """Train briefly between saves; each save in every format, oldest first."""
    import keras

    keras.utils.set_random_seed(5)
    rng = np.random.default_rng(5)
    model = build(keras)
    x, y = rng.random((16, 6), dtype=np.float32), rng.random((16, 3), dtype=np.float32)
    files: dict[str, list[Path]] = {fmt: [] for fmt in FORMATS}
    for epoch in range(epochs):
        model.fit(x, y, epochs=1, batch_size=4, verbose=0)
        stem = directory / f"m_{epoch}"
        model.save_weights(stem.with_name(f"m_{epoch}.weights.h5"))
        model.save(stem.with_name(f"m_{epoch}.keras"))
        model.save(stem, zipped=False)
        model.save_weights(stem.with_name(f"m_{epoch}.weights.json"), max_shard_size=SHARD_GB)
        for fmt, path in zip(
            FORMATS,
            (
                stem.with_name(f"m_{epoch}.weights.h5"),
                stem.with_name(f"m_{epoch}.keras"),
                stem,
                stem.with_name(f"m_{epoch}.weights.json"),
            ),
            strict=True,
        ):
            files[fmt].append(path)
    return files


def keras_state(path: Path) -> list[np.ndarray]:
    """Every variable Keras loads from weights at `path` (model, then optimizer)."""
    import keras

    model = build(keras)
    model.optimizer.build(model.trainable_variables)
    model.load_weights(path)
    return [np.array(v) for v in [*model.weights, *model.optimizer.variables]]


def assert_same_bits(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()
