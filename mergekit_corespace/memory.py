"""Give the pages of a memory-mapped checkpoint back once a merge has read from it.

mergekit's lazy loader hands out base weights as views into a memory-mapped shard
(safetensors), and adapter factors are read the same way. Every page read stays counted
in the process's RSS while the file is mapped: the weights merged so far, but also the
ones copied unchanged (a 1 GB embedding matrix stays resident after it was written).
The mappings are private and never written, so ``MADV_DONTNEED`` simply drops their
pages: whatever is read again later faults back in from the page cache or the file,
unchanged. Done for the whole mapping a tensor lies in (one checkpoint file), so RSS
stays at about one module plus one output shard; nothing is done for any other memory
(anonymous memory would be zeroed), nor off Linux.
"""

from __future__ import annotations

import bisect
import ctypes
import os
import sys

import torch

_MADV_DONTNEED = 4
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _file_mappings() -> list[tuple[int, int]]:
    """The private file-backed mappings of this process, as sorted (start, end)."""
    mappings = []
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[1][3] == "p" and fields[5].startswith("/"):
                start, end = fields[0].split("-")
                mappings.append((int(start, 16), int(end, 16)))
    return sorted(mappings)


def _mapping_of(tensor: torch.Tensor, mappings: list[tuple[int, int]]) -> tuple[int, int] | None:
    """The private file mapping that holds all of CPU ``tensor``'s bytes, if any."""
    if tensor.device.type != "cpu" or tensor.numel() == 0:
        return None
    begin = tensor.data_ptr()
    index = bisect.bisect_right(mappings, (begin, float("inf"))) - 1
    if index >= 0:
        start, stop = mappings[index]
        if begin + tensor.numel() * tensor.element_size() <= stop:
            return start, stop
    return None


def release_file_pages(*tensors: torch.Tensor) -> int:
    """Drop the resident pages of the checkpoint files (private file mappings) that CPU
    ``tensors`` are views into; one read of ``/proc/self/maps`` for all of them.

    Returns the number of bytes of mappings released (0 when no tensor is such a view)."""
    views = [t for t in tensors if t.device.type == "cpu" and t.numel() > 0]
    if sys.platform != "linux" or not views:
        return 0
    mappings = _file_mappings()
    holding = {_mapping_of(tensor, mappings) for tensor in views} - {None}
    libc = ctypes.CDLL(None, use_errno=True)
    released = 0
    for start, stop in holding:
        if not libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(stop - start), _MADV_DONTNEED):
            released += stop - start
    return released


class MappedRows:
    """Releases the pages of row ranges of matrices that are views into checkpoint files,
    as a pass over their rows goes on: a merge that reads T saved whole weights block by
    block then holds about one block of each in RSS, not T whole matrices.

    One read of ``/proc/self/maps`` when built; matrices that are not contiguous views
    into a private file mapping (fresh memory, device tensors) are left alone."""

    def __init__(self, *matrices: torch.Tensor):
        mapped = []
        if sys.platform == "linux":
            mappings = _file_mappings()
            mapped = [
                m for m in matrices if m.is_contiguous() and _mapping_of(m, mappings) is not None
            ]
        self._matrices = mapped
        self._libc = ctypes.CDLL(None, use_errno=True) if mapped else None

    def release(self, start: int, stop: int) -> None:
        """Drop the pages that lie wholly within rows ``start:stop`` of each matrix."""
        for matrix in self._matrices:
            row_bytes = matrix.stride(0) * matrix.element_size()
            first = matrix.data_ptr() + start * row_bytes
            last = matrix.data_ptr() + stop * row_bytes
            first = -(-first // _PAGE) * _PAGE  # inward: pages shared with other rows stay
            last = last // _PAGE * _PAGE
            if last > first:
                self._libc.madvise(
                    ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED
                )
