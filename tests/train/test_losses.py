"""Each loss against values worked out by hand (with math, not torch), gradients at extreme inputs, and
our dpo_loss, simpo_loss, orpo_loss and kto_loss against TRL 1.16's own code on the same log-prob tensors."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from cai.train.losses import (
    AdaptiveKLController,
    FixedKLController,
    a2c_loss,
    bradley_terry_loss,
    cpl_loss,
    distill_kl,
    dpo_loss,
    gae,
    geometric_mixture_logprobs,
    group_advantages,
    grpo_loss,
    hir_contrastive_loss,
    hir_loss,
    k3_kl,
    kl_penalty,
    kto_loss,
    log_odds,
    nash_md_loss,
    orpo_loss,
    pairwise_credit,
    ppo_policy_loss,
    ppo_value_loss,
    reward_centering_loss,
    rloo_advantages,
    rloo_loss,
    simpo_loss,
    token_entropy,
)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


# ----------------------------------------------------------------------------- Bradley-Terry


def test_bradley_terry_hard() -> None:
    losses = bradley_terry_loss(t(2.0, 0.0, -1.0), t(1.0, 0.0, 1.0))
    assert losses.tolist() == pytest.approx([-log_sigmoid(1.0), math.log(2), -log_sigmoid(-2.0)], abs=1e-12)
    assert losses[0].item() == pytest.approx(0.31326168751822286, abs=1e-12)


def test_bradley_terry_margin_moves_the_target() -> None:
    # Llama 2: d = 1, m = 3 -> -log sigmoid(-2) = log(1 + e^2)
    loss = bradley_terry_loss(t(2.0), t(1.0), margin=t(3.0))
    assert loss.item() == pytest.approx(math.log(1 + math.e**2), abs=1e-12)


def test_bradley_terry_soft_labels() -> None:
    # p = 0.8, d = 1: -(0.8 log s(1) + 0.2 log s(-1)) = 0.8 * 0.313262 + 0.2 * 1.313262 = 0.513262
    loss = bradley_terry_loss(t(1.5), t(0.5), label_prob=t(0.8))
    assert loss.item() == pytest.approx(0.5132616875182229, abs=1e-12)
    # p = 1 is the hard loss; p = 0.5 is minimised at d = 0, where it is log 2
    assert bradley_terry_loss(t(1.0), t(0.0), label_prob=t(1.0)).item() == pytest.approx(-log_sigmoid(1.0))
    d = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    loss = bradley_terry_loss(d, t(0.0), label_prob=t(0.5))
    loss.backward()
    assert loss.item() == pytest.approx(math.log(2)) and d.grad.item() == pytest.approx(0.0, abs=1e-12)


def test_bradley_terry_margin_and_soft_label_are_exclusive() -> None:
    with pytest.raises(ValueError, match="not both"):
        bradley_terry_loss(t(1.0), t(0.0), margin=t(1.0), label_prob=t(0.9))


@pytest.mark.parametrize("d", [1e4, -1e4])
@pytest.mark.parametrize("kwargs", [{}, {"margin": t(2.0)}, {"label_prob": t(0.7)}])
def test_bradley_terry_stable_at_extreme_differences(d: float, kwargs: dict) -> None:
    chosen = torch.tensor([d], dtype=torch.float32, requires_grad=True)
    loss = bradley_terry_loss(chosen, torch.zeros(1), **{k: v.float() for k, v in kwargs.items()})
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(chosen.grad).all()
    if d < 0 and not kwargs:
        assert loss.item() == pytest.approx(1e4, rel=1e-6)  # -log sigmoid(-1e4) = 1e4, not inf


# ----------------------------------------------------------------------------- DPO

# policy chosen/rejected, reference chosen/rejected: h = (-10 - -12) - (-15 - -14) = 2 - (-1) = 3
LOGPS = (t(-10.0), t(-15.0), t(-12.0), t(-14.0))


def test_dpo_sigmoid_and_rewards() -> None:
    losses, chosen, rejected = dpo_loss(*LOGPS, beta=0.1)
    assert losses.item() == pytest.approx(-log_sigmoid(0.3), abs=1e-12)  # 0.554355
    assert losses.item() == pytest.approx(0.5543552444685271, abs=1e-12)
    assert chosen.item() == pytest.approx(0.2) and rejected.item() == pytest.approx(-0.1)


def test_dpo_ipo() -> None:
    losses, _, _ = dpo_loss(*LOGPS, beta=0.1, loss_type="ipo")
    assert losses.item() == pytest.approx((3 - 5) ** 2, abs=1e-12)  # (h - 1/(2 beta))^2 = (3 - 5)^2


def test_dpo_hinge() -> None:
    losses, _, _ = dpo_loss(*LOGPS, beta=0.1, loss_type="hinge")
    assert losses.item() == pytest.approx(0.7, abs=1e-12)  # relu(1 - 0.3)
    losses, _, _ = dpo_loss(*LOGPS, beta=0.5, loss_type="hinge")
    assert losses.item() == 0.0  # beta h = 1.5 is past the hinge


def test_dpo_conservative_soft_labels_per_example() -> None:
    pc, pr, rc, rr = (torch.cat([x, x]) for x in LOGPS)
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, label_prob=t(0.9, 0.6))
    # -(p log s(0.3) + (1-p) log s(-0.3)) with log s(0.3) = -0.554355, log s(-0.3) = -0.854355
    assert losses.tolist() == pytest.approx(
        [0.9 * 0.5543552444685271 + 0.1 * 0.8543552444685271, 0.6 * 0.5543552444685271 + 0.4 * 0.8543552444685271],
        abs=1e-12,
    )


def test_dpo_soft_ipo_targets_two_p_minus_one() -> None:
    losses, _, _ = dpo_loss(*LOGPS, beta=0.1, loss_type="ipo", label_prob=t(0.75))
    # 0.75 (3 - 5)^2 + 0.25 (3 + 5)^2 = 3 + 16 = 19, and it is (h - (2p - 1)/(2 beta))^2 + const
    assert losses.item() == pytest.approx(19.0, abs=1e-12)
    h = torch.linspace(-10, 10, 2001, dtype=torch.float64)
    zeros = torch.zeros_like(h)
    curve, _, _ = dpo_loss(h, zeros, zeros, zeros, beta=0.1, loss_type="ipo", label_prob=torch.full_like(h, 0.75))
    assert h[curve.argmin()].item() == pytest.approx((2 * 0.75 - 1) / (2 * 0.1), abs=1e-9)


def test_dpo_rejects_unknown_loss_type() -> None:
    with pytest.raises(ValueError, match="robust"):
        dpo_loss(*LOGPS, beta=0.1, loss_type="robust")


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("soft", [False, True])
def test_dpo_gradients_finite_at_extreme_logps(loss_type: str, sign: float, soft: bool) -> None:
    policy_chosen = torch.tensor([sign * 1e4], requires_grad=True)
    zeros = torch.zeros(1)
    losses, _, _ = dpo_loss(
        policy_chosen,
        zeros,
        zeros,
        zeros,
        beta=1.0,
        loss_type=loss_type,
        label_prob=torch.tensor([0.8]) if soft else None,
    )
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(policy_chosen.grad).all()


# ----------------------------------------------------------------------------- CPL


def test_cpl_by_hand() -> None:
    # alpha 0.1: S_c = 0.1 * -10 = -1, S_r = 0.1 * -15 = -1.5
    losses, chosen, rejected = cpl_loss(t(-10.0), t(-15.0), alpha=0.1, lam=1.0)
    assert losses.item() == pytest.approx(math.log(1 + math.exp(-0.5)), abs=1e-12)  # -log sigmoid(-1 + 1.5)
    assert losses.item() == pytest.approx(0.4740769841801067, abs=1e-12)
    assert (chosen.item(), rejected.item()) == pytest.approx((-1.0, -1.5))
    # conservative lambda 0.5: -log sigmoid(-1 - 0.5 * -1.5) = -log sigmoid(-0.25) = log(1 + e^0.25)
    losses, _, _ = cpl_loss(t(-10.0), t(-15.0), alpha=0.1, lam=0.5)
    assert losses.item() == pytest.approx(0.8259394198788436, abs=1e-12)


def test_cpl_soft_label_and_conservative_gradient() -> None:
    # p = 0.8, lambda 0.5: 0.8 * log(1 + e^0.25) + 0.2 * -log sigmoid(-1.5 - 0.5 * -1) = 0.2 * log(1 + e)
    losses, _, _ = cpl_loss(t(-10.0), t(-15.0), alpha=0.1, lam=0.5, label_prob=t(0.8))
    assert losses.item() == pytest.approx(0.8 * 0.8259394198788436 + 0.2 * 1.3132616875182228, abs=1e-12)
    # lambda scales the rejected answer's gradient against the chosen one's: d/dS_r = -lambda d/dS_c
    chosen, rejected = t(-10.0).requires_grad_(), t(-15.0).requires_grad_()
    cpl_loss(chosen, rejected, alpha=0.1, lam=0.5)[0].sum().backward()
    assert rejected.grad.item() == pytest.approx(-0.5 * chosen.grad.item(), abs=1e-12)
    assert chosen.grad.item() == pytest.approx(-0.1 * (1 - 1 / (1 + math.exp(0.25))), abs=1e-12)  # -alpha sigmoid(0.25)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_cpl_gradients_finite_at_extreme_logps(sign: float) -> None:
    chosen = torch.tensor([sign * 1e4], requires_grad=True)
    losses, _, _ = cpl_loss(chosen, torch.zeros(1), alpha=1.0, lam=0.5, label_prob=torch.tensor([0.8]))
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(chosen.grad).all()


def test_reward_centering() -> None:
    # 0.01 * mean((1 + 2)^2, (-1 + 0)^2) = 0.01 * 5
    assert reward_centering_loss(t(1.0, -1.0), t(2.0, 0.0), 0.01).item() == pytest.approx(0.05, abs=1e-12)


# ----------------------------------------------------------------------------- DPO against TRL 1.16


def trl_dpo_loss(
    policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, loss_type, label_smoothing=0.0
) -> torch.Tensor:
    """TRL 1.16 has no pure DPO loss function: the loss lives inside DPOTrainer._compute_loss. Call that
    method unbound, with a stand-in trainer (the attributes it reads) and a stand-in model whose
    per-token log-probs put each sequence's whole log-prob on its single completion token; the
    reference log-probs go in as precomputed. What runs is TRL's own code; it returns the batch mean."""
    from trl.trainer.dpo_trainer import DPOTrainer

    batch = policy_chosen.shape[0]
    log_probs = torch.cat([policy_chosen, policy_rejected]).unsqueeze(1)
    fake_model = lambda **_: SimpleNamespace(
        log_probs=log_probs,
        entropy=torch.zeros_like(log_probs),
        mean_logits=torch.zeros_like(log_probs),
        is_top1=torch.zeros_like(log_probs, dtype=torch.bool),
    )
    gather = lambda x: x
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather=gather, gather_for_metrics=gather),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.ones(2 * batch, 2, dtype=torch.long),
        "attention_mask": torch.ones(2 * batch, 2, dtype=torch.long),
        "completion_mask": torch.tensor(
            [[0, 1]] * (2 * batch)
        ),  # one completion token: IPO's length normalisation divides by 1
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    return DPOTrainer._compute_loss(trainer, fake_model, inputs, return_outputs=False)


