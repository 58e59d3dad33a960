"""What a run exports, as others read it: TRL's trainers train on the datasets as they are, the dataset
card describes them and loads as a Hub card, and `cai export` converts them to the peers' formats."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from locations import ROOT
from pipeline_files import tiny_pipeline

from cai.cli import main
from cai.generate import constitution

# TRL's trainers set accelerate's process-wide state: cai's trainers in later tests must find none
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def sft_run(tiny_model, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sft-run")
    run_dir = folder / "run"
    assert (
        main(
            [
                "run",
                str(tiny_pipeline(folder, tiny_model, rounds=1)),
                "--limit",
                "6",
                "--run-dir",
                str(run_dir),
                "--quiet",
            ]
        )
        == 0
    )
    return run_dir


@pytest.fixture(scope="module")
def preference_run(tiny_model, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("preference-run")
    pipeline = tiny_pipeline(
        folder,
        tiny_model,
        roles={"responder": "local", "judge": "local"},
        stages=[
            {"type": "respond", "samples": 3, "max_tokens": 8, "temperature": 1.0},
            {"type": "compare", "tie_threshold": 0.0},
        ],
    )
    run_dir = folder / "run"
    assert main(["run", str(pipeline), "--limit", "6", "--run-dir", str(run_dir), "--quiet"]) == 0
    assert lines(run_dir / "datasets" / "preferences.jsonl"), "a random judge with no tie band labels every pair"
    return run_dir


def trl_args(config_class, out: Path, **extra):
    """One optimizer step of two examples on the CPU, nothing saved or reported."""
    return config_class(
        output_dir=str(out),
        max_steps=1,
        per_device_train_batch_size=2,
        learning_rate=1e-4,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        disable_tqdm=True,
        **extra,
    )


def test_trl_sft_trainer_trains_on_the_sft_export(sft_run, tiny_model, tmp_path):
    from datasets import load_from_disk
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    data = load_from_disk(str(sft_run / "datasets" / "sft"))
    trainer = SFTTrainer(
        model=str(tiny_model),
        args=trl_args(SFTConfig, tmp_path, max_length=128),
        train_dataset=data,
        processing_class=AutoTokenizer.from_pretrained(tiny_model),
    )
    result = trainer.train()
    assert result.global_step == 1 and math.isfinite(result.training_loss) and result.training_loss > 0


def test_trl_dpo_trainer_trains_on_the_preference_export(preference_run, tiny_model, tmp_path):
    from datasets import load_from_disk
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    data = load_from_disk(str(preference_run / "datasets" / "preferences"))
    trainer = DPOTrainer(
        model=str(tiny_model),
        args=trl_args(DPOConfig, tmp_path, max_length=128),
        train_dataset=data,
        processing_class=AutoTokenizer.from_pretrained(tiny_model),
    )
    result = trainer.train()
    # a model equal to its reference: the first step's loss is -log sigmoid(0)
    assert result.global_step == 1 and result.training_loss == pytest.approx(math.log(2), abs=1e-3)


def test_trl_reward_trainer_trains_on_the_preference_export(preference_run, tiny_model, tmp_path):
    from datasets import load_from_disk
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_model, num_labels=1, pad_token_id=tokenizer.pad_token_id
    )
    data = load_from_disk(str(preference_run / "datasets" / "preferences"))
    trainer = RewardTrainer(
        model=model,
        args=trl_args(RewardConfig, tmp_path, max_length=128),
        train_dataset=data,
        processing_class=tokenizer,
    )
    result = trainer.train()
    assert result.global_step == 1 and math.isfinite(result.training_loss)


def test_dataset_card_names_what_made_the_data_and_loads(sft_run, tmp_path):
    from datasets import load_dataset
    from huggingface_hub import DatasetCard

    datasets_dir = sft_run / "datasets"
    card = DatasetCard.load(datasets_dir / "README.md")
    facts = card.data.to_dict()["cai"]
    harmless = constitution.load(ROOT / "constitutions" / "harmless.yaml")
    assert facts["constitution"] == {
        "name": harmless.name,
        "version": harmless.version,
        "hash": harmless.hash,
        "principles": len(harmless.principles),
    }
    assert facts["pipeline"] == "tiny" and facts["seed"] == 7 and facts["limit"] == 6 and "cai" in facts["versions"]
    records = lines(datasets_dir / "sft.jsonl")
    assert facts["counts"] == {"rows": 6, "sft": len(records), "flagged": 6 - len(records)}
    assert harmless.hash in card.text and "SFTTrainer" in card.text and "`messages`:" in card.text
    # the header's configs point the Hub (and load_dataset on the folder) at the records, not at rows.jsonl
    loaded = load_dataset(str(datasets_dir), split="train", cache_dir=str(tmp_path / "cache"))
    assert loaded.num_rows == len(records) and loaded[0]["messages"] == records[0]["messages"]


def test_export_refuses_an_unknown_format_before_writing(tmp_path):
    """From Python (the CLI's choices stop it earlier): an unknown format was saved as an HF folder."""
    from cai.core.errors import InputError
    from cai.generate.export import convert

    with pytest.raises(InputError, match="unknown format 'csv'"):
        convert(tmp_path / "run", "csv", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "hf"])
