"""Where bytes live, knowing no checkpoint format.

Locations and URLs (`locations`), quoted globs (`globs`), the byte-source contract every
reader reads through (`bytesource`) with its local (`local`) and object-storage (`remote`)
implementations, the one budget of descriptors inputs may keep open (`descriptors`),
atomic local writes (`atomic`), and the targets outputs are committed to (`target`: a local
directory, `local_target`, or a bucket prefix, `bucket_target`). Nothing here parses a checkpoint:
formats sit on top (`wavg.formats`) and this package never imports them.
"""