def random_logps(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [-(torch.rand(n, generator=g, dtype=torch.float64) * 200) for _ in range(4)]


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
@pytest.mark.parametrize("beta", [0.05, 0.5])
def test_dpo_loss_equals_trl(loss_type: str, beta: float) -> None:
    logps = random_logps(32, seed=3)
    ours, _, _ = dpo_loss(*logps, beta=beta, loss_type=loss_type)
    theirs = trl_dpo_loss(*logps, beta=beta, loss_type=loss_type)
    assert abs(ours.mean().item() - theirs.item()) < 1e-6


def test_conservative_dpo_equals_trl_per_example() -> None:
    """TRL 1.16's `sigmoid` has no label smoothing any more; its `aot` loss is the cDPO formula applied
    after sorting the batch's log-ratios, and a batch of one is already sorted: one example at a time,
    it is cDPO with label_smoothing = 1 - p."""
    logps = random_logps(8, seed=5)
    probs = torch.linspace(0.55, 1.0, 8, dtype=torch.float64)
    ours, _, _ = dpo_loss(*logps, beta=0.1, label_prob=probs)
    for i in range(8):
        theirs = trl_dpo_loss(
            *(x[i : i + 1] for x in logps), beta=0.1, loss_type="aot", label_smoothing=1 - probs[i].item()
        )
        assert abs(ours[i].item() - theirs.item()) < 1e-6


# ----------------------------------------------------------------------------- SimPO, ORPO, KTO by hand


def test_simpo_by_hand() -> None:
    # mean token log-probs -1 and -2, beta 2, gamma 0.5: -log sigmoid(2 * -1 - 2 * -2 - 0.5) = log(1 + e^-1.5)
    losses, chosen, rejected = simpo_loss(t(-1.0), t(-2.0), beta=2.0, gamma=0.5)
    assert losses.item() == pytest.approx(math.log(1 + math.exp(-1.5)), abs=1e-12)
    assert losses.item() == pytest.approx(0.20141327798275246, abs=1e-12)
    assert (chosen.item(), rejected.item()) == pytest.approx((-2.0, -4.0))
    # gamma 0 and beta 1 is the plain Bradley-Terry loss on mean log-probs: log(1 + e^-1)
    assert simpo_loss(t(-1.0), t(-2.0), beta=1.0, gamma=0.0)[0].item() == pytest.approx(0.31326168751822286)


def test_simpo_soft_label_asks_the_margin_of_the_winner() -> None:
    # p = 0.8: 0.8 * log(1 + e^-1.5) + 0.2 * -log sigmoid(-4 - -2 - 0.5) = ... + 0.2 * log(1 + e^2.5)
    losses, _, _ = simpo_loss(t(-1.0), t(-2.0), beta=2.0, gamma=0.5, label_prob=t(0.8))
    assert losses.item() == pytest.approx(0.8 * math.log(1 + math.exp(-1.5)) + 0.2 * math.log(1 + math.exp(2.5)))


def test_orpo_by_hand() -> None:
    # P_c = 0.5 (odds 1, log-odds 0), P_r = 0.2 (odds 1/4): L_OR = -log sigmoid(log 4) = -log(4/5) = log 1.25,
    # L_SFT = -log 0.5 = log 2
    chosen, rejected = t(math.log(0.5)), t(math.log(0.2))
    losses, chosen_odds, rejected_odds = orpo_loss(chosen, rejected, lam=0.1)
    assert losses.item() == pytest.approx(math.log(2) + 0.1 * math.log(1.25), abs=1e-12)
    assert losses.item() == pytest.approx(0.7154615356913663, abs=1e-12)
    assert chosen_odds.item() == pytest.approx(0.0, abs=1e-12)
    assert rejected_odds.item() == pytest.approx(math.log(0.25), abs=1e-12)
    # label_prob 0.75: the rejected answer wins a quarter of the time, its own NLL -log 0.2 = log 5 and
    # L_OR = -log sigmoid(log 1/4) = -log(1/5) = log 5
    losses, _, _ = orpo_loss(chosen, rejected, lam=0.1, label_prob=t(0.75))
    expected = 0.75 * (math.log(2) + 0.1 * math.log(1.25)) + 0.25 * (math.log(5) + 0.1 * math.log(5))
    assert losses.item() == pytest.approx(expected, abs=1e-12)


def test_orpo_gradient_of_the_sft_term_alone() -> None:
    # lambda 0: the loss is -mean log-prob, whose gradient is -1
    chosen, rejected = t(-1.5).requires_grad_(), t(-0.5).requires_grad_()
    orpo_loss(chosen, rejected, lam=0.0)[0].sum().backward()
    assert chosen.grad.item() == pytest.approx(-1.0) and rejected.grad.item() == 0.0


@pytest.mark.parametrize("avg", [-1e4, -30.0, -0.7, -0.69, -1e-9, 0.0, 1e-7])
def test_log_odds_finite_with_finite_gradients(avg: float) -> None:
    """Both branches of log(1 - P), a near-certain answer, and rounding to log P >= 0 (capped below 0)."""
    x = torch.tensor([avg], dtype=torch.float32, requires_grad=True)
    value = log_odds(x)
    value.sum().backward()
    assert torch.isfinite(value).all() and torch.isfinite(x.grad).all()
    if -30 <= avg < -1e-6:
        assert value.item() == pytest.approx(avg - math.log(1 - math.exp(avg)), rel=1e-5)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_simpo_and_orpo_gradients_finite_at_extreme_logps(sign: float) -> None:
    for loss in (
        lambda c, r: simpo_loss(c, r, beta=2.0, gamma=0.5, label_prob=torch.tensor([0.8]))[0],
        lambda c, r: orpo_loss(c, r, lam=0.5, label_prob=torch.tensor([0.8]))[0],
    ):
        chosen = torch.tensor([-1e4 if sign > 0 else -1e-8], requires_grad=True)
        losses = loss(chosen, torch.tensor([-1.0]))
        losses.sum().backward()
        assert torch.isfinite(losses).all() and torch.isfinite(chosen.grad).all()


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_kto_by_hand() -> None:
    # r = log pi - log pi_ref = (1, -1, 0); mismatched pairs' log-ratios (1, -0.4): z0 = 0.3; beta 0.5
    desirable = torch.tensor([True, False, True])
    losses, rewards, z0 = kto_loss(
        t(-10.0, -12.0, -11.0),
        t(-11.0, -11.0, -11.0),
        desirable,
        t(-20.0, -21.0),
        t(-21.0, -20.6),
        beta=0.5,
        desirable_weight=1.0,
        undesirable_weight=2.0,
    )
    assert z0.item() == pytest.approx(0.3, abs=1e-12)
    assert losses.tolist() == pytest.approx(
        [1 - sigmoid(0.5 * (1 - 0.3)), 2 * (1 - sigmoid(0.5 * (0.3 + 1))), 1 - sigmoid(0.5 * (0 - 0.3))], abs=1e-12
    )
    assert losses.tolist() == pytest.approx([0.41338242108266987, 0.6859790746530023, 0.5374298453437496], abs=1e-12)
    assert rewards.tolist() == pytest.approx([0.5, -0.5, 0.0])


def test_kto_reference_point_is_clamped_detached_and_zero_without_mismatched_pairs() -> None:
    policy = t(-10.0, -12.0).requires_grad_()
    kl_policy = t(-20.0, -21.0).requires_grad_()
    desirable = torch.tensor([True, False])
    # mean mismatched log-ratio -0.5 < 0: z0 = 0, so desirable 1 - sigmoid(0.5), undesirable 1 - sigmoid(1)
    losses, _, z0 = kto_loss(policy, t(-11.0, -10.0), desirable, kl_policy, t(-19.0, -21.0), beta=1.0)
    assert z0.item() == 0.0
    assert losses.tolist() == pytest.approx([1 - sigmoid(1.0), 1 - sigmoid(2.0)], abs=1e-12)
    losses.sum().backward()
    assert kl_policy.grad is None  # no gradient through the reference point
    # d/dr (1 - sigmoid(r)) = -sigmoid(r)(1 - sigmoid(r)); the undesirable one's is +sigmoid(-r)(1 - sigmoid(-r))
    assert policy.grad.tolist() == pytest.approx(
        [-sigmoid(1.0) * (1 - sigmoid(1.0)), sigmoid(2.0) * (1 - sigmoid(2.0))], abs=1e-12
    )
    losses, _, z0 = kto_loss(t(-10.0), t(-11.0), torch.tensor([True]), t(), t(), beta=1.0)
    assert z0.item() == 0.0 and losses.item() == pytest.approx(1 - sigmoid(1.0), abs=1e-12)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_kto_gradients_finite_at_extreme_logps(sign: float) -> None:
    policy = torch.tensor([sign * 1e4, sign * 1e4], requires_grad=True)
    zeros = torch.zeros(2)
    losses, _, _ = kto_loss(policy, zeros, torch.tensor([True, False]), zeros, zeros - sign * 1e4, beta=1.0)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(policy.grad).all()


# ----------------------------------------------------------------------------- SimPO, ORPO, KTO against TRL 1.16


@contextlib.contextmanager
def quiet_experimental():
    """TRL warns once, on import, that trl.experimental (where CPO and ORPO live) is unstable."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="You are importing from 'trl.experimental'")
        yield


def stand_in_accelerator() -> SimpleNamespace:
    gather = lambda x: x
    return SimpleNamespace(device=torch.device("cpu"), gather=gather, gather_for_metrics=gather)


def trl_cpo(beta: float, gamma: float, label_smoothing: float = 0.0) -> SimpleNamespace:
    """A stand-in CPOTrainer with the attributes its SimPO loss path reads (loss_type simpo, cpo_alpha 0:
    SimPO as TRL runs it); its methods are TRL's own, called unbound."""
    with quiet_experimental():
        from trl.experimental.cpo.cpo_trainer import CPOTrainer

    trainer = SimpleNamespace(
        accelerator=stand_in_accelerator(),
        alpha=0.0,  # AlphaPO's reward transform off
        loss_type="simpo",
        beta=beta,
        simpo_gamma=gamma,
        label_smoothing=label_smoothing,
        cpo_alpha=0.0,
        aux_loss_enabled=False,
    )
    trainer.cpo_loss = lambda c, r: CPOTrainer.cpo_loss(trainer, c, r)
    trainer.get_batch_loss_metrics = lambda forward: CPOTrainer.get_batch_loss_metrics(
        SimpleNamespace(**vars(trainer), concatenated_forward=lambda model, batch: forward), None, None
    )
    return trainer


def trl_orpo(lam: float) -> SimpleNamespace:
    """A stand-in ORPOTrainer: TRL's `beta` is ORPO's lambda."""
    with quiet_experimental():
        from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    trainer = SimpleNamespace(accelerator=stand_in_accelerator(), beta=lam, aux_loss_enabled=False)
    trainer.odds_ratio_loss = lambda c, r: ORPOTrainer.odds_ratio_loss(trainer, c, r)
    trainer.get_batch_loss_metrics = lambda forward: ORPOTrainer.get_batch_loss_metrics(
        SimpleNamespace(**vars(trainer), concatenated_forward=lambda model, batch: forward), None, None
    )
    return trainer


def random_avg_logps(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token mean log-probs in [-4, -0.01]: both branches of ORPO's log(1 - P)."""
    g = torch.Generator().manual_seed(seed)
    return tuple(-(torch.rand(n, generator=g, dtype=torch.float64) * 3.99 + 0.01) for _ in range(2))


@pytest.mark.parametrize("beta, gamma", [(2.0, 0.5), (0.1, 1.4), (2.5, 0.0)])
def test_simpo_loss_equals_trl_cpo_simpo(beta: float, gamma: float) -> None:
    chosen, rejected = random_avg_logps(32, seed=7)
    ours, our_chosen, our_rejected = simpo_loss(chosen, rejected, beta=beta, gamma=gamma)
    trl = trl_cpo(beta, gamma)
    theirs, their_chosen, their_rejected = trl.cpo_loss(chosen, rejected)
    assert (ours - theirs).abs().max().item() < 1e-12
    assert torch.allclose(our_chosen, their_chosen) and torch.allclose(our_rejected, their_rejected)
    nothing = torch.zeros(32, 1, 1)
    loss, _ = trl.get_batch_loss_metrics((chosen, rejected, nothing, nothing, torch.tensor(5.0)))
    assert abs(ours.mean().item() - loss.item()) < 1e-12  # cpo_alpha 0: its NLL term is left out


def test_soft_simpo_equals_trl_label_smoothing_at_gamma_zero() -> None:
    chosen, rejected = random_avg_logps(16, seed=8)
    probs = torch.linspace(0.5, 1.0, 16, dtype=torch.float64)
    ours, _, _ = simpo_loss(chosen, rejected, beta=2.0, gamma=0.0, label_prob=probs)
    for i in range(16):
        theirs, _, _ = trl_cpo(2.0, 0.0, label_smoothing=1 - probs[i].item()).cpo_loss(
            chosen[i : i + 1], rejected[i : i + 1]
        )
        assert abs(ours[i].item() - theirs.item()) < 1e-12


@pytest.mark.parametrize("lam", [0.1, 1.0])
def test_orpo_loss_equals_trl(lam: float) -> None:
    """TRL computes ORPO's odds in fp32 whatever it is given: the comparison is in fp32."""
    chosen, rejected = (x.float() for x in random_avg_logps(32, seed=9))
    ours, our_chosen, our_rejected = orpo_loss(chosen, rejected, lam=lam)
    trl = trl_orpo(lam)
    odds_term, _, _, log_sigmoid_ratio, log_odds_ratio = trl.odds_ratio_loss(chosen, rejected)  # lam log sigmoid
    assert ((ours + chosen) - -odds_term).abs().max().item() < 1e-6  # ours less its SFT term -log P_c
    assert abs((our_chosen - our_rejected).mean().item() - log_odds_ratio.item()) < 1e-6
    assert abs(torch.nn.functional.logsigmoid(our_chosen - our_rejected).mean().item() - log_sigmoid_ratio) < 1e-6
    # the whole loss, TRL's NLL term being the value its forward pass reports: here the answers' mean NLL
    nothing = torch.zeros(32, 1, 1)
    loss, _ = trl.get_batch_loss_metrics((chosen, rejected, nothing, nothing, (-chosen).mean()))
    assert abs(ours.mean().item() - loss.item()) < 1e-6


def trl_kto_loss(
    policy, ref, desirable, kl_policy, kl_ref, beta: float, desirable_weight: float, undesirable_weight: float
) -> torch.Tensor:
    """TRL 1.16's KTO loss lives inside KTOTrainer._compute_loss. Call it unbound, with a stand-in trainer
    and a stand-in model that gives each sequence's whole log-prob on its one completion token: the
    examples' when called on `input_ids` of ones, the mismatched (KL) sequences' on twos. The reference
    log-probs go in as precomputed; TRL shifts the KL completions itself, here they are given."""
    from trl.trainer.kto_trainer import KTOTrainer

    n = policy.shape[0]

    def fake_model(input_ids, **_):
        log_probs = (policy if bool((input_ids == 1).all()) else kl_policy).unsqueeze(1)
        return SimpleNamespace(
            log_probs=log_probs, entropy=torch.zeros_like(log_probs), mean_logits=torch.zeros_like(log_probs)
        )

    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=stand_in_accelerator(),
        aux_loss_enabled=False,
        precompute_ref_logps=True,
        calculate_KL=True,
        loss_type="kto",
        beta=beta,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    trainer._compute_kl_logps = lambda model, batch: KTOTrainer._compute_kl_logps(trainer, model, batch)
    ones = torch.ones(n, 2, dtype=torch.long)
    inputs = {
        "input_ids": ones,
        "attention_mask": ones,
        "completion_mask": torch.tensor([[0, 1]] * n),
        "KL_input_ids": 2 * ones,
        "KL_attention_mask": ones,
        "KL_completion_mask": torch.tensor([[0, 1]] * n),
        "label": desirable,
        "ref_logps": ref,
        "ref_KL_logps": kl_ref,
    }
    return KTOTrainer._compute_loss(trainer, fake_model, inputs, return_outputs=False)


@pytest.mark.parametrize("kl_shift", [-3.0, 3.0], ids=["kl-clamped-at-0", "kl-positive"])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 1.33)])
def test_kto_loss_equals_trl(kl_shift: float, weights: tuple[float, float]) -> None:
    policy, ref, _, kl_ref = random_logps(32, seed=11)
    g = torch.Generator().manual_seed(12)
    kl_policy = kl_ref + kl_shift + torch.rand(32, generator=g, dtype=torch.float64) * 2 - 1  # mean log-ratio ~ shift
    desirable = torch.rand(32, generator=g) < 0.4
    ours, _, z0 = kto_loss(policy, ref, desirable, kl_policy, kl_ref, 0.1, *weights)
    assert (z0.item() > 1.0) == (kl_shift > 0) and z0.item() >= 0
    theirs = trl_kto_loss(policy, ref, desirable, kl_policy, kl_ref, 0.1, *weights)
    assert abs(ours.mean().item() - theirs.item()) < 1e-12