def test_cai_export_converts_the_records_with_their_card(preference_run, tmp_path, fmt, capsys):
    from datasets import load_dataset, load_from_disk
    from huggingface_hub import DatasetCard

    dest = tmp_path / "out"
    assert main(["export", str(preference_run), "--format", fmt, "-o", str(dest)]) == 0
    printed = Path(capsys.readouterr().out.strip())
    records = lines(preference_run / "datasets" / "preferences.jsonl")
    if fmt == "hf":
        data = load_from_disk(str(printed))
    else:
        data = load_dataset(
            fmt if fmt == "parquet" else "json",
            data_files=str(printed),
            split="train",
            cache_dir=str(tmp_path / "cache"),
        )
    assert printed.parent == dest or printed == dest
    assert data.num_rows == len(records)
    assert [(d["chosen"], d["label_prob"], d["votes"]) for d in data] == [
        (r["chosen"], r["label_prob"], r["votes"]) for r in records
    ]
    card = DatasetCard.load(dest / "README.md")
    assert card.data.to_dict()["cai"]["counts"]["preferences"] == len(records)
    assert "- `rows.jsonl`" not in card.text  # this layout holds the records only
    data_files = {"parquet": "preferences.parquet", "jsonl": "preferences.jsonl", "hf": "data-*.arrow"}[fmt]
    assert card.data.to_dict()["configs"][0]["data_files"][0]["path"] == data_files


def test_cai_export_refuses_a_folder_in_use_and_a_run_without_datasets(sft_run, tmp_path, capsys):
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    assert main(["export", str(sft_run), "--format", "jsonl", "-o", str(used)]) == 2
    assert capsys.readouterr().err.strip() == f"{used}: exists and is not empty: name a new folder"
    assert [p.name for p in used.iterdir()] == ["notes.txt"]
    assert main(["export", str(tmp_path), "--format", "parquet", "-o", str(tmp_path / "new")]) == 2
    assert "no exported datasets here" in capsys.readouterr().err and not (tmp_path / "new").exists()


def scored_row(index: int, scores: list[float | None]) -> dict:
    return {
        "id": f"row{index}",
        "messages": [{"role": "user", "content": f"Question {index}?"}],
        "responses": [f"answer {index}.{k}" for k in range(len(scores))],
        "scores": [
            {
                "score": s,
                "principle_scores": {"p1": s},
                "desirable": None if s is None else s > 5.5,
            }
            for s in scores
        ],
        "constitution_hash": "c",
        "seed": 1,
        "pipeline": "scored",
    }


def test_scored_answers_export_as_unpaired_records_kto_trains_on(tiny_model, tmp_path):
    """Each scored answer one (prompt, completion, label) record, TRL's unpaired format; answers no
    principle scored stay in rows.jsonl only, counted. TRL's KTOTrainer reads the export as it is."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer
    from trl import KTOConfig, KTOTrainer

    from cai.generate import export

    rows = [scored_row(0, [7.5, 2.0]), scored_row(1, [None, 5.5]), scored_row(2, [9.0, 3.25])]
    counts = export.export(rows, tmp_path / "datasets")

    assert counts == {"rows": 3, "unpaired": 5, "desirable": 2, "unscored": 1}
    records = lines(tmp_path / "datasets" / "unpaired.jsonl")
    assert [(r["completion"][0]["content"], r["label"], r["score"]) for r in records] == [
        ("answer 0.0", True, 7.5),
        ("answer 0.1", False, 2.0),
        ("answer 1.1", False, 5.5),  # not above desirable_above
        ("answer 2.0", True, 9.0),
        ("answer 2.1", False, 3.25),
    ]
    assert [r["group_id"] for r in records] == ["row0", "row0", "row1", "row2", "row2"]
    assert records[0]["prompt"] == [{"role": "user", "content": "Question 0?"}]
    trainer = KTOTrainer(
        model=str(tiny_model),
        args=trl_args(KTOConfig, tmp_path / "kto", max_length=128),
        train_dataset=load_from_disk(str(tmp_path / "datasets" / "unpaired")),
        processing_class=AutoTokenizer.from_pretrained(tiny_model),
    )
    result = trainer.train()
    assert result.global_step == 1 and math.isfinite(result.training_loss)
