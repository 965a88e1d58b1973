"""The averaging itself: which checkpoints in which order with which weights, and the
streaming float64 weighted sum over them.

`ordering` and `schemes` plan the run, `engine` streams it, `onerun` judges whether the
inputs look like one run, `quantized` and `requantize` average quantized layers, `rewrite`
copies a checkpoint with new values for some tensors. It sees formats only through
`wavg.formats.base` and `wavg.formats.registry`, and never imports Keras.
"""