def test_kto_per_example_equals_trl_on_single_label_batches() -> None:
    """TRL returns the batch mean only; a batch of desirable answers alone and one of undesirable ones
    pins each side's formula, example by example, with the same reference point."""
    policy, ref, kl_policy, kl_ref = random_logps(8, seed=13)
    for label in (True, False):
        desirable = torch.full((8,), label)
        ours, _, _ = kto_loss(policy, ref, desirable, kl_policy + 5, kl_ref, 0.2, 1.0, 1.5)
        for i in range(8):
            single = tuple(x[i : i + 1] for x in (policy, ref))
            theirs = trl_kto_loss(*single, desirable[i : i + 1], kl_policy + 5, kl_ref, 0.2, 1.0, 1.5)
            assert abs(ours[i].item() - theirs.item()) < 1e-12


# ----------------------------------------------------------------------------- PPO pieces


def test_gae_by_hand() -> None:
    # one sequence, 3 response tokens then one pad; gamma 0.9, lam 0.5
    rewards = t(0.0, 0.0, 1.0, 5.0).unsqueeze(0)  # the 5.0 on the pad must be ignored
    values = t(0.5, 0.4, 0.3, 9.0).unsqueeze(0)  # so must the value past the last response token
    mask = t(1, 1, 1, 0).unsqueeze(0)
    advantages, returns = gae(rewards, values, gamma=0.9, lam=0.5, mask=mask)
    d2 = 1.0 + 0.9 * 0 - 0.3  # 0.7
    d1 = 0.0 + 0.9 * 0.3 - 0.4  # -0.13
    d0 = 0.0 + 0.9 * 0.4 - 0.5  # -0.14
    a2 = d2
    a1 = d1 + 0.45 * a2
    a0 = d0 + 0.45 * a1
    assert advantages[0].tolist() == pytest.approx([a0, a1, a2, 0.0], abs=1e-12)
    assert returns[0].tolist() == pytest.approx([a0 + 0.5, a1 + 0.4, a2 + 0.3, 0.0], abs=1e-12)


