"""The tuner's search beyond a grid of λ: per-adapter weights (whose best values are known
by construction), TPE and CMA-ES seeded (same seed, same trials, same best.yml), a study
resumed after its process was killed, two workers sharing one journal file, pruning by
a part of the validation data (the median rule, and racing the best trial), and held-out
re-scoring.

The construction (``test_tune.setup``): each task's answers are the greedy outputs of the
base with both adapters active in PEFT, so task arithmetic with weights (1, 1) at λ = 1
reproduces every answer, and other weights do not.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import yaml
from test_tune import ANSWER_TOKENS, setup  # noqa: F401  (the fixture, shared)

from mergekit_corespace.errors import CoreSpaceError
from mergekit_corespace.evaluate import Evaluator, read_tasks
from mergekit_corespace.tune import STUDY_FILE, parse_grid, tune


def _tune(setup, out, grid, **settings):  # noqa: F811
    return tune(
        setup["recipe"], setup["data"], grid, metric="exact", out=out,
        max_new_tokens=ANSWER_TOKENS, progress=False, **settings,
    )  # fmt: skip


def _study(path):
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    storage = JournalStorage(JournalFileBackend(str(path)))
    return optuna.load_study(study_name="mergekit-corespace-tune", storage=storage)


def test_per_adapter_weights_known_best_wins_and_is_written_as_mergekit_reads_it(setup):  # noqa: F811
    result = _tune(setup, setup["root"] / "weights", ["lambda=1 weight=0,1,2"])
    assert len(result.rows) == 9  # three values per adapter, two adapters
    assert result.best.point == {"lambda": 1, "weight[a]": 1, "weight[b]": 1}
    assert result.best.scores == {"a": 1.0, "b": 1.0}
    for row in result.rows:
        if row is not result.best:
            assert min(row.scores.values()) < 1.0, row
    recipe = yaml.safe_load(result.recipe)
    assert [m["parameters"]["weight"] for m in recipe["models"]] == [1, 1]
    # mergekit reads the per-adapter weights of best.yml: a weight of 0 for b is a's merge
    from mergekit.config import MergeConfiguration

    from mergekit_corespace.tune import point_recipe

    config = MergeConfiguration.model_validate(
        point_recipe(yaml.safe_load(open(setup["recipe"])), {"weight[a]": 2, "weight[b]": 0})
    )
    assert [m.parameters["weight"] for m in config.models] == [2, 0]


def test_tpe_same_seed_same_trials_and_best_yml(setup):  # noqa: F811
    grid = ["lambda=0.5:1.5 weight=0.5:1.5"]
    runs = [
        _tune(setup, setup["root"] / name, grid, search="tpe", trials=5, random_seed=seed)
        for name, seed in (("tpe1", 7), ("tpe2", 7), ("tpe3", 8))
    ]
    points = [[row.point for row in run.rows] for run in runs]
    assert points[0] == points[1]
    assert points[0] != points[2]  # the seed decides the trials
    assert len(points[0]) == 5 and all(len(p) == 3 for p in points[0])
    best = [open(os.path.join(run.out, "best.yml")).read() for run in runs[:2]]
    assert best[0] == best[1]
    models = yaml.safe_load(best[0])["models"]
    winner = runs[0].best.point
    assert [m["parameters"]["weight"] for m in models] == [winner["weight[a]"], winner["weight[b]"]]
    for point in points[0]:  # drawn inside the ranges
        assert 0.5 <= point["lambda"] <= 1.5 and 0.5 <= point["weight[a]"] <= 1.5
    for name in ("optimization_history.png", "param_importances.png", "score_vs_lambda.png"):
        assert open(os.path.join(runs[0].out, name), "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_cmaes_draws_the_same_trials_from_the_same_seed_inside_its_range(setup):  # noqa: F811
    runs = [
        _tune(
            setup,
            setup["root"] / f"cmaes{i}",
            ["lambda=0.2:2"],
            search="cmaes",
            trials=6,
            random_seed=1,
        )  # fmt: skip
        for i in (1, 2)
    ]
    points = [[row.point["lambda"] for row in run.rows] for run in runs]
    assert points[0] == points[1] and len(set(points[0])) == 6
    assert all(0.2 <= value <= 2 for value in points[0])
    best = runs[0].best
    assert best.average == max(row.average for row in runs[0].rows)  # no reference: average
    assert runs[0].search["complete"] == 6


_WORKER = textwrap.dedent(
    """
    import json, os, signal, sys
    from mergekit_corespace.tune import tune
    from mergekit_corespace.tune.session import Session
    recipe, data, out, storage, trials, kill_at, counts = sys.argv[1:8]
    where, _, count = kill_at.partition(":")  # killed at the Nth stored trial or merge
    scored, merges = [], []
    def on_point(row, times):
        scored.append(row.point)
        with open(counts, "w") as handle:
            json.dump(scored, handle)
        if where == "stored" and len(scored) == int(count):
            os.kill(os.getpid(), signal.SIGKILL)
    put = Session.put
    def killing_put(self, point):
        merges.append(point)
        if where == "merge" and len(merges) == int(count):
            os.kill(os.getpid(), signal.SIGKILL)
        return put(self, point)
    Session.put = killing_put
    tune(recipe, data, ["lambda=0.5:1.5 weight=0.5:1.5"], metric="exact", out=out,
         max_new_tokens=4, progress=False, search="tpe", trials=int(trials),
         random_seed=3, on_point=on_point, storage=None if storage == "-" else storage)
    """
)


def _worker(setup, out, storage, trials, kill_at, counts):  # noqa: F811
    args = [setup["recipe"], setup["data"], str(out), storage, str(trials), kill_at]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", _WORKER, *args, str(counts)], env=env)


@pytest.mark.parametrize("kill_at", ["stored:2", "merge:3"])
def test_a_killed_run_resumes_without_scoring_a_finished_trial_again(setup, tmp_path, kill_at):  # noqa: F811
    from optuna.trial import TrialState

    out = tmp_path / "killed"
    worker = _worker(setup, out, "-", 4, kill_at, tmp_path / "first.json")
    assert worker.wait(timeout=600) == -signal.SIGKILL
    first = json.load(open(tmp_path / "first.json"))
    assert len(first) == 2  # killed once its second trial was stored, or in the third
    study = _study(out / STUDY_FILE)
    cut = [TrialState.RUNNING] if kill_at == "merge:3" else []
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE] * 2 + cut
    scored = []
    result = _tune(setup, out, ["lambda=0.5:1.5 weight=0.5:1.5"], search="tpe", trials=4,
                   random_seed=3, on_point=lambda row, times: scored.append(row.point))  # fmt: skip
    study = _study(out / STUDY_FILE)
    cut = [TrialState.FAIL] if kill_at == "merge:3" else []  # the cut trial: failed, redone
    states = sorted(t.state.name for t in study.get_trials())
    assert states == sorted(s.name for s in [TrialState.COMPLETE] * 4 + cut)
    assert len(scored) == 2  # the finished trials were not scored again
    assert [row.point for row in result.rows][:2] == first
    assert not any(point in scored for point in first)


def test_two_workers_share_one_journal_file_and_score_each_trial_once(setup, tmp_path):  # noqa: F811
    from optuna.trial import TrialState

    journal = tmp_path / "shared.journal"
    workers = [
        _worker(setup, tmp_path / f"w{i}", str(journal), 6, "none", tmp_path / f"w{i}.json")
        for i in (1, 2)
    ]
    assert [worker.wait(timeout=900) for worker in workers] == [0, 0]
    scored = [
        json.load(open(path)) if path.exists() else []
        for path in (tmp_path / "w1.json", tmp_path / "w2.json")
    ]
    assert sum(len(s) for s in scored) == 6  # every trial scored by one worker, none twice
    study = _study(journal)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 6
    assert sorted(json.dumps(t.user_attrs["point"], sort_keys=True) for t in complete) == sorted(
        json.dumps(p, sort_keys=True) for s in scored for p in s
    )
    for trial in study.get_trials(states=(TrialState.FAIL,)):  # only a surplus start fails
        assert "scores:search" not in trial.user_attrs
    assert not study.get_trials(states=(TrialState.RUNNING,))


def test_pruning_stops_low_first_parts_and_saves_examples(setup):  # noqa: F811
    lambdas = "0.25,0.5,0.75,0.9,1,1.1,1.5,2,3"
    result = _tune(setup, setup["root"] / "pruned", [f"lambda={lambdas}"], prune=True)
    search = result.search
    assert search["complete"] + search["pruned"] == 9 and search["pruned"] >= 1
    assert search["examples_scored"] < search["examples_unpruned"]
    assert result.best.point == {"lambda": 1}
    study = _study(result.out + "/" + STUDY_FILE)
    finished = sorted(study.get_trials(), key=lambda t: t.number)
    for trial in finished:  # Optuna's median rule, checked by hand on the first parts
        if trial.state.name != "PRUNED":
            continue
        earlier = [t.intermediate_values[0] for t in finished if t.number < trial.number]
        earlier.sort()
        middle = len(earlier) // 2
        median = earlier[middle] if len(earlier) % 2 else sum(earlier[middle - 1 : middle + 1]) / 2
        assert trial.intermediate_values[0] < median
        assert trial.number >= 5  # the first five trials are scored whole


def test_racing_prunes_trials_worse_than_the_best_on_the_same_examples(setup):  # noqa: F811
    import scipy.stats

    lambdas = "0.25,0.5,0.75,0.9,1,1.1,1.5,2,3"
    result = _tune(setup, setup["root"] / "raced", [f"lambda={lambdas}"], prune="wilcoxon")
    search = result.search
    assert search["prune"] == "wilcoxon"
    assert search["complete"] + search["pruned"] == 9 and search["pruned"] >= 1
    assert search["examples_scored"] < search["examples_unpruned"]
    assert result.best.point == {"lambda": 1}
    sizes = [len(task.examples) for task in read_tasks(setup["data"], {"*": "exact"})]
    whole = sum(sizes)
    study = _study(result.out + "/" + STUDY_FILE)
    finished = sorted(study.get_trials(), key=lambda t: t.number)
    verdicts = []
    for trial in finished:
        values = trial.intermediate_values
        complete = [t for t in finished if t.number < trial.number and t.state.name == "COMPLETE"]
        if trial.state.name == "COMPLETE":
            # one value per example, each its share of the normalised score
            assert sorted(values) == list(range(whole))
            assert sum(values.values()) / whole == pytest.approx(trial.value)
        if not complete:
            assert trial.state.name == "COMPLETE"  # nothing to race yet
            continue
        best = max(complete, key=lambda t: t.value)
        # the cuts: a third and two thirds of each task file, checked by hand
        for share in (1 / 3, 2 / 3):
            cut = [math.ceil(size * share) for size in sizes]
            steps = [*range(cut[0]), *range(sizes[0], sizes[0] + cut[1])]
            if not set(steps) <= set(values):
                continue
            differences = [values[s] - best.intermediate_values[s] for s in steps]
            worse = any(differences) and (
                scipy.stats.wilcoxon(differences, alternative="less", zero_method="zsplit").pvalue
                < 0.3
            )
            worse = worse and sum(values[s] for s in steps) / len(steps) < best.value
            stopped_here = trial.state.name == "PRUNED" and len(values) == len(steps)
            assert worse == stopped_here, (trial.number, share, differences)
            verdicts.append(worse)
            if stopped_here:
                assert trial.user_attrs["examples scored"] == len(steps)
                break
    assert True in verdicts and False in verdicts, verdicts  # trials stopped, and let go on
    # a study raced by one rule is not resumed by the other; a rule that does not exist
    with pytest.raises(CoreSpaceError, match="pruned by the wilcoxon rule"):
        _tune(setup, setup["root"] / "raced", [f"lambda={lambdas}"], prune="median")
    with pytest.raises(CoreSpaceError, match="--prune fast: expected one of median, wilcoxon"):
        _tune(setup, setup["root"] / "fast", [f"lambda={lambdas}"], prune="fast")


def test_held_out_examples_rescore_the_winner_and_runners_up(setup):  # noqa: F811
    result = _tune(setup, setup["root"] / "holdout", ["lambda=0.5,1,2"], holdout_fraction=0.3)
    assert [h["point"] for h in result.holdout][0] == result.best.point == {"lambda": 1}
    assert len(result.holdout) == 3
    searched = {
        (p["task"], p["line"]) for p in map(json.loads, open(result.out + "/predictions.jsonl"))
    }
    tasks = read_tasks(setup["data"], {"*": "exact"})
    every = {(t.name, e.line) for t in tasks for e in t.examples}
    assert len(every - searched) == sum(-(-len(t.examples) * 3 // 10) for t in tasks)
    assert searched < every
    winner = result.holdout[0]
    assert winner["scores"] == {"a": 1.0, "b": 1.0}  # the construction, on unseen examples
    for held in result.holdout:
        low, high = held["interval95"] or (held["holdout"], held["holdout"])
        assert low <= held["holdout"] <= high
        assert held["difference"] == pytest.approx(held["search"] - held["holdout"])
    from mergekit_corespace.tune.plan import split_holdout

    _, held_tasks = split_holdout(tasks, 0.3, None, 0)
    assert {(t.name, e.line) for t in held_tasks for e in t.examples} == every - searched
    assert "Held-out examples" in result.table()
    # a runner-up's held-out scores: its recipe merged by plain mergekit, loaded by
    # transformers and scored on exactly the held-out examples
    import mergekit.merge
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_corespace.tune import point_recipe

    runner_up = result.holdout[1]
    recipe = point_recipe(yaml.safe_load(open(setup["recipe"])), runner_up["point"])
    merged = str(setup["root"] / "holdout-runner-up")
    mergekit.merge.run_merge(MergeConfiguration.model_validate(recipe), merged,
                             options=MergeOptions(quiet=True))  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    evaluator = Evaluator(AutoTokenizer.from_pretrained(setup["base"]),
                          max_new_tokens=ANSWER_TOKENS)  # fmt: skip
    assert runner_up["scores"] == {t.name: evaluator.score(model, t) for t in held_tasks}


def test_a_study_refuses_another_search_space_and_resumes_the_same(setup, tmp_path):  # noqa: F811
    out, grid, scored = tmp_path / "space", ["lambda=0.5:1.5"], []
    first = _tune(setup, out, grid, search="tpe", trials=2, random_seed=1)
    again = _tune(setup, out, grid, search="tpe", trials=3, random_seed=1,
                  on_point=lambda row, times: scored.append(row))  # fmt: skip
    assert len(scored) == 1  # two trials were in the study already
    assert [row.point for row in again.rows][:2] == [row.point for row in first.rows]
    with pytest.raises(CoreSpaceError, match=r"study.journal: study \S+ searched another space"):
        _tune(setup, out, ["lambda=0.5:2"], search="tpe", trials=3, random_seed=1)


@pytest.mark.parametrize(
    ("grid", "settings", "message"),
    [
        (["lambda=0.5:2"], {}, r"^--grid lambda=0.5:2.0: a range is searched by --search tpe"),
        (["lambda=1"], {"trials": 5}, r"^--trials 5: a grid scores each of its 1 points"),
        (["lambda=0:2:log"], {"search": "tpe"}, r"^--grid lambda=0:2:log: a log range needs"),
        (["lambda=2:1"], {"search": "tpe"}, r"^--grid lambda=2:1: a range needs finite LOW < HIGH"),
        (["merge=ties weight=0:2"], {"search": "tpe"}, r"^--grid merge=ties weight\[a\]=0 "),
        (["merge=ta density=0.1:0.9"], {"search": "tpe"}, r"^--grid density=0.1:0.9: no point"),
        (["lambda=1"], {"holdout_fraction": 1.5}, r"^--holdout-fraction 1.5: must lie between"),
        (["lambda=1"], {"search": "tpe", "trials": 0}, r"^--trials 0: must be at least 1"),
        ([{"lambda": [1]}, {"lambda": [2]}], {"search": "tpe"}, r"^--search tpe: searches one"),
        (["merge=ta,ties:x"], {"search": "tpe"}, r"^--grid merge=ta,ties:x: a range is LOW:HIGH"),
        (["weight[c]=1"], {}, r"^--grid weight\[c\]=1: no adapter is named 'c' in models: \(adapt"),
        (["weight[c]=0:1"], {"search": "tpe"}, r"^--grid weight\[c\]=0.0:1.0: no adapter is nam"),
    ],
)
def test_bad_search_settings_stop_before_any_work(setup, tmp_path, grid, settings, message):  # noqa: F811
    out = tmp_path / "bad"
    with pytest.raises(CoreSpaceError, match=message):
        _tune(setup, out, grid, **settings)
    assert not out.exists()


def test_one_adapters_weight_is_searched_alone_and_the_others_keep_their_recipes(setup):  # noqa: F811
    result = _tune(setup, setup["root"] / "weight-b", ["lambda=1 weight[b]=0,1,2"])
    assert [row.point for row in result.rows] == [
        {"lambda": 1, "weight[b]": value} for value in (0, 1, 2)
    ]
    assert result.best.point == {"lambda": 1, "weight[b]": 1}
    assert result.best.scores == {"a": 1.0, "b": 1.0}
    models = yaml.safe_load(result.recipe)["models"]
    assert "weight" not in (models[0].get("parameters") or {})  # a: the recipe's (1)
    assert models[1]["parameters"]["weight"] == 1


def test_per_adapter_weight_keys_expand_in_the_order_of_models():
    from mergekit_corespace.tune.grid import expand_weights

    recipe = {"models": [{"model": f"base+/adapters/{name}"} for name in ("a", "b", "c")]}
    grid = parse_grid(["lambda=1 weight[c]=2 weight=0.5,1 density=0.3 weight[a]=0.1:1"])
    expanded = expand_weights(grid, recipe)
    assert list(expanded) == ["lambda", "weight[a]", "weight[b]", "weight[c]", "density"]
    assert str(expanded["weight[a]"]) == "0.1:1.0"
    assert expanded["weight[b]"] == [0.5, 1] and expanded["weight[c]"] == [2]
    alone = expand_weights(parse_grid(["weight[b]=0:2 lambda=1"]), recipe)
    assert list(alone) == ["weight[b]", "lambda"]  # a and c keep the recipe's weights
    with pytest.raises(CoreSpaceError, match=r"--grid weight\[b\]=2: weight\[b\] is given twice"):
        parse_grid(["weight[b]=1 weight[b]=2"])
    with pytest.raises(CoreSpaceError, match=r"unknown parameter 'weight\[\]'"):
        parse_grid(["weight[]=1"])


def test_ranges_and_weights_parse():
    grid = parse_grid(["lambda=0.05:3:log density=0.1:0.9 merge=ta,ties weight=0:2"])
    assert str(grid["lambda"]) == "0.05:3.0:log" and grid["lambda"].log
    assert grid["merge"] == ["ta", "ties"] and grid["weight"].high == 2.0
