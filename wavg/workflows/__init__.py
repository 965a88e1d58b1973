"""The Keras side of wavg: train, evaluate, soup, bn-update, and the model loading and data
they share. Every module here may import Keras (lazily); nothing below this package does.
"""
