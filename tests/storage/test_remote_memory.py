"""Read-ahead memory is bounded by the bytes actually held: a process reading eight objects
in lockstep from the test S3 server allocates, meanwhile, no more Python memory (response
bodies, their pieces while the client joins them, fetched chunks) than the budget."""

from __future__ import annotations

import os
import subprocess
import sys

from support.remote import BUCKET

BUDGET = 8 << 20
SIZE = 6 << 20  # per object: eight of them are six budgets
FILES = 8
# Besides the chunks: the client's and the reader's own state (requests, connections,
# threads), a few hundred KB however large the budget.
OVERHEAD = 1 << 20

# The reader runs in a process of its own: the test's process also runs the S3 server,
# whose allocations would count too.
READER = f"""
import sys, tracemalloc
from wavg.storage import remote
remote.BUDGET = {BUDGET}
size, block = {SIZE}, 256 << 10
files = [remote.RemoteFile(url) for url in sys.argv[1:]]
read = [bytearray(size) for _ in files]  # allocated before the count starts
tracemalloc.start()
for file in files:
    file.will_read([(0, size)], readers=len(files))
for at in range(0, size, block):  # one block of every input before the next
    for file, got in zip(files, read):
        file.readinto(at, memoryview(got)[at : at + block])
print(tracemalloc.get_traced_memory()[1])
sys.stdout.buffer.write(b"".join(read))
"""


def test_bytes_fetched_ahead_and_held_stay_within_the_budget(s3):
    client, _ = s3
    bodies = [os.urandom(SIZE) for _ in range(FILES)]
    for i, body in enumerate(bodies):
        client.put_object(Bucket=BUCKET, Key=f"memory/{i}.bin", Body=body)
    urls = [f"s3://{BUCKET}/memory/{i}.bin" for i in range(FILES)]
    done = subprocess.run(
        [sys.executable, "-c", READER, *urls], capture_output=True, check=False, env=os.environ
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    peak, _, data = done.stdout.partition(b"\n")
    assert data == b"".join(bodies)
    held = int(peak)
    assert held <= BUDGET + OVERHEAD, (
        f"{held / 2**20:.1f} MiB held, budget {BUDGET / 2**20:.0f} MiB"
    )
