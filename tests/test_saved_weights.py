"""Weights adapters save whole (``modules_to_save``, embeddings) merge in row blocks: the
bits of a whole-matrix merge for element-wise methods, ~1e-12 of it for SVD-based ones,
memory of about one block per adapter, and the base cast once."""

from __future__ import annotations

import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mergekit_corespace import dense, merges
from mergekit_corespace.adapters import DenseWeight, LoraModule
from mergekit_corespace.options import MergeParameters
from mergekit_corespace.pipeline import merge_factors, merge_module, read_inputs

ELEMENTWISE = [
    ("ta", {}),
    ("mean", {}),
    ("ties", {"density": 0.3}),
    ("ties", {"density": 0.7}),
    ("ties", {"density": 1.0}),
    ("dare", {"density": 0.5}),
    ("dare_ties", {"density": 0.5}),
]
SVD_BASED = ["tsv", "cart", "iso_c", "iso_cts"]
WEIGHTS = (1.0, 0.5, 0.8)


def _saved_module(tmp_path, shape=(200, 48), quantized=False, dtype=torch.float32):
    """Three adapters' parts of one weight, in files: LoRA + saved whole, saved whole
    only, LoRA only; and the base weight as a view into its mapped file."""
    generator = torch.Generator().manual_seed(0)
    rows, cols = shape
    base = torch.randn(shape, generator=generator).to(dtype)
    save_file({"w": base}, tmp_path / "base.safetensors")
    contributions = []
    for t in range(3):
        tensors, parts = {}, []
        if t != 1:
            tensors["a"] = torch.randn(4, cols, generator=generator)
            tensors["b"] = torch.randn(rows, 4, generator=generator) * 0.1
            parts.append(
                LoraModule(
                    file=str(tmp_path / f"a{t}.safetensors"),
                    module="w",
                    a_key="a",
                    b_key="b",
                    rank=4,
                    out_features=rows,
                    in_features=cols,
                    scale=0.5,
                )
            )
        if t != 2:
            noise = torch.randn(shape, generator=generator) * 0.05
            if quantized:  # many equal magnitudes and exact zeros: ties at the threshold
                noise = (noise * 40).round() / 40
            tensors["saved"] = (base + noise).to(dtype)
            parts.append(
                DenseWeight(
                    file=str(tmp_path / f"a{t}.safetensors"), key="saved", name="w", shape=shape
                )
            )
        save_file(tensors, tmp_path / f"a{t}.safetensors")
        contributions.append(tuple(parts))
    for parts in contributions:  # open the files now: their mappings are not merge memory
        read_inputs([parts], MergeParameters(), base=base)
    mapped = safe_open(tmp_path / "base.safetensors", "pt").get_tensor("w")
    return contributions, mapped


def _whole(contributions, base, parameters, seed=7):
    """The whole-matrix merge: every dense delta in memory, merged in full space."""
    inputs = read_inputs(contributions, parameters, base=base)
    return merge_factors(inputs, WEIGHTS, parameters, "full", seed=seed)


@pytest.mark.parametrize("precision", ["float64", "float32"])
@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("gather", [0, 300, 1 << 22])
def test_row_blocked_elementwise_merges_give_the_whole_matrix_bits(
    tmp_path, monkeypatch, precision, quantized, gather
):
    # 64-row blocks over 200 rows (the last one partial); `gather` 0 runs every radix pass
    monkeypatch.setattr(dense, "BLOCK_ELEMENTS", 64 * 48)
    monkeypatch.setattr(dense, "_GATHER_AT_MOST", gather)
    contributions, base = _saved_module(tmp_path, quantized=quantized)
    for method, extra in ELEMENTWISE:  # λ scales each block as it is read
        parameters = MergeParameters(merge=method, precision=precision, **extra, **{"lambda": 0.7})
        blocked = merge_module(contributions, WEIGHTS, parameters, "core", base=base, seed=7)
        assert isinstance(blocked.dense, dense.RowBlocks)
        whole = _whole(contributions, base, parameters)
        assert torch.equal(blocked.to_dense(), whole.to_dense()), method
        assert torch.equal(blocked.applied_to(base), whole.applied_to(base)), method


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_generator_drawn_in_consecutive_chunks_gives_one_draws_values(dtype):
    # what row-blocked DARE relies on to draw a whole-matrix merge's masks
    whole = torch.rand(300, 37, generator=torch.Generator().manual_seed(3), dtype=dtype)
    generator = torch.Generator().manual_seed(3)
    chunks = [torch.rand(rows, 37, generator=generator, dtype=dtype) for rows in (1, 64, 235)]
    assert torch.equal(torch.cat(chunks), whole)


