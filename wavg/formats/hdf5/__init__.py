"""The HDF5 layer every Keras weights file shares: the safe walk and raw tensor reads
(`walk`), and the output's structure written before its values (`skeleton`)."""
