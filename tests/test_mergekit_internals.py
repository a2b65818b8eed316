"""Fails when mergekit changes the internals the glue relies on (see glue/internals.py)."""

import hashlib
import importlib
import inspect
from importlib.metadata import version

import pytest
from helpers import run_in_process
from packaging.specifiers import SpecifierSet

from mergekit_corespace import toy
from mergekit_corespace.glue import internals

# sha256 (first 16 hex digits) of the source of each internal, as checked for mergekit 0.1.5.
# A mismatch means mergekit changed underneath: re-read the function, re-check the glue,
# then update the fingerprint (and SUPPORTED_MERGEKIT).
FINGERPRINTS = {
    "mergekit.merge.run_merge": "4456933bae68952d",
    "mergekit.io.tasks.LoaderCache.get": "814bddf2f136ee78",
    "mergekit.io.tasks.LoaderCache.setup": "57a372a7c77a37b2",
    "mergekit.parameter_resolver.resolve_parameters": "25ee301e6ecb2ac9",
    "mergekit.plan.MergePlanner.plan_tensor": "14342e40ba15bc9e",
    "mergekit.plan.MergePlanner.plan_to_disk": "8c10e5aa9f389ea4",
    "mergekit.io.tasks.LoadTensor": "8c9216a72d98173e",
    "mergekit.plan.MergePlanner.__init__": "a22d2960962049f6",
    "mergekit.plan.MergePlanner._plan": "7d1537dbe8fa7495",
}


def _resolve(dotted: str):
    parts = dotted.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for name in parts[split:]:
            target = getattr(target, name)
        return inspect.unwrap(target)
    raise ImportError(dotted)


def test_installed_mergekit_is_in_the_supported_range():
    assert version("mergekit") in SpecifierSet(internals.SUPPORTED_MERGEKIT)


@pytest.mark.parametrize("internal", internals.INTERNALS)
def test_internal_is_unchanged(internal):
    source = inspect.getsource(_resolve(internal))
    assert hashlib.sha256(source.encode()).hexdigest()[:16] == FINGERPRINTS[internal], (
        f"mergekit changed {internal}; re-check mergekit_corespace/glue/internals.py against it"
    )


def test_every_touched_internal_is_fingerprinted():
    assert set(FINGERPRINTS) == set(internals.INTERNALS)


def test_internals_pass_the_runtime_check():
    import mergekit.merge

    internals.check_internals(mergekit.merge)


def test_upstream_bert_bug_is_still_there(tmp_path):
    """mergekit 0.1.5 cannot merge BERT (plan.py: list + tuple aliases). When this test fails,
    upstream fixed it: our planner's tuple-safe optional-weight lookup is then no longer a
    workaround, and this test can go. (Core space on BERT is covered in test_core_space_ta.)"""
    first = toy.save_tiny_model(str(tmp_path / "a"), "bert", seed=1)
    second = toy.save_tiny_model(str(tmp_path / "b"), "bert", seed=2)
    config = (
        f"merge_method: linear\nmodels:\n  - model: {first}\n  - model: {second}\n"
        "parameters: {weight: 0.5}\n"
    )
    with pytest.raises(TypeError, match=r'can only concatenate list \(not "tuple"\) to list'):
        run_in_process(config, tmp_path / "out")
