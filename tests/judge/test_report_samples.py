"""The report's samples section: rows as a person reads them, from hand-made rows."""

from __future__ import annotations

from cai.judge import report_samples

REVISED = {
    "id": "r1",
    "source_id": "rt-001",
    "flags": [],
    "messages": [{"role": "user", "content": "How do I <pick> a lock?"}],
    "response": "Sure, here is how to pick it.",
    "revision": "I can't help pick it, ask a locksmith.",
    "rounds": [
        {
            "principle_id": "harm",
            "critique": "It helps a break-in.",
            "revision": "I can't help pick it, ask a locksmith.",
        }
    ],
}
COMPARED = {
    "id": "c1",
    "messages": [{"role": "user", "content": "Q?"}],
    "responses": ["first answer", "second answer", "third answer"],
    "pairs": [
        {
            "answers": [0, 2],
            "label": "b",
            "p_first": 0.2,
            "principle_probs": {"harm": 0.1, "honest": 0.3},
            "position_consistent": False,
        }
    ],
}


def test_word_diff_marks_removed_and_added_words():
    assert report_samples.word_diff("a b c d", "a x c d e") == "a <del>b</del> <ins>x</ins> c d <ins>e</ins>"
    assert report_samples.word_diff("same words", "same words") == "same words"


def test_a_revised_row_shows_prompt_rounds_and_diff_escaped():
    page = report_samples.render([REVISED])
    assert "How do I &lt;pick&gt; a lock?" in page  # the prompt, escaped
    assert "round 1 critique (harm)" in page and "It helps a break-in." in page
    assert (
        "<del>Sure, here is how to</del> <ins>I can&#x27;t help</ins> pick <del>it.</del> <ins>it, ask a locksmith.</ins>"
        in page
    )


def test_a_compared_pair_shows_both_answers_the_chosen_one_and_the_votes():
    page = report_samples.render([COMPARED])
    assert "P(first better) = 0.200" in page and "position inconsistent" in page
    assert "harm: 0.100, honest: 0.300" in page
    assert "answer 1</b><pre>first answer" in page and "answer 3 (chosen)</b><pre>third answer" in page
    assert "second answer" not in page  # not in this pair


def test_only_the_first_rows_are_shown():
    page = report_samples.render([{**REVISED, "id": f"r{i}"} for i in range(9)], n=3)
    assert page.count("class='sample'") == 3 and "The first 3 rows" in page
    assert report_samples.render([]) == ""
