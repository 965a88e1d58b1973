"""Fetch an HDF5 file's structure ahead of libhdf5, a tree level per round, from storage where
every read costs a round trip.

libhdf5 walks a file one object at a time, each read chosen by the previous one: on object
storage every page of structure is a round trip of its own, one after another (about 60 for a
ResNet50 ``.h5``, 6 s at 100 ms). This module reads the same structure breadth first: the
addresses in one level of the group tree (B-tree nodes, symbol tables, local heaps, object
headers, their continuations, the global heap collections of string attributes) are all known once the level above is parsed, so their pages
are fetched together, one round per level, into the source's page cache; libhdf5's own walk
then finds them there. It only ever hints: it parses nothing that libhdf5 or wavg's checks
rely on, and on anything it does not understand it stops (the walk then fetches the rest
itself). It never reads tensor data.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from wavg.errors import CheckpointError
from wavg.storage.bytesource import ByteSource

SIGNATURE = b"\x89HDF\r\n\x1a\n"
# What to fetch of an object before its size is known: a v1 object header's first messages,
# a group B-tree node with K=16, a symbol-table node with 8 entries (their default sizes).
GUESS = {"header": 512, "messages": 512, "tree": 544, "node": 328, "heap": 32, "collection": 4096}
MAX_ROUNDS = 64  # a deeper tree than this is not one Keras writes; the walk does the rest
MAX_ITEMS = 200_000  # objects looked at, at most (a guard against a cyclic or hostile file)
_UNDEFINED = (1 << 64) - 1

# Message types of a v1 object header that lead to more structure.
_ATTRIBUTE = 0x0C
_CONTINUATION = 0x10
_SYMBOL_TABLE = 0x11
_VARIABLE_LENGTH = 9  # the datatype class whose values live in global heap collections


def prefetch_structure(file: ByteSource, base: int, end: int) -> int:
    """Fetch the structure of the HDF5 file lying at ``base … end`` of `file` into its cache,
    one round of concurrent requests per level of its group tree; the number of rounds.

    Only files with a version 0 or 1 superblock (what h5py and Keras write by default) are
    followed past the superblock; any other file, or anything unexpected, ends the rounds.
    """
    walker = _Walker(file, base, end)
    try:
        return walker.run()
    except (CheckpointError, ValueError, IndexError, struct.error):
        return walker.rounds  # not understood: libhdf5's own walk finds what is left


class _Walker:
    """The rounds of one prefetch: each round fetches the pages of a frontier of objects,
    then parses them into the next frontier."""

    def __init__(self, file: ByteSource, base: int, end: int) -> None:
        self.file, self.base, self.end = file, base, end
        self.rounds = 0
        self.offsets = 8  # sizes of addresses and lengths, from the superblock
        self.lengths = 8
        self.seen: set[tuple[str, int]] = set()

    def run(self) -> int:
        if not self._fetch([("superblock", 0)]):
            return self.rounds
        head = self._read(0, 96)
        if head[:8] != SIGNATURE or head[8] not in (0, 1):
            return self.rounds
        self.offsets, self.lengths = head[13], head[14]
        if self.offsets not in (4, 8) or self.lengths not in (4, 8):
            return self.rounds
        entry = (24 if head[8] == 0 else 28) + 4 * self.offsets
        frontier = self._entry(entry)
        while frontier and self.rounds < MAX_ROUNDS and len(self.seen) < MAX_ITEMS:
            frontier = [item for item in frontier if item not in self.seen]
            self.seen.update(frontier)
            if not frontier:
                break
            if not self._fetch(frontier):
                break  # the cache is full: libhdf5's walk reads the rest
            parsed: list[tuple[str, int]] = []
            for kind, address in frontier:
                parsed += self._parse(kind, address)
            frontier = parsed
        return self.rounds

    # -- reading -------------------------------------------------------------------------------

    def _fetch(self, items: list[tuple[str, int]]) -> bool:
        wanted = []
        for kind, address in items:
            size = GUESS.get(kind, 96)
            if kind.startswith(("range:", "messages:")):
                size = int(kind.split(":", 1)[1])
            wanted.append((self.base + address, max(1, min(size, self.end - self.base - address))))
        self.rounds += 1
        return self.file.cache_small_reads(wanted)

    def _read(self, address: int, size: int) -> bytes:
        if address < 0 or self.base + address + size > self.end:
            size = self.end - self.base - address
            if size <= 0:
                raise ValueError("address outside the file")
        return self.file.read_at(self.base + address, size)

    def _address(self, data: bytes, at: int) -> int:
        return int.from_bytes(data[at : at + self.offsets], "little")

    def _length(self, data: bytes, at: int) -> int:
        return int.from_bytes(data[at : at + self.lengths], "little")

    def _valid(self, address: int) -> bool:
        undefined = _UNDEFINED if self.offsets == 8 else (1 << 32) - 1
        return 0 < address < self.end - self.base and address != undefined

    # -- parsing -------------------------------------------------------------------------------

    def _parse(self, kind: str, address: int) -> list[tuple[str, int]]:
        parsers: dict[str, Callable[[int], list[tuple[str, int]]]] = {
            "header": self._header,
            "tree": self._tree,
            "node": self._node,
            "heap": self._heap,
        }
        if kind.startswith("messages:"):
            return self._messages(address, int(kind.split(":", 1)[1]))
        parser = parsers.get(kind)
        return parser(address) if parser is not None else []

    def _entry(self, at: int, data: bytes | None = None) -> list[tuple[str, int]]:
        """A symbol-table entry: its object header, and its group's B-tree and local heap
        when the entry caches them (scratch-pad type 1), which saves a round."""
        size = 2 * self.offsets + 24
        entry = data[at : at + size] if data is not None else self._read(at, size)
        found = []
        header = self._address(entry, self.offsets)
        if self._valid(header):
            found.append(("header", header))
        cache_type = int.from_bytes(entry[2 * self.offsets : 2 * self.offsets + 4], "little")
        if cache_type == 1:
            scratch = 2 * self.offsets + 8
            tree, heap = self._address(entry, scratch), self._address(entry, scratch + self.offsets)
            found += [("tree", tree)] if self._valid(tree) else []
            found += [("heap", heap)] if self._valid(heap) else []
        return found

    def _header(self, address: int) -> list[tuple[str, int]]:
        """A version 1 object header: its messages follow 16 bytes of prefix."""
        prefix = self._read(address, 16)
        if prefix[0] != 1:
            return []  # a version 2 header ("OHDR"): not followed
        size = int.from_bytes(prefix[8:12], "little")
        return self._messages(address + 16, size)

    def _messages(self, address: int, size: int) -> list[tuple[str, int]]:
        """A block of v1 header messages: continuations and symbol-table messages lead on."""
        if size <= 0 or size > 1 << 24:
            return []
        data = self._read(address, size)
        found: list[tuple[str, int]] = []
        at = 0
        while at + 8 <= len(data):
            kind, length = struct.unpack_from("<HH", data, at)
            body = data[at + 8 : at + 8 + length]
            if kind == _CONTINUATION and len(body) >= self.offsets + self.lengths:
                block = self._address(body, 0)
                if self._valid(block):
                    found.append((f"messages:{self._length(body, self.offsets)}", block))
            elif kind == _SYMBOL_TABLE and len(body) >= 2 * self.offsets:
                tree, heap = self._address(body, 0), self._address(body, self.offsets)
                found += [("tree", tree)] if self._valid(tree) else []
                found += [("heap", heap)] if self._valid(heap) else []
            elif kind == _ATTRIBUTE:
                found += [("collection", a) for a in self._heap_collections(body)]
            at += 8 + length
        return found

    def _heap_collections(self, body: bytes) -> set[int]:
        """The global heap collections a variable-length attribute's values lie in (a string
        attribute such as a legacy ``.h5``'s model config); none for any other attribute."""
        version = body[0]
        if version not in (1, 2, 3):
            return set()
        name_size, type_size, space_size = struct.unpack_from("<HHH", body, 2)
        at = 8 if version < 3 else 9

        def field(size: int) -> int:
            return (size + 7) // 8 * 8 if version == 1 else size

        datatype = body[at + field(name_size) : at + field(name_size) + type_size]
        if not datatype or datatype[0] & 0x0F != _VARIABLE_LENGTH:
            return set()
        space_at = at + field(name_size) + field(type_size)
        count = self._elements(body[space_at : space_at + space_size])
        data_at = space_at + field(space_size)
        step = 4 + self.offsets + 4  # a length, then the heap ID: collection address, index
        found = set()
        for i in range(min(count, 4096)):
            address = self._address(body, data_at + i * step + 4)
            if self._valid(address):
                found.add(address)
        return found

    def _elements(self, space: bytes) -> int:
        """How many values a dataspace message describes (1 for a scalar)."""
        version, rank = space[0], space[1]
        if version == 2 and space[3] == 2:
            return 0  # a null dataspace
        at = 8 if version == 1 else 4
        count = 1
        for i in range(rank):
            count *= self._length(space, at + i * self.lengths)
        return count

    def _tree(self, address: int) -> list[tuple[str, int]]:
        """A version 1 B-tree node of a group: children are nodes below it, or symbol-table
        nodes at level 0."""
        head_size = 8 + 2 * self.offsets
        head = self._read(address, head_size)
        if head[:4] != b"TREE" or head[4] != 0:
            return []
        level, used = head[5], int.from_bytes(head[6:8], "little")
        step = self.offsets + self.lengths
        body = self._read(address + head_size, self.lengths + used * step)
        children = [self._address(body, self.lengths + i * step) for i in range(used)]
        kind = "tree" if level > 0 else "node"
        return [(kind, child) for child in children if self._valid(child)]

    def _node(self, address: int) -> list[tuple[str, int]]:
        """A symbol-table node: one entry per link of the group."""
        head = self._read(address, 8)
        if head[:4] != b"SNOD":
            return []
        count = int.from_bytes(head[6:8], "little")
        size = 2 * self.offsets + 24
        data = self._read(address + 8, count * size)
        found: list[tuple[str, int]] = []
        for i in range(count):
            found += self._entry(i * size, data)
        return found

    def _heap(self, address: int) -> list[tuple[str, int]]:
        """A local heap: its data segment holds the group's link names."""
        head = self._read(address, 8 + 2 * self.lengths + self.offsets)
        if head[:4] != b"HEAP":
            return []
        size = self._length(head, 8)
        segment = self._address(head, 8 + 2 * self.lengths)
        return [(f"range:{size}", segment)] if self._valid(segment) and size > 0 else []