def test_gae_lambda_one_is_discounted_return() -> None:
    rewards = t(1.0, 2.0, 3.0).unsqueeze(0)
    values = t(0.7, -0.2, 0.4).unsqueeze(0)
    _, returns = gae(rewards, values, gamma=0.5, lam=1.0)
    assert returns[0].tolist() == pytest.approx([1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3.0], abs=1e-12)


def test_ppo_policy_loss_clips() -> None:
    # ratios e^0.5 = 1.6487 (A > 0: clipped at 1.2) and e^-0.5 = 0.6065 (A < 0: clipped at 0.8), e^0 = 1
    logprobs, old = t(0.5, -0.5, 0.0), t(0.0, 0.0, 0.0)
    advantages = t(2.0, -1.0, 3.0)
    loss, clip_frac = ppo_policy_loss(logprobs, old, advantages, clip_range=0.2)
    # per token max(-A r, -A clip(r)): max(-3.2974, -2.4) = -2.4; max(0.6065, 0.8) = 0.8; -3
    assert loss.item() == pytest.approx((-2.4 + 0.8 - 3.0) / 3, abs=1e-12)
    assert clip_frac.item() == pytest.approx(2 / 3)
    # a ratio moving the right way inside the band is not clipped
    loss, clip_frac = ppo_policy_loss(t(0.1), t(0.0), t(1.0), clip_range=0.2)
    assert loss.item() == pytest.approx(-math.exp(0.1)) and clip_frac.item() == 0.0


