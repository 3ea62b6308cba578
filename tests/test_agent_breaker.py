"""The crash-loop breaker's record and rules (agent/breaker.py, Ledger attempts): a run that dies holding a batch
counts a death for each of its still-pending facts; two deaths isolate a fact, one more death alone quarantines it;
errors kagent reports itself do not count. The kill-driven version (SIGKILL from inside compute) is in
test_reliability_crash.py."""
from __future__ import annotations

import pytest

from agent import breaker
from agent.config import AgentConfig
from memory.ledger import Ledger, LedgerError
from memory.record import FactRecord


@pytest.fixture
def ledger(tmp_path):
    with Ledger(tmp_path / "ledger") as led:
        led.add_facts([FactRecord(subject=f"Town{i}", prompt="{} is in", target="X") for i in range(4)])
        yield led


def die_holding(ledger: Ledger, ids: list[int]) -> None:
    """A run that opened an attempt and never closed it (killed): the record is simply left open."""
    ledger.open_attempt(ids)


def test_a_run_that_died_holding_a_batch_is_recorded_once_per_attempt(ledger):
    die_holding(ledger, [1, 2, 3])
    assert breaker.recover(ledger) == [1, 2, 3]
    assert breaker.recover(ledger) == []  # closed as `died`: counted once
    [event] = ledger.events("crash")
    assert event.data["facts"] == [1, 2, 3] and "died while applying a batch of 3 fact(s)" in event.message
    assert event.message.endswith("killed, out of RAM or crashed")  # RAM, not "memory" (the fact store's word)
    assert ledger.deaths([1, 2, 3, 4]) == {1: (1, 0), 2: (1, 0), 3: (1, 0)}


def test_two_deaths_isolate_a_fact_and_one_more_alone_quarantines_it(ledger):
    cfg = AgentConfig()
    facts = ledger.facts(ids=[1, 2, 3])
    die_holding(ledger, [1, 2, 3])
    breaker.recover(ledger)
    assert [f.id for f in breaker.judge(ledger, facts, cfg).rest] == [1, 2, 3]
    die_holding(ledger, [1, 2, 3])
    breaker.recover(ledger)
    verdicts = breaker.judge(ledger, facts, cfg)
    assert [f.id for f in verdicts.alone] == [1, 2, 3] and not verdicts.quarantine
    with breaker.attempt(ledger, facts[:1]):  # fact 1 alone: the batch ends normally
        pass
    die_holding(ledger, [2])  # fact 2 alone: the run dies
    breaker.recover(ledger)
    verdicts = breaker.judge(ledger, facts, cfg)
    assert [(f.id, reason.split(" (")[0]) for f, reason in verdicts.quarantine] == [(2, "stopped the editor 3 times")]
    assert [f.id for f in verdicts.alone] == [1, 3]


def test_deaths_alone_from_the_start_quarantine_on_the_third(ledger):
    cfg = AgentConfig()
    for deaths in (1, 2, 3):
        die_holding(ledger, [4])
        breaker.recover(ledger)
        verdicts = breaker.judge(ledger, ledger.facts(ids=[4]), cfg)
        assert bool(verdicts.quarantine) == (deaths == 3), deaths


def test_the_rules_follow_the_config(ledger):
    cfg = AgentConfig(crash_isolate_after=1, crash_quarantine_after=2)
    fact = ledger.facts(ids=[1])
    die_holding(ledger, [1, 2])
    breaker.recover(ledger)
    assert breaker.judge(ledger, fact, cfg).alone == fact
    for _ in range(2):
        die_holding(ledger, [1])
        breaker.recover(ledger)
    reason = breaker.judge(ledger, fact, cfg).quarantine[0][1]
    assert reason.startswith("stopped the editor 3 times") and reason.endswith("killed, out of RAM or crashed)")


@pytest.mark.parametrize("error, counted", [(LedgerError("disk full"), False), (OSError(28, "No space left"), False),
                                            (KeyboardInterrupt(), False), (RuntimeError("can't allocate"), True),
                                            (MemoryError(), True)])
def test_errors_kagent_reports_do_not_count_and_crashes_do(ledger, error, counted):
    with pytest.raises(type(error)):
        with breaker.attempt(ledger, ledger.facts(ids=[1, 2])):
            raise error
    breaker.recover(ledger)
    assert ledger.deaths([1, 2]) == ({1: (1, 0), 2: (1, 0)} if counted else {})


def test_a_finished_batch_closes_its_attempt(ledger):
    with breaker.attempt(ledger, ledger.facts(ids=[1, 2])):
        pass
    assert breaker.recover(ledger) == [] and ledger.deaths([1, 2]) == {}
    row = ledger.db.execute("SELECT outcome, closed_at FROM attempts").fetchone()
    assert row["outcome"] == "done" and row["closed_at"] is not None
