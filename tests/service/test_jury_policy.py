"""A jury in a service job: its jurors are roles like any other, so each juror's backend passes the
server's policy as every backend does; a juror on an API the operator did not declare is refused."""

from __future__ import annotations

import shutil

import pytest
import yaml
from pipeline_files import ROOT

from cai.core.errors import InputError
from cai.service.policy import ServerBackend
from cai.service.workspace import Workspace

KEY_ENV = "CAI_TEST_JURY_KEY"
DECLARED = "http://127.0.0.1:9/v1"


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # as `cai serve` runs: relative paths resolve in the workspace
    monkeypatch.setenv(KEY_ENV, "sk-jury-0123456789")
    shutil.copy(ROOT / "constitutions" / "harmless.yaml", tmp_path / "constitution.yaml")
    shutil.copy(ROOT / "prompts" / "red_team_demo.jsonl", tmp_path / "prompts.jsonl")
    pipeline = {
        "name": "jury",
        "seed": 1,
        "constitution": "constitution.yaml",
        "prompts": "prompts.jsonl",
        "backends": {
            "local": {"type": "vllm", "model": "smollm2"},
            "api": {"type": "openai", "model": "m", "base_url": DECLARED, "api_key_env": KEY_ENV},
        },
        "roles": {"responder": "local", "judge": "local", "judge_api": "api"},
        "stages": [{"type": "respond", "samples": 2}, {"type": "compare", "jury": {"judge": 1, "judge_api": 2}}],
    }
    (tmp_path / "jury.yaml").write_text(yaml.safe_dump(pipeline))
    return Workspace.open(tmp_path, {"declared": ServerBackend("declared", (DECLARED,), KEY_ENV)})


def test_a_jury_on_declared_backends_loads(workspace):
    cfg = workspace.load_pipeline("jury.yaml", [])
    assert cfg.roles["judge_api"] == "api" and cfg.stages[1].params["jury"] == {"judge": 1, "judge_api": 2}


def test_a_juror_on_an_undeclared_api_is_refused(workspace):
    with pytest.raises(
        InputError,
        match=r"jury.yaml: backends.api: http://127.0.0.1:8/v1 with \$CAI_TEST_JURY_KEY is not a backend this server allows",
    ):
        workspace.load_pipeline("jury.yaml", ["backends.api.base_url=http://127.0.0.1:8/v1"])
