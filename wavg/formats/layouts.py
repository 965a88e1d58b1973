"""Where each Keras format keeps its model weights and its optimizer state.

A ``.keras`` model, zipped or unzipped, holds its config in `CONFIG` and its weights in
`WEIGHTS`: the two names are spelled here only.

A layout is recognised from the HDF5 tree of the weights file; it decides which float
tensors are averaged (model weights) and which are copied from the newest file (optimizer
state), and which output suffixes Keras will load back.
"""

from __future__ import annotations

from dataclasses import dataclass

import h5py

CONFIG = "config.json"  # in a .keras archive or folder: the model's architecture
WEIGHTS = "model.weights.h5"  # beside it: the weights file (HDF5)


@dataclass(frozen=True)
class Layout:
    """How one Keras format lays out its weights file."""

    name: str  # what the user sees: "h5", "h5 weights", "weights.h5", "keras", "hdf5"
    optimizer_group: str | None  # top-level group holding optimizer state, if any
    suffixes: tuple[str, ...]  # output names Keras loads in this format
    refused_suffixes: tuple[str, ...] = ()  # names Keras would read as another format

    def is_optimizer(self, name: str) -> bool:
        group = self.optimizer_group
        return group is not None and (name == group or name.startswith(f"{group}/"))

    def accepts_output(self, filename: str) -> bool:
        lower = filename.lower()
        if any(lower.endswith(s) for s in self.refused_suffixes):
            return False
        return not self.suffixes or any(lower.endswith(s) for s in self.suffixes)


# model.save("x.h5"): model_config attribute, model_weights/ and optimizer_weights/ groups.
LEGACY_MODEL = Layout("h5", "optimizer_weights", (".h5", ".hdf5"), (".weights.h5",))
# Keras 2 save_weights("x.h5"): layer groups at the root, listed in a layer_names attribute.
LEGACY_WEIGHTS = Layout("h5 weights", None, (".h5", ".hdf5"), (".weights.h5",))
# Keras 3 save_weights("x.weights.h5"), and model.weights.h5 inside a .keras archive.
KERAS3_WEIGHTS = Layout("weights.h5", "optimizer", (".weights.h5",))
KERAS_ARCHIVE = Layout("keras", "optimizer", (".keras",))
# Keras 3 save_weights("x.weights.json", max_shard_size=...): an index naming .weights.h5 shards.
SHARDED_WEIGHTS = Layout("weights.json", "optimizer", (".weights.json",))
# model.save("dir", zipped=False): config.json, metadata.json and model.weights.h5 in a folder.
KERAS_FOLDER = Layout("keras folder", "optimizer", ())
# Any other HDF5 file of arrays: every float dataset is averaged.
PLAIN_HDF5 = Layout("hdf5", None, ())


def hdf5_layout(h5: h5py.File) -> Layout:
    """Recognise the layout of a stand-alone HDF5 checkpoint from its root."""
    if "model_weights" in h5 or "model_config" in h5.attrs:
        return LEGACY_MODEL
    if "layer_names" in h5.attrs:
        return LEGACY_WEIGHTS
    if "layers" in h5 or "vars" in h5:
        return KERAS3_WEIGHTS
    return PLAIN_HDF5
