"""The contrast prompts (trained on, beyond the paper) never overlap any evaluation set, not even nearly.

Every evaluation text is compared with every contrast text after normalisation (lowercase, punctuation
stripped, whitespace collapsed): equal, token-set Jaccard >= 0.6 or difflib ratio >= 0.85 counts as a
leak. AdvBench is checked whole (any of its parts may be evaluated), so is the benign set with its paired
harmful questions.
"""

import random
import re
import string
from difflib import SequenceMatcher

import pytest

from safesteer.io.prompts import (CONTRAST_SPLITS, TUNE_SIZES, builtin_splits, contrast_prompts, load_prompts,
                                  split_prompts)

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalise(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def near_duplicates(ours: list[str], theirs: list[str]) -> list[tuple[str, str, str]]:
    """(why, our text, their text) for every pair that is equal, Jaccard >= 0.6 or difflib ratio >= 0.85."""
    a = [(t, normalise(t)) for t in ours]
    b = [(t, normalise(t)) for t in theirs]
    b_tokens = [set(n.split()) for _, n in b]
    hits = []
    for text, norm in a:
        tokens = set(norm.split())
        matcher = SequenceMatcher(autojunk=False)
        matcher.set_seq2(norm)
        for (other, onorm), otokens in zip(b, b_tokens):
            if norm == onorm:
                hits.append(("exact", text, other))
                continue
            if tokens and otokens and len(tokens & otokens) / len(tokens | otokens) >= 0.6:
                hits.append(("jaccard", text, other))
                continue
            matcher.set_seq1(onorm)
            # The cheap upper bounds first: ratio() <= quick_ratio() <= real_quick_ratio().
            if matcher.real_quick_ratio() >= 0.85 and matcher.quick_ratio() >= 0.85 and matcher.ratio() >= 0.85:
                hits.append(("difflib", text, other))
    return hits


@pytest.fixture(scope="module")
def splits():
    return builtin_splits(seed=0)


def evaluation_texts(splits) -> dict[str, list[str]]:
    benign = load_prompts("benign")
    return {
        "advbench (all 520)": [p.text for p in load_prompts("advbench")],
        "harmbench": [p.text for p in load_prompts("harmbench")],
        "benign": [p.text for p in benign] + [p.meta["harmful_version"] for p in benign],
        "edgy": [p.text for p in load_prompts("edgy")],
        "harmless eval": [p.text for p in splits["harmless"]["eval"]],
    }


@pytest.mark.parametrize("seed", [0, 1])
def test_contrast_prompts_are_disjoint_from_every_evaluation_set(seed):
    splits = builtin_splits(seed)
    ours = [p.text for p in load_prompts("contrast")] + [p.text for p in splits["harmless"]["contrast"]]
    leaks = {name: near_duplicates(ours, texts) for name, texts in evaluation_texts(splits).items()}
    assert not any(leaks.values()), {k: v[:5] for k, v in leaks.items() if v}


def test_near_duplicate_check_catches_rewordings():
    assert near_duplicates(["How do I kill a Python process?"], ["how do i kill a python process"])[0][0] == "exact"
    assert near_duplicates(["Write a poem about the sea at night."], ["Write a poem about the sea at dawn"])
    assert not near_duplicates(["Explain photosynthesis."], ["Write a phishing email."])


def test_contrast_set_shape_and_splits(splits):
    prompts = load_prompts("contrast")
    assert len(prompts) >= 200
    assert len({p.category for p in prompts}) >= 10
    assert {p.meta["form"] for p in prompts} == {"imperative", "question"}
    parts = splits["contrast"]
    assert len(parts["train"]) == CONTRAST_SPLITS["train"] and len(parts["heldout"]) == len(prompts) - CONTRAST_SPLITS["train"]
    assert not {p.text for p in parts["train"]} & {p.text for p in parts["heldout"]}
    assert len(splits["harmless"]["contrast"]) == 64
    assert not {p.text for p in splits["harmless"]["contrast"]} & {p.text for p in splits["harmless"]["eval"]}
    builtin = contrast_prompts("builtin", seed=0)
    assert [p.text for p in builtin] == [p.text for p in parts["train"] + splits["harmless"]["contrast"]]
    assert contrast_prompts("") == []


def test_edgy_tune_and_report_are_disjoint_and_stable_under_input_order(splits):
    edgy = load_prompts("edgy")
    tune, report = splits["edgy"]["tune"], splits["edgy"]["report"]
    assert (len(tune), len(report)) == (TUNE_SIZES["edgy"], len(edgy) - TUNE_SIZES["edgy"])
    assert not {p.text for p in tune} & {p.text for p in report}
    assert {p.text for p in tune} | {p.text for p in report} == {p.text for p in edgy}
    assert splits["edgy"]["eval"] == report  # the default over-refusal evaluation reads the report part
    shuffled = edgy[:]
    random.Random(5).shuffle(shuffled)
    again = split_prompts(shuffled, {"tune": TUNE_SIZES["edgy"], "report": None}, seed=0)
    assert [p.text for p in again["tune"]] == [p.text for p in tune]
    assert [p.text for p in again["report"]] == [p.text for p in report]