def test_ppo_policy_loss_mask() -> None:
    loss, _ = ppo_policy_loss(
        t(0.0, 0.0).unsqueeze(0), t(0.0, 0.0).unsqueeze(0), t(1.0, 100.0).unsqueeze(0), 0.2, mask=t(1, 0).unsqueeze(0)
    )
    assert loss.item() == pytest.approx(-1.0)


def test_ppo_value_loss_clips() -> None:
    values, old, returns = t(1.0, 0.55), t(0.5, 0.5), t(2.0, 0.0)
    loss, clip_frac = ppo_value_loss(values, old, returns, clip_range=0.2)
    # token 0: (1 - 2)^2 = 1 vs clipped V 0.7: (0.7 - 2)^2 = 1.69 -> 1.69 (clipped wins)
    # token 1: (0.55 - 0)^2 = 0.3025, clipped V is 0.55 too -> 0.3025
    assert loss.item() == pytest.approx(0.5 * (1.69 + 0.3025) / 2, abs=1e-12)
    assert clip_frac.item() == pytest.approx(0.5)


def test_kl_penalty() -> None:
    assert kl_penalty(t(-1.0, -2.0), t(-1.5, -1.0), beta=0.2).tolist() == pytest.approx([0.1, -0.2])


def test_fixed_kl_controller() -> None:
    controller = FixedKLController(0.05)
    assert controller.update(current_kl=100.0, n_steps=64) == 0.05


