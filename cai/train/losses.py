"""The training objectives as pure tensor functions: tensors in, tensors out, no model, no state
(except the KL controllers, which are a number and its update rule).

Conventions: per-example inputs are 1-D tensors over examples; per-token inputs are [batch, T].
`label_prob` is the probability that `chosen` is the better answer, as the AI judge gives it.
A soft label always means the expectation of the hard loss under the label distribution:
p * loss(chosen wins) + (1 - p) * loss(rejected wins).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def bradley_terry_loss(
    chosen_rewards: Tensor, rejected_rewards: Tensor, margin: Tensor | None = None, label_prob: Tensor | None = None
) -> Tensor:
    """Per-example reward-model ranking loss, with d = r_c - r_r:

        hard (InstructGPT):                 -log sigmoid(d)
        margin m (Llama 2):                 -log sigmoid(d - m)
        soft label p (Constitutional AI):   -(p log sigmoid(d) + (1 - p) log sigmoid(-d))

    A margin and a soft label both encode the judge's confidence (cai's `margin` column is the capped
    log-odds of `label_prob`): using both would count it twice, so they are exclusive.
    log sigmoid is F.logsigmoid, finite with finite gradients at |d| = 1e4.
    """
    if margin is not None and label_prob is not None:
        raise ValueError("bradley_terry_loss takes a margin or a label_prob, not both")
    d = chosen_rewards - rejected_rewards
    if margin is not None:
        d = d - margin
    if label_prob is None:
        return -F.logsigmoid(d)
    return -(label_prob * F.logsigmoid(d) + (1 - label_prob) * F.logsigmoid(-d))


DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_prob: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Direct preference losses on sequence log-probs; returns (per-example losses, chosen rewards,
    rejected rewards), the rewards being beta * (log pi - log pi_ref) (detached: they are metrics).

    With h = (log pi_c - log ref_c) - (log pi_r - log ref_r):
        sigmoid (DPO, Rafailov et al. 2023):  -log sigmoid(beta h)
        ipo (IPO, Azar et al. 2023):          (h - 1 / (2 beta))^2
        hinge (SLiC, Zhao et al. 2023):       relu(1 - beta h)
    With label_prob p, p * loss(h) + (1 - p) * loss(-h); for sigmoid that is conservative DPO
    -(p log sigmoid(beta h) + (1 - p) log sigmoid(-beta h)) (Mitchell 2023), here per example, so
    the AI judge's own confidence sets each pair's smoothing. For ipo it moves the target of h to
    (2p - 1) / (2 beta), the minimiser of IPO's population loss.
    IPO's h is whatever log-probs it is given: pass per-token means for the length-normalised form.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r} (known: {', '.join(DPO_LOSS_TYPES)})")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    h = chosen_logratios - rejected_logratios

    def hard(h: Tensor) -> Tensor:
        if loss_type == "sigmoid":
            return -F.logsigmoid(beta * h)
        if loss_type == "ipo":
            return (h - 1 / (2 * beta)) ** 2
        return torch.relu(1 - beta * h)

    losses = hard(h) if label_prob is None else label_prob * hard(h) + (1 - label_prob) * hard(-h)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def cpl_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    alpha: float,
    lam: float = 1.0,
    label_prob: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Contrastive Preference Learning (Hejna et al. 2024), reference-free; returns (per-example losses,
    chosen scores, rejected scores), the scores being alpha log pi(y|x) (detached: they are metrics).

    CPL reads the optimal advantage as alpha log pi (the regret of a segment is the sum of its steps'
    alpha log pi(a_t|s_t); one answer is one segment, undiscounted), and fits preferences with it:

        L_CPL(lambda) = -log( exp(S_c) / (exp(S_c) + exp(lambda S_r)) ) = -log sigmoid(S_c - lambda S_r)
        S = alpha sum_t log pi(y_t | x, y_<t)

    lambda in (0, 1] is the paper's conservative regulariser: lambda < 1 scales the rejected answer's
    score down, which puts more of the loss's weight on raising the preferred answer, in the data's
    support, than on lowering the rejected one; lambda = 1 is plain CPL. With label_prob p the loss is
    p L(c over r) + (1 - p) L(r over c), as for the other preference losses.
    """
    chosen, rejected = alpha * policy_chosen_logps, alpha * policy_rejected_logps

    def hard(winner: Tensor, loser: Tensor) -> Tensor:
        return -F.logsigmoid(winner - lam * loser)

    losses = (
        hard(chosen, rejected)
        if label_prob is None
        else label_prob * hard(chosen, rejected) + (1 - label_prob) * hard(rejected, chosen)
    )
    return losses, chosen.detach(), rejected.detach()


