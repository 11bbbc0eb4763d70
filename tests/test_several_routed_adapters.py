"""One learned-route adapter per domain, several active together (``peft_scale.adapter_choice``: the joint rule).

Three separable synthetic domains on a tiny 4-layer Llama (``conftest.py``'s model and helpers): the *base* domain
(token ids 4-63), a first new domain ``es`` (ids 64-95) and a second ``fr`` (ids 96-127). The base model is trained
on all three first, so that, like a pre-trained model that has seen both languages' tokens, its stream tells them
apart; then ``es`` is fitted and trained, then ``fr`` (its router fitted against the base domain and ``es``'s text).
"""

from __future__ import annotations

import copy
import json
import warnings

import huggingface_hub
import pytest
import torch
from conftest import (
    BASE, ES, FR, MODES, PRESERVE, domain_ids, reference_ema, route_config, router_logits, run_in_fresh_process,
)  # fmt: skip
from peft import get_peft_model
from peft.tuners.tuners_utils import BaseTuner
from tiny_models import perturb_adapter

import peft_scale
from peft_scale import ScaleConfig, fit_router, routing_confusion
from peft_scale.adapter_choice import choose_adapters
from peft_scale.model_card import SECTION_END, SECTION_START


def config(mode: str = "ffn", **overrides) -> ScaleConfig:
    return route_config(mode, **overrides)


def train(model, adapter: str, domain, steps: int = 8, seed: int = 0) -> None:
    """A few Adam steps on ``domain``, with ``adapter`` active alone (PEFT: only its blocks are trainable)."""
    model.set_adapter(adapter)
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        ids = domain_ids(domain, 8, 24, seed=seed + step)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def adapter_state(model, adapter: str) -> dict[str, torch.Tensor]:
    """Every tensor of one adapter (its blocks and its router's buffers), cloned."""
    return {name: t.detach().clone() for name, t in model.state_dict().items() if f".{adapter}." in name + "."}


BIG = {"base": domain_ids(BASE, 64, 48, seed=50), "es": domain_ids(ES, 64, 48, seed=51), "fr": domain_ids(FR, 64, 48, seed=52)}
PROBES = {"base": domain_ids(BASE, 4, 16, seed=7), "es": domain_ids(ES, 4, 16, seed=8), "fr": domain_ids(FR, 4, 16, seed=9)}


@pytest.fixture(scope="module", params=list(MODES))
def stages(request, speaker):
    """The sequence: base model -> ``es`` fitted and trained -> ``fr`` added, fitted and trained -> ``es``'s router
    refitted with ``fr``'s text in its old side (it never saw it, see
    ``test_an_earlier_router_claims_a_later_domain_until_refitted``) -> both active."""
    mode = request.param
    reference = copy.deepcopy(speaker)
    model = get_peft_model(copy.deepcopy(speaker), config(mode), adapter_name="es")
    es_data, fr_data, base_data = domain_ids(ES, seed=1), domain_ids(FR, seed=3), domain_ids(BASE, seed=2)
    es_report = fit_router(model, es_data, base_data, adapter_name="es", progress=False)
    train(model, "es", ES, seed=100)
    before, before_routing = {}, {}
    with torch.no_grad():
        for name, ids in PROBES.items():
            before[name] = model(input_ids=ids).logits
            before_routing[name] = model.base_model.last_routing.sent_to("es")
    es_state = adapter_state(model, "es")
    model.add_adapter("fr", config(mode))
    model.set_adapter("fr")
    # the old side of the new domain's router: the base model's domain and the earlier domain's text
    with warnings.catch_warnings(record=True) as fr_warnings:  # es's router claims fr's text: see the report
        warnings.simplefilter("always")
        fr_report = fit_router(model, fr_data, torch.cat([base_data, es_data]), adapter_name="fr", progress=False)
    train(model, "fr", FR, seed=200)
    es_after_fr = adapter_state(model, "es")
    with torch.no_grad():
        fr_alone = model(input_ids=PROBES["fr"]).logits
    model.set_adapter("es")
    es_alone = routing_confusion(model, BIG)
    model.base_model.set_adapter(["es", "fr"])
    unrefitted = routing_confusion(model, BIG)
    with warnings.catch_warnings(record=True) as refit_warnings:
        warnings.simplefilter("always")
        es_refit = fit_router(model, es_data, torch.cat([base_data, fr_data]), adapter_name="es", progress=False)
    return dict(
        mode=mode, model=model, reference=reference, before=before, before_routing=before_routing, es_state=es_state,
        es_after_fr=es_after_fr, fr_alone=fr_alone, es_alone=es_alone, unrefitted=unrefitted,
        reports={"es": es_report, "fr": fr_report, "es refitted": es_refit},
        warnings={"fr": [str(w.message) for w in fr_warnings], "es refitted": [str(w.message) for w in refit_warnings]},
    )


# ------------------------------------------------------------------------------------ 1. every domain keeps its own


def test_every_domain_gives_what_it_gave_before_the_next_adapter_was_added(stages):
    model, reference = stages["model"], stages["reference"]
    assert model.base_model.active_adapters == ["es", "fr"]
    with torch.no_grad():
        # the base model's domain: no router claims it, the base model's logits
        logits = model(input_ids=PROBES["base"]).logits
        routing = model.base_model.last_routing
        assert routing.adapters == ("es", "fr") and routing.to_preservation.all()
        assert (logits - reference(input_ids=PROBES["base"]).logits).abs().max() <= 1e-6
        # the first domain: the same decisions as before fr existed, and the logits es gave alone before fr trained
        logits = model(input_ids=PROBES["es"]).logits
        routing = model.base_model.last_routing
        unchanged = (routing.sent_to("es") == stages["before_routing"]["es"]).all(dim=1)  # rows, every token
        assert unchanged.all() and not routing.sent_to("fr").any()
        assert (logits - stages["before"]["es"])[unchanged].abs().max() <= 1e-6
        assert (logits - reference(input_ids=PROBES["es"]).logits).abs().max() > 1e-2  # es did learn something
        # the second domain: its tokens go to fr and get what fr computes alone
        logits = model(input_ids=PROBES["fr"]).logits
        routing = model.base_model.last_routing
        assert routing.sent_to("fr").all()
        assert (logits - stages["fr_alone"]).abs().max() <= 1e-6
        assert (logits - stages["before"]["fr"]).abs().max() > 1e-2


