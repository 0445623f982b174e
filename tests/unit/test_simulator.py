"""The deterministic simulator: a seed replays a run exactly, and a broken rule is
caught with the seed and step that reproduce it."""

from __future__ import annotations

import pytest

from clearing import pos
from clearing.codes import CardState
from clearing.model import Card
from clearing.simulator import SimulationFailure, Simulator
from medclear.infra.policy import load_policy
from medclear.infra.settings import Settings

POLICY = load_policy(Settings())


def test_the_same_seed_replays_the_same_run() -> None:
    a = Simulator(POLICY, seed=11, persons=150, days=9).run()
    b = Simulator(POLICY, seed=11, persons=150, days=9).run()
    c = Simulator(POLICY, seed=12, persons=150, days=9).run()
    assert (a.decisions, a.results, a.approved_fen, a.redeliveries) == (
        b.decisions,
        b.results,
        b.approved_fen,
        b.redeliveries,
    )
    assert (a.results, a.approved_fen) != (c.results, c.approved_fen)
    assert a.results["OK"] > 0 and a.results["CARD_PRE_LOST"] > 0  # it exercises the domain


def test_a_broken_rule_is_caught_with_its_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    real = pos.effective_state

    def pre_lost_cards_pay(card: Card, at_ms: int) -> CardState:
        state = real(card, at_ms)
        return CardState.ACTIVE if state == CardState.PRE_LOST else state

    monkeypatch.setattr(pos, "effective_state", pre_lost_cards_pay)
    with pytest.raises(SimulationFailure, match=r"seed 5, step \d+: approved .* invalid card"):
        # the check in the simulator uses the real rule, the decision the broken one
        Simulator(POLICY, seed=5, persons=300, days=10).run()