def simpo_loss(
    policy_chosen_avg_logps: Tensor,
    policy_rejected_avg_logps: Tensor,
    beta: float,
    gamma: float,
    label_prob: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """SimPO (Meng et al. 2024, eq. 6), reference-free; returns (per-example losses, chosen rewards,
    rejected rewards), the rewards being beta * the answer's mean per-token log-prob (detached: metrics).

    The implicit reward is the length-normalised log-likelihood, with a target margin gamma:

        r(y) = beta / |y| sum_t log pi(y_t | x, y_<t)          (the inputs are these per-token means)
        L = -log sigmoid(r(y_c) - r(y_r) - gamma)

    With label_prob p, p L(c over r) + (1 - p) L(r over c): the margin is always asked of the winner.
    (TRL's CPOTrainer(loss_type="simpo") smooths as -(1 - s) log sigmoid(z) - s log sigmoid(-z) with
    z = r_c - r_r - gamma, which asks -gamma of the loser; the two agree at gamma = 0.)
    """
    chosen, rejected = beta * policy_chosen_avg_logps, beta * policy_rejected_avg_logps

    def hard(winner: Tensor, loser: Tensor) -> Tensor:
        return -F.logsigmoid(winner - loser - gamma)

    losses = (
        hard(chosen, rejected)
        if label_prob is None
        else label_prob * hard(chosen, rejected) + (1 - label_prob) * hard(rejected, chosen)
    )
    return losses, chosen.detach(), rejected.detach()


def log_odds(avg_logps: Tensor, eps: float = 1e-6) -> Tensor:
    """log( P / (1 - P) ) with log P the per-token mean log-prob (ORPO's odds of an answer):
    log P - log(1 - exp(log P)), the second term as log1p(-exp(x)) below -log 2 and log(-expm1(x)) above
    (no cancellation either side). log P is capped at -eps: a rounding to 0 or above in low precision
    would make the odds infinite (P = 1) or nan (P > 1)."""
    x = avg_logps.clamp(max=-eps)
    return x - torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    policy_chosen_avg_logps: Tensor,
    policy_rejected_avg_logps: Tensor,
    lam: float,
    label_prob: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """ORPO, odds ratio preference optimisation (Hong et al. 2024, eqs. 6-7), reference-free; returns
    (per-example losses, chosen log-odds, rejected log-odds) (the last two detached: metrics).

    SFT on the chosen answer plus an odds-ratio term, both on per-token mean log-probs (the paper's
    P(y|x) = exp(1/|y| sum_t log pi(y_t | x, y_<t))):

        odds(y) = P(y|x) / (1 - P(y|x))
        L_SFT   = -log P(y_c|x)                                  (the chosen answer's mean token NLL)
        L_OR    = -log sigmoid( log odds(y_c) - log odds(y_r) )
        L       = L_SFT + lambda L_OR

    With label_prob p, p L(c over r) + (1 - p) L(r over c), the SFT term included (the expectation of
    the hard loss: the answer that wins is the one fine-tuned on). TRL's ORPOTrainer takes lambda as
    its `beta`, and its NLL term is the token mean over the batch's prompts and chosen answers; here it is
    the paper's, over the answer's own tokens, one mean per answer.
    """
    chosen, rejected = log_odds(policy_chosen_avg_logps), log_odds(policy_rejected_avg_logps)

    def hard(winner_logps: Tensor, winner: Tensor, loser: Tensor) -> Tensor:
        return -winner_logps - lam * F.logsigmoid(winner - loser)

    losses = (
        hard(policy_chosen_avg_logps, chosen, rejected)
        if label_prob is None
        else label_prob * hard(policy_chosen_avg_logps, chosen, rejected)
        + (1 - label_prob) * hard(policy_rejected_avg_logps, rejected, chosen)
    )
    return losses, chosen.detach(), rejected.detach()


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    kl_policy_logps: Tensor,
    kl_ref_logps: Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """KTO, Kahneman-Tversky optimisation (Ethayarajh et al. 2024, eq. 7), on unpaired answers each
    labelled desirable or not; returns (per-example losses, rewards beta r (detached), z0).

    With r = log pi(y|x) - log pi_ref(y|x) (sequence log-probs) and a reference point z0:

        desirable:    L = lambda_D (1 - sigmoid(beta (r - z0)))
        undesirable:  L = lambda_U (1 - sigmoid(beta (z0 - r)))
        z0 = max(0, mean_j [ log pi(y'_j|x_j) - log pi_ref(y'_j|x_j) ])

    z0 estimates KL(pi || pi_ref) from the batch itself, on mismatched pairs (x_j, y'_j): prompt j with
    an answer written for another prompt (`kl_policy_logps`, `kl_ref_logps`, any number of them); it is
    detached, as in the paper (no gradient through the reference point) and TRL's KTOTrainer. Without a
    mismatched pair z0 is 0. `desirable` is a bool tensor; the batch loss is the plain mean of the
    per-example losses, as TRL's. lambda_D n_D / (lambda_U n_U) in [1, 4/3] is the paper's advice for
    unbalanced data (n_D, n_U the desirable and undesirable counts).
    """
    if kl_policy_logps.numel():
        z0 = (kl_policy_logps - kl_ref_logps).mean().detach().clamp(min=0)
    else:
        z0 = torch.zeros((), dtype=policy_logps.dtype, device=policy_logps.device)
    logratios = policy_logps - ref_logps
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (logratios - z0))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratios))),
    )
    return losses, beta * logratios.detach(), z0


