"""Sharded Keras weights (``.weights.json`` + shards): the untrusted index (`index`) and
the reader over its shards (`reader`), and how such an output is committed (`commit`)."""
