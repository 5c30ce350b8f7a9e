"""Each preference loss equals its paper's formula, computed here by hand in plain Python on made-up
log-probabilities (no torch in the expected values)."""

from __future__ import annotations

import math

import pytest
import torch

from qlorakit.train.objectives.losses import dpo_losses, kto_losses, log1m_exp, orpo_losses, simpo_losses

CHOSEN, REJECTED = [-12.0, -30.5, -4.25], [-15.0, -28.0, -9.0]
REF_CHOSEN, REF_REJECTED = [-13.0, -29.0, -5.0], [-14.0, -29.5, -8.0]


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def t(xs):
    return torch.tensor(xs, dtype=torch.float64)


def margins() -> list[float]:
    return [(c - rc) - (r - rr) for c, r, rc, rr in zip(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED)]


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_dpo_sigmoid_and_cdpo(eps):
    beta = 0.1
    losses, rw, rl = dpo_losses(t(CHOSEN), t(REJECTED), t(REF_CHOSEN), t(REF_REJECTED), beta=beta,
                                label_smoothing=eps)
    want = [-(1 - eps) * logsig(beta * h) - eps * logsig(-beta * h) for h in margins()]
    assert losses.tolist() == pytest.approx(want, abs=1e-12)
    assert rw.tolist() == pytest.approx([beta * (c - r) for c, r in zip(CHOSEN, REF_CHOSEN)])
    assert rl.tolist() == pytest.approx([beta * (c - r) for c, r in zip(REJECTED, REF_REJECTED)])
    if eps:  # label smoothing changes the loss (the twin that ignores it is caught)
        plain = dpo_losses(t(CHOSEN), t(REJECTED), t(REF_CHOSEN), t(REF_REJECTED), beta=beta)[0]
        assert not torch.allclose(plain, losses)


def test_dpo_at_the_reference_is_ln2():
    x = t(CHOSEN)
    losses, rw, rl = dpo_losses(x, t(REJECTED), x, t(REJECTED))
    assert losses.tolist() == pytest.approx([math.log(2)] * 3) and not rw.any() and not rl.any()


def test_robust_dpo():
    beta, eps = 0.1, 0.1
    losses = dpo_losses(t(CHOSEN), t(REJECTED), t(REF_CHOSEN), t(REF_REJECTED), beta=beta, loss_type="robust",
                        label_smoothing=eps)[0]
    want = [(-(1 - eps) * logsig(beta * h) + eps * logsig(-beta * h)) / (1 - 2 * eps) for h in margins()]
    assert losses.tolist() == pytest.approx(want, abs=1e-12)


def test_ipo():
    beta = 0.1
    losses = dpo_losses(t(CHOSEN), t(REJECTED), t(REF_CHOSEN), t(REF_REJECTED), beta=beta, loss_type="ipo")[0]
    assert losses.tolist() == pytest.approx([(h - 1 / (2 * beta)) ** 2 for h in margins()], abs=1e-12)


def test_orpo_with_a_stable_log_one_minus_p():
    lam = 0.1
    cm, rm = [-0.5, -2.0, -1e-9], [-1.5, -0.25, -3.0]  # token-averaged log-probabilities; one p within 1e-9 of 1
    losses, rw, rl = orpo_losses(t(cm), t(rm), lam=lam)

    def log_odds(lp):
        return lp - math.log(-math.expm1(lp))

    want = [-c + -lam * logsig(log_odds(c) - log_odds(r)) for c, r in zip(cm, rm)]
    assert losses.tolist() == pytest.approx(want, rel=1e-9)
    assert rw.tolist() == pytest.approx([lam * c for c in cm])
    # The naive log(1 - exp(logp)) in float32 rounds 1 - p to 0 near p = 1 and gives inf; the stable form does not.
    near_one = torch.tensor([-1e-9], dtype=torch.float32)
    assert torch.isinf(torch.log(1 - torch.exp(near_one))).all()
    assert torch.isfinite(log1m_exp(near_one)).all()
    assert float(log1m_exp(near_one)) == pytest.approx(math.log(1e-9), rel=1e-4)


def test_simpo():
    beta, gamma = 2.0, 1.0
    cm, rm = [-0.8, -1.6], [-1.1, -0.9]
    losses, rw, rl = simpo_losses(t(cm), t(rm), beta=beta, gamma=gamma)
    assert losses.tolist() == pytest.approx([-logsig(beta * c - beta * r - gamma) for c, r in zip(cm, rm)])
    assert rw.tolist() == pytest.approx([beta * c for c in cm])