def reward_centering_loss(chosen_rewards: Tensor, rejected_rewards: Tensor, coefficient: float) -> Tensor:
    """Auxiliary term that pins the reward's free offset near 0 (Eisenstein et al. 2023, "Helping or
    Herding?"):  coefficient * mean((r_c + r_r)^2). The ranking loss only sees r_c - r_r."""
    return coefficient * ((chosen_rewards + rejected_rewards) ** 2).mean()


def token_logps(logits: Tensor, labels: Tensor) -> Tensor:
    """log p(labels[t+1] | tokens <= t) for a causal LM: [batch, T, V] logits, [batch, T] ids ->
    [batch, T - 1]. Computed in at least fp32 as gather - logsumexp, without a full log_softmax copy."""
    logits = logits[:, :-1]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    targets = labels[:, 1:].clamp(min=0).unsqueeze(-1)  # -100 and pads are masked out by the caller
    return torch.gather(logits, 2, targets).squeeze(-1) - torch.logsumexp(logits, dim=-1)


# ----------------------------------------------------------------------------- PPO pieces


def masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def gae(rewards: Tensor, values: Tensor, gamma: float, lam: float, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over [batch, T]:

        delta_t = r_t + gamma V_{t+1} - V_t
        A_t     = delta_t + gamma lam A_{t+1}
        returns = A + V

    `mask` is 1 on response tokens; values past the last response token count as 0 (the episode ends
    there), and advantages and returns are 0 outside the mask.
    """
    mask = torch.ones_like(rewards) if mask is None else mask.to(rewards.dtype)
    values = values * mask
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * lam * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


def ppo_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, clip_range: float, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Clipped surrogate (Schulman et al. 2017), as a loss to minimise, and the clip fraction:

        ratio = exp(log pi - log pi_old)
        loss  = mean( max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)) )

    the clip fraction being the share of tokens where the clipped term is the larger one.
    """
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    return loss, masked_mean((clipped > unclipped).float(), mask)


def ppo_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, clip_range: float, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Clipped value loss (the PPO baselines' form) and its clip fraction:

    V_clip = V_old + clip(V - V_old, -eps, eps)
    loss   = 0.5 mean( max((V - R)^2, (V_clip - R)^2) )
    """
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)
    return loss, masked_mean((clipped_error > unclipped_error).float(), mask)


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, beta: float) -> Tensor:
    """Per-token KL penalty beta * (log pi - log pi_ref) (Ziegler et al. 2019; InstructGPT), subtracted
    from the per-token reward."""
    return beta * (logprobs - ref_logprobs)


class FixedKLController:
    """A constant KL coefficient beta."""

    def __init__(self, value: float):
        self.value = value

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value


class AdaptiveKLController:
    """Ziegler et al. 2019: beta_{t+1} = beta_t (1 + e_t n / horizon), with the proportional
    error e_t = clip(KL_t / KL_target - 1, -0.2, 0.2) and n the samples seen since the last update."""

    def __init__(self, init_value: float, target: float, horizon: float):
        self.value = init_value
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon
        return self.value


# ----------------------------------------------------------------------------- critic-free and actor-critic pieces


def group_advantages(rewards: Tensor, scale: bool = True, eps: float = 1e-4) -> Tensor:
    """GRPO's group-relative advantage (Shao et al. 2024, DeepSeekMath, outcome supervision), over
    [prompts, K] rewards of K answers per prompt, given to every token of answer i:

        A_i = (r_i - mean(r_group)) / (std(r_group) + eps)      scale=True (the paper)
        A_i =  r_i - mean(r_group)                               scale=False (Liu et al. 2025, Dr. GRPO)

    std is the sample standard deviation (n - 1), as TRL's GRPOTrainer computes it. Dividing by it
    weighs prompts whose answers barely differ as much as those where they differ a lot; Dr. GRPO
    drops it for that reason. A group whose rewards are all equal has advantage 0 either way.
    """
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale:
        return centred
    return centred / (rewards.std(dim=1, keepdim=True) + eps)


def rloo_advantages(rewards: Tensor) -> Tensor:
    """RLOO's leave-one-out baseline (Kool et al. 2019; Ahmadian et al. 2024), over [prompts, K]:

        A_i = r_i - 1/(K-1) sum_{j != i} r_j  =  K/(K-1) (r_i - mean(r_group))

    each answer's baseline is the mean reward of the prompt's other K - 1 answers (unbiased: it does
    not depend on answer i)."""
    k = rewards.shape[1]
    if k < 2:
        raise ValueError("rloo_advantages needs at least 2 answers per prompt")
    others = (rewards.sum(dim=1, keepdim=True) - rewards) / (k - 1)
    return rewards - others


def k3_kl(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """GRPO's per-token KL estimator (Schulman's k3, the DeepSeekMath paper's eq. 4), unbiased for
    KL(pi || pi_ref) on samples from pi and never negative:

        D_t = pi_ref / pi - log(pi_ref / pi) - 1,   with log(pi_ref / pi) = log pi_ref - log pi
    """
    log_ratio = ref_logprobs - logprobs
    return torch.exp(log_ratio) - log_ratio - 1


def grpo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    ref_logprobs: Tensor | None,
    advantages: Tensor,
    clip_range: float,
    beta: float,
    mask: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """GRPO's objective (Shao et al. 2024, eq. 3) as a loss to minimise, over [batch, T] tokens with
    one advantage per answer ([batch]); returns (loss, mean k3 KL, clip fraction):

        L = -1/G sum_i 1/|o_i| sum_t [ min(rho_t A_i, clip(rho_t, 1 - eps, 1 + eps) A_i) - beta D_t ]
        rho_t = pi(o_t) / pi_old(o_t),   D_t = k3_kl(log pi, log pi_ref)

    each answer's tokens averaged first (1/|o_i|), then the answers. With one update per batch
    (pi_old = pi, rho = 1) the gradient is REINFORCE's with advantage A_i. `ref_logprobs` None (beta 0)
    leaves the KL term out.
    """
    mask = mask.to(logprobs.dtype)
    ratio = torch.exp(logprobs - old_logprobs)
    a = advantages.unsqueeze(1)
    surrogate = torch.minimum(ratio * a, torch.clamp(ratio, 1 - clip_range, 1 + clip_range) * a)
    kl = k3_kl(logprobs, ref_logprobs) if ref_logprobs is not None else torch.zeros_like(logprobs)
    per_token = -(surrogate - beta * kl)
    lengths = mask.sum(1).clamp(min=1)
    loss = ((per_token * mask).sum(1) / lengths).mean()
    clipped = (ratio * a > torch.clamp(ratio, 1 - clip_range, 1 + clip_range) * a).float()
    return loss, ((kl * mask).sum(1) / lengths).mean().detach(), masked_mean(clipped, mask)


def a2c_loss(
    logprobs: Tensor, values: Tensor, advantages: Tensor, returns: Tensor, value_coef: float, mask: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Advantage actor-critic (Mnih et al. 2016), one update per batch, no ratio and no clipping;
    returns (loss, policy loss, value loss):

        L_pi = -mean_t( A_t log pi(a_t | s_t) )       A_t detached (GAE over the critic's V)
        L_V  = 0.5 mean_t( (V(s_t) - R_t)^2 )
        L    = L_pi + value_coef L_V
    """
    policy_loss = -masked_mean(advantages.detach() * logprobs, mask)
    value_loss = 0.5 * masked_mean((values - returns.detach()) ** 2, mask)
    return policy_loss + value_coef * value_loss, policy_loss, value_loss


def rloo_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, clip_range: float, mask: Tensor
) -> tuple[Tensor, Tensor]:
    """RLOO's REINFORCE on whole answers (Ahmadian et al. 2024: an answer is one action), with PPO's
    clip on the sequence ratio for the case of more than one update per batch; returns (loss, clip
    fraction), with s_i = sum_t log pi(y_t) over answer i's tokens:

        rho_i = exp(s_i - s_i_old)
        L = -mean_i min(rho_i A_i, clip(rho_i, 1 - eps, 1 + eps) A_i)

    With one update per batch (rho = 1) the gradient is -mean_i A_i grad s_i, the paper's estimator.
    """
    mask = mask.to(logprobs.dtype)
    ratio = torch.exp(((logprobs - old_logprobs) * mask).sum(1))
    unclipped, clipped = ratio * advantages, torch.clamp(ratio, 1 - clip_range, 1 + clip_range) * advantages
    return -torch.minimum(unclipped, clipped).mean(), (clipped < unclipped).float().mean()


# ----------------------------------------------------------------------------- Nash learning from preferences


def geometric_mixture_logprobs(policy_logits: Tensor, ref_logits: Tensor, beta: float) -> Tensor:
    """Next-token log-probs of the geometric mixture of the policy pi and the reference mu (Munos et al.
    2023, "Nash Learning from Human Feedback", Nash-MD's regularised policy):

        pi^beta(y | x)  proportional to  pi(y | x)^(1 - beta) mu(y | x)^beta

    taken token by token, as the paper's practical Nash-MD-PG does (and TRL's NashMDTrainer): at each
    position the mixture's logits are (1 - beta) l_pi + beta l_mu, renormalised,

        log pi^beta(t) = log_softmax((1 - beta) l_pi + beta l_mu)[t]

    A product of per-token mixtures is not the sequence-level mixture (that one's normaliser sums over
    whole answers and cannot be sampled from token by token); the per-token form is the approximation
    the paper's experiments use. Each model's logits may carry any per-position offset: the
    renormalisation removes it, so raw logits and log-probs give the same mixture.
    """
    mixed = (1 - beta) * policy_logits.float() + beta * ref_logits.float()
    return torch.log_softmax(mixed, dim=-1)


def nash_md_loss(
    logprobs: Tensor, ref_logprobs: Tensor | None, preference: Tensor, tau: float, mask: Tensor
) -> tuple[Tensor, Tensor]:
    """Nash-MD-PG (Munos et al. 2023) as a loss to minimise, over [batch, T] tokens of answers y ~ pi
    with [batch] preferences P_i = P(y_i > y'_i | x_i) against answers y'_i of the geometric mixture;
    returns (loss, the sequence KL estimate per answer, detached).

    The policy ascends  E_{y ~ pi, y' ~ pi^beta} [P(y > y')] - tau KL(pi || mu). With
    S_i = sum_t log pi(y_i,t) and KL_i = sum_t (log pi(y_i,t) - log mu(y_i,t)) over answer tokens:

        L = -1/B sum_i (P_i - 1/2 - tau sg(KL_i)) S_i            (sg: no gradient through it)

    REINFORCE twice: 1/2 is the control variate (P's expectation when pi^beta = pi); and
    grad KL(pi || mu) = E_pi[(log pi/mu) grad log pi] (the other term, E_pi[grad log pi], is 0), so the KL
    weighs S_i as a reward would rather than entering the loss as log pi - log mu, whose own gradient
    is that zero-mean term alone. `ref_logprobs` None (tau 0) leaves the KL out.
    """
    mask = mask.to(logprobs.dtype)
    sequence = (logprobs * mask).sum(1)
    kl = ((logprobs - ref_logprobs) * mask).sum(1).detach() if ref_logprobs is not None else torch.zeros_like(sequence)
    weight = preference.to(sequence.dtype) - 0.5 - tau * kl
    return -(weight * sequence).mean(), kl


# ----------------------------------------------------------------------------- hindsight instruction relabeling


def token_entropy(logits: Tensor) -> Tensor:
    """H_t = -sum_v p_t(v) log p_t(v) of each next-token distribution: [batch, T, V] -> [batch, T - 1],
    aligned with `token_logps` (position t predicts token t + 1). Computed in at least fp32."""
    logits = logits[:, :-1]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return torch.logsumexp(logits, -1) - (torch.softmax(logits, -1) * logits).sum(-1)


def pairwise_credit(chosen: Tensor, rejected: Tensor | float) -> Tensor:
    """Accuracy credit of each pair: 1 when `chosen` scores higher, 0.5 on a tie (a coin flip), else 0."""
    return (chosen > rejected).float() + 0.5 * (chosen == rejected).float()


def hir_contrastive_loss(instruction_logps: Tensor, negatives: Tensor) -> Tensor:
    """HIR's contrastive instruction-following term (Zhang et al. 2023, sec. 4): over a batch of n relabeled
    pairs (q_i, p_i, o_i) (query, hindsight instruction, answer), with P_ij the answer o_i's log-likelihood
    under the query q_i and the instruction p_j (`instruction_logps` [n, n]; sequence log-probs as in the
    paper's equation, or per-token means as in the authors' code: cai.train.hir passes the former):

        L_c = -1/n sum_i log( exp(P_ii) / (exp(P_ii) + sum_{j in N(i)} exp(P_ij)) )

    each answer likelier under its own instruction than under the batch's others. N(i) (`negatives`
    [n, n], bool) holds the j whose instruction differs from p_i: a pair relabeled with the same
    instruction is the positive again, not a negative. A row without negatives adds 0 (log 1), and
    still counts in the 1/n, as in the paper's sum over the batch.
    """
    n = instruction_logps.shape[0]
    own = torch.eye(n, dtype=torch.bool, device=instruction_logps.device)
    logits = instruction_logps.masked_fill(~(negatives | own), float("-inf"))
    return (torch.logsumexp(logits, dim=1) - instruction_logps.diagonal()).mean()


def hir_loss(
    token_logps: Tensor,
    mask: Tensor,
    instruction_logps: Tensor,
    negatives: Tensor,
    contrastive_coef: float,
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """HIR's training objective (Zhang et al. 2023, sec. 4), returning (loss, L_sup, L_c, mean entropy):

        L = L_sup + contrastive_coef L_c + entropy_coef L_ent
        L_sup = -1/|tokens| sum_i sum_t log P(o_i,t | q_i, p_i, o_i,<t)     the answers under their own
                                                                           (relabeled) instructions
        L_c   = hir_contrastive_loss(P, negatives)
        L_ent = sum_t P_t log P_t = -mean_t H_t                             negative entropy: minimising
                                                                           it keeps the token distributions wide

    `token_logps` and `mask` ([n, T]) are the own-instruction sequences' token log-probs and answer mask
    (L_sup averages over all answer tokens of the batch, as `cai train sft`); `entropy` [n, T] the
    entropy at the same positions (None: no entropy term, reported as 0).
    """
    mask = mask.to(token_logps.dtype)
    supervised = -(token_logps * mask).sum() / mask.sum().clamp(min=1)
    contrastive = hir_contrastive_loss(instruction_logps, negatives)
    mean_entropy = masked_mean(entropy, mask) if entropy is not None else torch.zeros((), device=token_logps.device)
    return (
        supervised + contrastive_coef * contrastive - entropy_coef * mean_entropy,
        supervised,
        contrastive,
        mean_entropy,
    )


# ----------------------------------------------------------------------------- distillation


def distill_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    temperature: float = 1.0,
    direction: str = "forward",
) -> Tensor:
    """Token-level distillation loss (context distillation, Askell et al. 2021; Hinton et al. 2015's
    softened targets), the mean over the masked tokens of the KL between the two next-token
    distributions at each position, over the whole vocabulary:

        p_T = softmax(z_T / tau),  p_S = softmax(z_S / tau)
        forward:  KL(p_T || p_S) = sum_v p_T(v) (log p_T(v) - log p_S(v))   (mass-covering)
        reverse:  KL(p_S || p_T) = sum_v p_S(v) (log p_S(v) - log p_T(v))   (mode-seeking)
        L = sum_t m_t KL_t / sum_t m_t

    Logits are [..., V], the mask [...] (1 on the tokens that count). The teacher's logits are
    detached. Hinton's tau^2 factor is not applied: it only rescales the gradient, as the learning
    rate does.
    """
    if direction not in ("forward", "reverse"):
        raise ValueError(f"unknown KL direction {direction!r} (known: forward, reverse)")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    student = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.detach().to(dtype) / temperature, dim=-1)
    p, log_p, log_q = (teacher.exp(), teacher, student) if direction == "forward" else (student.exp(), student, teacher)
    return masked_mean((p * (log_p - log_q)).sum(-1), mask)


