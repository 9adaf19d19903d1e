"""Unit tests of the search's objective table, Pareto front and choice per budget, and of
export's choice of subnets from that record."""

import json
from types import SimpleNamespace

import pytest

from eftnas_cli import artifacts
from eftnas_cli.elastic import LayerWidth, SearchSpace, Subnet
from eftnas_cli.errors import UserError
from eftnas_cli.recipe import SearchSection
from eftnas_cli.stages.export import choose_subnets
from eftnas_cli.stages.search import OBJECTIVES, choose_per_budget, dominates, objectives_for, pareto_front

SCORE_MACS = [o for o in OBJECTIVES if o.name in ("score", "gmacs")]
WITH_LATENCY = [o for o in OBJECTIVES if o.name in ("score", "gmacs", "latency_ms")]


def record(trial, score, gmacs, latency_ms=1.0, heads=1):
    subnet = Subnet((LayerWidth(heads, 4),))
    return {"trial": trial, "score": score, "gmacs": gmacs, "macs": int(gmacs * 1e9), "latency_ms": latency_ms,
            "subnet": subnet.to_dict(), "metrics": {"score": score}}


def test_objectives_follow_the_recipe():
    assert [o.name for o in objectives_for(SearchSection())] == ["score", "gmacs"]
    latency = objectives_for(SearchSection(latency=True))
    assert [(o.name, o.direction) for o in latency] == [("score", "maximize"), ("gmacs", "minimize"),
                                                         ("latency_ms", "minimize")]


def test_pareto_front_two_objectives():
    records = [record(0, 0.80, 1.0), record(1, 0.70, 0.5), record(2, 0.65, 0.6), record(3, 0.80, 1.2),
               record(4, 0.60, 0.4), record(5, 0.70, 0.5)]
    front = pareto_front(records, SCORE_MACS)
    # 2 is beaten by 1 on both; 3 by 0 on MACs; equal records (1 and 5) do not dominate each other.
    assert sorted(r["trial"] for r in front) == [0, 1, 4, 5]


def test_pareto_front_is_n_dimensional():
    slow_but_small = record(0, 0.70, 0.5, latency_ms=9.0)
    fast_but_larger = record(1, 0.70, 0.6, latency_ms=2.0)
    dominated = record(2, 0.69, 0.6, latency_ms=3.0)
    assert sorted(r["trial"] for r in pareto_front([slow_but_small, fast_but_larger, dominated], WITH_LATENCY)) == [0, 1]
    # Without the latency axis the faster one is dominated.
    assert [r["trial"] for r in pareto_front([slow_but_small, fast_but_larger, dominated], SCORE_MACS)] == [0]
    assert dominates(fast_but_larger, dominated, WITH_LATENCY)
    assert not dominates(dominated, dominated, WITH_LATENCY)


def test_each_budget_chooses_the_largest_subnet_scoring_within_the_margin():
    full = int(2e9)
    records = [record(0, 0.80, 1.9), record(1, 0.75, 0.8), record(2, 0.75, 0.9), record(3, 0.73, 1.0),
               record(4, 0.60, 0.5)]
    best = choose_per_budget(records, [1.0, 0.5, 0.3, 0.1], full, eval_rows=400, tie_standard_errors=0.0)
    assert best["1"]["trial"] == 0
    assert best["0.5"]["trial"] == 2  # a tie in score goes to more MACs
    assert best["0.3"]["trial"] == 4
    assert best["0.1"] is None
    # One standard error of 0.75 on 400 rows is 0.0217: 0.73 is within it, 0.60 is not.
    assert artifacts.score_standard_error(0.75, 400) == pytest.approx(0.02165, abs=1e-5)
    within_one = choose_per_budget(records, [0.5, 0.45], full, eval_rows=400, tie_standard_errors=1.0)
    assert within_one["0.5"]["trial"] == 3 and within_one["0.45"]["trial"] == 2
    # On 4,000 rows the standard error is 0.0068: 0.73 is told apart from 0.75.
    assert choose_per_budget(records, [0.5], full, eval_rows=4000, tie_standard_errors=1.0)["0.5"]["trial"] == 2


