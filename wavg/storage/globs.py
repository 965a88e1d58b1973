"""Expand quoted globs on the side that holds the files: a shell cannot list a bucket.

Local patterns are matched with `glob`, URL patterns listed on their backend (imported only
then). Reads listings only, never a checkpoint's contents.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from wavg.errors import CheckpointError
from wavg.storage.locations import GLOB_CHARS, Location, Url, as_location, input_names


def expand_inputs(
    names: str | os.PathLike[str] | Url | Sequence[str | os.PathLike[str] | Url],
) -> list[Location]:
    """The checkpoints `names` stand for, with quoted globs expanded; reads no contents.

    `names` is one name or a list of them (see `locations.input_names`, which raises the
    TypeError for anything else, naming ``paths``, the public functions' parameter).

    A local name is taken literally when something has that name; otherwise, if it holds
    glob characters, it is matched (sorted; ordering by epoch comes later). A URL with glob
    characters is listed on its backend. A pattern that matches nothing, or a missing
    local name, is a `CheckpointError` naming it.
    """
    found: list[Location] = []
    for name in input_names(names):
        location = as_location(name)
        if isinstance(location, Url):
            if GLOB_CHARS.search(urlsplit(location.url).path):
                from wavg.storage.remote import glob_urls

                matches = glob_urls(location.url)
                if not matches:
                    raise CheckpointError(str(location), "no object matches this pattern")
                found.extend(Url(m) for m in matches)
            else:
                found.append(location)
            continue
        text = os.fspath(location)
        if os.path.lexists(text):
            found.append(location)
        elif GLOB_CHARS.search(text):
            matches = sorted(glob.glob(text))
            if not matches:
                raise CheckpointError(text, "no such file (and no file matches it as a pattern)")
            found.extend(Path(m) for m in matches)
        else:
            raise CheckpointError(text, "no such file")
    return found
