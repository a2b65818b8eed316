"""Device options, testable without a GPU: merges that never depend on the ambient device,
the global-TIES first pass scheduled once for --multi-gpu, and device options this torch
cannot honour refused in one line before any work."""

import pytest
import torch
from helpers import invoke_cli, merge_config, merge_yaml
from torch.overrides import TorchFunctionMode

from mergekit_corespace.merges import MagnitudeSketch
from mergekit_corespace.options import MergeParameters
from mergekit_corespace.pipeline import merge_factors
from mergekit_corespace.spaces import CoreSpace, truncate

METHODS = ["ta", "mean", "ties", "dare", "dare_ties", "tsv", "cart", "iso_c", "iso_cts"]
FACTORIES = {
    torch.empty,
    torch.zeros,
    torch.ones,
    torch.full,
    torch.rand,
    torch.randn,
    torch.randint,
    torch.randperm,
    torch.arange,
    torch.linspace,
    torch.eye,
    torch.tensor,
    torch.as_tensor,
}


class FactoriesWithoutDevice(TorchFunctionMode):
    """Records each tensor factory called without ``device=``. Pushed inside a device
    context, it sees the call before the context fills in its device."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and kwargs.get("device") is None:
            self.calls.append(func.__name__)
        return func(*args, **kwargs)


def _factors(seed):
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(24, r, generator=generator, dtype=torch.float64, device="cpu"),
            torch.randn(r, 20, generator=generator, dtype=torch.float64, device="cpu"),
        )
        for r in (2, 3, 4)
    ]


def _every_merge(factors, saved):
    """Every space × method × TIES scope on random factors, a saved whole weight (full
    space), the global-TIES sketch and the adapter output's truncation."""
    results = []
    sketch = MagnitudeSketch(len(factors))
    for index, task in enumerate(CoreSpace(factors).tasks):
        sketch.add(index, task)
    thresholds = [sketch.threshold(i, 0.5) for i in range(len(factors))]
    results.append(torch.tensor(thresholds, dtype=torch.float64, device="cpu"))
    for space in ("core", "knots", "full"):
        for method in METHODS:
            density = {"density": 0.5} if method in ("ties", "dare", "dare_ties") else {}
            parameters = MergeParameters(merge=method, **density)
            delta = merge_factors(factors, [1.0, 0.5, 0.8], parameters, space, seed=3)
            results.append(delta.to_dense())
            cut = truncate(delta, rank=2)
            results += [cut.b, cut.a]
        parameters = MergeParameters(merge="ties", density=0.5, ties_scope="global")
        results.append(
            merge_factors(
                factors, [1.0, 0.5, 0.8], parameters, space, thresholds=thresholds
            ).applied_to(torch.ones(24, 20, dtype=torch.float64, device="cpu"))
        )
    results.append(merge_factors(saved, [1, 1, 1], MergeParameters(merge="dare"), seed=5).dense)
    return results


def test_every_tensor_factory_of_a_merge_names_its_device():
    """mergekit runs each --multi-gpu task inside ``with torch.device("cuda:i")``, where a
    factory without ``device=`` lands on that GPU: every factory of every merge names
    its device, so where tensors go never depends on the context."""
    factors = _factors(0)
    saved = [torch.ones(24, 20, dtype=torch.float64, device="cpu"), *_factors(1)[:2]]
    expected = _every_merge(factors, saved)
    with FactoriesWithoutDevice() as recorder:
        again = _every_merge(factors, saved)
    assert recorder.calls == []
    assert all(torch.equal(a, b) for a, b in zip(again, expected, strict=True))


def test_dare_masks_and_the_global_ties_sketch_work_inside_another_devices_context():
    """The two merges that mixed devices there: a DARE mask drawn with a CPU generator,
    and the global-TIES sketch's counts (CPU histograms added to them)."""
    tasks = [b @ a for b, a in _factors(0)]

    def run():
        sketch = MagnitudeSketch(len(tasks))
        for index, task in enumerate(tasks):
            sketch.add(index, task)
        dare = [
            merge_factors(tasks, [1, 1, 1], MergeParameters(merge=m), "full", seed=5).dense
            for m in ("dare", "dare_ties")
        ]
        return [sketch.threshold(i, 0.3) for i in range(len(tasks))], dare

    thresholds, dare = run()
    with torch.device("meta"):
        thresholds_inside, dare_inside = run()
    assert thresholds_inside == thresholds
    assert all(torch.equal(a, b) for a, b in zip(dare_inside, dare, strict=True))