def test_training_one_adapter_leaves_the_other_bit_identical(stages):
    """``es``'s blocks and router, saved before ``fr`` was added, fitted and trained: every tensor bit-equal."""
    now = stages["es_after_fr"]
    assert now.keys() == stages["es_state"].keys() and any("scale_router" in key for key in now)
    for key, tensor in stages["es_state"].items():
        assert torch.equal(now[key], tensor), key
    # refitting es's router afterwards changed its router and nothing else of es
    refitted = adapter_state(stages["model"], "es")
    for key, tensor in stages["es_state"].items():
        if ".scale_router." in key:
            assert key.endswith((".threshold", ".fitted")) or not torch.equal(refitted[key], tensor), key
        else:
            assert torch.equal(refitted[key], tensor), key


def test_an_earlier_router_claims_a_later_domain_until_refitted(stages):
    """Measured: es's router, fitted against the base domain only, never saw fr's text, and it claims fr's tokens
    (with es active alone they go to es). Routed together with fr's router (fitted with es's text in its old side,
    not as ``other_domains``, so it does not outrank es's), both claim fr's tokens and the higher of two saturated
    scores takes each: a matter of rounding (es took them on one machine, fr on another). Refitting es's router with
    fr's text in its old side (its blocks untouched) sends each domain to its own adapter."""
    for report in stages["reports"].values():
        assert report.old_to_base >= 0.99 and report.new_to_expansion >= 0.99, report
    alone, before, after = stages["es_alone"], stages["unrefitted"], routing_confusion(stages["model"], BIG)
    assert alone["fr"]["es"] >= 0.9 and alone["es"]["es"] >= 0.99 and alone["base"]["base"] >= 0.99, alone
    assert before["fr"]["base"] <= 0.01 and before["es"]["es"] >= 0.99 and before["base"]["base"] >= 0.99, before
    for domain in ("base", "es", "fr"):
        assert after[domain][domain] >= 0.99, after


def claimed_warning(adapter: str, other: str, share: float) -> str:
    return (
        f"fit_router: the router of adapter {other!r} claims {share:.1%} of the held-out new tokens of adapter "
        f"{adapter!r} (score at or above its own threshold; more than 5%): routed together, those tokens can go to "
        f"{other!r} instead of {adapter!r}. Fit this router with the text of {other!r} as an other domain named after "
        f"its adapter, e.g. fit_router(model, new_data, old_data, other_domains={{{other!r}: {other}_data}}, "
        f"adapter_name={adapter!r}): it then outranks the router of {other!r} (a token both claim goes to {adapter!r}) "
        "and that router needs no refit (docs/several-domains.md); domains this close may also be one domain, for one "
        "adapter."
    )


def test_fit_router_reports_the_share_of_its_tokens_the_other_routers_claim(stages):
    """The same case from ``fit_router``'s report: fitting fr, es's router (fitted against the base domain alone)
    claims its held-out tokens, and fit_router warns with the fix; once es is refitted with fr's text in its old side,
    fr's router (fitted with es's text in its old side) claims none of es's tokens, and nothing is said."""
    reports = stages["reports"]
    assert reports["es"].claimed_by_other_adapters == {}  # the first adapter: no other router
    assert "claimed by other adapters" not in str(reports["es"])
    share = reports["fr"].claimed_by_other_adapters["es"]
    assert list(reports["fr"].claimed_by_other_adapters) == ["es"] and share >= 0.9, reports["fr"]
    assert f"held-out new tokens claimed by other adapters' routers: 'es' {share:.2%}" in str(reports["fr"])
    assert [text for text in stages["warnings"]["fr"] if text.startswith("fit_router")] == [
        claimed_warning("fr", "es", share)
    ]
    refitted = reports["es refitted"].claimed_by_other_adapters
    assert list(refitted) == ["fr"] and refitted["fr"] <= 0.01, refitted
    assert not any(text.startswith("fit_router") for text in stages["warnings"]["es refitted"])
    # recorded in the config, so the saved adapter says it
    recorded = stages["model"].peft_config["es"].router_report["claimed_by_other_adapters"]
    assert recorded == {"fr": round(refitted["fr"], 4)}


def test_fit_router_warns_when_two_domains_overlap(speaker):
    """Two adapters fitted on the same text: the first's router claims (nearly) every held-out token of the second.
    A router that is not fitted, or that reads another layer (it cannot route together with these), is not counted."""
    model = get_peft_model(copy.deepcopy(speaker), config(), adapter_name="es")
    model.add_adapter("fr", config())
    model.add_adapter("de", config(preserve_layers=PRESERVE + 1))
    data, old = domain_ids(ES, seed=1), domain_ids(BASE, seed=2)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="fit_router")  # fr's router is not fitted yet: nothing to report
        first = fit_router(model, data, old, adapter_name="es", progress=False)
    assert first.claimed_by_other_adapters == {}
    assert model.peft_config["es"].router_report["claimed_by_other_adapters"] == {}
    with pytest.warns(UserWarning, match="fit_router: the router of adapter 'es' claims") as caught:
        second = fit_router(model, data, old, adapter_name="fr", progress=False)
    share = second.claimed_by_other_adapters["es"]
    assert list(second.claimed_by_other_adapters) == ["es"] and share >= 0.95, second
    said = [str(w.message) for w in caught if str(w.message).startswith("fit_router")]
    assert said == [claimed_warning("fr", "es", share)]
    assert model.peft_config["fr"].router_report["claimed_by_other_adapters"] == {"es": round(share, 4)}
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="fit_router")
        assert fit_router(model, data, old, adapter_name="de", progress=False).claimed_by_other_adapters == {}


# two new domains that overlap partly (token ids 88-103 in both), for fit_router's other_domains
ES_LIKE, FR_LIKE = (64, 104), (88, 128)
OVERLAP = {
    "es": domain_ids(ES_LIKE, 32, 32, seed=1),
    "fr": domain_ids(FR_LIKE, 32, 32, seed=3),
    "base": domain_ids(BASE, 32, 32, seed=2),
}


@pytest.fixture(scope="module")
def overlapping(speaker):
    """``es``'s router fitted on ``ES_LIKE`` text twice: with ``FR_LIKE`` text in its old side, and with it as
    ``other_domains`` (the base domain the old side)."""
    model = get_peft_model(copy.deepcopy(speaker), config(), adapter_name="es")
    fit = dict(adapter_name="es", progress=False)
    in_old = fit_router(model, OVERLAP["es"], torch.cat([OVERLAP["base"], OVERLAP["fr"]]), **fit)
    recorded_in_old = copy.deepcopy(model.peft_config["es"].router_report)
    pairwise = fit_router(model, OVERLAP["es"], OVERLAP["base"], other_domains={"fr": OVERLAP["fr"]}, **fit)
    return dict(model=model, in_old=in_old, pairwise=pairwise, recorded_in_old=recorded_in_old)


