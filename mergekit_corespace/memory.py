"""Give a memory-mapped tensor's file pages back once it has been read.

mergekit's lazy loader hands out base weights as views into a memory-mapped shard
(safetensors). Reading a weight makes its pages resident, and they stay counted in the
process's RSS until the whole shard is unmapped — on top of the merged copy we produce.
For a private, file-backed mapping whose pages were never written, ``MADV_DONTNEED``
simply drops them: a later read faults them in again from the file. Nothing is done
for any other memory (anonymous memory would be zeroed), nor off Linux.
"""

from __future__ import annotations

import ctypes
import mmap
import sys

import torch

_MADV_DONTNEED = 4


def _file_mapping(address: int) -> tuple[int, int] | None:
    """The private file-backed mapping containing ``address``, as (start, end)."""
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= address < end:
                private = fields[1][3] == "p"
                file_backed = len(fields) == 6 and fields[5].startswith("/")
                return (start, end) if private and file_backed else None
    return None


def release_file_pages(tensor: torch.Tensor) -> int:
    """Drop the resident pages of a CPU tensor that lies in a private file mapping.

    Returns the number of bytes released (0 when the tensor is not such a view)."""
    if sys.platform != "linux" or tensor.device.type != "cpu" or tensor.numel() == 0:
        return 0
    begin, size = tensor.data_ptr(), tensor.numel() * tensor.element_size()
    mapping = _file_mapping(begin)
    if mapping is None or begin + size > mapping[1]:
        return 0
    page = mmap.PAGESIZE
    start, end = -(-begin // page) * page, (begin + size) // page * page  # whole pages inside
    if end <= start:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED):
        return 0
    return end - start
