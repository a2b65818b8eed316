"""Dropping a checkpoint's mapped pages frees memory and never changes a value."""

import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mergekit_corespace.memory import release_file_pages

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="madvise and /proc are Linux's")


def _rss_file_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssFile:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssFile in /proc/self/status")


def test_released_checkpoint_pages_leave_rss_and_read_back_unchanged(tmp_path):
    generator = torch.Generator().manual_seed(0)
    saved = {name: torch.randn(2048, 2048, generator=generator) for name in ("a", "b")}
    save_file(saved, tmp_path / "shard.safetensors")
    handle = safe_open(tmp_path / "shard.safetensors", "pt")
    a, b = handle.get_tensor("a"), handle.get_tensor("b")
    assert float(a.sum() + b.sum()) == pytest.approx(float(saved["a"].sum() + saved["b"].sum()))
    resident = _rss_file_bytes()
    assert release_file_pages(a) >= 2 * a.numel() * a.element_size()  # the whole file
    assert resident - _rss_file_bytes() >= 1.5 * a.numel() * a.element_size()  # a and b
    assert torch.equal(a, saved["a"]) and torch.equal(b, saved["b"])


def test_memory_that_is_not_a_file_mapping_is_left_alone():
    tensor = torch.randn(1024, 1024)
    copy = tensor.clone()
    assert release_file_pages(tensor, copy) == 0
    assert torch.equal(tensor, copy)


def test_an_adapter_check_reads_proc_maps_once_per_256_mib_not_per_tensor(tmp_path, monkeypatch):
    """check_finite releases the file's pages in batches: each release reads
    /proc/self/maps (7 ms a read in an 8 B-shaped --cuda merge profiled on an H200, where
    hundreds of tensors per adapter made it a third of the merge)."""
    from mergekit_corespace import adapters, toy

    base = toy.save_tiny_model(str(tmp_path / "base"))
    adapter = adapters.LoraAdapter.open(toy.save_lora_adapter(base, str(tmp_path / "lora")))
    calls = []
    monkeypatch.setattr(adapters, "release_file_pages", lambda *t: calls.append(len(t)))
    adapter.check_finite()
    assert calls == [len(adapter.modules) * 2]  # every factor, in one release
    calls.clear()
    monkeypatch.setattr(adapters, "_RELEASE_AFTER_BYTES", 1)  # a huge tensor: released at once
    adapter.check_finite()
    assert calls == [1] * (len(adapter.modules) * 2) + [0]