def test_global_ties_first_pass_runs_once_before_the_gpus_islands(llama32, monkeypatch):
    """With --multi-gpu the thresholds task is a leading task (run once), not duplicated
    per GPU, and the TIES merges still spread over every GPU."""
    import mergekit.multigpu_executor as multigpu
    from mergekit.options import MergeOptions

    from mergekit_corespace.glue.internals import active, install, planned_merge_tasks
    from mergekit_corespace.glue.run import validate_run
    from mergekit_corespace.glue.tasks import TiesThresholdsTask, WeightMergeTask

    install()
    root, base, adapters = llama32
    config = merge_config(
        merge_yaml(base, adapters, parameters="{merge: ties, density: 0.5, ties_scope: global}")
    )
    options = MergeOptions(quiet=True)
    run = validate_run(config, options)
    tasks = planned_merge_tasks(config, options, run)
    monkeypatch.setattr(multigpu, "get_torch_accelerator_type", lambda *_: "cuda")
    with active(run):  # as inside run_merge, where mergekit builds the executor
        executor = multigpu.MultiGPUExecutor(targets=tasks, num_gpus=2)
    leading = [handle.task() for handle in executor.leading_main_handles]
    assert [type(task) for task in leading] == [TiesThresholdsTask]
    assert not executor.per_gpu_tasks
    assert sorted(str(device) for device in executor.gpu_assignments) == ["cuda:0", "cuda:1"]
    merges_per_gpu = [
        sum(isinstance(handle.task(), WeightMergeTask) for handle in handles)
        for handles in executor.gpu_assignments.values()
    ]
    merges = sum(isinstance(task, WeightMergeTask) for task in tasks)
    assert sum(merges_per_gpu) == merges and min(merges_per_gpu) >= merges // 3


NO_GPU = [
    ("--cuda", "Error: --cuda: torch "),
    ("--gpu-rich", "Error: --gpu-rich: torch "),
    ("--device cuda", "Error: --device cuda: torch "),
    ("--device cuda:1", "Error: --device cuda:1: torch "),
    ("--multi-gpu", "Error: --multi-gpu: torch "),
    ("--read-to-gpu", "Error: --read-to-gpu: torch "),
    ("--device nowhere", "Error: --device nowhere: not a device torch knows"),
]


@pytest.mark.parametrize("script", ["mergekit-yaml", "mergekit-corespace-lora"])
@pytest.mark.parametrize("option, message", NO_GPU)
def test_device_options_this_torch_cannot_honour_are_one_line_before_any_work(
    llama32, tmp_path, monkeypatch, script, option, message
):
    """As on a torch built without CUDA (the accelerator query is patched, so the test
    means the same on a GPU machine)."""
    root, base, adapters = llama32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    config = tmp_path / "merge.yml"
    config.write_text(merge_yaml(base, adapters[:2]))
    done = invoke_cli([str(config), str(tmp_path / "out"), *option.split()], script=script)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and errors[0].startswith(message), done.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merge.yml"]


def test_adapter_output_dealt_over_several_devices_gives_the_same_bytes(
    llama32, tmp_path, monkeypatch
):
    """--multi-gpu deals the modules of a merged adapter out over the GPUs, one thread
    each; here two "devices" that are both the CPU, against one."""
    import mergekit_corespace.glue.adapter_output as adapter_output
    from mergekit_corespace import merge_adapters

    root, base, adapters = llama32

    def merged(out, devices):
        monkeypatch.setattr(adapter_output, "merge_devices", lambda options: devices)
        merge_adapters(
            base,
            adapters,
            method="dare_ties",
            out=str(tmp_path / out),
            density=0.5,
            options={"random_seed": 2},
        )
        return {p.name: p.read_bytes() for p in sorted((tmp_path / out).iterdir())}

    assert merged("one", ["cpu"]) == merged("two", ["cpu", "cpu"])