# ----------------------------------------------------------------------------- generative judge


def judge_choice_loss(
    logits: Tensor, right: Tensor, wrong: Tensor, label_prob: Tensor | None = None, lm_coef: float = 0.0
) -> Tensor:
    """Per-example loss of a generative judge at its answer position (where it writes its first token).
    `logits` [N, V]; `right`, `wrong` [N]: the token of the letter the better answer is shown under and
    of the other letter. With z_r, z_w their logits and q the target probability that the right letter
    is the answer (1 for a human label, an API judge's label_prob for a soft one):

        L = -[q log sigmoid(z_r - z_w) + (1 - q) log sigmoid(z_w - z_r)]
            + lm_coef * -[q log p(r) + (1 - q) log p(w)],     p = softmax(logits) over the vocabulary

    The first term is the cross-entropy over the two letters alone, softmax over two being the sigmoid
    of their difference: Bradley-Terry on the letter logits (bradley_terry_loss), and exactly the
    probability the compare stage reads (option log-probs normalised over A and B). It leaves the
    letters' share of the whole vocabulary free; the second term keeps them the judge's likely reply.
    """
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    z_right, z_wrong = z.gather(1, right[:, None])[:, 0], z.gather(1, wrong[:, None])[:, 0]
    loss = bradley_terry_loss(z_right, z_wrong, label_prob=label_prob)
    if lm_coef:
        q = torch.ones_like(z_right) if label_prob is None else label_prob
        normaliser = torch.logsumexp(z, dim=-1)
        loss = loss - lm_coef * (q * (z_right - normaliser) + (1 - q) * (z_wrong - normaliser))
    return loss


