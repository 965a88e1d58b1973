"""Bytes <-> tensors: every checkpoint format wavg reads and writes.

`base` is the format-neutral seam (`Checkpoint`, `Writer`, `Tensor`) the averaging core
sees; `registry` is the one place that decides what a location is and opens it. One module
or package per format: `h5file` (``.h5``, ``.weights.h5``), `keras_zip` (``.keras``),
`keras_folder` (unzipped ``.keras``), `sharded` (``.weights.json``), `orbax` (Orbax steps);
`hdf5` holds the HDF5 layer they share. A format that writes several files owns its commit
protocol (`sharded.commit`, `keras_folder.commit`), written once over `wavg.storage.target`.
Formats read bytes only through `wavg.storage`; they never import Keras or the averaging.
"""
