"""Bad parameters are one clear error naming the field, raised before any output exists."""

import pytest
from helpers import run_cli, run_in_process

from mergekit_corespace import toy
from mergekit_corespace.errors import CoreSpaceError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    base = toy.save_tiny_model(str(root / "base"))
    adapters = [toy.save_lora_adapter(base, str(root / f"a{i}"), r=4, seed=i) for i in (1, 2)]
    return base, adapters


def _config(base, adapters, parameters="", model_parameters="{weight: 1.0}", method="core_space"):
    models = "".join(
        f"  - model: {base}+{a}\n    parameters: {model_parameters}\n" for a in adapters
    )
    return f"merge_method: {method}\nbase_model: {base}\nmodels:\n{models}{parameters}"


BAD = {
    "unknown_parameter": (
        "parameters:\n  lamda: 0.5\n",
        "{weight: 1.0}",
        r"parameters\.lamda: unknown parameter",
    ),
    "ill_typed_lambda": (
        "parameters:\n  lambda: lots\n",
        "{weight: 1.0}",
        r"parameters\.lambda: .*valid number",
    ),
    "unknown_inner_method": (
        "parameters:\n  merge: average\n",
        "{weight: 1.0}",
        r"parameters\.merge: .*'ta'",
    ),
    "ill_typed_weight": ("", "{weight: heavy}", r"models\[0\]\.parameters\.weight: .*valid number"),
    "unknown_model_parameter": (
        "",
        "{weight: 1.0, density: 0.5}",
        r"models\[0\]\.parameters\.density: unknown",
    ),
    "shared_parameter_under_a_model": (
        "",
        "{weight: 1.0, lambda: 2}",
        r"models\[0\]\.parameters\.lambda: .*top-level",
    ),
    "bad_value_in_a_gradient": (
        "parameters:\n  lambda: [0.5, nope]\n",
        "{weight: 1.0}",
        r"parameters\.lambda",
    ),
    "bad_value_in_a_filter": (
        "parameters:\n  lambda:\n    - filter: self_attn\n      value: x\n    - value: 1\n",
        "{weight: 1.0}",
        r"parameters\.lambda",
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_parameter_is_named_and_nothing_is_written(tiny, tmp_path, case):
    parameters, model_parameters, message = BAD[case]
    base, adapters = tiny
    with pytest.raises(CoreSpaceError, match=message):
        run_in_process(_config(base, adapters, parameters, model_parameters), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_missing_base_model_and_plain_models_are_refused(tiny, tmp_path):
    base, adapters = tiny
    no_base = f"merge_method: core_space\nmodels:\n  - model: {base}+{adapters[0]}\n"
    with pytest.raises(CoreSpaceError, match="base_model.*required"):
        run_in_process(no_base, tmp_path / "out")
    plain = f"merge_method: core_space\nbase_model: {base}\nmodels:\n  - model: {adapters[0]}\n"
    with pytest.raises(CoreSpaceError, match="not a LoRA adapter"):
        run_in_process(plain, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_mean_with_weights_summing_to_zero_is_an_error(tiny, tmp_path):
    base, adapters = tiny
    text = (
        f"merge_method: core_space\nbase_model: {base}\nmodels:\n"
        f"  - model: {base}+{adapters[0]}\n    parameters: {{weight: 1.0}}\n"
        f"  - model: {base}+{adapters[1]}\n    parameters: {{weight: -1.0}}\n"
        "parameters:\n  merge: mean\n"
    )
    with pytest.raises(CoreSpaceError, match="sum to 0; merge: mean"):
        run_in_process(text, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_mergekit_yaml_prints_the_error_without_a_traceback(tiny, tmp_path):
    base, adapters = tiny
    config = tmp_path / "bad.yml"
    config.write_text(_config(base, adapters, "parameters:\n  lamda: 0.5\n"))
    done = run_cli([str(config), str(tmp_path / "out")])
    assert done.returncode == 1
    assert "Error: parameters.lamda: unknown parameter for core_space" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()