# ----------------------------------------------------------------------------- length debiasing


def length_balance_weights(length_diffs: list[float], weights: list[float] | None = None) -> list[float]:
    """Pair weights under which the pairs whose chosen answer is the longer (d_i > 0, d_i = len(chosen)
    - len(rejected)) and those whose chosen answer is the shorter (d_i < 0) carry equal total weight,
    the total kept: with the pairs' own weights w_i (their files', 1 by default),

        W+ = sum_{d_i > 0} w_i,   W- = sum_{d_i < 0} w_i
        w'_i = w_i (W+ + W-) / (2 W+)   if d_i > 0
               w_i (W+ + W-) / (2 W-)   if d_i < 0
               w_i                      if d_i = 0

    so that sum_{d > 0} w' = sum_{d < 0} w' = (W+ + W-) / 2: length alone then predicts no label. With no
    pair on one side there is nothing to balance, and the weights are returned as they are."""
    weights = [1.0] * len(length_diffs) if weights is None else list(weights)
    longer = sum(w for d, w in zip(length_diffs, weights) if d > 0)
    shorter = sum(w for d, w in zip(length_diffs, weights) if d < 0)
    if longer == 0 or shorter == 0:
        return weights
    half = (longer + shorter) / 2
    return [w * half / longer if d > 0 else w * half / shorter if d < 0 else w for d, w in zip(length_diffs, weights)]