def test_adaptive_kl_controller() -> None:
    controller = AdaptiveKLController(init_value=0.1, target=6.0, horizon=10000)
    # KL 7.2: error 0.2 -> beta * (1 + 0.2 * 256 / 10000)
    assert controller.update(7.2, n_steps=256) == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000))
    # KL far above target: the error is clipped at +0.2
    before = controller.value
    assert controller.update(600.0, n_steps=256) == pytest.approx(before * (1 + 0.2 * 256 / 10000))
    # KL 0: error clipped at -0.2
    before = controller.value
    assert controller.update(0.0, n_steps=100) == pytest.approx(before * (1 - 0.2 * 100 / 10000))
    # on target: unchanged
    before = controller.value
    assert controller.update(6.0, n_steps=100) == pytest.approx(before)


# ----------------------------------------------------------------------------- GRPO, RLOO, A2C


def test_group_advantages_by_hand() -> None:
    rewards = t(1.0, 2.0, 3.0, 6.0).reshape(2, 2)
    # group 1: mean 1.5, sample std sqrt(0.5); group 2: mean 4.5, sample std sqrt(4.5)
    scaled = group_advantages(rewards, scale=True, eps=0.0)
    assert scaled.flatten().tolist() == pytest.approx(
        [-0.5 / math.sqrt(0.5), 0.5 / math.sqrt(0.5), -1.5 / math.sqrt(4.5), 1.5 / math.sqrt(4.5)]
    )
    assert group_advantages(rewards, scale=False).flatten().tolist() == pytest.approx([-0.5, 0.5, -1.5, 1.5])
    assert (
        group_advantages(t(2.0, 2.0, 2.0).reshape(1, 3)).abs().max().item() == 0.0
    )  # equal rewards: no signal, no nan


def test_rloo_baseline_is_the_mean_of_the_others() -> None:
    rewards = t(1.0, 2.0, 6.0).reshape(1, 3)
    # 1 - (2+6)/2 = -3; 2 - (1+6)/2 = -1.5; 6 - (1+2)/2 = 4.5
    assert rloo_advantages(rewards).flatten().tolist() == pytest.approx([-3.0, -1.5, 4.5])
    with pytest.raises(ValueError):
        rloo_advantages(t(1.0).reshape(1, 1))


def test_k3_kl_by_hand() -> None:
    logp, ref = t(math.log(0.5), math.log(0.2)), t(math.log(0.25), math.log(0.2))
    # ratio ref/pi = 0.5: 0.5 - log 0.5 - 1 = 0.19315; equal probabilities: 0
    assert k3_kl(logp, ref).tolist() == pytest.approx([0.5 - math.log(0.5) - 1, 0.0])


def test_grpo_loss_by_hand() -> None:
    logp = t(math.log(0.6), math.log(0.5), math.log(0.3), 0.0).reshape(2, 2)
    old = t(math.log(0.5), math.log(0.5), math.log(0.3), 0.0).reshape(2, 2)
    ref = t(math.log(0.5), math.log(0.25), math.log(0.3), 0.0).reshape(2, 2)
    mask = t(1, 1, 1, 0).reshape(2, 2)
    advantages = t(1.0, -2.0)
    loss, kl, clip_fraction = grpo_loss(logp, old, ref, advantages, clip_range=0.1, beta=0.5, mask=mask)
    # answer 1: rho = (1.2, 1); A = 1: min(1.2, 1.1) = 1.1 and 1; k3 = (5/6 - log(5/6) - 1, 0.5 - log 0.5 - 1)
    k3_a = 5 / 6 - math.log(5 / 6) - 1
    k3_b = 0.5 - math.log(0.5) - 1
    answer_1 = (-(1.1 - 0.5 * k3_a) - (1.0 - 0.5 * k3_b)) / 2
    # answer 2: one token, rho = 1, A = -2, k3 = 0
    answer_2 = 2.0
    assert loss.item() == pytest.approx((answer_1 + answer_2) / 2)
    assert kl.item() == pytest.approx(((k3_a + k3_b) / 2 + 0) / 2)
    assert clip_fraction.item() == pytest.approx(1 / 3)


def test_grpo_loss_at_ratio_one_is_reinforce() -> None:
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.7]], requires_grad=True)
    advantages = t(1.5, -0.5).float()
    loss, _, _ = grpo_loss(logp, logp.detach(), None, advantages, 0.2, 0.0, torch.ones(2, 2))
    loss.backward()
    # d/dlogp of -(1/2) sum_i (1/2) sum_t A_i rho_t = -A_i / 4 at rho = 1
    assert logp.grad.flatten().tolist() == pytest.approx([-0.375, -0.375, 0.125, 0.125])