def test_other_domains_are_negatives_not_calibrated_on(overlapping):
    """With the other new domain in the old side, the threshold must keep 99% of its tokens (40% of which are ids
    es's text has too) out, and es's own text pays; as other_domains, the threshold bounds the base domain only:
    lower, es's recall higher, and the base domain's held-out tokens still at most max_old_error from the base."""
    in_old, pairwise = overlapping["in_old"], overlapping["pairwise"]
    assert pairwise.threshold < in_old.threshold, (pairwise, in_old)
    assert pairwise.new_to_expansion >= in_old.new_to_expansion + 0.2, (pairwise, in_old)
    assert 1 - pairwise.old_to_base <= 0.01 + 0.01, pairwise  # the held-out bound, with a tolerance
    assert 1 - pairwise.calibration_old_to_base <= 0.01
    # the price: with es active alone, the fr tokens it claims go to es (the joint rule decides between routers)
    assert list(pairwise.other_to_expansion) == ["fr"] and 0 < pairwise.other_to_expansion["fr"] < 0.5, pairwise
    assert pairwise.held_out_tokens["old"] == pairwise.other_held_out_tokens["fr"] > 0  # the same split sizes
    assert in_old.other_to_expansion == {} == in_old.other_held_out_tokens
    assert in_old.tokens["old"] == 2 * pairwise.tokens["old"]  # the fr text is not part of the old side


def test_the_report_says_what_the_router_claims_of_the_other_domains(overlapping):
    pairwise, in_old = overlapping["pairwise"], overlapping["in_old"]
    share, held_out = pairwise.other_to_expansion["fr"], pairwise.other_held_out_tokens["fr"]
    assert (
        "held-out tokens of the other domains routed to the expansion (negatives, not calibrated on): "
        f"'fr' {share:.2%} of {held_out:,}"
    ) in str(pairwise)
    assert "other domains" not in str(in_old)
    # recorded in the config (the saved adapter says it); a report saved before the key existed still loads
    assert overlapping["model"].peft_config["es"].router_report["other_to_expansion"] == {"fr": round(share, 4)}
    assert overlapping["recorded_in_old"]["other_to_expansion"] == {}


def test_a_router_report_saved_without_other_to_expansion_loads(overlapping, speaker, tmp_path):
    from peft import PeftModel

    model = overlapping["model"]
    model.save_pretrained(tmp_path)
    path = tmp_path / "es" / "adapter_config.json"  # (PEFT: a subfolder for an adapter not named "default")
    saved = json.loads(path.read_text())
    del saved["router_report"]["other_to_expansion"], saved["router_report"]["claimed_by_other_adapters"]
    path.write_text(json.dumps(saved))
    loaded = PeftModel.from_pretrained(copy.deepcopy(speaker), tmp_path, subfolder="es", adapter_name="es")
    assert "other_to_expansion" not in loaded.peft_config["es"].router_report
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=PROBES["es"]).logits, model(input_ids=PROBES["es"]).logits)
    loaded.save_pretrained(tmp_path / "again")  # the model card reads the report
    assert "learned router" in (tmp_path / "again" / "README.md").read_text()


@pytest.mark.parametrize(
    ("other_domains", "error", "message"),
    [
        (OVERLAP["fr"], TypeError, r"^fit_router: other_domains is a Tensor; give a dict of domain name -> token ids "
         r"\(each in the forms new_data takes\), e.g. other_domains=\{'fr': fr_blocks\}\.$"),
        ([OVERLAP["fr"]], TypeError, r"^fit_router: other_domains is a list; give a dict"),
        ({}, ValueError, r"^fit_router: other_domains is an empty dict; give None, or name -> token ids"),
        ({3: OVERLAP["fr"]}, ValueError, r"^fit_router: other_domains has the key 3; its keys name the domains in the "
         r"report, as non-empty strings"),
        ({"": OVERLAP["fr"]}, ValueError, r"^fit_router: other_domains has the key ''"),
        ({"fr": "bonjour"}, TypeError, r"^fit_router: other_domains\['fr'\] is a str\. Give other_domains\['fr'\] as a "
         r"LongTensor of token ids"),
        ({"fr": torch.rand(2, 3)}, ValueError, r"other_domains\['fr'\] is a torch.float32 tensor of shape \(2, 3\)"),
        ({"fr": []}, ValueError, r"^fit_router: other_domains\['fr'\] is empty \(no tokens\)"),
        ({"fr": torch.full((4, 3), 500)}, ValueError, r"other_domains\['fr'\] holds token id 500, outside the model's "
         "vocabulary of 128"),
        ({"fr": OVERLAP["fr"][:2]}, ValueError, r"^fit_router: other_domains\['fr'\] has 2 sequence\(s\); at least 3 "
         r"are needed \(one each to fit, calibrate and hold out\)"),
    ],
)  # fmt: skip
def test_fit_router_bad_other_domains(speaker, other_domains, error, message):
    model = get_peft_model(copy.deepcopy(speaker), config(), adapter_name="es")
    with pytest.raises(error, match=message):
        fit_router(model, OVERLAP["es"], OVERLAP["base"], other_domains=other_domains, progress=False)


@pytest.fixture(scope="module")
def unrefitted(speaker):
    """The sequence without a refit: ``es`` fitted against the base domain and trained; ``fr`` fitted against the
    base domain with ``es``'s text as ``other_domains={"es": ...}`` (named after its adapter: ``fr``'s router
    outranks ``es``'s), trained; both active, ``es``'s router as it was fitted before ``fr`` existed."""
    model = get_peft_model(copy.deepcopy(speaker), config(), adapter_name="es")
    es_data, fr_data, base_data = domain_ids(ES, seed=1), domain_ids(FR, seed=3), domain_ids(BASE, seed=2)
    es_report = fit_router(model, es_data, base_data, adapter_name="es", progress=False)
    train(model, "es", ES, seed=100)
    with torch.no_grad():
        before = {name: model(input_ids=ids).logits for name, ids in PROBES.items()}
        model(input_ids=PROBES["es"])
        before_routing = model.base_model.last_routing.sent_to("es")
    es_state = adapter_state(model, "es")
    model.add_adapter("fr", config())
    model.set_adapter("fr")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fr_report = fit_router(
            model, fr_data, base_data, other_domains={"es": es_data}, adapter_name="fr", progress=False
        )
    train(model, "fr", FR, seed=200)
    with torch.no_grad():
        fr_alone = model(input_ids=PROBES["fr"]).logits
    model.base_model.set_adapter(["es", "fr"])
    return dict(
        model=model, before=before, before_routing=before_routing, es_state=es_state, fr_alone=fr_alone,
        reports={"es": es_report, "fr": fr_report}, warnings=[str(w.message) for w in caught],
    )