def test_kto_with_its_kl_term():
    beta, wd, wu = 0.1, 1.0, 1.5
    logps, refs, desirable = [-10.0, -20.0, -7.0], [-11.0, -18.0, -7.5], [True, False, False]
    kl_pol, kl_ref = [-30.0, -25.0, -28.0], [-31.0, -26.5, -27.0]  # mismatched prompt/completion pairs
    kl = max(sum(p - r for p, r in zip(kl_pol, kl_ref)) / 3, 0.0)
    losses, rewards = kto_losses(t(logps), t(refs), torch.tensor(desirable), torch.tensor(kl, dtype=torch.float64),
                                 beta=beta, desirable_weight=wd, undesirable_weight=wu)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    want = [wd * (1 - sig(beta * ((p - r) - kl))) if d else wu * (1 - sig(beta * (kl - (p - r))))
            for p, r, d in zip(logps, refs, desirable)]
    assert losses.tolist() == pytest.approx(want, abs=1e-12)
    assert rewards.tolist() == pytest.approx([beta * (p - r) for p, r in zip(logps, refs)])
    # A negative KL estimate is clamped to 0 (the reference point is a KL divergence).
    assert torch.equal(kto_losses(t(logps), t(refs), torch.tensor(desirable), t(-5.0), beta=beta)[0],
                       kto_losses(t(logps), t(refs), torch.tensor(desirable), t(0.0), beta=beta)[0])


def test_a_key_the_method_ignores_is_an_error_naming_both():
    from qlorakit.config import ConfigError, build_config

    with pytest.raises(ConfigError, match=r"simpo_gamma: method dpo does not use it.*\(simpo\)"):
        build_config(["--method", "dpo", "--simpo_gamma", "2"])
    with pytest.raises(ConfigError, match=r"label_smoothing: method sft does not use it.*\(dpo\)"):
        build_config(["--label_smoothing", "0.1"])
    with pytest.raises(ConfigError, match="loss_type robust: needs label_smoothing > 0"):
        build_config(["--method", "dpo", "--loss_type", "robust"])
    cfg = build_config(["--method", "simpo"])
    from qlorakit.config_methods import method_beta

    assert (method_beta(cfg), method_beta(build_config(["--method", "dpo"]))) == (2.0, 0.1)


def test_rpo_adds_each_pairs_chosen_nll_over_its_length(monkeypatch):
    """rpo_alpha adds alpha * -log pi(y_w) / |y_w| to each pair's DPO loss. Chosen completions of different lengths
    tell the per-pair normalization from a batch-wide token mean (TRL's) and from an unnormalized sum."""
    from qlorakit.train.objectives import preference
    from qlorakit.train.objectives.losses import rpo_nll

    sums = t([-6.0, -30.0, -2.0, -9.0])  # chosen, rejected of pair 1, then of pair 2
    counts = t([3.0, 5.0, 8.0, 2.0])
    monkeypatch.setattr(preference, "sequence_logps", lambda model, batch, device: (sums, counts))
    batch = {"pref_ref": t([[-5.0, -29.0], [-2.5, -8.0]])}
    plain = preference.Pairs("dpo", beta=0.1).loss(None, batch, torch.device("cpu"))[0]
    rpo = preference.Pairs("dpo", beta=0.1, rpo_alpha=0.5).loss(None, batch, torch.device("cpu"))[0]
    assert float(rpo - plain) == pytest.approx(0.5 * (6.0 / 3 + 2.0 / 8))
    assert rpo_nll(t([-6.0, -2.0]), t([3.0, 8.0])).tolist() == pytest.approx([2.0, 0.25])
    assert float(rpo - plain) != pytest.approx(0.5 * (6.0 + 2.0) / (3 + 8) * 2)  # the batch token mean differs


def test_rpo_alpha_is_a_dpo_key():
    from qlorakit.config import ConfigError, build_config

    assert build_config(["--method", "dpo", "--rpo_alpha", "1"]).rpo_alpha == 1.0
    with pytest.raises(ConfigError, match=r"rpo_alpha: method orpo does not use it.*\(dpo\)"):
        build_config(["--method", "orpo", "--rpo_alpha", "1"])
    with pytest.raises(ConfigError, match=r"rpo_alpha: must be >= 0"):
        build_config(["--method", "dpo", "--rpo_alpha", "-1"])