@pytest.mark.parametrize("by_sort", [False, True])  # True: as off the CPU
@pytest.mark.parametrize("gather_at_most", [0, 500, 1 << 22])  # radix to the last bit … none
def test_ties_thresholds_are_kthvalue_of_the_whole_matrix(
    tmp_path, monkeypatch, by_sort, gather_at_most
):
    monkeypatch.setattr(merges, "_selects_by_sort", lambda device: by_sort)
    monkeypatch.setattr(dense, "BLOCK_ELEMENTS", 64 * 48)
    monkeypatch.setattr(dense, "_GATHER_AT_MOST", gather_at_most)
    contributions, base = _saved_module(tmp_path, quantized=True)
    parameters = MergeParameters(merge="ties")
    tasks = dense.DenseTasks(contributions, base, torch.float64)
    whole = [
        x if isinstance(x, torch.Tensor) else x[0] @ x[1]
        for x in read_inputs(contributions, parameters, base=base)
    ]
    for density in (1e-4, 0.3, 0.5, 0.999):
        keep = max(1, int(density * whole[0].numel()))
        expected = [float(x.abs().flatten().kthvalue(x.numel() - keep + 1).values) for x in whole]
        assert dense.top_magnitude_thresholds(tasks, density) == expected


@pytest.mark.parametrize("method", SVD_BASED)
def test_svd_based_merges_of_large_saved_weights_match_the_in_memory_merge(
    tmp_path, monkeypatch, method
):
    monkeypatch.setattr(dense, "BLOCK_ELEMENTS", 64 * 40)
    contributions, base = _saved_module(tmp_path, shape=(600, 40))
    parameters = MergeParameters(merge=method)
    whole = _whole(contributions, base, parameters).to_dense()
    # small: merged in memory, as before
    in_memory = merge_module(contributions, WEIGHTS, parameters, base=base, seed=7)
    assert torch.equal(in_memory.to_dense(), whole)
    # large: Gram matrices over row blocks; not LAPACK's SVD, so equal to rounding
    monkeypatch.setattr(dense, "IN_MEMORY_ELEMENTS", 0)
    streamed = merge_module(contributions, WEIGHTS, parameters, base=base, seed=7)
    assert isinstance(streamed.dense, dense.RowBlocks)
    error = (streamed.to_dense() - whole).norm() / whole.norm()
    assert error < 1e-10, error


