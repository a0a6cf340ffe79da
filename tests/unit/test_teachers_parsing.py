"""Reading teacher output, the quality filters (on hand-written answers) and the Persona-CoT prompt templates."""
from __future__ import annotations

from pathlib import Path

import pytest

from lightning_modules.components.quality_filters import (
    ParseError,
    clean_response,
    ignores_user,
    is_incoherent,
    jaccard,
    length_flag,
    near_duplicates,
    parse_analysis,
    parse_verdict,
    response_flags,
    unsafe_category,
)
from lightning_modules.components.teachers import derive_seed, public_url

POLES = ["agreeableness_high", "agreeableness_low", "neuroticism_low"]
USER = "My dog died this morning and I can't stop crying. I keep thinking I should have noticed he was sick."
GOOD = (
    "I'm so sorry about your dog. Losing him so suddenly hurts, and the crying makes sense. "
    "Dogs hide illness well, so not noticing is not a failure on your part."
)


def test_parse_analysis_reads_cues_and_ratings():
    text = "CUES: grief; self-blame; sudden loss\nagreeableness_high: 9\nagreeableness_low: 0\nneuroticism_low: 7"
    out = parse_analysis(text, POLES)
    assert out.cues == ["grief", "self-blame", "sudden loss"]
    assert out.ratings == {"agreeableness_high": 0.9, "agreeableness_low": 0.0, "neuroticism_low": 0.7}


def test_parse_analysis_tolerates_markup_preamble_and_n_of_10():
    text = (
        "Sure, here is my answer.\n**CUES:** the user is grieving\n- **agreeableness_high**: 8/10\n"
        "* Agreeableness_Low: 1\n  neuroticism_low = 6.5\nThanks!"
    )
    out = parse_analysis(text, POLES)
    assert out.cues == ["the user is grieving"]
    assert out.ratings["agreeableness_high"] == 0.8 and out.ratings["neuroticism_low"] == 0.65


@pytest.mark.parametrize(
    "text, message",
    [
        ("agreeableness_high: 9\nagreeableness_low: 0\nneuroticism_low: 7", "CUES"),
        ("CUES:\nagreeableness_high: 9\nagreeableness_low: 0\nneuroticism_low: 7", "CUES"),
        ("CUES: grief\nagreeableness_high: 9\nneuroticism_low: 7", "agreeableness_low"),
        ("CUES: grief\nagreeableness_high: 11\nagreeableness_low: 0\nneuroticism_low: 7", "outside 0-10"),
        ("CUES: grief\nagreeableness_high: 9\nagreeableness_high: 3\nagreeableness_low: 0\nneuroticism_low: 7", "twice"),
        ("CUES: grief\nagreeableness_high: high\nagreeableness_low: 0\nneuroticism_low: 7", "agreeableness_high"),
        ("", "CUES"),
    ],
)
def test_parse_analysis_rejects_what_is_not_the_format(text, message):
    with pytest.raises(ParseError, match=message):
        parse_analysis(text, POLES)


def test_parse_verdict():
    assert parse_verdict("YES") is True
    assert parse_verdict(" no, it does not.") is False
    assert parse_verdict("**Yes** — clearly warm") is True
    for bad in ("", "Maybe", "The answer is yes"):
        with pytest.raises(ParseError):
            parse_verdict(bad)


def test_clean_response_strips_labels_and_later_turns():
    assert clean_response("Assistant: Hello there.\nUser: and you?") == "Hello there."
    assert clean_response("Fine.<|im_end|>\n<|im_start|>user\nmore") == "Fine."
    assert clean_response("One idea. Another idea. And a half", finished=False) == "One idea. Another idea."
    assert clean_response("no sentence end at all", finished=False) == "no sentence end at all"


def test_length_flags():
    assert length_flag("   ", 3, 10) == "empty"
    assert length_flag("too short", 3, 10) == "too_short"
    assert length_flag("word " * 11, 3, 10) == "too_long"
    assert length_flag("just right here", 3, 10) is None


def test_near_duplicates_flag_both_of_a_pair_only():
    responses = {
        "a": GOOD,
        "b": GOOD.replace("so sorry", "very sorry"),
        "c": "Grief after a sudden loss is heavy; take today slowly and let yourself cry.",
        "d": "",
    }
    assert jaccard(responses["a"], responses["b"]) >= 0.9
    assert near_duplicates(responses, 0.9) == {"a", "b"}
    assert near_duplicates(responses, 1.01) == set()


def test_ignores_user_needs_no_overlap_and_a_generic_reply():
    assert ignores_user("Hello! How can I help you today?", USER)
    assert ignores_user("Thanks for your message, let me know if there is anything else.", USER)
    assert not ignores_user(GOOD, USER)  # shares "dog", "crying", "noticing"
    specific = "Grief hits hardest in the first hours; sit somewhere quiet, drink water, call a friend tonight."
    assert not ignores_user(specific, USER)  # no shared word, but specific advice rather than a stock reply