def test_a_router_fitted_against_an_adapters_domain_outranks_it(unrefitted):
    """fr's ``other_domains`` names the adapter es: fr's router outranks es's (reported, recorded in the config), and
    fit_router does not warn that es's router, which claims nearly all of fr's tokens, must be refitted."""
    reports, model = unrefitted["reports"], unrefitted["model"]
    assert model.peft_config["fr"].router.outranks == ["es"]
    assert model.peft_config["es"].router.outranks == []
    share = reports["fr"].claimed_by_other_adapters["es"]
    assert share >= 0.9, reports["fr"]  # es never saw fr's text
    assert not [text for text in unrefitted["warnings"] if text.startswith("fit_router")]
    assert reports["fr"].new_to_expansion >= 0.99 and reports["fr"].other_to_expansion["es"] <= 0.01, reports["fr"]


def test_an_outranked_router_keeps_every_domain_as_it_was_without_a_refit(unrefitted, speaker):
    """Issue 12's first test with es's router never refitted: the base domain gives the base model's logits, es's
    sequences es's decisions and logits from before fr existed, fr's sequences what fr gives alone, although es's
    router claims every one of them too (the outranking decides; which of two saturated scores is higher would be
    a matter of rounding)."""
    model = unrefitted["model"]
    for key, tensor in unrefitted["es_state"].items():  # es's blocks and router: bit-identical
        assert torch.equal(adapter_state(model, "es")[key], tensor), key
    with torch.no_grad():
        logits = model(input_ids=PROBES["base"]).logits
        assert model.base_model.last_routing.to_preservation.all()
        assert (logits - speaker(input_ids=PROBES["base"]).logits).abs().max() <= 1e-6
        logits = model(input_ids=PROBES["es"]).logits
        routing = model.base_model.last_routing
        unchanged = (routing.sent_to("es") == unrefitted["before_routing"]).all(dim=1)
        assert unchanged.all() and not routing.sent_to("fr").any()
        assert (logits - unrefitted["before"]["es"]).abs().max() <= 1e-6
        logits = model(input_ids=PROBES["fr"]).logits
        routing = model.base_model.last_routing
        assert routing.sent_to("fr").all()
        assert (routing.adapter_scores["es"] >= model.base_model.scale_router["es"].threshold).all()
        assert (logits - unrefitted["fr_alone"]).abs().max() <= 1e-6
    confusion = routing_confusion(model, BIG)
    for domain in ("base", "es", "fr"):
        assert confusion[domain][domain] >= 0.99, confusion


def test_deleting_an_outranked_adapter_forgets_the_outranking(unrefitted):
    """A later adapter named like the deleted one is another domain: fr's router does not outrank it."""
    model = copy.deepcopy(unrefitted["model"])
    model.set_adapter("fr")
    model.delete_adapter("es")
    assert model.peft_config["fr"].router.outranks == []
    assert unrefitted["model"].peft_config["fr"].router.outranks == ["es"]  # the copy's only