def test_the_base_is_cast_once_per_block_not_per_adapter(tmp_path, monkeypatch):
    monkeypatch.setattr(dense, "BLOCK_ELEMENTS", 64 * 48)
    contributions, base = _saved_module(tmp_path)
    contributions = [contributions[0], contributions[1], contributions[1]]  # 3 saved
    storage = base.untyped_storage().data_ptr()
    casts = []

    class CountBaseCasts(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.Tensor.to and args[0].untyped_storage().data_ptr() == storage:
                casts.append(args[0].shape)
            return func(*args, **(kwargs or {}))

    with CountBaseCasts():
        merge_module(contributions, WEIGHTS, MergeParameters(), base=base).to_dense()
        assert len(casts) == 4  # 200 rows in blocks of 64
        casts.clear()
        read_inputs(contributions, MergeParameters(merge="tsv"), base=base)
        assert len(casts) == 1


def _peak_allocated(run) -> int:
    """Peak bytes of tensors alive at once while ``run()`` runs, from the allocations and
    frees the profiler records (deterministic, unlike RSS)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        run()
    events, stack = [], list(profiler.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation:
            events.append((event.start_time_ns, event.extra_fields.alloc_size))
    alive = peak = 0
    for _, size in sorted(events):
        alive += size
        peak = max(peak, alive)
    return peak


@pytest.mark.parametrize("method", ["ta", "ties", "dare_ties", "tsv", "cart", "iso_cts"])
def test_a_saved_vocabulary_matrix_merges_in_a_few_blocks_per_adapter(
    tmp_path, monkeypatch, method
):
    monkeypatch.setattr(dense, "BLOCK_ELEMENTS", 1 << 16)  # 512 KiB per adapter in float64
    shape = (32768, 128)  # 4 Mi entries: 32 MiB per float64 delta, 64 blocks
    contributions, base = _saved_module(tmp_path, shape=shape)
    parameters = MergeParameters(merge=method, **({"density": 0.5} if "dare" in method else {}))

    def whole():
        _whole(contributions, base, parameters).applied_to(base)

    def blocked():
        merge_module(contributions, WEIGHTS, parameters, base=base).applied_to(base)

    deltas = 3 * shape[0] * shape[1] * 8  # the three float64 deltas, whole: 96 MiB
    output = shape[0] * shape[1] * 4  # the merged float32 weight: 16 MiB
    assert _peak_allocated(whole) > deltas  # as every method merged them before
    peak = _peak_allocated(blocked)
    # the output, and T blocks times the method's temporaries of them
    # the output, and per adapter a few blocks of the method's temporaries (measured: 5.0
    # for tsv to 8.8 for iso_cts; each whole delta would be 64 blocks)
    blocks = (peak - output) / (3 * (1 << 16) * 8)
    assert blocks < 10, f"{peak / 2**20:.1f} MiB: {blocks:.1f} blocks per adapter"


@pytest.mark.skipif(sys.platform != "linux", reason="madvise and /proc are Linux's")
def test_a_pass_over_saved_weights_gives_their_file_pages_back(tmp_path, monkeypatch):
    monkeypatch.setattr(dense, "BLOCK_ELEMENTS", 1 << 16)
    contributions, base = _saved_module(tmp_path, shape=(8192, 512))
    tasks = dense.DenseTasks(contributions, base, torch.float64)

    def rss_file() -> int:
        with open("/proc/self/status") as status:
            line = next(line for line in status if line.startswith("RssFile:"))
        return int(line.split()[1]) * 1024

    before, peak = rss_file(), 0
    for _ in tasks.blocks():
        peak = max(peak, rss_file() - before)
    files = 3 * 8192 * 512 * 4  # base and two saved weights, float32: 48 MiB
    assert peak < files / 8, f"{peak / 2**20:.1f} MiB"


def test_row_blocked_merges_never_depend_on_the_ambient_device(tmp_path, monkeypatch):
    """As every merge (tests/test_devices.py): each factory names its device, so a
    --multi-gpu task's ``with torch.device(...)`` context changes nothing."""
    from test_devices import FactoriesWithoutDevice

    monkeypatch.setattr(dense, "BLOCK_ELEMENTS", 64 * 48)
    monkeypatch.setattr(dense, "IN_MEMORY_ELEMENTS", 0)
    monkeypatch.setattr(dense, "_GATHER_AT_MOST", 300)
    contributions, base = _saved_module(tmp_path)
    methods = [(m, extra) for m, extra in ELEMENTWISE] + [(m, {}) for m in SVD_BASED]

    def merge_all():
        return [
            merge_module(
                contributions, WEIGHTS, MergeParameters(merge=m, **extra), base=base
            ).applied_to(base)
            for m, extra in methods
        ]

    expected = merge_all()
    with FactoriesWithoutDevice() as recorder:
        again = merge_all()
    assert recorder.calls == []
    with torch.device("meta"):
        inside = merge_all()
    assert all(torch.equal(a, b) for a, b in zip(again + inside, expected * 2, strict=True))


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_auto_precision_is_float32_only_for_dense_svds_off_the_cpu(tmp_path, device):
    """``precision: auto``: float64 on the CPU, for core space, for full-space merges without
    an SVD, for TIES / DARE everywhere and for weights saved whole; float32 for KnOTS and
    for full-space TSV / CART / Iso on another device ("meta" stands for a GPU: the factors are
    moved there, nothing is computed). An explicit precision wins."""
    contributions, base = _saved_module(tmp_path)
    lora_only = [(parts[0],) for parts in contributions if isinstance(parts[0], LoraModule)]
    off_cpu = torch.float32 if device != "cpu" else torch.float64

    def dtypes(parts, space, merge, precision="auto"):
        parameters = MergeParameters(merge=merge, precision=precision)
        inputs = read_inputs(parts, parameters, device, base=base, space=space)
        return {(x if isinstance(x, torch.Tensor) else x[0]).dtype for x in inputs}

    for merge in ("ta", "ties", "dare", "dare_ties", "tsv", "cart", "iso_c", "iso_cts"):
        selection = merge in ("ties", "dare", "dare_ties")
        svd = merge in ("tsv", "cart", "iso_c", "iso_cts")
        assert dtypes(lora_only, "core", merge) == {torch.float64}
        assert dtypes(lora_only, "knots", merge) == {torch.float64 if selection else off_cpu}
        assert dtypes(lora_only, "full", merge) == {off_cpu if svd else torch.float64}
        # saved whole (merged in full space): float64, its Gram SVDs need it
        for space in ("core", "knots", "full"):
            assert dtypes(contributions, space, merge) == {torch.float64}
        for precision in ("float64", "float32"):
            for space in ("core", "knots", "full"):
                expected = {getattr(torch, precision)}
                assert dtypes(lora_only, space, merge, precision) == expected
