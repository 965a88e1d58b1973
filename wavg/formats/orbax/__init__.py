"""Orbax checkpoints: roots and steps on disk (`steps`), one step read and written through
TensorStore (`step`), and steps in a bucket (`remote`)."""