def test_the_outranking_is_saved_and_loaded_with_the_adapters(unrefitted, speaker, tmp_path):
    from peft import PeftModel

    model = unrefitted["model"]
    ids = torch.cat([PROBES["es"][:2], PROBES["fr"][:2]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    choice = model.base_model.last_routing.choice
    model.save_pretrained(tmp_path)
    fr = model.peft_config["fr"].router_report
    card = (tmp_path / "README.md").read_text()
    assert (
        f"`fr`: {fr['new_to_expansion']:.1%} of its domain's held-out tokens claimed, {fr['old_to_base']:.1%} of its "
        "old side's left to the base model, outranks `es`"
    ) in card and card.count("outranks `") == 1
    loaded = PeftModel.from_pretrained(copy.deepcopy(speaker), tmp_path / "es", adapter_name="es")
    loaded.load_adapter(tmp_path / "fr", adapter_name="fr")
    loaded.base_model.set_adapter(["es", "fr"])
    assert loaded.peft_config["fr"].router.outranks == ["es"]
    with torch.no_grad():
        logits = loaded(input_ids=ids).logits
    assert torch.equal(loaded.base_model.last_routing.choice, choice)
    assert (logits - expected).abs().max() <= 1e-6


def test_a_token_both_routers_claim_gets_one_adapter_only(stages):
    """Thresholds at 0: both routers claim every token. Each token then gets exactly one adapter's computation (the
    more confident one's), not the sum of both expansions."""
    model = copy.deepcopy(stages["model"])
    routers = model.base_model.scale_router
    for router in routers.values():
        router.threshold.fill_(0.0)
    ids = torch.cat([PROBES["es"], PROBES["fr"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        routing = model.base_model.last_routing
        assert not routing.to_preservation.any()
        higher = routing.adapter_scores["fr"] > routing.adapter_scores["es"]
        assert torch.equal(routing.sent_to("fr"), higher)
        for name in ("es", "fr"):
            rows = routing.sent_to(name).all(dim=1)  # rows whose every token went to this adapter
            assert rows.sum() >= 3, name
            model.set_adapter(name)
            alone = model(input_ids=ids).logits
            assert (logits - alone)[rows].abs().max() <= 1e-6, name
        model.base_model.set_adapter(["es", "fr"])
        # what the two expansions summed would give instead
        for module in model.modules():
            if getattr(module, "route_gated", None):
                module.route_gated.update(dict.fromkeys(module.route_gated, False))
        assert (model(input_ids=ids).logits - logits).abs().max() > 1e-2


def test_last_routing_says_which_adapter_each_token_went_to(stages):
    model = stages["model"]
    ids = torch.cat([PROBES["base"][:1], PROBES["es"][:1], PROBES["fr"][:1]])
    with torch.no_grad():
        model(input_ids=ids)
    routing = model.base_model.last_routing
    assert routing.choice.tolist() == [[-1] * 16, [0] * 16, [1] * 16]
    assert torch.equal(routing.sent_to(None), routing.to_preservation)
    assert torch.equal(routing.scores, torch.maximum(routing.adapter_scores["es"], routing.adapter_scores["fr"]))
    with pytest.raises(KeyError, match=r"adapter 'de' did not route this forward pass \(the routed adapters were"):
        routing.sent_to("de")


def test_one_active_routed_adapter_routes_as_before(stages):
    """The single-adapter path is unchanged: es alone gives its logits from before fr existed, bit for bit, on the
    domains where its (refitted) router decides as before."""
    model = copy.deepcopy(stages["model"])
    model.set_adapter("es")
    with torch.no_grad():
        for name in ("base", "es"):
            ids = PROBES[name]
            assert torch.equal(model(input_ids=ids).logits, stages["before"][name]), name
            routing = model.base_model.last_routing
            assert routing.adapters == ("es",) and torch.equal(routing.sent_to("es"), ~routing.to_preservation)
            assert torch.equal(routing.sent_to("es"), stages["before_routing"][name]), name


# ------------------------------------------------------------------------------------- 2. save and load, delete


def test_save_and_load_both_adapters_in_a_fresh_process(stages, tmp_path):
    model, reference = stages["model"], stages["reference"]
    ids = torch.cat([PROBES["base"][:2], PROBES["es"][:2], PROBES["fr"][:2]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    choice = model.base_model.last_routing.choice
    assert choice.tolist() == [[-1] * 16] * 2 + [[0] * 16] * 2 + [[1] * 16] * 2
    reference.save_pretrained(tmp_path / "base")
    model.save_pretrained(tmp_path / "adapters")
    for name in ("es", "fr"):  # PEFT's layout: one subfolder per adapter
        saved = json.loads((tmp_path / "adapters" / name / "adapter_config.json").read_text())
        assert saved["route_rule"] == "learned" and saved["router_report"]["old_source"] == "old data", name
    card = (tmp_path / "adapters" / "README.md").read_text()
    # what the fresh process below runs is what the card tells a reader to run
    loading = [
        'model = PeftModel.from_pretrained(base, "adapters", subfolder="es", adapter_name="es")',
        'model.load_adapter("adapters", subfolder="fr", adapter_name="fr")',
        "model.base_model.set_adapter(['es', 'fr'])",
    ]
    assert all(line in card for line in loading), card
    torch.save({"ids": ids}, tmp_path / "inputs.pt")
    run_in_fresh_process(
        f"""
import os, torch, peft_scale
from peft import PeftModel
from transformers import AutoModelForCausalLM
os.chdir({str(tmp_path)!r})
torch.set_num_threads(1)
base = AutoModelForCausalLM.from_pretrained("base").eval()
{loading[0]}
{loading[1]}
{loading[2].split("  #")[0]}
ids = torch.load("inputs.pt")["ids"]
with torch.no_grad():
    logits = model(input_ids=ids).logits
torch.save({{"logits": logits, "choice": model.base_model.last_routing.choice}}, "loaded.pt")
"""
    )
    loaded = torch.load(tmp_path / "loaded.pt")
    assert torch.equal(loaded["choice"], choice)
    assert (loaded["logits"] - expected).abs().max() <= 1e-6


def test_delete_one_adapter_keeps_the_other_routing_as_alone(stages):
    model = copy.deepcopy(stages["model"])
    with torch.no_grad():
        model.set_adapter("fr")
        fr_alone = {name: model(input_ids=ids).logits for name, ids in PROBES.items()}
        model.base_model.set_adapter(["es", "fr"])
        model.delete_adapter("es")
        assert model.base_model.active_adapters == ["fr"]
        assert list(model.base_model.scale_router) == ["fr"]
        assert not any(".es." in key + "." for key in model.state_dict())
        for name, ids in PROBES.items():
            assert torch.equal(model(input_ids=ids).logits, fr_alone[name]), name
            assert model.base_model.last_routing.adapters == ("fr",)
        model.delete_adapter("fr")  # the last router: its layer's hook goes with it
        assert not model.base_model._routing._layer_hooks


# ---------------------------------------------------------------------------------------------- the errors


def test_a_routed_adapter_is_not_activated_with_an_unrouted_or_cosine_one(speaker):
    model = get_peft_model(copy.deepcopy(speaker), config(), adapter_name="es")
    fit_router(model, domain_ids(ES, seed=1), domain_ids(BASE, seed=2), progress=False)
    model.add_adapter("plain", ScaleConfig(ffn_expansion=8))
    with pytest.raises(ValueError, match=r"learned-route adapter\(s\) \['es'\] cannot be active together with "
                       r"'plain' \(adapt\).*set_adapter\(\['es'\]\)"):
        model.base_model.set_adapter(["es", "plain"])
    assert model.base_model.active_adapters == ["es"]  # left as it was
    cosine = ScaleConfig(**MODES["full_width"], variant="route", route_rule="cosine", preserve_layers=PRESERVE)
    model.add_adapter("cosine", cosine)
    with pytest.raises(ValueError, match=r"together with 'cosine' \(route \(cosine rule\)\)"):
        model.base_model.set_adapter(["cosine", "es"])
    # switched around ScaleModel.set_adapter (PEFT's own), the forward pass refuses the mix instead
    BaseTuner.set_adapter(model.base_model, ["es", "plain"])
    with pytest.raises(ValueError, match=r"cannot be active together with 'plain' \(adapt\)"):
        model(input_ids=PROBES["es"])
    # several unrouted adapters stay as they were: PEFT's multi-adapter sum
    model.set_adapter("plain")
    model.add_adapter("plain2", ScaleConfig(ffn_expansion=4))
    model.base_model.set_adapter(["plain", "plain2"])
    model(input_ids=PROBES["es"])


def test_routed_adapters_with_different_preserve_layers_are_refused(speaker):
    model = get_peft_model(copy.deepcopy(speaker), config(), adapter_name="es")
    model.add_adapter("fr", config(preserve_layers=PRESERVE + 1))
    with pytest.raises(ValueError, match=r"must have the same preserve_layers, but these differ: \{'es': 2, 'fr': 3\}"
                       r".*Create the adapters with one preserve_layers \(e.g. 2 for all\)"):
        model.base_model.set_adapter(["es", "fr"])
    for name, data in (("es", ES), ("fr", FR)):
        fit_router(model, domain_ids(data, seed=1), domain_ids(BASE, seed=2), adapter_name=name, progress=False)
    BaseTuner.set_adapter(model.base_model, ["es", "fr"])
    with pytest.raises(ValueError, match="must have the same preserve_layers"):
        model(input_ids=PROBES["es"])


def test_an_unfitted_router_among_several_is_an_error_that_names_it(speaker):
    model = get_peft_model(copy.deepcopy(speaker), config(), adapter_name="es")
    fit_router(model, domain_ids(ES, seed=1), domain_ids(BASE, seed=2), progress=False)
    model.add_adapter("fr", config())
    model.base_model.set_adapter(["es", "fr"])  # activating is allowed: fitting comes next
    with pytest.raises(RuntimeError, match=r"SCALE adapters \['fr'\] \(active together with \['es'\]\) route with "
                       r"learned routers that have not been fitted. Call peft_scale.fit_router\(model, its_data, "
                       r"adapter_name='fr'\)"):
        model(input_ids=PROBES["fr"])
    with pytest.warns(UserWarning, match="the router of adapter 'es' claims"):  # es never saw fr's text
        fit_router(model, domain_ids(FR, seed=3), domain_ids(BASE, seed=2), adapter_name="fr", progress=False)
    model(input_ids=PROBES["fr"])


def test_a_full_width_and_an_ffn_adapter_route_together(speaker):
    """Different modes and sizes mix: each adapter's new features are its own, and the gates keep them apart."""
    reference = copy.deepcopy(speaker)
    model = get_peft_model(copy.deepcopy(speaker), config("full_width"), adapter_name="es")
    model.add_adapter("fr", config("ffn", ffn_expansion=24))
    for name, data, other in (("es", ES, FR), ("fr", FR, ES)):  # each router: the base and the other domain as old
        old = torch.cat([domain_ids(BASE, seed=2), domain_ids(other, seed=3)])
        fit_router(model, domain_ids(data, seed=1), old, adapter_name=name, progress=False)
        perturb_adapter(model, name, seed=1 if name == "es" else 2, scale=0.5)
    ids = torch.cat([PROBES["base"], PROBES["es"], PROBES["fr"]])
    with torch.no_grad():
        alone = {}
        for name in ("es", "fr"):
            model.set_adapter(name)
            alone[name] = model(input_ids=ids).logits
        model.base_model.set_adapter(["es", "fr"])
        logits = model(input_ids=ids).logits
        routing = model.base_model.last_routing
        assert routing.choice.tolist() == [[-1] * 16] * 4 + [[0] * 16] * 4 + [[1] * 16] * 4
        assert (logits[:4] - reference(input_ids=PROBES["base"]).logits).abs().max() <= 1e-6
        assert (logits[4:8] - alone["es"][4:8]).abs().max() <= 1e-6
        assert (logits[8:] - alone["fr"][8:]).abs().max() <= 1e-6


# ---------------------------------------------------------------------------------------- the confusion report


def test_routing_confusion_gives_each_data_sets_shares(stages):
    model = stages["model"]
    mixed = torch.cat([PROBES["es"][:3], PROBES["fr"][:1]])  # 3 rows of es, 1 of fr
    ragged = [PROBES["fr"][0][:5], PROBES["fr"][1], PROBES["base"][0][:3]]  # padded in batches, not counted
    confusion = routing_confusion(model, {**PROBES, "mixed": mixed, "ragged": ragged}, batch_size=3)
    assert confusion == {
        "base": {"es": 0.0, "fr": 0.0, "base": 1.0},
        "es": {"es": 1.0, "fr": 0.0, "base": 0.0},
        "fr": {"es": 0.0, "fr": 1.0, "base": 0.0},
        "mixed": {"es": 0.75, "fr": 0.25, "base": 0.0},
        "ragged": {"es": 0.0, "fr": 21 / 24, "base": 3 / 24},
    }
    assert list(confusion["es"]) == ["es", "fr", "base"]
    assert model.training is False and model.base_model.active_adapters == ["es", "fr"]


def test_routing_confusion_counts_a_router_claiming_another_domain(stages):
    """es's router lowered to claim everything, and more confidently than fr's on some fr tokens: the report shows
    the share of fr's tokens taken by es, token for token as the model routes them."""
    model = copy.deepcopy(stages["model"])
    model.base_model.scale_router["es"].threshold.fill_(0.0)
    with torch.no_grad():
        model(input_ids=PROBES["fr"])
    taken = model.base_model.last_routing.sent_to("es").float().mean().item()
    confusion = routing_confusion(model, {"fr": PROBES["fr"], "base": PROBES["base"]})
    assert confusion["fr"] == {"es": taken, "fr": 1 - taken, "base": 0.0}
    assert confusion["base"] == {"es": 1.0, "fr": 0.0, "base": 0.0}


def test_routing_confusion_takes_every_form_fit_router_takes(stages):
    """The data go through ``token_sequences``, as ``fit_router``'s do: lists of dicts (padding marked by an attention
    mask not counted) and datasets give the shares of the same ids as a tensor."""
    from datasets import Dataset

    model = stages["model"]
    ids = torch.cat([PROBES["es"][:3], PROBES["fr"][:1]])
    padded = [{"input_ids": row.tolist() + [0] * 3, "attention_mask": [1] * len(row) + [0] * 3} for row in ids]
    dataset = Dataset.from_dict({"input_ids": ids.tolist()})
    confusion = routing_confusion(model, {"tensor": ids, "rows": list(ids), "dicts": padded, "dataset": dataset})
    assert confusion["tensor"] == {"es": 0.75, "fr": 0.25, "base": 0.0}
    assert all(shares == confusion["tensor"] for shares in confusion.values()), confusion


FORMS = r"Give data\['es'\] as a LongTensor of token ids of shape \(n, seq\), a list of 1-D token id sequences"


@pytest.mark.parametrize(
    ("data", "error", "message"),
    [
        ("hola", TypeError, r"^routing_confusion: data\['es'\] is a str. " + FORMS),
        (3, TypeError, r"^routing_confusion: data\['es'\] is a int. " + FORMS),
        (torch.rand(2, 3), ValueError, r"^routing_confusion: data\['es'\] is a torch.float32 tensor of shape \(2, 3\). "
         + FORMS),
        (torch.arange(6), ValueError, r"^routing_confusion: data\['es'\] is a torch.int64 tensor of shape \(6,\)"),
        (torch.ones(2, 3, dtype=torch.bool), ValueError, r"data\['es'\] is a torch.bool tensor of shape \(2, 3\)"),
        ([1, 2, 3], ValueError,
         r"^routing_confusion: data\['es'\] is a list whose items are not dicts with 'input_ids' nor 1-D token id "
         r"sequences. " + FORMS),
        (["hola", "bonjour"], ValueError, r"data\['es'\] is a list of strings; tokenize it first\.$"),
        ([[1.5, 2.0]], ValueError, r"^routing_confusion: an item of data\['es'\] has token ids of dtype torch.float32, "
         r"shape \(2,\). " + FORMS),
        ([torch.ones(2, 3, dtype=torch.long)], ValueError,
         r"an item of data\['es'\] has token ids of dtype torch.int64, shape \(2, 3\)"),
        ([{"input_ids": [[1, 2]]}], ValueError, r"an item of data\['es'\] has input_ids of dtype torch.int64, "
         r"shape \(1, 2\)"),
        (torch.zeros(0, 4, dtype=torch.long), ValueError, r"^routing_confusion: data\['es'\] is empty \(no tokens\). "
         "There is nothing to route.$"),
        ([], ValueError, r"^routing_confusion: data\['es'\] is empty \(no tokens\)"),
        ([[], torch.zeros(0, dtype=torch.long)], ValueError, r"data\['es'\] is empty \(no tokens\)"),
        (torch.full((2, 3), 500), ValueError,
         r"^routing_confusion: data\['es'\] holds token id 500, outside the model's vocabulary of 128: was it "
         r"tokenized with this model's tokenizer\?$"),
        ([[5, -1, 7]], ValueError, r"data\['es'\] holds token id -1, outside the model's vocabulary of 128"),
    ],
)
def test_routing_confusion_bad_data(stages, data, error, message):
    with pytest.raises(error, match=message):
        routing_confusion(stages["model"], {"base": PROBES["base"], "es": data})


def test_routing_confusion_errors(stages, speaker):
    model = copy.deepcopy(stages["model"])
    with pytest.raises(TypeError, match="data must be a non-empty dict"):
        routing_confusion(model, PROBES["es"])
    with model.disable_adapter(), pytest.raises(ValueError, match="made no learned routing decision; are its adapters"):
        routing_confusion(model, {"es": PROBES["es"]})
    named_base = get_peft_model(copy.deepcopy(speaker), config(), adapter_name="base")
    with pytest.raises(ValueError, match="an adapter is named 'base', the report's name for the base model; rename"):
        routing_confusion(named_base, {"es": PROBES["es"]})
    plain = get_peft_model(copy.deepcopy(speaker), ScaleConfig(ffn_expansion=8))
    with pytest.raises(ValueError, match=r"no learned-route adapter is active"):
        routing_confusion(plain, {"es": PROBES["es"]})
    with pytest.raises(TypeError, match="needs a model made by get_peft_model"):
        routing_confusion(speaker, {"es": PROBES["es"]})


def test_public_names():
    assert peft_scale.routing_confusion is routing_confusion and "routing_confusion" in peft_scale.__all__


# ------------------------------------------------------------------------------------------ the model card, Hub


def test_the_card_lists_the_domains_and_their_routers_accuracy(stages, tmp_path):
    model = stages["model"]
    model.save_pretrained(tmp_path / "adapters")
    text = (tmp_path / "adapters" / "README.md").read_text()
    es, fr = (model.peft_config[name].router_report for name in ("es", "fr"))
    for name, report in (("es", es), ("fr", fr)):
        assert (
            f"| `{name}` | `{name}` |" in text
            and f"held out: {report['old_to_base']:.1%} of old tokens to the base model, "
            f"{report['new_to_expansion']:.1%} of new tokens to the expansion; old side: old data" in text
        ), name
    assert "**One adapter per domain, routed together:** `es`, `fr`." in text
    assert (
        f"`es`: {es['new_to_expansion']:.1%} of its domain's held-out tokens claimed, {es['old_to_base']:.1%} of its "
        "old side's left to the base model"
    ) in text
    assert "outranks `" not in text  # fr was fitted with es's text in its old side, not as other_domains


def section(text: str) -> str:
    return text.split(SECTION_START)[1].split(SECTION_END)[0]


class RecordedHub:
    """What ``huggingface_hub`` would have been asked to do: the repository created, the files committed."""

    def __init__(self, monkeypatch, remote_card=None):
        self.created, self.files = [], {}
        hub = self

        def create_repo(api, repo_id, **kwargs):
            hub.created.append(repo_id)
            return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

        def create_commit(api, repo_id, operations, **kwargs):
            for op in operations:
                with open(op.path_or_fileobj, "rb") as file:  # the temporary folder is gone after the call
                    hub.files[op.path_in_repo] = file.read()
            return "commit"

        def hf_hub_download(repo_id, filename, **kwargs):  # the repository's current card, if it has one
            if remote_card is None:
                raise huggingface_hub.errors.EntryNotFoundError(f"{repo_id} has no {filename}")
            return str(remote_card)

        monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
        monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
        monkeypatch.setattr(huggingface_hub.repocard, "hf_hub_download", hf_hub_download)

    def card(self) -> huggingface_hub.ModelCard:
        return huggingface_hub.ModelCard(self.files["README.md"].decode())


def test_push_to_hub_publishes_the_scale_card_with_both_adapters(stages, monkeypatch, tmp_path):
    hub = RecordedHub(monkeypatch)
    stages["model"].push_to_hub("tiny-org/es-fr", tags=["my-tag"])
    assert hub.created == ["tiny-org/es-fr"]
    assert {"es/adapter_config.json", "es/adapter_model.safetensors", "fr/adapter_config.json",
            "fr/adapter_model.safetensors", "README.md"} == set(hub.files)
    card = hub.card()
    assert card.text.count(SECTION_START) == 1 and "## SCALE adapter" in card.text
    assert 'PeftModel.from_pretrained(base, "tiny-org/es-fr", subfolder="es", adapter_name="es")' in card.text
    assert "**One adapter per domain, routed together:** `es`, `fr`." in card.text
    assert card.data.library_name == "peft"
    assert {"scale", "peft-scale", "arxiv:2511.03270", "my-tag"} <= set(card.data.tags)
    # the SCALE section save_pretrained writes, with the repository's name in the loading snippet
    stages["model"].save_pretrained(tmp_path / "es-fr")
    saved = section((tmp_path / "es-fr" / "README.md").read_text())
    assert section(card.text) == saved.replace('"es-fr"', '"tiny-org/es-fr"')


def test_push_to_hub_keeps_what_the_repositorys_card_says(stages, monkeypatch, tmp_path):
    remote = tmp_path / "remote_README.md"
    remote.write_text("---\ntags:\n- author-tag\n---\n\n# My adapters\n\nTrained on my data.\n")
    hub = RecordedHub(monkeypatch, remote_card=remote)
    stages["model"].push_to_hub("tiny-org/es-fr")
    card = hub.card()
    assert "Trained on my data." in card.text and card.text.startswith("# My adapters")
    assert card.text.count(SECTION_START) == 1
    assert {"author-tag", "scale"} <= set(card.data.tags)


def test_push_to_hub_of_other_peft_methods_is_transformers_own(monkeypatch):
    from peft import LoraConfig
    from tiny_models import tiny_llama

    hub = RecordedHub(monkeypatch)
    get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"])).push_to_hub("tiny-org/lora")
    assert SECTION_START not in hub.card().text and "adapter_config.json" in hub.files


@pytest.mark.parametrize("start", ["token", "old"])
def test_each_routed_adapter_smooths_with_its_own_coefficient(speaker, start):
    """``es`` smooths its router's score (RouterConfig.smoothing=0.8, from its first token or from the old side's median
    logit), ``fr`` does not: routed together, each adapter's score is its own rule's, and the joint choice is made
    on those scores; cached generation decides alike."""
    es_config = config(router_smoothing=0.8, router_smoothing_start=start)
    model = get_peft_model(copy.deepcopy(speaker), es_config, adapter_name="es")
    model.add_adapter("fr", config())
    base, es, fr = (domain_ids(d, 48, 24, seed=60 + i) for i, d in enumerate((BASE, ES, FR)))
    fit_router(model, es, torch.cat([base, fr]), adapter_name="es", progress=False)
    fit_router(model, fr, torch.cat([base, es]), adapter_name="fr", progress=False)
    perturb_adapter(model, "es", seed=1, scale=0.5)
    perturb_adapter(model, "fr", seed=2, scale=0.5)
    model.base_model.set_adapter(["es", "fr"])
    model.eval()
    halves = [domain_ids(d, 2, 8, seed=70 + i) for i, d in enumerate((BASE, ES, FR, ES))]
    ids = torch.cat([torch.cat(halves[:2], 1), torch.cat(halves[2:], 1)])  # base -> es, fr -> es
    own = {name: router_logits(model, ids, name) for name in ("es", "fr")}
    result = model.base_model.last_routing
    assert result.adapters == ("es", "fr")
    es_start = float(model.base_model.scale_router["es"].start) if start == "old" else None
    expected = {"es": torch.sigmoid(reference_ema(own["es"], 0.8, es_start)).float(), "fr": torch.sigmoid(own["fr"])}
    assert torch.allclose(result.adapter_scores["es"], expected["es"], atol=1e-6, rtol=0)
    assert torch.equal(result.adapter_scores["fr"], expected["fr"])
    routers = model.base_model.scale_router
    claims = [result.adapter_scores[name] >= routers[name].threshold[0] for name in ("es", "fr")]
    assert torch.equal(result.choice, choose_adapters([result.adapter_scores[n] for n in ("es", "fr")], claims))
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(input_ids=ids, use_cache=True, **settings),
                       model.generate(input_ids=ids, use_cache=False, **settings))  # fmt: skip


def test_the_preservation_copy_with_two_routed_adapters(stages):
    """Rows that go es -> base domain -> fr: with RouterConfig.preservation_copy, the tokens no router claims get the base
    model's logits although es and fr changed the tokens before them."""
    model, reference = stages["model"], stages["reference"]
    rows = torch.cat([PROBES["es"][:, :8], PROBES["base"][:, :8], PROBES["fr"][:, :8]], 1)
    configs = [model.peft_config[name] for name in ("es", "fr")]
    try:
        with torch.no_grad():
            plain = model(input_ids=rows).logits
            to_base = model.base_model.last_routing.to_preservation.clone()
            for config in configs:
                config.router.preservation_copy = True
            copied = model(input_ids=rows).logits
            routing = model.base_model.last_routing
            expected = reference(input_ids=rows).logits
    finally:
        for config in configs:
            config.router.preservation_copy = False
    assert torch.equal(routing.to_preservation, to_base)
    assert routing.sent_to("es")[:, :8].any() and routing.sent_to("fr")[:, 16:].any() and to_base[:, 8:16].any()
    assert (plain - expected)[to_base].abs().max() > 1e-3  # without the copy: es's changes reach them
    assert (copied - expected)[to_base].abs().max() <= 1e-6
    assert (copied - plain)[~to_base].abs().max() <= 1e-6


def test_routed_together_each_adapter_gets_its_own_kind_of_gate(speaker):
    """``es`` with the hard gate, ``fr`` with the soft one: the joint rule picks the adapter, and the chosen one's
    gate is 1 (``es``) or ``(p - tau) / (1 - tau)`` of its own router (``fr``); every other adapter's is 0."""
    model = get_peft_model(copy.deepcopy(speaker), config(), adapter_name="es")
    model.add_adapter("fr", config(router_gate="soft"))
    es_data, fr_data, base_data = domain_ids(ES, seed=1), domain_ids(FR, seed=3), domain_ids(BASE, seed=2)
    fit_router(model, es_data, torch.cat([base_data, fr_data]), adapter_name="es", progress=False)
    fit_router(model, fr_data, torch.cat([base_data, es_data]), adapter_name="fr", progress=False)
    model.base_model.set_adapter(["es", "fr"])
    with torch.no_grad():
        model(input_ids=torch.cat([PROBES["base"], PROBES["es"], PROBES["fr"]]))
    routing, gates = model.base_model.last_routing, model.base_model._routing.gates.gates
    tau = model.base_model.scale_router["fr"].threshold[0]
    fr_score = routing.adapter_scores["fr"]
    assert torch.equal(gates["es"][..., 0], routing.sent_to("es").float())
    expected = torch.where(routing.sent_to("fr"), (fr_score - tau) / (1 - tau), torch.zeros_like(fr_score))
    torch.testing.assert_close(gates["fr"][..., 0], expected, rtol=0, atol=1e-6)
    assert routing.sent_to("es").any() and routing.sent_to("fr").any() and routing.to_preservation.any()
