"""The report's samples: a handful of rows as a person reads them, first in input order. A revised row
shows its prompt, the first answer, each round's principle, critique and revision, and a word diff of
the answer against the final revision; a compared row shows each judged pair side by side with its
label probability, each principle's vote and whether the choice survived swapping the order."""

from __future__ import annotations

import difflib
import html
import itertools
from typing import Any, Iterable

from cai.generate.records import Pair, Row, row_answers

SAMPLES = 5
STYLE = (
    ".sample{border:1px solid #ccc;padding:0.5em 1em;margin:1em 0}.sample pre{white-space:pre-wrap;margin:0.2em 0 0.6em}"
    "del{background:#fdd}ins{background:#dfd;text-decoration:none}.pair{display:flex;gap:1em}.pair>div{flex:1}"
    ".chosen{border-left:4px solid #2a2;padding-left:0.5em}.flag{color:#b00}"
)


def render(rows: Iterable[Row], n: int = SAMPLES) -> str:
    picked = list(itertools.islice(rows, n))
    if not picked:
        return ""
    parts = [f"<h2>Samples</h2><p>The first {len(picked)} rows (all of them: datasets/rows.jsonl).</p>"]
    parts += [_row(row) for row in picked]
    return "\n".join(parts)


def word_diff(before: str, after: str) -> str:
    """HTML of `after` against `before`, word by word: removed words in <del>, added ones in <ins>."""
    a, b = before.split(), after.split()
    out = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if op in ("delete", "replace"):
            out.append(f"<del>{html.escape(' '.join(a[i1:i2]))}</del>")
        if op in ("insert", "replace"):
            out.append(f"<ins>{html.escape(' '.join(b[j1:j2]))}</ins>")
        if op == "equal":
            out.append(html.escape(" ".join(a[i1:i2])))
    return " ".join(out)


def _text(label: str, text: str | None) -> str:
    return f"<b>{html.escape(label)}</b><pre>{html.escape(text or '')}</pre>"


def _row(row: Row) -> str:
    e = html.escape
    prompt = next((m["content"] for m in reversed(row.get("messages", [])) if m["role"] == "user"), "")
    parts = [f"<div class='sample'><p><code>{e(row['id'])}</code> {e(row.get('source_id') or '')}"]
    if row.get("flags"):
        parts.append(f" <span class='flag'>flagged: {e(', '.join(row['flags']))}</span>")
    parts.append("</p>" + _text("prompt", prompt))
    if "pairs" in row:
        parts += [_pair(row, pair) for pair in row["pairs"]]
    else:
        parts.append(_text("answer", row.get("response")))
        for k, r in enumerate(row.get("rounds", []), 1):
            parts += [
                _text(f"round {k} critique ({r['principle_id']})", r["critique"]),
                _text(f"round {k} revision{_gain(r.get('gain'))}", r["revision"]),
            ]
        check = row.get("revision_check")
        if check and "helpfulness" in check:
            harmful = "no verdict" if check["p_harmful"] is None else f"{check['p_harmful']:.3f}"
            parts.append(
                f"<p>P(request harmful) = {e(harmful)}; final revision vs answer on helpfulness{e(_gain(check['helpfulness']))}</p>"
            )
        if "revision" in row:
            parts.append(
                f"<b>answer &rarr; final revision</b><pre>{word_diff(row.get('response') or '', row['revision'] or '')}</pre>"
            )
    parts.append("</div>")
    return "".join(parts)


def _gain(gain: dict[str, Any] | None) -> str:
    """The revision check's verdict on a revision against the initial answer, for a heading."""
    if gain is None:
        return ""
    if gain["p_revision"] is None:
        return " (judge: no verdict)"
    consistency = (
        ""
        if gain["position_consistent"] is None
        else ", position consistent"
        if gain["position_consistent"]
        else ", position inconsistent"
    )
    return f" (P(better than the answer) = {gain['p_revision']:.3f}{consistency})"


def _pair(row: Row, pair: Pair) -> str:
    e = html.escape
    answers = row_answers(row)
    first, second = pair["answers"]
    p = pair["p_first"]
    label = pair["label"]
    heading = f"label {e(label)}" + ("" if p is None else f", P(first better) = {p:.3f}")
    if pair.get("position_consistent") is not None:
        heading += (
            ", position consistent"
            if pair["position_consistent"]
            else ", <span class='flag'>position inconsistent</span>"
        )
    if pair.get("jurors"):
        heading += "; jurors: " + ", ".join(
            f"{e(role)} {e(j['label'])}" + ("" if j["p_first"] is None else f" {j['p_first']:.3f}")
            for role, j in pair["jurors"].items()
        )
    votes = ", ".join(f"{e(pid)}: {q:.3f}" for pid, q in pair.get("principle_probs", {}).items()) or "no valid vote"
    sides = [
        (f"answer {first + 1}", answers[first], label == "a"),
        (f"answer {second + 1}", answers[second], label == "b"),
    ]
    cells = "".join(
        f"<div class='{'chosen' if chosen else ''}'>{_text(name + (' (chosen)' if chosen else ''), text)}</div>"
        for name, text, chosen in sides
    )
    return f"<p>{heading}; votes per principle (P first better): {votes}</p><div class='pair'>{cells}</div>"
