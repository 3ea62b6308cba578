"""Guard logic: bisection finds the facts that fail on their own; probe thresholds are relative to the baseline."""
from __future__ import annotations

from agent.config import AgentConfig
from agent.guard import PROBE, Verdict, bisect, damage_failures, probe_failures


def test_bisect_isolates_the_bad_facts_and_keeps_the_rest():
    committed: list[list[int]] = []

    def attempt(group: list[int]) -> Verdict:
        if {3, 6} & set(group):
            return Verdict(False, PROBE, f"group {group} hurts")
        committed.append(group)
        return Verdict(True)

    rejected = bisect(list(range(8)), attempt)
    assert [f for f, _ in rejected] == [3, 6]
    assert sorted(f for g in committed for f in g) == [0, 1, 2, 4, 5, 7]
    assert bisect([1, 2], lambda g: Verdict(True)) == []


def test_probe_thresholds_are_relative_to_the_baseline():
    cfg = AgentConfig(known_acc_drop=0.05, ppl_ratio=1.05, retention_drop=0.1)
    ok = {"known_acc": 0.96, "perplexity": 20.9, "retention": 0.85}
    assert probe_failures(ok, 1.0, 20.0, 0.9, cfg) == []
    bad = probe_failures({"known_acc": 0.9, "perplexity": 21.5, "retention": 0.7}, 1.0, 20.0, 0.9, cfg)
    assert [b.split()[0] for b in bad] == ["known-fact", "perplexity", "retention"]
    assert "not finite" in probe_failures({"perplexity": float("nan")}, None, 20.0, None, cfg)[0]


def test_damage_counts_only_above_the_noise_floor():
    cfg = AgentConfig(damage_z=3.0, damage_tolerance=0.01)
    assert damage_failures({"perplexity": 20.0}, cfg) == []  # no floor measured: nothing to judge
    assert damage_failures({"damage": 0.5, "floor": 0.45, "excess": 0.05, "excess_se": 0.02}, cfg) == []
    assert damage_failures({"excess": 0.009, "excess_se": 0.0001}, cfg) == []  # significant but negligible
    bad = damage_failures({"damage": 0.5, "floor": 0.3, "excess": 0.2, "excess_se": 0.02}, cfg)
    assert len(bad) == 1 and bad[0].startswith("probe damage 0.500 > noise floor 0.300 by 0.200 (> 3.0 x se 0.020")
    assert damage_failures({"excess": float("nan"), "excess_se": 0.1}, cfg)
    both = probe_failures({"excess": 1.0, "excess_se": 0.1, "perplexity": 30.0}, None, 20.0, None, cfg)
    assert [b.split()[0] for b in both] == ["probe", "perplexity"]
    assert probe_failures({"known_acc": 0.5, "perplexity": 20.0}, 1.0, 20.0, None, AgentConfig()) == []  # flips: off
