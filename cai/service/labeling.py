"""Labeling tasks in the server's SQLite (beside the jobs): a task's pairs, and each labeler's
assignments and answers, with the order the pair was shown in, when, and the seconds spent.

Assignment is one write transaction (BEGIN IMMEDIATE: the database's write lock, taken before the
pair is chosen), so however many labelers ask at once, a pair never has more live assignments than the
task's overlap, and (a unique index) never two of one labeler. A skipped pair frees its place for
someone else; an assignment not answered yet holds it (the labeler gets it back on reload) for the
task's `hold_s`, then goes back to the pool: a labeler who leaves mid-task does not keep pairs from the
others for good."""

from __future__ import annotations

import json
import random
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cai.service import database

SKIP = "skip"
HOLD_S = 3600.0  # an hour: a pair left open longer than that goes to someone else
CHOICES = ("left", "right", "tie", SKIP)  # what a labeler presses, in the order shown

_SCHEMA = """
CREATE TABLE IF NOT EXISTS label_tasks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    question TEXT NOT NULL,          -- the comparison question shown above the pair
    source TEXT NOT NULL,            -- run directory or HH-style JSONL, relative to the workspace
    overlap INTEGER NOT NULL,        -- labelers per pair
    seed INTEGER NOT NULL,           -- the order pairs come in, and each one's left/right order
    labelers TEXT NOT NULL,          -- JSON list of labeler names; empty: every labeler
    left_out TEXT NOT NULL,          -- JSON: source pairs not made items, by reason
    created REAL NOT NULL,
    hold_s REAL NOT NULL             -- seconds an unanswered assignment keeps its pair
);
CREATE TABLE IF NOT EXISTS label_items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id INTEGER NOT NULL REFERENCES label_tasks(id),
    position INTEGER NOT NULL,       -- the seeded order items are handed out in
    source_id TEXT NOT NULL,
    prompt TEXT NOT NULL,            -- JSON messages
    first TEXT NOT NULL,             -- the pair's answers as the source holds them: labels say `a` for
    second TEXT NOT NULL,            -- the first better, `b` for the second, whatever order was shown
    judge TEXT                       -- JSON: the judge's pair (p_first, label, principle_probs, votes)
);
CREATE INDEX IF NOT EXISTS label_items_task ON label_items (task_id, position);
CREATE TABLE IF NOT EXISTS label_assignments (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id INTEGER NOT NULL,
    item_id INTEGER NOT NULL REFERENCES label_items(id),
    labeler TEXT NOT NULL,
    swapped INTEGER NOT NULL,        -- 1: the second answer was shown on the left
    shown REAL NOT NULL,
    answered REAL,
    label TEXT,                      -- a, b, tie or skip; NULL while open
    note TEXT,
    seconds REAL,                    -- from shown to answered, by the server's clock
    UNIQUE (item_id, labeler)
);
CREATE INDEX IF NOT EXISTS label_assignments_labeler ON label_assignments (task_id, labeler, answered);
"""


@dataclass(frozen=True)
class NewTask:
    name: str
    question: str
    source: str
    overlap: int
    seed: int
    labelers: list[str]
    hold_s: float = HOLD_S


class NotYours(Exception):
    """An assignment of another labeler, or a task the labeler is not one of."""


class Answered(Exception):
    """The assignment was answered already."""


