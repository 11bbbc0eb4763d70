"""``peft_scale.adapter_choice``: the rule that gives each token to one of several routed adapters (the highest claiming
score, unless a router that outranks it claims the token too) and how the outranking is read off the configs. The
same rule on whole models: ``test_several_routed_adapters.py``."""

from __future__ import annotations

import torch
from conftest import route_config

from peft_scale.adapter_choice import choose_adapters, outranking


def test_the_joint_rule_takes_the_most_confident_claiming_router():
    scores = [torch.tensor([[0.9, 0.6, 0.3, 0.7, 0.95]]), torch.tensor([[0.8, 0.9, 0.2, 0.7, 0.99]])]
    claims = [scores[0] >= 0.5, scores[1] >= 0.85]  # the second router's threshold is higher
    # 0: both claim, the first is higher; 1: both, the second; 2: neither; 3: only the first (0.7 < 0.85);
    # 4: both, the second
    assert choose_adapters(scores, claims).tolist() == [[0, 1, -1, 0, 1]]
    tie = [torch.tensor([[0.7]]), torch.tensor([[0.7]])]
    assert choose_adapters(tie, [t >= 0.5 for t in tie]).tolist() == [[0]]  # a tie: the adapter that comes first


def test_the_joint_rule_gives_a_token_to_the_router_that_outranks_the_others():
    scores = [torch.tensor([[0.99, 0.99, 0.9, 0.3]]), torch.tensor([[0.6, 0.3, 0.9, 0.95]])]
    claims = [s >= 0.5 for s in scores]
    outranks = torch.tensor([[False, False], [True, False]])  # the second router outranks the first
    # 0: both claim, the second takes it although it scores lower; 1: only the first; 2: both, the second;
    # 3: only the second
    assert choose_adapters(scores, claims, outranks).tolist() == [[1, 0, 1, 1]]
    assert choose_adapters(scores, claims).tolist() == [[0, 0, 0, 1]]  # the plain rule
    # a cycle (a over b over c over a) where all three claim: every claim is beaten, so the plain rule decides
    three = [torch.tensor([[0.7]]), torch.tensor([[0.9]]), torch.tensor([[0.8]])]
    cycle = torch.tensor([[False, True, False], [False, False, True], [True, False, False]])
    assert choose_adapters(three, [t >= 0.5 for t in three], cycle).tolist() == [[1]]


def test_outranking_reads_which_adapters_each_router_was_fitted_against():
    def fitted_against(*names):
        return route_config(router_outranks=list(names))

    # fr was fitted with es's text as other_domains={"es": ...}; es before fr existed
    assert outranking(["es", "fr"], {"es": fitted_against(), "fr": fitted_against("es")}).tolist() == [
        [False, False],
        [True, False],
    ]
    # fitted against each other: both learned the difference, the scores decide
    assert outranking(["es", "fr"], {"es": fitted_against("fr"), "fr": fitted_against("es")}) is None
    # a report saved before the key existed, no report, or another domain's name: nothing outranked
    old_report = route_config(router_report={"old_to_base": 0.99})
    assert outranking(["es", "fr"], {"es": old_report, "fr": route_config()}) is None
    assert outranking(["es", "fr"], {"es": fitted_against("de"), "fr": fitted_against()}) is None