def test_pareto_record_reads_the_search_choice_and_applies_its_rule_to_other_budgets():
    trials = [record(3, 0.60, 0.5), record(2, 0.75, 0.9), record(5, 0.74, 1.0), record(0, 0.80, 1.9)]
    recorded = {"0.5": record(2, 0.75, 0.9)}
    data = {"full_macs": int(2e9), "front": [trials[0], trials[1], trials[3]], "best_per_budget": recorded,
            "eval_rows": 100, "teacher": {}, "tie_standard_errors": 1.0}
    pareto = artifacts.ParetoRecord(data, trials)
    assert pareto.best(0.5)["trial"] == 2
    assert pareto.best(0.3)["trial"] == 3  # not searched for: the same rule on the trials
    assert pareto.best(0.6)["trial"] == 5  # 0.74 is within one standard error of 0.75 on 100 rows
    assert pareto.best(0.1) is None


@pytest.fixture
def searched_run(tmp_path):
    """A run directory stand-in whose search recorded budgets 0.5 and 0.3."""
    search_dir = tmp_path / "search"
    search_dir.mkdir()
    small, large = record(1, 0.6, 0.5, heads=1), record(0, 0.7, 0.9, heads=2)
    pareto = {"full_macs": int(2e9), "eval_rows": 4, "teacher": {}, "front": [small, large],
              "best_per_budget": {"0.5": large, "0.3": small}}
    (search_dir / artifacts.PARETO_FILE).write_text(json.dumps(pareto))
    (search_dir / artifacts.TRIALS_FILE).write_text(json.dumps([small, large]))
    run = SimpleNamespace(require=lambda stage, by: search_dir)
    space = SearchSpace([{"heads": [2, 1], "neurons": [4]}], full_macs=int(2e9), min_macs=int(0.4e9), seq_len=8,
                        targets=[])
    config = SimpleNamespace(model_type="bert", hidden_size=8, num_attention_heads=2, num_hidden_layers=1,
                             intermediate_size=4)
    return run, SimpleNamespace(space=space, config=config)


def test_export_chooses_the_recorded_subnet_per_budget(searched_run):
    run, supernet = searched_run
    chosen = choose_subnets(run, supernet, [0.5, 0.3], None, None)
    assert [(label, subnet.layers[0].heads, rec["trial"]) for label, subnet, rec in chosen] == [
        ("budget-0.5", 2, 0), ("budget-0.3", 1, 1)]


def test_export_chooses_a_trial_or_a_subnet_file(searched_run, tmp_path):
    run, supernet = searched_run
    [(label, subnet, rec)] = choose_subnets(run, supernet, None, 1, None)
    assert (label, subnet.layers[0].heads, rec["trial"]) == ("trial-1", 1, 1)
    path = tmp_path / "mine.json"
    Subnet((LayerWidth(2, 3),)).to_json(path)
    [(label, subnet, rec)] = choose_subnets(run, supernet, None, None, path)
    assert (label, subnet, rec) == ("mine", Subnet((LayerWidth(2, 3),)), None)


@pytest.mark.parametrize("budget, message", [
    (0.1, r"below the search space's smallest subnet \(0.200 of the full MACs, set by space.cmin\)"),
])
def test_export_budget_errors_say_what_is_valid(searched_run, budget, message):
    run, supernet = searched_run
    with pytest.raises(UserError, match=message):
        choose_subnets(run, supernet, [budget], None, None)


def test_export_refuses_a_subnet_file_name_that_is_no_folder_name(searched_run, tmp_path):
    run, supernet = searched_run
    path = tmp_path / "...json"
    Subnet((LayerWidth(2, 3),)).to_json(path)
    with pytest.raises(UserError, match="becomes the export's folder name"):
        choose_subnets(run, supernet, None, None, path)


def test_the_first_generation_spreads_below_the_largest_budget():
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from eftnas_cli.recipe import SpaceSection
    from eftnas_cli.stages.gen_space import build_space
    from eftnas_cli.stages.search import first_generation
    from eftnas_cli.supernet import Supernet

    config = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
    generator = torch.Generator().manual_seed(0)
    space = build_space(config, torch.rand(6, 12, generator=generator), torch.rand(6, 1536, generator=generator),
                        SpaceSection(num_targets=5, cmin=0.25))
    supernet = Supernet(BertForSequenceClassification(config), space)
    chosen = first_generation(supernet, SearchSection(population=16, trials=16, budgets=[0.7, 0.35]), seed=0)
    assert len(chosen) == 16 == len(set(chosen))
    fractions = sorted(supernet.macs(subnet) / space.full_macs for subnet in chosen)
    assert fractions[-1] <= 0.7 * 1.02
    # Uniform widths almost never fall below 0.35 of the MACs: a quarter of this generation does.
    assert sum(f <= 0.35 for f in fractions) >= 4, fractions
