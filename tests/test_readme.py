"""The README's commands and parameter table stay true to the code and CI."""

import re
from pathlib import Path

from mergekit_corespace.options import PER_ADAPTER_DEFAULTS, parameter_names

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
CI = REPO / ".ci" / "run"
SETUP = REPO / "scripts" / "setup"
BENCH = REPO / "bench"
DEMO = "python bench/llm/run.py --quick"


def _quick_start_commands():
    section = README.read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section)


def test_ci_runs_the_readme_setup_and_exactly_the_readme_test_command():
    setup, test = _quick_start_commands()
    assert setup == f"bash scripts/setup && . .venv/bin/activate && {DEMO}"
    ci = [line for line in CI.read_text().splitlines() if line.strip() and line[0] != "#"]
    assert ci[-1] == test
    assert "bash scripts/setup" in ci
    # scripts/setup is the only list: neither CI nor the README's commands install anything
    assert not [line for line in ci if "pip " in line]
    assert "pip " not in setup and "pip " not in test


def test_setup_installs_the_cpu_torch_before_anything_that_depends_on_it():
    script = SETUP.read_text()
    assert script.index("pip install torch==2.13.0") < script.index("pip install -e")
    assert script.index("pip install -e") < script.index("pip install --no-deps")


def test_setup_installs_every_package_the_project_tells_a_user_to_install():
    """Every ``pip install X`` the README, a benchmark's page or its error message asks
    for is installed by scripts/setup: pinned wheels at the same version, the rest as a
    dependency or extra of the package that scripts/setup installs."""
    import tomllib

    script = SETUP.read_text()
    pinned = dict(re.findall(r"([A-Za-z0-9_.-]+)==([A-Za-z0-9_.]+)", script))
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = re.search(r'pip install -e "\.\[([a-z,-]+)\]"', script).group(1).split(",")
    requirements = project["dependencies"] + [
        requirement for extra in extras for requirement in project["optional-dependencies"][extra]
    ]
    installed = {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower() for r in requirements}
    sources = [README, *BENCH.rglob("*.py"), *BENCH.rglob("*.md")]
    asked = []
    for source in sources:
        for command in re.findall(r"pip install ([^`&\n\"')]+)", source.read_text()):
            for word in command.split():
                if not word.startswith(("-", ".", '"')):  # options and the local package
                    asked.append((source.name, word))
    assert len(asked) > 5  # the hints were found
    for source, word in asked:
        name, _, version = word.partition("==")
        if version:
            assert pinned.get(name) == version, f"{source}: {word} (scripts/setup: {pinned})"
        else:
            assert name.lower() in installed or name in pinned, f"{source}: {word}"


def test_every_parameter_is_documented():
    table = README.read_text().split("### Parameters", 1)[1].split("\n### ", 1)[0]
    for name in [*parameter_names(), *PER_ADAPTER_DEFAULTS]:
        assert f"| `{name}` |" in table, name


def test_every_yaml_example_is_a_valid_configuration():
    import yaml

    from mergekit_corespace.glue.registration import METHOD_SPACES
    from mergekit_corespace.options import MergeParameters

    examples = [
        yaml.safe_load(block)
        for block in re.findall(r"```yaml\n(.+?)```", README.read_text(), re.S)
    ]
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