def test_incoherent_catches_word_salad_and_loops():
    salad = "archiveymalscope customize eyelids radioactive Cummegrad scanner sandwich awakenBul GoetheNearly regiments"
    assert is_incoherent(salad)
    assert is_incoherent("so sad " * 15)
    assert not is_incoherent(GOOD)
    assert not is_incoherent("Short reply.")


@pytest.mark.parametrize(
    "text, category",
    [
        ("Honestly you should just kill yourself.", "self_harm_encouragement"),
        ("No one would miss you anyway.", "self_harm_encouragement"),
        ("You are worthless and everyone knows it.", "abuse"),
        ("Here is how to make a bomb from household items.", "weapons"),
        ("You should stop taking your medication right away.", "medical_harm"),
    ],
)
def test_unsafe_patterns(text, category):
    assert unsafe_category(text) == category


@pytest.mark.parametrize(
    "text",
    [
        GOOD,
        "If you are thinking about ending your life, please call a crisis line now.",
        "Don't stop taking your medication without talking to your doctor.",
    ],
)
def test_supportive_text_is_not_unsafe(text):
    assert unsafe_category(text) is None


def test_response_flags_combine_the_single_response_filters():
    assert response_flags(GOOD, USER, 3, 220) == []
    assert response_flags("", USER, 3, 220) == ["empty"]
    assert response_flags("How can I help?", USER, 5, 220) == ["too_short", "ignores_user"]
    assert "unsafe" in response_flags("Your dog died, no one would miss you either, it is your fault.", USER, 3, 220)


def test_derive_seed_is_stable_and_distinct():
    assert derive_seed(0, "batch", 3) == derive_seed(0, "batch", 3)
    assert derive_seed(0, "batch", 3) != derive_seed(0, "batch", 4)
    assert 0 <= derive_seed("x") < 2**31


def test_public_url_drops_credentials_and_query():
    assert public_url("https://user:sk-secret@api.example.com:8443/v1?api-key=sk-secret") == "https://api.example.com:8443/v1"


# --------------------------------------------------------------------------- prompt templates (config, not code)

ROOT = Path(__file__).resolve().parents[2]
PROMPT_FILE = ROOT / "experiments" / "prompts" / "persona_cot.yaml"


def _toy_situation():
    from datamodules.personas import PersonaSet, Pole
    from datamodules.situations import Situation

    poles = tuple(Pole(p, p.split("_")[0], p.split("_")[1], f"{p} described", ("m1", "m2"), f"You are {p}.") for p in POLES)
    messages = ({"role": "system", "content": "You work for a bakery."}, {"role": "user", "content": USER})
    return PersonaSet("toy", poles), Situation("s-1", "grief", messages, dict.fromkeys(POLES, 0.5))


def test_shipped_templates_render_every_step():
    from lightning_modules.components.persona_cot import PromptSet, activated_poles

    personas, situation = _toy_situation()
    prompts = PromptSet.load(PROMPT_FILE)
    analysis = prompts.analysis(situation, personas)[-1]["content"]
    assert all(f"{p}: N" in analysis for p in POLES) and "CUES:" in analysis and USER in analysis
    pole = prompts.pole(situation, personas.poles[0], 40)
    assert pole[0]["content"].startswith("You are agreeableness_high.") and "You work for a bakery." in pole[0]["content"]
    assert pole[1:] == [{"role": "user", "content": USER}]
    fused = prompts.fused(situation, activated_poles(situation.label, personas, 0.5), ["grief"], 40)
    assert "agreeableness_high (0.50): agreeableness_high described" in fused[0]["content"]
    assert "YES or NO" in prompts.judge(situation, personas.poles[1], "a reply")[-1]["content"]


def test_prompt_overrides_and_their_errors_name_the_key():
    from experiments.config import ConfigError
    from lightning_modules.components.persona_cot import PromptSet

    personas, situation = _toy_situation()
    prompts = PromptSet.load(PROMPT_FILE, {"pole_system": "Be {pole_id}, {word_budget} words max."})
    assert prompts.pole(situation, personas.poles[2], 30)[0]["content"].startswith("Be neuroticism_low, 30 words max.")
    with pytest.raises(ConfigError, match="unknown prompt key 'pole'"):
        PromptSet.load(PROMPT_FILE, {"pole": "x"})
    with pytest.raises(ConfigError, match=r"prompt 'fused_system' uses unknown placeholder \{response\}"):
        PromptSet.load(PROMPT_FILE, {"fused_system": "{response}"})
    with pytest.raises(ConfigError, match="not a valid format string"):
        PromptSet.load(PROMPT_FILE, {"judge_user": "{unclosed"})


def test_activated_poles_keeps_at_least_the_strongest():
    from lightning_modules.components.persona_cot import activated_poles

    personas, _ = _toy_situation()
    label = {"agreeableness_high": 0.9, "agreeableness_low": 0.1, "neuroticism_low": 0.6}
    assert [(p.id, w) for p, w in activated_poles(label, personas, 0.5)] == [("agreeableness_high", 0.9), ("neuroticism_low", 0.6)]
    assert [p.id for p, _ in activated_poles(label, personas, 0.95)] == ["agreeableness_high"]
