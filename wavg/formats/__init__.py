"""Bytes <-> tensors: every checkpoint format wavg reads and writes.

`base` is the format-neutral seam (`Checkpoint`, `Writer`, `Tensor`) the averaging core
sees; `registry` is the one place that decides what a location is and opens it. One module
or package per format: `h5file` (``.h5``, ``.weights.h5``), `keras_zip` (``.keras``),
`keras_folder` (unzipped ``.keras``), `sharded` (``.weights.json``), `orbax` (Orbax steps);
`hdf5` holds the HDF5 layer they share, `commit` how multi-file outputs are committed.
Formats read bytes only through `wavg.storage`; they never import Keras or the averaging.
"""