def unit_mean(weights: list[float]) -> list[float]:
    """w_i * n / sum_j w_j: the same proportions with mean 1, so that a weighted mean loss keeps its scale."""
    total = sum(weights)
    return [w * len(weights) / total for w in weights]


def pearson_correlation(x: Tensor, y: Tensor, eps: float = 1e-8) -> Tensor:
    """rho(x, y) = sum (x - mean x)(y - mean y) / sqrt(sum (x - mean x)^2 * sum (y - mean y)^2 + eps).
    The eps inside the root keeps the value (0) and its gradient finite when x or y is constant."""
    x, y = x.float() - x.float().mean(), y.float() - y.float().mean()
    return (x * y).sum() / torch.sqrt((x * x).sum() * (y * y).sum() + eps)


def length_correlation(
    preference: Tensor,
    length_diff: Tensor,
    past_preference: Tensor | None = None,
    past_length_diff: Tensor | None = None,
) -> Tensor:
    """rho(s_chosen - s_rejected, len(chosen) - len(rejected)) over a batch of pairs, signed.

    `preference`: the model's score difference per pair (a reward model's r_c - r_r, a judge's logit
    difference z_chosen - z_rejected); `length_diff`: the answers' token-length difference. Zero for
    fewer than two pairs (no correlation to measure).

    With `past_*`, the detached values of the N pairs before this batch of b, rho is measured over all
    N + b and its gradient scaled by (N + b) / b. Pair i of the batch then pulls |rho| with

        sign(rho) * (l~_i - rho s~_i) / (b sigma_s)

    (s~, l~ standardized over the N + b pairs): the batch's own Pearson gradient when there is no past,
    the population rho's per-pair gradient estimated from N + b points instead of b. Over 4 pairs |rho|
    is mostly noise, and its gradient with it."""
    if past_preference is not None and past_preference.numel():
        preference_all = torch.cat([past_preference.to(preference.dtype), preference])
        length_all = torch.cat([past_length_diff.to(length_diff.dtype), length_diff])
    else:
        preference_all, length_all = preference, length_diff
    if preference_all.numel() < 2:
        return preference.sum() * 0.0
    rho = pearson_correlation(preference_all, length_all)
    scale = preference_all.numel() / preference.numel()
    return rho.detach() + scale * (rho - rho.detach())


