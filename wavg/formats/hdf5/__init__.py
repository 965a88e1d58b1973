"""The HDF5 layer every Keras weights file shares: the safe walk (`walk`), the reader
state and raw tensor reads of a checkpoint whose weights are one HDF5 file (`reader`), and
the output's structure written before its values (`skeleton`)."""
