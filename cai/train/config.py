"""Train config files (`cai train KIND CONFIG.yaml`): load, apply `--set`, validate, resolve.

One schema (cai/schemas/train.json) covers every trainer (KINDS): the shared keys at the top, each
trainer's own keys in its section (`sft:`, `rm:`, `dpo:`, ...); a section for another trainer is an error.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cai.core.errors import InputError
from cai.core.files import existing_path, load_yaml, validate
from cai.core.models import check_model_folder
from cai.core.overrides import apply_overrides
from cai.generate.backends.base import BackendSpec
from cai.generate.config import backend_spec

# The one list of trainer kinds, with the module whose train() each runs: the CLI, the service and
# the chain schema's enum (kept equal by a test) read it.
RECIPES = {
    "sft": "cai.train.sft",
    "rm": "cai.train.reward",
    "dpo": "cai.train.dpo",
    "ppo": "cai.train.ppo",
    "rejection": "cai.train.rejection",
    "rest": "cai.train.rest",
    "grpo": "cai.train.grpo",
    "rloo": "cai.train.grpo",
    "nash-md": "cai.train.nash_md",
    "online-dpo": "cai.train.online_dpo",
    "hir": "cai.train.hir",
    "distill": "cai.train.distill",
    "judge": "cai.train.judge",
}
KINDS = tuple(RECIPES)
DEFAULT_LR = {
    "sft": 2e-5,
    "rm": 1e-5,
    "dpo": 1e-6,
    "ppo": 1e-6,
    "rejection": 2e-5,
    "rest": 2e-5,
    "grpo": 1e-6,
    "rloo": 1e-6,
    "nash-md": 1e-6,
    "online-dpo": 1e-6,
    "hir": 2e-5,
    "distill": 2e-5,
    "judge": 1e-5,
}
# Keys that change neither the weights nor the data order: a resumed run may change them (gradient
# checkpointing gives the same gradients, and is what a run that ran out of memory needs)
RESUMABLE_CHANGES = frozenset(
    {"save_every", "keep_checkpoints", "eval_every", "eval_batch_size", "tensorboard", "gradient_checkpointing"}
)


@dataclass(frozen=True)
class LoraOptions:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"


@dataclass(frozen=True)
class SFTOptions:
    bucket_by_length: bool = True  # batches of similar lengths: less padding, same examples per epoch


@dataclass(frozen=True)
class PretrainOptions:
    """Preference-model pretraining (Askell et al. 2021): a first phase on a generic comparison set."""

    data: Path
    limit: int | None = None
    max_steps: int | None = None
    epochs: int = 1
    lr: float | None = None  # default: the main phase's


@dataclass(frozen=True)
class RewardOptions:
    use_margin: bool = False  # Llama 2: -log sigmoid(d - margin), margin from the dataset's `margin` column
    use_soft_labels: bool = False  # CAI paper: soft cross-entropy on the `label_prob` column
    center_coef: float = 0.0  # Eisenstein et al.: coef * (r_c + r_r)^2
    length_balance: bool = False  # chosen-longer and chosen-shorter pairs weigh the same in total
    length_coef: float = 0.0  # heads 1: coef * |corr(r_c - r_r, length difference)|; heads 2: ODIN's length loss
    length_window: int = 0  # heads 1: the correlation also over this many pairs before the batch (0: the batch's)
    heads: int = 1  # 2: ODIN's quality and length heads; the quality head alone is kept
    orthogonal_coef: float = 1.0  # heads 2: ODIN's |w_quality . w_length|
    pretrain: PretrainOptions | None = None


@dataclass(frozen=True)
class DPOOptions:
    beta: float = 0.1  # for cpl: its temperature alpha; orpo has none (orpo_lambda)
    loss_type: str = "sigmoid"
    cpl_lambda: float = 0.5  # CPL's conservative regulariser (1: plain CPL)
    simpo_gamma: float = 0.5  # SimPO's target reward margin
    orpo_lambda: float = 0.1  # ORPO's weight of the odds-ratio term beside the SFT term
    kto_desirable_weight: float = 1.0  # KTO's lambda_D
    kto_undesirable_weight: float = 1.0  # KTO's lambda_U
    use_soft_labels: bool = False  # conservative DPO with each pair's `label_prob`
    reference: str | None = None  # default: the starting model
    precompute_ref: bool = False  # reference log-probs once before training, cached in output_dir


@dataclass(frozen=True)
class JudgeSource:
    """The constitution's judge as a live reward: `score` (d-RLAIF's expected 1-10 score under
    `principles` comparison principles drawn per answer) or `pairwise` (the swap-averaged probability
    that the answer beats the prompt's reference answer, from `references`)."""

    backend: BackendSpec
    constitution: Path
    mode: str = "score"
    principles: int = 1
    references: Path | None = None  # pairwise: SFT records (`messages`) whose last turn is the reference answer


@dataclass(frozen=True)
class RewardSource:
    name: str
    weight: float = 1.0
    model: Path | None = None  # a `cai train rm` output
    tokens: tuple[str, ...] = ()  # rule token_fraction: the share of answer tokens among these
    judge: JudgeSource | None = None


@dataclass(frozen=True)
class PPOOptions:
    rewards: tuple[RewardSource, ...] = ()
    algorithm: str = "ppo"  # a2c: one unclipped update per batch
    gate: tuple[str, float] | None = None
    value_from: str | None = None  # default: the first reward model, else the policy
    rollout: str = "hf"
    vllm_options: dict[str, Any] = field(default_factory=dict)
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    kl_beta: float = 0.05
    kl_target: float | None = None
    kl_horizon: float = 10000.0
    gamma: float = 1.0
    lam: float = 0.95
    clip_range: float = 0.2
    value_clip_range: float = 0.2
    value_coef: float = 0.1
    entropy_coef: float = 0.0
    ppo_epochs: int = 4
    minibatch_size: int | None = None  # default: the whole rollout batch
    reward_norm: str = "running"


@dataclass(frozen=True)
class GroupOptions:
    """GRPO and RLOO: `samples` (K) answers per prompt, each answer's advantage relative to the others
    of its prompt (no value model), a KL term to the reference: GRPO's k3 estimator in the loss, RLOO's
    sequence KL in the reward. `epochs` passes of `minibatch_size` answers per batch (1: on-policy)."""

    rewards: tuple[RewardSource, ...] = ()
    gate: tuple[str, float] | None = None
    samples: int = 4
    rollout: str = "hf"
    vllm_options: dict[str, Any] = field(default_factory=dict)
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    kl_beta: float = 0.04
    scale_rewards: bool = True  # grpo only: divide by the group's std (False: Dr. GRPO)
    clip_range: float = 0.2
    epochs: int = 1
    minibatch_size: int | None = None  # answers per optimizer step; default: all batch_size * samples


@dataclass(frozen=True)
class PreferenceSource:
    """Nash-MD's P(y > y' | x): a reward model's Bradley-Terry probability sigmoid(r(y) - r(y')), or the
    judge's swap-averaged pairwise probability between the two answers (mode pairwise, no references)."""

    model: Path | None = None
    judge: JudgeSource | None = None


@dataclass(frozen=True)
class NashMDOptions:
    """Nash-MD (Munos et al. 2023): answers of the policy against answers of the geometric mixture
    pi^(1 - mixture_coef) mu^mixture_coef of policy and reference, scored by `preference`; `kl_beta` is
    the paper's tau, the weight of KL(pi || mu)."""

    preference: PreferenceSource = field(default_factory=PreferenceSource)
    mixture_coef: float = 0.5
    kl_beta: float = 0.1
    rollout: str = "hf"
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0


@dataclass(frozen=True)
class PairJudgeSource:
    """The compare stage's judge on live answers, as a pipeline's compare stage labels pairs: each pair in
    both orders under `principles` comparison principles drawn per pair, each vote calibrated
    (`calibration`, a `cai eval-judge --calibrate` file), or several backends voting by weight (`jury`)."""

    backends: dict[str, BackendSpec]  # the compare stage's roles: `judge`, or the jury's names
    constitution: Path
    jury: dict[str, float] | None = None  # role -> weight; None: the one judge
    principles: int = 1
    calibration: Path | None = None
    few_shot: int = 0
    method: str = "auto"


@dataclass(frozen=True)
class PairPreferenceSource:
    """Online DPO's labels: a reward model's Bradley-Terry probability sigmoid(r(y) - r(y')), or the judge."""

    model: Path | None = None
    judge: PairJudgeSource | None = None


@dataclass(frozen=True)
class OnlineDPOOptions:
    """Online DPO from AI feedback (Guo et al. 2024): `samples` answers per prompt from the current policy,
    pairs of them labelled live by `preference`, the DPO family's loss against the reference."""

    preference: PairPreferenceSource = field(default_factory=PairPreferenceSource)
    samples: int = 2
    pairs: str = "best_vs_worst"  # or all: every pair of a prompt's answers
    use_soft_labels: bool = False  # the judge's P as each pair's label, not its verdict
    beta: float = 0.1
    loss_type: str = "sigmoid"
    rollout: str = "hf"
    vllm_options: dict[str, Any] = field(default_factory=dict)
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0


@dataclass(frozen=True)
class SampledOptions:
    """What the trainers that sample K answers per prompt, score them and fine-tune on a selection
    (rejection sampling, ReST) share: reward sources and the sampler's settings. The fine-tuning
    itself uses the shared training keys."""

    rewards: tuple[RewardSource, ...] = ()
    gate: tuple[str, float] | None = None
    samples: int = 4
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    vllm_options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RejectionOptions(SampledOptions):
    """Best-of-K (Llama 2's rejection sampling)."""

    iterations: int = 1


@dataclass(frozen=True)
class RestOptions(SampledOptions):
    """ReST (Gulcehre et al. 2023): `grow_steps` Grow steps, each followed by one Improve step per
    threshold (rising), each Improve step fine-tuning on the Grow samples at or above its threshold."""

    grow_steps: int = 1
    thresholds: tuple[float, ...] = (0.0,)
    threshold_type: str = "reward"  # reward: the thresholds are rewards; quantile: quantiles of each Grow's rewards


@dataclass(frozen=True)
class Band:
    """An outcome an answer can reach: its reward is at least `at_least` (None: the lowest band, any reward)."""

    label: str
    at_least: float | None = None


@dataclass(frozen=True)
class HIROptions(SampledOptions):
    """HIR, Hindsight Instruction Relabeling (Zhang et al. 2023): `iterations` of sampling with the best
    band's instruction, relabeling each answer with the band its reward reached (`bands`, rising, put into
    `template`), and training on the relabeled pairs with the supervised and contrastive terms."""

    bands: tuple[Band, ...] = ()
    template: str = "{prompt}\n\n(Write an answer that is {band}.)"
    iterations: int = 1
    contrastive_coef: float = 1.0
    entropy_coef: float = 0.0  # the paper's entropy regularisation: -coef * mean token entropy


@dataclass(frozen=True)
class DistillContext:
    """What the teacher reads before each prompt, as a system message: one of a constitution (its
    principles listed), a text, or a text file."""

    constitution: Path | None = None
    system: str | None = None
    system_file: Path | None = None


@dataclass(frozen=True)
class DistillOptions:
    """Context distillation (Askell et al. 2021): the teacher answers with `context` before each
    prompt; the student, without it, learns the answers (`target: text`, SFT) or the teacher's
    next-token distributions over them (`target: logits`, the KL at `kl_temperature`)."""

    context: DistillContext = field(default_factory=DistillContext)
    target: str = "logits"
    teacher: str | None = None  # default: the starting model
    kl: str = "forward"
    kl_temperature: float = 1.0
    samples: int = 1
    rollout: str = "hf"
    vllm_options: dict[str, Any] = field(default_factory=dict)
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0


@dataclass(frozen=True)
class JudgeTrainOptions:
    """A generative judge fine-tuned on labeled pairs in the compare stage's prompt, both orders: the
    Bradley-Terry loss on the option letters' logits, plus `lm_coef` times the full-vocabulary NLL of
    the right letter (keeps the letters the judge's likely replies, for a top-k API or a parsed choice)."""

    constitution: Path | None = None  # its comparison principles pose the question; None: the project's harmless.yaml
    soft_labels: bool = False  # the target is each pair's label_prob, not 1
    lm_coef: float = 0.1
    length_balance: bool = False  # chosen-longer and chosen-shorter pairs weigh the same in total
    length_coef: float = 0.0  # coef * |corr(z_chosen - z_rejected, length difference)| per batch
    length_window: int = 0  # the correlation also over this many pairs before the batch (0: the batch's)


@dataclass(frozen=True)
class DataFile:
    """One file of `data.train`, and how much each of its records counts in the loss."""

    path: Path
    weight: float = 1.0


# The trainers that read `data.train` as a list of weighted files (their losses weigh each pair).
WEIGHTED_DATA_KINDS = ("judge", "rm")
# The decorrelation term is a Pearson correlation over a batch's pairs: two points always correlate fully.
MIN_CORRELATION_BATCH = 4


@dataclass
class TrainConfig:
    kind: str
    file: Path
    raw: dict[str, Any]  # the validated document, overrides applied: recorded in output_dir
    model: str
    train_data: Path  # the first of train_files: what the trainers that read one file read
    output_dir: Path
    train_files: tuple[DataFile, ...] = ()  # every file of data.train with its weight
    eval_data: Path | None = None
    eval_fraction: float = 0.1
    limit: int | None = None
    eval_skip: int = 0  # records of eval_data passed over: pairs 801-1000 of the training file are a held-out set
    seed: int = 0
    max_steps: int | None = None
    epochs: int = 1
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    scheduler: str = "cosine"
    max_grad_norm: float = 1.0
    max_length: int = 1024
    precision: str = "auto"
    save_every: int = 100
    keep_checkpoints: int = 2
    eval_every: int | None = None
    eval_batch_size: int | None = None
    tensorboard: bool = False
    gradient_checkpointing: bool = False
    attn_implementation: str | None = None  # transformers' default (sdpa where the model supports it)
    reference_offload: str | None = None  # "cpu": the frozen reference's weights kept in CPU memory
    packing: bool = False
    max_tokens_per_batch: int | None = None  # with packing; batch_size x max_length when not given
    lora: LoraOptions | None = None
    sft: SFTOptions = field(default_factory=SFTOptions)
    rm: RewardOptions = field(default_factory=RewardOptions)
    dpo: DPOOptions = field(default_factory=DPOOptions)
    ppo: PPOOptions = field(default_factory=PPOOptions)
    rejection: RejectionOptions = field(default_factory=RejectionOptions)
    rest: RestOptions = field(default_factory=RestOptions)
    grpo: GroupOptions = field(default_factory=GroupOptions)
    rloo: GroupOptions = field(default_factory=GroupOptions)
    hir: HIROptions = field(default_factory=HIROptions)
    nash_md: NashMDOptions = field(default_factory=NashMDOptions)  # the `nash-md:` section
    online_dpo: OnlineDPOOptions = field(default_factory=OnlineDPOOptions)  # the `online-dpo:` section
    distill: DistillOptions = field(default_factory=DistillOptions)
    judge: JudgeTrainOptions = field(default_factory=JudgeTrainOptions)

    def reward_sections(self) -> dict[str, Any]:
        """The sections that hold `rewards:` lists, by name."""
        return {
            "ppo": self.ppo,
            "rejection": self.rejection,
            "rest": self.rest,
            "grpo": self.grpo,
            "rloo": self.rloo,
            "hir": self.hir,
        }

    def judges(self) -> list[tuple[str, JudgeSource]]:
        """(config field, spec) of every judge this config declares: reward sources and Nash-MD's preference."""
        found = [
            (f"{name}.rewards[{i}].judge", s.judge)
            for name, options in self.reward_sections().items()
            for i, s in enumerate(options.rewards)
            if s.judge is not None
        ]
        if self.nash_md.preference.judge is not None:
            found.append(("nash-md.preference.judge", self.nash_md.preference.judge))
        pair_judge = self.online_dpo.preference.judge
        if pair_judge is not None:  # one entry per backend: a jury's jurors each have their own
            for role, spec in pair_judge.backends.items():
                where = "online-dpo.preference.judge" + (f".jury.{role}" if pair_judge.jury else "")
                found.append((where, JudgeSource(backend=spec, constitution=pair_judge.constitution)))
        return found

    def data_files(self) -> tuple[DataFile, ...]:
        """data.train's files with their weights (a config made in code may give train_data alone)."""
        return self.train_files or (DataFile(self.train_data),)

    def read_paths(self) -> list[tuple[str, Path]]:
        """(config field, path) of every file or folder this trainer reads besides its models: the data
        and the reward models. What the service confines to its workspace."""
        listed = isinstance(self.raw.get("data", {}).get("train"), list)
        paths = [(f"data.train[{i}].path" if listed else "data.train", f.path) for i, f in enumerate(self.data_files())]
        paths += [("data.eval", self.eval_data)] if self.eval_data is not None else []
        if self.rm.pretrain is not None:
            paths.append(("rm.pretrain.data", self.rm.pretrain.data))
        paths += [
            (f"{name}.rewards[{i}].model", s.model)
            for name, options in self.reward_sections().items()
            for i, s in enumerate(options.rewards)
            if s.model is not None
        ]
        if self.nash_md.preference.model is not None:
            paths.append(("nash-md.preference.model", self.nash_md.preference.model))
        if self.online_dpo.preference.model is not None:
            paths.append(("online-dpo.preference.model", self.online_dpo.preference.model))
        if self.online_dpo.preference.judge is not None and self.online_dpo.preference.judge.calibration is not None:
            paths.append(("online-dpo.preference.judge.calibration", self.online_dpo.preference.judge.calibration))
        for where, judge in self.judges():
            paths.append((f"{where}.constitution", judge.constitution))
            if judge.references is not None:
                paths.append((f"{where}.references", judge.references))
        context = self.distill.context
        paths += [
            (f"distill.context.{key}", p)
            for key, p in (("constitution", context.constitution), ("system_file", context.system_file))
            if p is not None
        ]
        if self.judge.constitution is not None:  # the default is the project's own file, not one a job names
            paths.append(("judge.constitution", self.judge.constitution))
        return paths

    @property
    def base_dirs(self) -> list[Path]:
        """Where a relative model folder is looked for: beside the config file, then the current folder."""
        return [self.file.parent.resolve(), Path.cwd()]


def _check_flash_attention(name: str, kind: str) -> None:
    """flash_attention_2 needs the flash-attn package and a CUDA GPU: refused before anything is loaded.
    It reads no attention mask, and every trainer but SFT computes a shared prompt once for several
    answers behind one (data.pack)."""
    import importlib.util

    import torch

    if kind != "sft":
        raise InputError(
            name,
            "attn_implementation",
            f"flash_attention_2 takes no attention mask, and `cai train {kind}` shares each prompt between "
            "its answers through one: use sdpa",
        )
    if importlib.util.find_spec("flash_attn") is None:
        raise InputError(name, "attn_implementation", "flash_attention_2 needs the flash-attn package: use sdpa")
    if not torch.cuda.is_available():
        raise InputError(name, "attn_implementation", "flash_attention_2 runs on a CUDA GPU only: use sdpa")


# trainers that run under FSDP: every process runs the same forward passes in every step (sampling
# included, through generate's synced_gpus), and one optimizer covers one model
FSDP_KINDS = ("sft", "dpo", "rm", "grpo", "rloo")

# trainers that pack (`packing: true`), with the sequences an example holds at most (a pair: two answers)
PACKING_KINDS = {"sft": 1, "dpo": 2, "rm": 2}


def packed_row(config: "TrainConfig") -> tuple[int, int]:
    """(a packed row's capacity: the longest example, rows a batch holds): max_tokens_per_batch / the
    capacity rows, or batch_size rows, as many tokens as a full padded batch."""
    capacity = config.max_length * PACKING_KINDS[config.kind]
    return capacity, (config.max_tokens_per_batch // capacity if config.max_tokens_per_batch else config.batch_size)


# trainers with a frozen reference (distill: its teacher) to keep beside the trained model
REFERENCE_KINDS = ("dpo", "ppo", "grpo", "rloo", "nash-md", "online-dpo", "distill")


def _check_reference_offload(doc: dict[str, Any], kind: str, name: str) -> None:
    if "reference_offload" not in doc:
        return
    if kind not in REFERENCE_KINDS:
        raise InputError(name, "reference_offload", f"`cai train {kind}` loads no frozen reference to offload")
    if "lora" in doc and kind != "distill" and not doc.get("dpo", {}).get("reference"):
        raise InputError(
            name, "reference_offload", "under lora the reference is the policy without its adapter: no copy to offload"
        )


def _check_packing(doc: dict[str, Any], kind: str, name: str) -> None:
    if doc.get("packing") and kind not in PACKING_KINDS:
        raise InputError(
            name, "packing", f"`cai train {kind}` cannot pack batches: packing is for {', '.join(PACKING_KINDS)}"
        )
    if doc.get("packing") and doc.get("dpo", {}).get("loss_type") == "kto":
        raise InputError(name, "packing", "dpo.loss_type kto pairs each answer with a neighbour's prompt: no packing")
    if "max_tokens_per_batch" in doc:
        if not doc.get("packing"):
            raise InputError(name, "max_tokens_per_batch", "an option of packing: true")
        longest = doc.get("max_length", 1024) * PACKING_KINDS[kind]
        if doc["max_tokens_per_batch"] < longest:
            holds = "max_length" if PACKING_KINDS[kind] == 1 else f"{PACKING_KINDS[kind]} x max_length"
            raise InputError(
                name, "max_tokens_per_batch", f"must hold the longest example: at least {holds} ({longest})"
            )


def judge_backend(name: str, doc: dict[str, Any], file: Path, field: str):
    """A training's judge backend, written as a pipeline's; a Batch API is refused: it answers within
    hours, and a training step waits for its labels."""
    if doc.get("type") == "openai_batch":
        raise InputError(
            str(file),
            f"{field}.type",
            "a Batch API answers within hours: a training step's judge must be vllm or openai",
        )
    return backend_spec(name, doc, file, field)


def load(kind: str, path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    file = Path(path)
    name = str(file)
    doc = load_yaml(file)
    if not isinstance(doc, dict):
        validate(doc, "train", name)  # reports the wrong top-level type
    doc = _exponent_floats(apply_overrides(doc, list(overrides), name))
    validate(doc, "train", name)
    for other in KINDS:
        if other != kind and other in doc:
            raise InputError(name, other, f"options for `cai train {other}`, but this is `cai train {kind}`")

    model = doc["model"]
    check_model_folder(model, file, name, "model")
    dpo = DPOOptions(**doc.get("dpo", {}))
    _check_dpo(dpo, doc, name)
    if dpo.reference is not None:
        check_model_folder(dpo.reference, file, name, "dpo.reference")

    data = doc["data"]
    train_files = _train_files(kind, data["train"], file, name)
    eval_data = existing_path(data["eval"], file, name, "data.eval", folder_ok=True) if "eval" in data else None
    if "eval_skip" in data and eval_data is None:
        raise InputError(name, "data.eval_skip", "skips records of data.eval: give data.eval")

    rm_doc = dict(doc.get("rm", {}))
    if "pretrain" in rm_doc:
        pretrain = dict(rm_doc["pretrain"])
        pretrain["data"] = existing_path(pretrain["data"], file, name, "rm.pretrain.data", folder_ok=True)
        rm_doc["pretrain"] = PretrainOptions(**pretrain)
    rm = RewardOptions(**rm_doc)
    if rm.use_margin and rm.use_soft_labels:
        raise InputError(
            name, "rm.use_soft_labels", "use_margin and use_soft_labels both encode the judge's confidence: enable one"
        )
    if rm.heads == 1 and "orthogonal_coef" in rm_doc:
        raise InputError(
            name, "rm.orthogonal_coef", "an option of rm.heads 2: one head has nothing to be orthogonal to"
        )
    if rm.heads == 2 and rm.length_window:
        raise InputError(
            name, "rm.length_window", "an option of rm.heads 1 (ODIN's length loss is over each batch): set it to 0"
        )
    for section in ("rm", "judge"):
        options = doc.get(section, {})
        if options.get("length_window") and not options.get("length_coef"):
            raise InputError(
                name, f"{section}.length_window", f"an option of {section}.length_coef, which is 0: set it to 0 too"
            )
        pairs = doc.get("batch_size", 8) + options.get("length_window", 0)
        if options.get("length_coef", 0) > 0 and pairs < MIN_CORRELATION_BATCH:
            raise InputError(
                name,
                f"{section}.length_coef",
                f"a correlation over each batch: batch_size plus {section}.length_window must be at least {MIN_CORRELATION_BATCH} (is {pairs})",
            )

    scalars = {
        k: doc[k]
        for k in (
            "seed",
            "max_steps",
            "epochs",
            "batch_size",
            "grad_accum",
            "lr",
            "weight_decay",
            "warmup_steps",
            "scheduler",
            "max_grad_norm",
            "max_length",
            "precision",
            "save_every",
            "keep_checkpoints",
            "eval_every",
            "eval_batch_size",
            "tensorboard",
            "gradient_checkpointing",
            "attn_implementation",
            "reference_offload",
            "packing",
            "max_tokens_per_batch",
        )
        if k in doc
    }
    if doc.get("attn_implementation") == "flash_attention_2":
        _check_flash_attention(name, kind)
    _check_packing(doc, kind, name)
    _check_reference_offload(doc, kind, name)
    return TrainConfig(
        kind=kind,
        file=file,
        raw=doc,
        model=model,
        train_data=train_files[0].path,
        train_files=train_files,
        output_dir=Path(doc["output_dir"]).expanduser(),  # relative to where cai runs, as a pipeline's output.dir
        eval_data=eval_data,
        eval_fraction=data.get("eval_fraction", 0.0 if eval_data else 0.1),
        limit=data.get("limit"),
        eval_skip=data.get("eval_skip", 0),
        **{"lr": DEFAULT_LR[kind], **scalars},
        lora=LoraOptions(**doc["lora"]) if "lora" in doc else None,
        sft=SFTOptions(**doc.get("sft", {})),
        rm=rm,
        dpo=dpo,
        ppo=_ppo_options(doc, file, name) if kind == "ppo" else PPOOptions(),
        rejection=_rejection_options(doc, file, name) if kind == "rejection" else RejectionOptions(),
        rest=_rest_options(doc, file, name) if kind == "rest" else RestOptions(),
        grpo=_group_options(doc, "grpo", file, name) if kind == "grpo" else GroupOptions(),
        rloo=_group_options(doc, "rloo", file, name) if kind == "rloo" else GroupOptions(),
        nash_md=_nash_md_options(doc, file, name) if kind == "nash-md" else NashMDOptions(),
        online_dpo=_online_dpo_options(doc, file, name) if kind == "online-dpo" else OnlineDPOOptions(),
        hir=_hir_options(doc, file, name) if kind == "hir" else HIROptions(),
        distill=_distill_options(doc, file, name) if kind == "distill" else DistillOptions(),
        judge=_judge_train_options(doc, file, name) if kind == "judge" else JudgeTrainOptions(),
    )


# The loss_type each loss-specific `dpo:` option belongs to, and the losses that use no reference model.
DPO_LOSS_OPTIONS = {
    "cpl_lambda": "cpl",
    "simpo_gamma": "simpo",
    "orpo_lambda": "orpo",
    "kto_desirable_weight": "kto",
    "kto_undesirable_weight": "kto",
}
REFERENCE_FREE_LOSSES = ("cpl", "simpo", "orpo")


def _check_dpo(dpo: DPOOptions, doc: dict[str, Any], name: str) -> None:
    given, loss = doc.get("dpo", {}), dpo.loss_type
    for key, owner in DPO_LOSS_OPTIONS.items():
        if key in given and owner != loss:
            raise InputError(name, f"dpo.{key}", f"an option of loss_type {owner}, not {loss}")
    if loss in REFERENCE_FREE_LOSSES:
        for key, value in (("reference", dpo.reference), ("precompute_ref", dpo.precompute_ref)):
            if value:
                raise InputError(name, f"dpo.{key}", f"{loss} is reference-free: it uses no reference model")
    if loss == "orpo" and "beta" in given:
        raise InputError(name, "dpo.beta", "orpo has no beta: the odds-ratio term's weight is orpo_lambda")
    if loss == "kto":
        if dpo.precompute_ref:
            raise InputError(
                name,
                "dpo.precompute_ref",
                "kto pairs each prompt with another answer of its batch for its KL estimate: "
                "the reference runs every step",
            )
        if dpo.use_soft_labels:
            raise InputError(
                name, "dpo.use_soft_labels", "kto trains on answers labelled desirable or not, not on pairs"
            )
        if doc.get("batch_size", TrainConfig.batch_size) < 2:
            raise InputError(
                name, "batch_size", "kto estimates its KL reference point from the batch's other answers: at least 2"
            )


def _rewards(
    doc: dict[str, Any], section: str, file: Path, name: str
) -> tuple[dict[str, Any], tuple[RewardSource, ...], tuple[str, float] | None]:
    """A trainer section's other options, its reward sources and its gate, checked."""
    if section not in doc:
        raise InputError(name, section, f"`cai train {section}` needs a {section} section with its rewards")
    options = dict(doc[section])
    sources: list[RewardSource] = []
    for index, spec in enumerate(options.pop("rewards")):
        if any(s.name == spec["name"] for s in sources):
            raise InputError(name, f"{section}.rewards[{index}].name", f"a second reward named {spec['name']!r}")
        model = (
            existing_path(spec["model"], file, name, f"{section}.rewards[{index}].model", folder_ok=True)
            if "model" in spec
            else None
        )
        judge = (
            _judge(spec["judge"], file, name, f"{section}.rewards[{index}].judge", spec["name"])
            if "judge" in spec
            else None
        )
        sources.append(RewardSource(spec["name"], spec.get("weight", 1.0), model, tuple(spec.get("tokens", ())), judge))
    gate = options.pop("gate", None)
    if gate is not None and gate["reward"] not in [s.name for s in sources]:
        raise InputError(
            name, f"{section}.gate.reward", f"names no reward (rewards: {', '.join(s.name for s in sources)})"
        )
    return options, tuple(sources), (gate["reward"], gate["threshold"]) if gate else None


def _judge(doc: dict[str, Any], file: Path, name: str, where: str, source: str) -> JudgeSource:
    mode = doc.get("mode", "score")
    if (mode == "pairwise") != ("references" in doc):
        raise InputError(
            name,
            f"{where}.references",
            "pairwise mode needs references (each prompt's reference answer); score mode takes none",
        )
    return JudgeSource(
        backend=judge_backend(f"judge-{source}", doc["backend"], file, f"{where}.backend"),
        constitution=existing_path(doc["constitution"], file, name, f"{where}.constitution"),
        mode=mode,
        principles=doc.get("principles", 1),
        references=existing_path(doc["references"], file, name, f"{where}.references") if "references" in doc else None,
    )


def _offline_rewards(
    doc: dict[str, Any], section: str, file: Path, name: str
) -> tuple[dict[str, Any], tuple[RewardSource, ...], tuple[str, float] | None]:
    options, sources, gate = _rewards(doc, section, file, name)
    for index, source in enumerate(sources):
        if source.judge is not None:
            raise InputError(
                name,
                f"{section}.rewards[{index}].judge",
                "the judge is a reward of the online trainers (ppo, grpo, rloo)",
            )
    return options, sources, gate


def _rejection_options(doc: dict[str, Any], file: Path, name: str) -> RejectionOptions:
    options, sources, gate = _offline_rewards(doc, "rejection", file, name)
    return RejectionOptions(rewards=sources, gate=gate, **options)


def _rest_options(doc: dict[str, Any], file: Path, name: str) -> RestOptions:
    options, sources, gate = _offline_rewards(doc, "rest", file, name)
    thresholds = tuple(options.pop("thresholds", RestOptions.thresholds))
    if any(b <= a for a, b in zip(thresholds, thresholds[1:])):
        raise InputError(name, "rest.thresholds", f"must rise strictly, one Improve step each: {list(thresholds)}")
    if options.get("threshold_type") == "quantile" and not all(0 <= q < 1 for q in thresholds):
        raise InputError(name, "rest.thresholds", f"quantile thresholds lie in [0, 1): {list(thresholds)}")
    return RestOptions(rewards=sources, gate=gate, thresholds=thresholds, **options)


def _hir_options(doc: dict[str, Any], file: Path, name: str) -> HIROptions:
    # The judge is accepted here (unlike rejection and ReST): the issue asks for it, and sample_scored
    # scores through Rewards, which serves it.
    options, sources, gate = _rewards(doc, "hir", file, name)
    try:
        fields = {
            f for _, f, _, _ in string.Formatter().parse(options.get("template", HIROptions.template)) if f is not None
        }
    except ValueError as exc:
        raise InputError(name, "hir.template", f"{exc} (a literal brace is written twice: {{{{ or }}}})") from None
    if fields != {"prompt", "band"}:
        raise InputError(
            name,
            "hir.template",
            f"needs the fields {{prompt}} and {{band}} and no other (has: {', '.join(sorted(fields)) or 'none'})",
        )
    bands = []
    for index, band in enumerate(options.pop("bands")):
        if index == 0 and "at_least" in band:
            raise InputError(
                name,
                "hir.bands[0].at_least",
                "the first band is the lowest: it takes every reward below the next band's at_least",
            )
        if index > 0 and "at_least" not in band:
            raise InputError(name, f"hir.bands[{index}].at_least", "every band but the first needs its lower bound")
        if index > 1 and band["at_least"] <= bands[-1].at_least:
            raise InputError(
                name,
                f"hir.bands[{index}].at_least",
                f"must rise: {band['at_least']} is not above the band before's {bands[-1].at_least}",
            )
        if any(b.label == band["label"] for b in bands):
            raise InputError(name, f"hir.bands[{index}].label", f"a second band labelled {band['label']!r}")
        bands.append(Band(band["label"], band.get("at_least")))
    return HIROptions(rewards=sources, gate=gate, bands=tuple(bands), **options)


def _check_rollout(doc: dict[str, Any], options: dict[str, Any], section: str, name: str) -> None:
    if options.get("rollout") == "vllm" and "lora" in doc:
        # The engine takes whole weights: a LoRA policy would need its adapter merged at every sync.
        raise InputError(
            name, f"{section}.rollout", "vllm rollouts need a full policy, not lora: drop lora or use rollout: hf"
        )


def _group_options(doc: dict[str, Any], section: str, file: Path, name: str) -> GroupOptions:
    options, sources, gate = _rewards(doc, section, file, name)
    _check_rollout(doc, options, section, name)
    group = GroupOptions(rewards=sources, gate=gate, **options)
    if group.minibatch_size is not None and group.minibatch_size % group.samples:
        raise InputError(
            name,
            f"{section}.minibatch_size",
            f"a multiple of samples ({group.samples}): a prompt's answers are packed into one row",
        )
    return group


def _nash_md_options(doc: dict[str, Any], file: Path, name: str) -> NashMDOptions:
    if "nash-md" not in doc:
        raise InputError(name, "nash-md", "`cai train nash-md` needs a nash-md section with its preference")
    options = dict(doc["nash-md"])
    if options.get("rollout") == "vllm":
        # the mixture's every token needs the policy's and the reference's logits together: a loop over
        # both models, not one engine's sampling
        raise InputError(
            name,
            "nash-md.rollout",
            "Nash-MD samples from the policy-reference mixture with both models' logits: use rollout: hf",
        )
    spec = options.pop("preference")
    if len(spec) != 1:
        raise InputError(
            name,
            "nash-md.preference",
            "needs exactly one of model (a `cai train rm` output) or judge (the constitution's pairwise judge)",
        )
    if "model" in spec:
        preference = PreferenceSource(
            model=existing_path(spec["model"], file, name, "nash-md.preference.model", folder_ok=True)
        )
    else:
        judge, where = spec["judge"], "nash-md.preference.judge"
        preference = PreferenceSource(
            judge=JudgeSource(
                backend=judge_backend("judge-preference", judge["backend"], file, f"{where}.backend"),
                constitution=existing_path(judge["constitution"], file, name, f"{where}.constitution"),
                mode="pairwise",
                principles=judge.get("principles", 1),
            )
        )
    return NashMDOptions(preference=preference, **options)


def _online_dpo_options(doc: dict[str, Any], file: Path, name: str) -> OnlineDPOOptions:
    if "online-dpo" not in doc:
        raise InputError(name, "online-dpo", "`cai train online-dpo` needs an online-dpo section with its preference")
    options = dict(doc["online-dpo"])
    _check_rollout(doc, options, "online-dpo", name)
    spec = options.pop("preference")
    if len(spec) != 1:
        raise InputError(
            name,
            "online-dpo.preference",
            "needs exactly one of model (a `cai train rm` output) or judge (the constitution's pairwise judge)",
        )
    if "model" in spec:
        model = existing_path(spec["model"], file, name, "online-dpo.preference.model", folder_ok=True)
        return OnlineDPOOptions(preference=PairPreferenceSource(model=model), **options)
    judge, where = dict(spec["judge"]), "online-dpo.preference.judge"
    if ("backend" in judge) == ("jury" in judge):
        raise InputError(name, where, "needs exactly one of backend (one judge) or jury (several, by weight)")
    if "jury" in judge and "calibration" in judge:
        raise InputError(
            name, f"{where}.calibration", "a calibration is fitted to one judge: a jury's jurors would share it"
        )
    if "backend" in judge:
        backends = {"judge": judge_backend("judge", judge["backend"], file, f"{where}.backend")}
        jury = None
    else:
        backends = {
            role: backend_spec(role, juror["backend"], file, f"{where}.jury.{role}.backend")
            for role, juror in judge["jury"].items()
        }
        jury = {role: juror.get("weight", 1.0) for role, juror in judge["jury"].items()}
    source = PairJudgeSource(
        backends=backends,
        constitution=existing_path(judge["constitution"], file, name, f"{where}.constitution"),
        jury=jury,
        principles=judge.get("principles", 1),
        calibration=existing_path(judge["calibration"], file, name, f"{where}.calibration")
        if "calibration" in judge
        else None,
        few_shot=judge.get("few_shot", 0),
        method=judge.get("method", "auto"),
    )
    return OnlineDPOOptions(preference=PairPreferenceSource(judge=source), **options)


def _ppo_options(doc: dict[str, Any], file: Path, name: str) -> PPOOptions:
    options, sources, gate = _rewards(doc, "ppo", file, name)
    _check_rollout(doc, options, "ppo", name)
    if options.get("algorithm") == "a2c":
        for key in ("ppo_epochs", "minibatch_size", "clip_range", "value_clip_range"):
            if key in options:
                raise InputError(
                    name, f"ppo.{key}", "an option of algorithm ppo: a2c takes one unclipped update per batch"
                )
    if options.get("value_from") == "reward" and not any(s.model for s in sources):
        raise InputError(name, "ppo.value_from", "no reward model to start the value model from")
    return PPOOptions(rewards=sources, gate=gate, **options)


def _distill_options(doc: dict[str, Any], file: Path, name: str) -> DistillOptions:
    if "distill" not in doc:
        raise InputError(name, "distill", "`cai train distill` needs a distill section with the teacher's context")
    options = dict(doc["distill"])
    context = options.pop("context")
    if len(context) != 1:
        raise InputError(
            name,
            "distill.context",
            f"give exactly one of constitution, system, system_file (given: {', '.join(context) or 'none'})",
        )
    paths = {
        key: existing_path(context[key], file, name, f"distill.context.{key}")
        for key in ("constitution", "system_file")
        if key in context
    }
    if options.get("target", DistillOptions.target) == "text":
        for key in ("kl", "kl_temperature"):
            if key in options:
                raise InputError(
                    name,
                    f"distill.{key}",
                    "an option of target logits: target text fine-tunes on the teacher's answers",
                )
    if "teacher" in options:
        check_model_folder(options["teacher"], file, name, "distill.teacher")
    return DistillOptions(context=DistillContext(system=context.get("system"), **paths), **options)


def _train_files(kind: str, spec: str | list[dict[str, Any]], file: Path, name: str) -> tuple[DataFile, ...]:
    """`data.train`: one file or folder, or (judge, rm) a list of them with weights."""
    if isinstance(spec, str):
        return (DataFile(existing_path(spec, file, name, "data.train", folder_ok=True)),)
    if kind not in WEIGHTED_DATA_KINDS:
        raise InputError(
            name,
            "data.train",
            f"a list of files is read by `cai train {' and '.join(WEIGHTED_DATA_KINDS)}` only: give `cai train {kind}` one file",
        )
    return tuple(
        DataFile(
            existing_path(entry["path"], file, name, f"data.train[{i}].path", folder_ok=True), entry.get("weight", 1.0)
        )
        for i, entry in enumerate(spec)
    )


def _judge_train_options(doc: dict[str, Any], file: Path, name: str) -> JudgeTrainOptions:
    options = dict(doc.get("judge", {}))
    if "constitution" in options:
        options["constitution"] = existing_path(options["constitution"], file, name, "judge.constitution")
    return JudgeTrainOptions(**options)


_EXPONENT_FLOAT = re.compile(r"^[-+]?[0-9]+(\.[0-9]*)?[eE][-+]?[0-9]+$")


def _exponent_floats(doc: Any) -> Any:
    """YAML 1.1 (PyYAML) reads `lr: 1e-5` as the string "1e-5" (it wants `1.0e-5`); a learning rate
    is where everyone writes that form, so such strings are numbers here."""
    if isinstance(doc, dict):
        return {k: _exponent_floats(v) for k, v in doc.items()}
    if isinstance(doc, str) and _EXPONENT_FLOAT.match(doc):
        return float(doc)
    return doc


def changed_keys(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Top-level keys whose values differ between two config documents, except those a resume may change."""
    keys = (set(recorded) | set(current)) - RESUMABLE_CHANGES
    return sorted(k for k in keys if recorded.get(k) != current.get(k))
