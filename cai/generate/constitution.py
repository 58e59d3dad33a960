"""Constitutions: a versioned file of principles that drives critique, revision and comparison."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cai.core.disk import write_atomic
from cai.core.errors import InputError
from cai.core.files import content_hash, load_yaml, validate
from cai.generate.records import Message


@dataclass(frozen=True)
class Principle:
    id: str
    critique: str
    revision: str
    comparison: str | None = None
    tags: tuple[str, ...] = ()
    weight: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "critique": self.critique, "revision": self.revision}
        if self.comparison is not None:
            out["comparison"] = self.comparison
        if self.tags:
            out["tags"] = list(self.tags)
        if self.weight != 1.0:
            out["weight"] = self.weight
        return out


@dataclass(frozen=True)
class ComparisonShot:
    """A worked comparison for few-shot judging: a conversation that ends with the human's turn, and
    the answer to it that is better and the one that is worse (RLMadisonFewShotPrompts' form)."""

    conversation: tuple[Message, ...]
    better: str
    worse: str

    def to_dict(self) -> dict[str, Any]:
        return {"conversation": [dict(m) for m in self.conversation], "better": self.better, "worse": self.worse}


@dataclass(frozen=True)
class Constitution:
    name: str
    version: str | int
    principles: tuple[Principle, ...]
    description: str | None = None
    few_shot: tuple[tuple[Message, ...], ...] = field(default=())
    comparison_few_shot: tuple[ComparisonShot, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "version": self.version}
        if self.description is not None:
            out["description"] = self.description
        out["principles"] = [p.to_dict() for p in self.principles]
        if self.few_shot:
            out["few_shot"] = [[dict(m) for m in dialogue] for dialogue in self.few_shot]
        if self.comparison_few_shot:
            out["comparison_few_shot"] = [shot.to_dict() for shot in self.comparison_few_shot]
        return out

    @property
    def hash(self) -> str:
        """Content hash of the principles and few-shot examples: identical meaning, identical hash."""
        return content_hash(self.to_dict())

    def principle(self, principle_id: str) -> Principle:
        return next(p for p in self.principles if p.id == principle_id)

    def draw(self, rng: random.Random) -> Principle:
        """One principle drawn with probability proportional to its weight."""
        return rng.choices(self.principles, weights=[p.weight for p in self.principles], k=1)[0]

    def save(self, path: str | Path) -> None:
        """As YAML that `load` reads back, written whole or not at all."""
        write_atomic(Path(path), yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True, width=100))


def from_dict(data: Any, file: str) -> Constitution:
    validate(data, "constitution", file)
    seen: dict[str, int] = {}
    for index, p in enumerate(data["principles"]):
        if p["id"] in seen:
            raise InputError(
                file, f"principles[{index}].id", f"duplicate id {p['id']!r} (first at principles[{seen[p['id']]}])"
            )
        seen[p["id"]] = index
    for index, shot in enumerate(data.get("comparison_few_shot", ())):
        if shot["conversation"][-1]["role"] != "user":
            raise InputError(
                file,
                f"comparison_few_shot[{index}].conversation",
                "must end with the user's turn that the two answers reply to",
            )
    principles = tuple(
        Principle(
            id=p["id"],
            critique=p["critique"],
            revision=p["revision"],
            comparison=p.get("comparison"),
            tags=tuple(p.get("tags", ())),
            weight=float(p.get("weight", 1.0)),
        )
        for p in data["principles"]
    )
    return Constitution(
        name=data["name"],
        version=data["version"],
        description=data.get("description"),
        principles=principles,
        few_shot=tuple(tuple(dict(m) for m in d) for d in data.get("few_shot", ())),
        comparison_few_shot=tuple(
            ComparisonShot(conversation=tuple(dict(m) for m in s["conversation"]), better=s["better"], worse=s["worse"])
            for s in data.get("comparison_few_shot", ())
        ),
    )


def load(path: str | Path) -> Constitution:
    return from_dict(load_yaml(path), str(path))
