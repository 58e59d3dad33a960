"""Every trainer kind is registered wherever kinds are listed: `cai train`'s choices, the chain file
schema, the service's train jobs; and the service confines every kind's reward models to its workspace."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from synthetic import write_config, write_jsonl

from cai import chain
from cai.cli import build_parser
from cai.core.errors import InputError
from cai.core.files import schema
from cai.service.app import TrainRequest
from cai.service.workspace import Workspace
from cai.train.config import DEFAULT_LR, KINDS
from cai.train.config import load as load_config


def test_every_kind_is_a_command_a_chain_step_and_a_service_job(tmp_path: Path) -> None:
    choices = next(
        a for a in build_parser()._subparsers._group_actions[0].choices["train"]._actions if a.dest == "kind"
    ).choices
    assert tuple(choices) == KINDS and set(DEFAULT_LR) == set(KINDS)
    train_step = next(o for o in schema("chain")["properties"]["steps"]["items"]["oneOf"] if "train" in o["required"])
    assert tuple(train_step["properties"]["train"]["enum"]) == KINDS
    for kind in KINDS:
        assert TrainRequest(kind=kind, config="c.yaml").kind == kind
    config = write_config(tmp_path / "c.yaml", model="smollm2", data={"train": "p.jsonl"}, output_dir="x")
    steps = [
        {"name": kind.replace("-", "_"), "train": kind, "config": str(config)} for kind in KINDS
    ]  # a step name has no hyphen
    loaded = chain.load(write_config(tmp_path / "chain.yaml", name="all", steps=steps))
    assert [s.argv[:2] for s in loaded.steps] == [("train", kind) for kind in KINDS]


NEEDS = {
    "hir": {"bands": [{"label": "low"}, {"label": "high", "at_least": 0.5}]}
}  # what a kind's section requires besides its rewards


@pytest.mark.parametrize("kind", ["ppo", "rejection", "rest", "grpo", "rloo", "hir"])
def test_service_refuses_a_reward_model_outside_the_workspace(tmp_path: Path, kind: str, monkeypatch) -> None:
    root, outside = tmp_path / "ws", tmp_path / "outside"
    (outside / "rm").mkdir(parents=True)
    write_jsonl(root / "prompts.jsonl", [{"prompt": "Hi?"}])
    rewards = [
        {"name": "rule", "rule": "token_fraction", "tokens": ["a"]},
        {"name": "harmless", "model": str(outside / "rm")},
    ]
    (root / "c.yaml").write_text(
        json.dumps(
            {
                "model": "smollm2",
                "data": {"train": "prompts.jsonl"},
                "output_dir": "runs/x",
                kind: {"rewards": rewards, **NEEDS.get(kind, {})},
            }
        )
    )
    monkeypatch.chdir(root)  # as `cai serve` runs: in its workspace
    with pytest.raises(InputError) as info:
        Workspace.open(root).load_training(kind, "c.yaml", [])
    assert info.value.render().startswith(f"c.yaml: {kind}.rewards[1].model: leaves the workspace")


def test_service_refuses_pretraining_data_outside_the_workspace(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "ws"
    write_jsonl(root / "prefs.jsonl", [])
    outside = write_jsonl(tmp_path / "generic.jsonl", [])
    (root / "c.yaml").write_text(
        json.dumps(
            {
                "model": "smollm2",
                "data": {"train": "prefs.jsonl"},
                "output_dir": "runs/x",
                "rm": {"pretrain": {"data": str(outside)}},
            }
        )
    )
    monkeypatch.chdir(root)
    with pytest.raises(InputError) as info:
        Workspace.open(root).load_training("rm", "c.yaml", [])
    assert info.value.render().startswith("c.yaml: rm.pretrain.data: leaves the workspace")


@pytest.mark.parametrize("key", ["constitution", "system_file"])
def test_service_refuses_a_distill_context_outside_the_workspace(tmp_path: Path, key: str, monkeypatch) -> None:
    root = tmp_path / "ws"
    write_jsonl(root / "prompts.jsonl", [{"prompt": "Hi?"}])
    outside = tmp_path / "context.txt"
    outside.write_text("Be kind.")
    (root / "c.yaml").write_text(
        json.dumps(
            {
                "model": "smollm2",
                "data": {"train": "prompts.jsonl"},
                "output_dir": "runs/x",
                "distill": {"context": {key: str(outside)}},
            }
        )
    )
    monkeypatch.chdir(root)
    with pytest.raises(InputError) as info:
        Workspace.open(root).load_training("distill", "c.yaml", [])
    assert info.value.render().startswith(f"c.yaml: distill.context.{key}: leaves the workspace")


def test_service_refuses_a_judge_constitution_outside_the_workspace(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "ws"
    write_jsonl(root / "prefs.jsonl", [])
    outside = tmp_path / "harmless.yaml"
    outside.write_text((Path(__file__).resolve().parents[2] / "constitutions" / "harmless.yaml").read_text())
    (root / "c.yaml").write_text(
        json.dumps(
            {
                "model": "smollm2",
                "data": {"train": "prefs.jsonl"},
                "output_dir": "runs/x",
                "judge": {"constitution": str(outside)},
            }
        )
    )
    monkeypatch.chdir(root)
    with pytest.raises(InputError) as info:
        Workspace.open(root).load_training("judge", "c.yaml", [])
    assert info.value.render().startswith("c.yaml: judge.constitution: leaves the workspace")
    (root / "c.yaml").write_text(
        json.dumps({"model": "smollm2", "data": {"train": "prefs.jsonl"}, "output_dir": "runs/x"})
    )
    assert (
        Workspace.open(root).load_training("judge", "c.yaml", []).judge.constitution is None
    )  # the project's own default is no job's choice


def test_service_refuses_a_judge_backend_the_operator_did_not_declare(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "ws"
    write_jsonl(root / "prompts.jsonl", [{"prompt": "Hi?"}])
    (root / "harmless.yaml").write_text(
        (Path(__file__).resolve().parents[2] / "constitutions" / "harmless.yaml").read_text()
    )
    backend = {"type": "openai", "model": "judge", "base_url": "http://10.0.0.1:8000/v1", "api_key_env": "SOME_SECRET"}
    rewards = [{"name": "judge", "judge": {"backend": backend, "constitution": "harmless.yaml"}}]
    (root / "c.yaml").write_text(
        json.dumps(
            {
                "model": "smollm2",
                "data": {"train": "prompts.jsonl"},
                "output_dir": "runs/x",
                "grpo": {"rewards": rewards},
            }
        )
    )
    monkeypatch.chdir(root)
    with pytest.raises(InputError) as info:
        Workspace.open(root).load_training("grpo", "c.yaml", [])
    assert info.value.render().startswith(
        "c.yaml: grpo.rewards[0].judge.backend: http://10.0.0.1:8000/v1 with $SOME_SECRET is not a backend this server allows"
    )


def test_the_judge_backend_schema_is_the_pipelines_without_batch_apis(tmp_path: Path) -> None:
    """One backend entry format: the train schema points at the pipeline schema's. A Batch API, which
    answers within hours, cannot label a training step: refused naming the field."""
    assert schema("train")["$defs"]["backend"] == {"$ref": "pipeline.json#/$defs/backend"}
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Hi?"}])
    backend = {"type": "openai_batch", "model": "judge", "base_url": "http://127.0.0.1:9/v1"}
    rewards = [{"name": "judge", "judge": {"backend": backend, "constitution": "harmless.yaml"}}]
    config = write_config(
        tmp_path / "c.yaml", model="smollm2", data={"train": "prompts.jsonl"}, output_dir="x", grpo={"rewards": rewards}
    )
    with pytest.raises(InputError) as info:
        load_config("grpo", config)
    assert info.value.field == "grpo.rewards[0].judge.backend.type" and "Batch API" in info.value.message


def test_service_confines_nash_md_preference_to_the_workspace_and_its_backends(tmp_path: Path, monkeypatch) -> None:
    root, outside = tmp_path / "ws", tmp_path / "outside"
    (outside / "rm").mkdir(parents=True)
    write_jsonl(root / "prompts.jsonl", [{"prompt": "Hi?"}])
    (root / "harmless.yaml").write_text(
        (Path(__file__).resolve().parents[2] / "constitutions" / "harmless.yaml").read_text()
    )
    backend = {"type": "openai", "model": "judge", "base_url": "http://10.0.0.1:8000/v1", "api_key_env": "SOME_SECRET"}
    monkeypatch.chdir(root)
    for preference, field in (
        ({"model": str(outside / "rm")}, "nash-md.preference.model: leaves the workspace"),
        (
            {"judge": {"backend": backend, "constitution": "harmless.yaml"}},
            "nash-md.preference.judge.backend: http://10.0.0.1:8000/v1",
        ),
    ):
        (root / "c.yaml").write_text(
            json.dumps(
                {
                    "model": "smollm2",
                    "data": {"train": "prompts.jsonl"},
                    "output_dir": "runs/x",
                    "nash-md": {"preference": preference},
                }
            )
        )
        with pytest.raises(InputError) as info:
            Workspace.open(root).load_training("nash-md", "c.yaml", [])
        assert info.value.render().startswith(f"c.yaml: {field}"), info.value.render()