class LabelStore:
    def __init__(self, path: Path):
        self.path = path
        database.create(path, _SCHEMA)
        with self._db() as db:  # a file from before holds could lapse: its tasks get the default hold
            if "hold_s" not in {row["name"] for row in db.execute("PRAGMA table_info(label_tasks)")}:
                db.execute(f"ALTER TABLE label_tasks ADD COLUMN hold_s REAL NOT NULL DEFAULT {HOLD_S}")

    def _db(self):
        return database.connect(self.path)

    # -- tasks

    def create(self, task: NewTask, items: list[dict[str, Any]], left_out: dict[str, int]) -> dict[str, Any]:
        order = list(range(len(items)))
        random.Random(task.seed).shuffle(order)
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            cur = db.execute(
                "INSERT INTO label_tasks (name, question, source, overlap, seed, labelers, left_out, created, hold_s) "
                "VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    task.name,
                    task.question,
                    task.source,
                    task.overlap,
                    task.seed,
                    json.dumps(task.labelers),
                    json.dumps(left_out),
                    time.time(),
                    task.hold_s,
                ),
            )
            task_id = cur.lastrowid
            db.executemany(
                "INSERT INTO label_items (task_id, position, source_id, prompt, first, second, judge) VALUES (?,?,?,?,?,?,?)",
                [
                    (
                        task_id,
                        position,
                        item["source_id"],
                        json.dumps(item["prompt"]),
                        item["first"],
                        item["second"],
                        json.dumps(item["judge"]) if item.get("judge") is not None else None,
                    )
                    for position, item in zip(order, items)
                ],
            )
            db.execute("COMMIT")
        return self.task(task_id)

    def task(self, task_id: int) -> dict[str, Any] | None:
        with self._db() as db:
            row = db.execute("SELECT * FROM label_tasks WHERE id = ?", (task_id,)).fetchone()
            if row is None:
                return None
            return self._describe(db, row)

    def tasks(self, labeler: str | None = None) -> list[dict[str, Any]]:
        """Every task, or those `labeler` may label, with their progress (a labeler sees only its own)."""
        with self._db() as db:
            rows = db.execute("SELECT * FROM label_tasks ORDER BY id").fetchall()
            found = [self._describe(db, row, labeler) for row in rows]
        return [t for t in found if labeler is None or may_label(t, labeler)]

    def _describe(self, db: sqlite3.Connection, row: sqlite3.Row, labeler: str | None = None) -> dict[str, Any]:
        task = dict(row)
        task["labelers"] = json.loads(task["labelers"])
        task["left_out"] = json.loads(task["left_out"])
        task["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(task["created"]))
        task["pairs"] = db.execute("SELECT COUNT(*) FROM label_items WHERE task_id = ?", (row["id"],)).fetchone()[0]
        by_labeler = db.execute(
            "SELECT labeler, COUNT(*) FROM label_assignments WHERE task_id = ? AND label IS NOT NULL AND label != ? GROUP BY labeler",
            (row["id"], SKIP),
        ).fetchall()
        counts = {who: n for who, n in by_labeler}
        task["labels_target"] = task["pairs"] * task["overlap"]
        task["labels_done"] = sum(counts.values())
        if labeler is None:
            task["labels_by_labeler"] = counts
        else:  # a labeler sees its own count, not its colleagues' names
            task["labels_mine"] = counts.get(labeler, 0)
        return task

    # -- the labeling flow

    def next(self, task: dict[str, Any], labeler: str) -> dict[str, Any] | None:
        """The labeler's open assignment in the task, else a new one on the first pair (in the task's
        order) that it has not seen and that has fewer live assignments than the overlap; None when
        no pair is left for it. Assignments left open past the task's hold are dropped first."""
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute(
                    "DELETE FROM label_assignments WHERE task_id = ? AND label IS NULL AND shown < ?",
                    (task["id"], time.time() - task["hold_s"]),
                )
                open_one = db.execute(
                    "SELECT id FROM label_assignments WHERE task_id = ? AND labeler = ? AND label IS NULL",
                    (task["id"], labeler),
                ).fetchone()
                if open_one is not None:
                    assignment_id = open_one[0]
                else:
                    item = db.execute(
                        "SELECT i.id FROM label_items i WHERE i.task_id = ? "
                        "AND NOT EXISTS (SELECT 1 FROM label_assignments a WHERE a.item_id = i.id AND a.labeler = ?) "
                        "AND (SELECT COUNT(*) FROM label_assignments a WHERE a.item_id = i.id AND (a.label IS NULL OR a.label != ?)) < ? "
                        "ORDER BY i.position LIMIT 1",
                        (task["id"], labeler, SKIP, task["overlap"]),
                    ).fetchone()
                    if item is None:
                        db.execute("COMMIT")
                        return None
                    # Seeded per task, pair and labeler: each labeler's order is its own, and reproducible.
                    swapped = random.Random(f"{task['seed']}:{item[0]}:{labeler}").random() < 0.5
                    assignment_id = db.execute(
                        "INSERT INTO label_assignments (task_id, item_id, labeler, swapped, shown) VALUES (?,?,?,?,?)",
                        (task["id"], item[0], labeler, int(swapped), time.time()),
                    ).lastrowid
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return self.shown(assignment_id)

    def shown(self, assignment_id: int) -> dict[str, Any]:
        """The assignment as the labeler sees it: the answers left and right, never which is which."""
        with self._db() as db:
            row = db.execute(
                "SELECT a.id, a.task_id, a.swapped, i.prompt, i.first, i.second FROM label_assignments a "
                "JOIN label_items i ON i.id = a.item_id WHERE a.id = ?",
                (assignment_id,),
            ).fetchone()
        left, right = (row["second"], row["first"]) if row["swapped"] else (row["first"], row["second"])
        return {
            "assignment": row["id"],
            "task": row["task_id"],
            "prompt": json.loads(row["prompt"]),
            "left": left,
            "right": right,
        }

    def answer(self, assignment_id: int, labeler: str, choice: str, note: str | None) -> dict[str, Any]:
        """Record `choice` (CHOICES, as shown) as the label of the pair's own order. KeyError: no such
        assignment; NotYours: another labeler's; Answered: answered already."""
        now = time.time()
        with self._db() as db:
            row = db.execute("SELECT * FROM label_assignments WHERE id = ?", (assignment_id,)).fetchone()
            if row is None:
                raise KeyError(assignment_id)
            if row["labeler"] != labeler:
                raise NotYours(f"assignment {assignment_id} is another labeler's")
            label = _label(choice, bool(row["swapped"]))
            cur = db.execute(
                "UPDATE label_assignments SET label = ?, note = ?, answered = ?, seconds = ? WHERE id = ? AND labeler = ? AND label IS NULL",
                (label, note or None, now, now - row["shown"], assignment_id, labeler),
            )
            if cur.rowcount != 1:
                raise Answered(f"assignment {assignment_id} is answered already")
        return {"assignment": assignment_id, "label": label, "seconds": now - row["shown"]}

    # -- what the labels add up to

    def items(self, task_id: int, skips: bool = False) -> list[dict[str, Any]]:
        """The task's pairs in its order, each with its `labels` and their records (`given`); skips
        only among the records, and only with `skips`."""
        with self._db() as db:
            items = db.execute("SELECT * FROM label_items WHERE task_id = ? ORDER BY position", (task_id,)).fetchall()
            answers = db.execute(
                "SELECT id AS assignment, item_id, labeler, label, note, swapped, seconds, answered FROM label_assignments "
                "WHERE task_id = ? AND label IS NOT NULL AND label != ? ORDER BY id",
                (task_id, "" if skips else SKIP),
            ).fetchall()
        by_item: dict[int, list[dict[str, Any]]] = {}
        for a in answers:
            by_item.setdefault(a["item_id"], []).append({**dict(a), "swapped": bool(a["swapped"])})
        return [
            {
                "id": item["id"],
                "source_id": item["source_id"],
                "prompt": json.loads(item["prompt"]),
                "first": item["first"],
                "second": item["second"],
                "judge": json.loads(item["judge"]) if item["judge"] else None,
                "given": by_item.get(item["id"], []),
                "labels": [a["label"] for a in by_item.get(item["id"], []) if a["label"] != SKIP],
            }
            for item in items
        ]


def may_label(task: dict[str, Any], labeler: str) -> bool:
    return not task["labelers"] or labeler in task["labelers"]


def _label(choice: str, swapped: bool) -> str:
    """The label in the pair's own order: `a` when its first answer is the better one."""
    if choice in ("tie", SKIP):
        return choice
    left_is_first = not swapped
    return "a" if (choice == "left") == left_is_first else "b"