def test_rloo_loss_by_hand() -> None:
    logp = torch.tensor([[-1.0, -1.0], [-0.5, 0.0]], dtype=torch.float64, requires_grad=True)
    old = t(-1.0, -1.2, -0.5, 0.0).reshape(2, 2)
    mask = t(1, 1, 1, 0).reshape(2, 2)
    advantages = t(2.0, -1.0)
    loss, clip_fraction = rloo_loss(logp, old, advantages, 0.1, mask)
    # answer 1: rho = exp(0.2) = 1.2214 > 1.1, A > 0: min gives 1.1 * 2; answer 2: rho = 1: -1
    assert loss.item() == pytest.approx(-(2.2 - 1.0) / 2)
    assert clip_fraction.item() == pytest.approx(0.5)
    loss.backward()
    # clipped answer: no gradient; answer 2: -A/2 = 0.5 on its token, none on the masked one
    assert logp.grad.flatten().tolist() == pytest.approx([0.0, 0.0, 0.5, 0.0])


def test_a2c_loss_by_hand() -> None:
    logp = t(-1.0, -2.0, -3.0).reshape(1, 3)
    values, returns = t(0.5, 1.0, 0.0).reshape(1, 3), t(1.0, 1.0, 2.0).reshape(1, 3)
    advantages = t(2.0, -1.0, 4.0).reshape(1, 3)
    mask = t(1, 1, 0).reshape(1, 3)
    loss, policy, value = a2c_loss(logp, values, advantages, returns, value_coef=0.5, mask=mask)
    # policy: -(2 * -1 + -1 * -2) / 2 = 0; value: 0.5 * (0.25 + 0) / 2 = 0.0625
    assert policy.item() == pytest.approx(0.0) and value.item() == pytest.approx(0.0625)
    assert loss.item() == pytest.approx(0.03125)


def test_geometric_mixture_by_hand() -> None:
    """pi = (1/2, 1/4, 1/4), mu = (1/4, 1/4, 1/2): pi^(1/2) mu^(1/2) = (sqrt(1/8), 1/4, sqrt(1/8)), over its
    sum 1/4 + 2 sqrt(1/8); beta 1/4: pi^(3/4) mu^(1/4) renormalised. Logits offset per model by any
    constant give the same mixture; beta 0 and 1 give pi and mu."""
    pi, mu = [0.5, 0.25, 0.25], [0.25, 0.25, 0.5]
    policy_logits = torch.tensor([[math.log(p) + 3.0 for p in pi]])
    ref_logits = torch.tensor([[math.log(m) - 1.5 for m in mu]])

    def by_hand(beta: float) -> list[float]:
        unnormalised = [p ** (1 - beta) * m**beta for p, m in zip(pi, mu)]
        return [u / sum(unnormalised) for u in unnormalised]

    half = math.sqrt(1 / 8) / (0.25 + 2 * math.sqrt(1 / 8))
    assert by_hand(0.5) == pytest.approx([half, 1 - 2 * half, half])  # the formula above, written out
    for beta in (0.0, 0.25, 0.5, 1.0):
        got = geometric_mixture_logprobs(policy_logits, ref_logits, beta).exp()[0].tolist()
        assert got == pytest.approx(by_hand(beta), abs=1e-6), beta
    assert geometric_mixture_logprobs(policy_logits, ref_logits, 0.0).exp()[0].tolist() == pytest.approx(pi, abs=1e-6)


def test_nash_md_loss_by_hand() -> None:
    """S = (-1 - 2, -0.5) = (-3, -0.5) (the second answer's last token is padding), KL = ((-1 + 1.5) +
    (-2 + 1), -0.5 + 1) = (-0.5, 0.5); weights P - 1/2 - tau KL = (0.3 + 0.05, -0.2 - 0.05) = (0.35, -0.25);
    L = -((0.35)(-3) + (-0.25)(-0.5)) / 2 = 0.4625. The gradient is -weight_i / B on each answer token,
    none through the KL."""
    logprobs = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0], [-1.0, -2.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss, kl = nash_md_loss(logprobs, ref, torch.tensor([0.8, 0.3]), 0.1, mask)
    assert loss.item() == pytest.approx(0.4625)
    assert kl.tolist() == pytest.approx([-0.5, 0.5])
    loss.backward()
    assert logprobs.grad.flatten().tolist() == pytest.approx([-0.175, -0.175, 0.125, 0.0])
    # tau 0 (no reference): REINFORCE on P - 1/2 alone
    plain, _ = nash_md_loss(logprobs.detach(), None, torch.tensor([0.8, 0.3]), 0.0, mask)
    assert plain.item() == pytest.approx(-(0.3 * -3 + -0.2 * -0.5) / 2)


def test_hir_contrastive_loss_by_hand() -> None:
    """Pairs 0 and 2 share an instruction (band 0), pair 1 has its own (band 1): each row's negatives
    are the pairs of the other band; P_02 and P_20 are left out of the sums."""
    p = torch.tensor(
        [[-1.0, -2.0, -7.0], [-3.0, -0.5, -4.0], [-2.0, -1.0, -2.5]], dtype=torch.float64, requires_grad=True
    )
    band = torch.tensor([0, 1, 0])
    negatives = band[None, :] != band[:, None]
    loss = hir_contrastive_loss(p, negatives)
    rows = [
        -math.log(math.exp(-1.0) / (math.exp(-1.0) + math.exp(-2.0))),
        -math.log(math.exp(-0.5) / (math.exp(-0.5) + math.exp(-3.0) + math.exp(-4.0))),
        -math.log(math.exp(-2.5) / (math.exp(-2.5) + math.exp(-1.0))),
    ]
    assert loss.item() == pytest.approx(sum(rows) / 3)
    loss.backward()
    # d/dP_ii = -(1 - softmax_ii) / n; a left-out entry gets no gradient
    own_2 = math.exp(-2.5) / (math.exp(-2.5) + math.exp(-1.0))
    assert (
        p.grad[2, 2].item() == pytest.approx(-(1 - own_2) / 3)
        and p.grad[2, 0].item() == 0.0
        and p.grad[0, 2].item() == 0.0
    )
    assert p.grad[2, 1].item() == pytest.approx((1 - own_2) / 3)


def test_hir_contrastive_loss_without_negatives_is_zero() -> None:
    p = t(-1.0, -2.0, -3.0, -0.5).reshape(2, 2)
    assert hir_contrastive_loss(p, torch.zeros(2, 2, dtype=torch.bool)).item() == 0.0


def test_hir_loss_by_hand() -> None:
    logp = t(-1.0, -2.0, -0.5, -1.0, -3.0, 0.0).reshape(2, 3)
    mask = t(1, 1, 0, 0, 1, 1).reshape(2, 3)
    p = t(-1.5, -2.5, -1.0, -1.5).reshape(2, 2)
    negatives = torch.tensor([[False, True], [True, False]])
    entropy = t(0.5, 1.0, 9.0, 9.0, 2.0, 1.5).reshape(2, 3)
    loss, supervised, contrastive, mean_entropy = hir_loss(logp, mask, p, negatives, 0.5, entropy, 0.1)
    # L_sup over the 4 answer tokens: (1 + 2 + 3 + 0) / 4; L_c: log(1 + e^-1) and log(1 + e^0.5), averaged
    assert supervised.item() == pytest.approx(1.5)
    assert contrastive.item() == pytest.approx((math.log1p(math.exp(-1.0)) + math.log1p(math.exp(0.5))) / 2)
    assert mean_entropy.item() == pytest.approx((0.5 + 1.0 + 2.0 + 1.5) / 4)
    assert loss.item() == pytest.approx(1.5 + 0.5 * contrastive.item() - 0.1 * 1.25)
    plain, _, _, no_entropy = hir_loss(logp, mask, p, negatives, 0.0)
    assert plain.item() == pytest.approx(1.5) and no_entropy.item() == 0.0


def test_token_entropy_by_hand() -> None:
    logits = torch.tensor(
        [[[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3.0), -math.inf, -math.inf], [5.0, 1.0, 2.0, 3.0]]], dtype=torch.float64
    )
    entropy = token_entropy(logits.nan_to_num(neginf=-1e9))
    # uniform over 4: log 4; (1/4, 3/4): -(1/4 log 1/4 + 3/4 log 3/4); the last position predicts nothing
    assert entropy.shape == (1, 2)
    assert entropy[0].tolist() == pytest.approx([math.log(4.0), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))])