def length_correlation_penalty(
    preference: Tensor,
    length_diff: Tensor,
    coefficient: float,
    past_preference: Tensor | None = None,
    past_length_diff: Tensor | None = None,
) -> Tensor:
    """The length-decorrelation term (after ODIN, Chen et al. 2024), over a batch of pairs (and the
    pairs before it, `length_correlation`):

        coefficient * |rho(s_chosen - s_rejected, len(chosen) - len(rejected))|"""
    return coefficient * length_correlation(preference, length_diff, past_preference, past_length_diff).abs()


class CorrelationWindow:
    """The detached preference and length differences of the last `size` pairs trained on, the past of
    length_correlation. Not checkpointed: after a resume it refills within size / batch pairs."""

    def __init__(self, size: int):
        self.size = size
        self.preference = torch.empty(0)
        self.length_diff = torch.empty(0)

    def penalty(self, preference: Tensor, length_diff: Tensor, coefficient: float) -> tuple[Tensor, float]:
        """This batch's term over the window and the batch, and the signed correlation it measured (the
        figure to log); then the batch joins the window."""
        rho = length_correlation(
            preference, length_diff, self.preference.to(preference.device), self.length_diff.to(length_diff.device)
        )
        if self.size:
            self.preference = torch.cat([self.preference, preference.detach().float().cpu()])[-self.size :]
            self.length_diff = torch.cat([self.length_diff, length_diff.float().cpu()])[-self.size :]
        return coefficient * rho.abs(), rho.item()


def odin_length_loss(quality: Tensor, length_rewards: Tensor, lengths: Tensor) -> Tensor:
    """ODIN's disentangling term (Chen et al. 2024, eq. 4) over a batch of answers, with the reward
    r = r^Q + r^L of a quality head and a length head trained by the ranking loss:

        L_L = |rho(r^Q, L)| - rho(r^L, L)

    L the answers' token lengths: the quality head is pushed to carry no length, the length head all
    of it."""
    return pearson_correlation(quality, lengths).abs() - pearson_correlation(length_rewards, lengths)


def orthogonality_loss(w_quality: Tensor, w_length: Tensor) -> Tensor:
    """ODIN's orthogonality term (Chen et al. 2024, eq. 5) between the two heads' weight vectors:

        L_O = |w_Q^T w_L|

    so the quality head cannot read the feature direction the length head uses."""
    return (w_quality.float() @ w_length.float()).abs()