def test_distill_kl_by_hand() -> None:
    p, q = [0.8, 0.1, 0.1], [0.4, 0.4, 0.2]  # teacher, student
    teacher = torch.log(t(*p)).reshape(1, 1, 3).requires_grad_()
    student = torch.log(t(*q)).reshape(1, 1, 3).requires_grad_()
    # forward: .8 ln 2 + .1 ln(1/4) + .1 ln(1/2) = .5 ln 2; reverse: .4 ln(1/2) + .4 ln 4 + .2 ln 2 = .6 ln 2
    forward = distill_kl(student, teacher)
    assert forward.item() == pytest.approx(0.5 * math.log(2))
    assert distill_kl(student, teacher, direction="reverse").item() == pytest.approx(0.6 * math.log(2))
    forward.backward()
    # d KL(p || softmax(z)) / dz = softmax(z) - p; nothing flows into the teacher
    assert student.grad.flatten().tolist() == pytest.approx([-0.4, 0.3, 0.1])
    assert teacher.grad is None
    with pytest.raises(ValueError):
        distill_kl(student, teacher, direction="sideways")


def test_distill_kl_temperature_and_mask_by_hand() -> None:
    p, q = t(0.8, 0.1, 0.1), t(0.4, 0.4, 0.2)
    # at tau = 2, logits 2 log p + c soften to p again; a shift c changes no distribution
    teacher = torch.stack([2 * torch.log(p), 2 * torch.log(q), 2 * torch.log(p)]).reshape(1, 3, 3)
    student = torch.stack([2 * torch.log(q) + 5, 2 * torch.log(q) - 1, 2 * torch.log(q)]).reshape(1, 3, 3)
    mask = t(1, 1, 0).reshape(1, 3)  # token 2: equal distributions (KL 0); token 3 is masked out
    assert distill_kl(student, teacher, mask, temperature=2.0).item() == pytest.approx((0.5 * math.log(2) + 0.0) / 2)
    # at tau = 1 token 1 compares p^2 and q^2 normalised: (.64, .01, .01)/.66 against (.16, .16, .04)/.36
    p2, q2 = [x / 0.66 for x in (0.64, 0.01, 0.01)], [x / 0.36 for x in (0.16, 0.16, 0.04)]
    by_hand = sum(a * math.log(a / b) for a, b in zip(p2, q2))
    assert distill_kl(student, teacher, mask).item() == pytest.approx(by_hand / 2)


def test_judge_choice_loss_by_hand() -> None:
    """Bradley-Terry on the letter logits, plus lm_coef times the NLL of the letters over the vocabulary."""
    from cai.train.losses import judge_choice_loss

    logits = torch.tensor([[2.0, 0.0, 1.0], [0.5, -1.0, 3.0]])
    right, wrong = torch.tensor([0, 1]), torch.tensor([2, 0])
    # row 0: z_r - z_w = 1, q = 1:   -log sigmoid(1) = log(1 + e^-1) = 0.313262
    #        NLL of token 0:          log(e^2 + e^0 + e^1) - 2 = 0.407606
    # row 1: z_r - z_w = -1.5, q = 0.25: -(0.25 log sigmoid(-1.5) + 0.75 log sigmoid(1.5)) = 0.25 * 1.701413 + 0.75 * 0.201413 = 0.576413
    #        lse = log(e^0.5 + e^-1 + e^3) = 3.095674; -(0.25 (-1 - lse) + 0.75 (0.5 - lse)) = 0.25 * 4.095674 + 0.75 * 2.595674 = 2.970674
    q = torch.tensor([1.0, 0.25])
    assert judge_choice_loss(logits, right, wrong, q).tolist() == pytest.approx([0.313262, 0.576413], abs=1e-5)
    assert judge_choice_loss(logits, right, wrong, q, lm_coef=0.5).tolist() == pytest.approx(
        [0.313262 + 0.5 * 0.407606, 0.576413 + 0.5 * 2.970674], abs=1e-5
    )
    assert judge_choice_loss(logits, right, wrong).tolist() == pytest.approx(
        [0.313262, -math.log(torch.sigmoid(torch.tensor(-1.5)).item())], abs=1e-5
    )
    # the letters' part sees only their difference: a shift of every logit changes nothing, unlike the NLL
    assert torch.allclose(judge_choice_loss(logits + 3.0, right, wrong, q), judge_choice_loss(logits, right, wrong, q))


def test_pairwise_credit_counts_a_tie_as_half() -> None:
    assert pairwise_credit(t(2.0, -1.0, 0.3), t(1.0, 0.5, 0.3)).tolist() == [1.0, 0.0, 0.5]
    assert pairwise_credit(t(0.7, 0.5, 0.2), 0.5).tolist() == [1.0, 0.5, 0.0]  # a probability against chance
