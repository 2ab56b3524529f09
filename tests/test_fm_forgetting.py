"""Forgetting damage, overlap and penalties vs explicit dense float64 quadratic forms.

K-FAC references: ``torch.kron(A, G)`` of the factors stored by a real
``kfac_optim.KFACPreconditioner`` (a Woodbury low-rank G on one layer, a dense G
on a Hugging Face Conv1D head), acting on the column-major ``vec`` of
``dW = [W | b]`` written out per layer type here. Diagonal references: the dense
empirical Fisher of ``fm_reference``. Penalty gradients are compared with
``torch.autograd`` of the explicit quadratic form. Tolerance 1e-12 relative.
"""

import copy

import pytest
import torch
from torch import nn

import fisher_metrics as fm
from tests.fm_reference import (
    DTYPE,
    dense_factors,
    kfac_trained,
    mlp_problem,
    single_thread,  # noqa: F401
)

TOL = 1e-12


class Net(nn.Module):
    """x (B, 6) -> Linear(6, 5) -> tanh -> Conv1D(5 -> 3) (Hugging Face, weight stored (5, 3))."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.fc = nn.Linear(6, 5)
        self.head = Conv1D(3, 5)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(x)))


def kfac_setup(seed=0, policy="hybrid"):
    """Two K-FAC steps; ``"hybrid"``: fc (o = 5) keeps a low-rank G (4 columns), head a dense G."""
    torch.manual_seed(seed)
    return kfac_trained(
        Net().to(DTYPE),
        lambda generator: torch.randn(2, 6, generator=generator, dtype=DTYPE),
        3,
        policy=policy,
        hybrid_min_out=5,
        seed=seed,
    )


def dW(params, name):
    """``[W | b]`` (o, d + 1) of layer ``name`` from parameter tensors (Conv1D stores W^T)."""
    w, b = params[f"{name}.weight"], params[f"{name}.bias"]
    return torch.cat([w if name == "fc" else w.T, b[:, None]], dim=1)


def kron_quadratic(pre, before, after, num_data=1.0, tau=0.0):
    """``{layer: vec(dW)^T [(sqrt(N) A + sqrt(tau) I) (x) (sqrt(N) G + sqrt(tau) I)] vec(dW)}``."""
    out = {}
    for name, entry in pre.state_dict()["layers"].items():
        A, G = dense_factors(entry)
        A = num_data**0.5 * A + tau**0.5 * torch.eye(A.shape[0], dtype=DTYPE)
        G = num_data**0.5 * G + tau**0.5 * torch.eye(G.shape[0], dtype=DTYPE)
        vec = (dW(after, name) - dW(before, name)).T.reshape(-1)  # column-major vec
        out[name] = vec @ torch.kron(A, G) @ vec
    return out


def perturbed(model, scale=0.1, seed=7):
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return other


def params_of(model):
    return dict(model.named_parameters())


def test_kfac_damage_matches_kron():
    model, pre = kfac_setup()
    fa = fm.KFACFisher.from_preconditioner(pre)
    assert fa.factors("fc")["low_rank"] and not fa.factors("head")["low_rank"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    after = perturbed(model)
    expected = kron_quadratic(pre, before, after.state_dict())
    for target in (after, after.state_dict()):
        dmg = fm.forgetting_damage(fa, before=before, after=target)
        assert dmg["per_layer"].keys() == {"fc", "head"}
        for name, value in expected.items():
            assert dmg["per_layer"][name] == pytest.approx(float(value), rel=TOL)
        assert dmg["total"] == pytest.approx(float(sum(expected.values())), rel=TOL)
        assert dmg["expected_loss_increase"] == pytest.approx(dmg["total"] / 2, rel=TOL)
    delta2 = sum(float((params_of(after)[n].detach() - before[n]).square().sum()) for n in before)
    assert dmg["delta_norm"] == pytest.approx(delta2**0.5, rel=TOL)
    assert dmg["normalized"] == pytest.approx(
        dmg["total"] / (delta2 * fa.trace() / fa.num_params), rel=TOL
    )
    assert fm.forgetting_damage(fa, before, model)["total"] == 0.0
    assert fm.forgetting_damage(fa, before, model)["normalized"] == 0.0


def test_kfac_penalties_and_gradients_match_explicit_form():
    model, pre = kfac_setup()
    fa = fm.KFACFisher.from_preconditioner(pre)
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    moved = perturbed(model)
    for penalty, (num_data, tau) in (
        (lambda m: fm.ewc_penalty(fa, anchor, m, strength=3.0), (1.0, 0.0)),
        (lambda m: fm.kfac_laplace_penalty(fa, anchor, m, strength=3.0), (1.0, 0.0)),
        (
            lambda m: fm.kfac_laplace_penalty(
                fa, anchor, m, 3.0, num_data=4.0, prior_precision=0.1
            ),
            (4.0, 0.1),
        ),
    ):
        got = penalty(moved)
        got_grads = torch.autograd.grad(got, list(moved.parameters()))
        explicit = 1.5 * sum(kron_quadratic(pre, anchor, params_of(moved), num_data, tau).values())
        ref_grads = torch.autograd.grad(explicit, list(moved.parameters()))
        assert got.dtype == DTYPE
        assert float(got.detach()) == pytest.approx(float(explicit.detach()), rel=TOL)
        for g, r in zip(got_grads, ref_grads, strict=True):
            assert torch.allclose(g, r, rtol=1e-11, atol=1e-13)


def test_diagonal_damage_and_ewc_gradient_match_dense():
    model, batches, problem = mlp_problem("ce")
    fd = fm.DiagonalFisher.collect(model, batches)
    diag = problem.empirical_fisher().diagonal().detach()
    before = model.state_dict()
    before = {n: t.clone() for n, t in before.items()}
    after = perturbed(model)
    delta = fd.flatten(params_of(after)).detach() - fd.flatten(before)
    dmg = fm.forgetting_damage(fd, before, after)
    assert dmg["total"] == pytest.approx(float(delta @ (diag * delta)), rel=TOL)
    split = problem.split(diag * delta.square())
    assert dmg["per_layer"]["0"] == pytest.approx(
        float(split["0.weight"].sum() + split["0.bias"].sum()), rel=TOL
    )
    n = delta.numel()
    expected = float(delta @ (diag * delta)) / (float(delta @ delta) * float(diag.sum()) / n)
    assert dmg["normalized"] == pytest.approx(expected, rel=TOL)
    penalty = fm.ewc_penalty(fd, before, after, strength=100.0)
    assert float(penalty.detach()) == pytest.approx(50.0 * float(delta @ (diag * delta)), rel=TOL)
    grads = torch.autograd.grad(penalty, list(after.parameters()))
    assert torch.allclose(
        torch.cat([g.reshape(-1) for g in grads]), 100.0 * diag * delta, rtol=1e-12
    )
    # GroupFisher: the same quadratic form with group means
    gf = fd.groups(model)
    assert fm.forgetting_damage(gf, before, after)["total"] == pytest.approx(
        gf.quadratic_form({k: params_of(after)[k].detach() - before[k] for k in gf.param_names}),
        rel=TOL,
    )
    assert fm.ewc_penalty(gf, before, after).requires_grad


def test_damage_is_half_the_loss_increase_of_a_quadratic_loss():
    # Linear regression with centred orthogonal features: the GGN is diagonal and exact,
    # the loss quadratic, so L(after) - L(before) = D / 2 at the least-squares optimum.
    generator = torch.Generator().manual_seed(0)
    ones = torch.ones(20, 1, dtype=DTYPE)
    q, _ = torch.linalg.qr(
        torch.cat([ones, torch.randn(20, 3, generator=generator, dtype=DTYPE)], 1)
    )
    x = q[:, 1:] * torch.tensor([3.0, 2.0, 0.5], dtype=DTYPE)
    y = x @ torch.tensor([[1.0], [-2.0], [0.3]], dtype=DTYPE) + 0.1 * torch.randn(
        20, 1, generator=generator, dtype=DTYPE
    )
    model = nn.Linear(3, 1).to(DTYPE)
    solution = torch.linalg.lstsq(torch.cat([x, ones], 1), y).solution
    with torch.no_grad():
        model.weight.copy_(solution[:3].T)
        model.bias.copy_(solution[3])
    fd = fm.DiagonalFisher.collect(model, (x, y), "ggn")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    after = perturbed(model, scale=0.5)

    def loss(m):
        return float(0.5 * (m(x) - y).square().sum(1).mean().detach())

    dmg = fm.forgetting_damage(fd, before, after)
    assert dmg["expected_loss_increase"] == pytest.approx(loss(after) - loss(model), rel=1e-10)


def test_symmetric_damage_and_overlap():
    model, batches, problem = mlp_problem("ce")
    fa = fm.DiagonalFisher.collect(model, batches[0])
    fb = fm.DiagonalFisher.collect(model, batches[1])
    after = perturbed(model)
    a, b = (fm.forgetting_damage(f, model.state_dict(), after) for f in (fa, fb))
    sym = fm.symmetric_damage(fa, fb, model.state_dict(), after)
    assert sym["total"] == pytest.approx((a["total"] + b["total"]) / 2, rel=TOL)
    assert (sym["task_a"], sym["task_b"]) == (a["total"], b["total"])
    assert sym["per_layer"]["2"] == pytest.approx(
        (a["per_layer"]["2"] + b["per_layer"]["2"]) / 2, rel=TOL
    )
    va, vb = fa.flatten(fa.diagonal()), fb.flatten(fb.diagonal())
    overlap = fm.fisher_overlap(fa, fb)
    assert overlap["overlap"] == pytest.approx(float(va @ vb / (va.norm() * vb.norm())), rel=TOL)
    assert fm.fisher_overlap(fa, fa)["overlap"] == pytest.approx(1.0, rel=TOL)
    assert 0.0 < overlap["per_layer"]["0"] < 1.0
    # K-FAC: cosine of the dense block-diagonal matrices
    model_a, pre_a = kfac_setup(0)
    model_b, pre_b = kfac_setup(3, policy="eig")  # dense G on fc: the mixed low-rank/dense path
    ka, kb = fm.KFACFisher.from_preconditioner(pre_a), fm.KFACFisher.from_preconditioner(pre_b)
    assert ka.factors("fc")["low_rank"] and not kb.factors("fc")["low_rank"]
    blocks_a = {n: torch.kron(*dense_factors(e)) for n, e in pre_a.state_dict()["layers"].items()}
    blocks_b = {n: torch.kron(*dense_factors(e)) for n, e in pre_b.state_dict()["layers"].items()}
    got = fm.fisher_overlap(ka, kb)
    for name in ("fc", "head"):
        a_, b_ = blocks_a[name], blocks_b[name]
        assert got["per_layer"][name] == pytest.approx(
            float((a_ * b_).sum() / (a_.norm() * b_.norm())), rel=1e-10
        )
    inner = sum(float((blocks_a[n] * blocks_b[n]).sum()) for n in blocks_a)
    norms = (
        sum(float(blocks_a[n].square().sum()) for n in blocks_a)
        * sum(float(blocks_b[n].square().sum()) for n in blocks_b)
    ) ** 0.5
    assert got["overlap"] == pytest.approx(inner / norms, rel=1e-10)
    assert fm.fisher_overlap(ka, ka)["overlap"] == pytest.approx(1.0, rel=1e-10)


def test_online_ewc_accumulates_and_moves_the_anchor():
    model, batches, _ = mlp_problem("ce")
    f1 = fm.DiagonalFisher.collect(model, batches[0])
    theta1 = {n: p.detach().clone() for n, p in model.named_parameters()}
    model2 = perturbed(model, seed=1)
    f2 = fm.DiagonalFisher.collect(model2, batches[1])
    online = fm.OnlineEWC(gamma=0.5, strength=10.0)
    online.consolidate(f1, theta1)
    online.consolidate(f2, model2)
    assert online.tasks == 2
    running = {n: 0.5 * f1.values[n] + f2.values[n] for n in f1.values}
    model3 = perturbed(model2, seed=2)
    penalty = online.penalty(model3)
    explicit = 5.0 * sum(
        (running[n] * (p - params_of(model2)[n].detach()).square()).sum()
        for n, p in model3.named_parameters()
    )
    assert float(penalty.detach()) == pytest.approx(float(explicit.detach()), rel=TOL)
    got = torch.autograd.grad(penalty, list(model3.parameters()))
    ref = torch.autograd.grad(explicit, list(model3.parameters()))
    for g, r in zip(got, ref, strict=True):
        assert torch.allclose(g, r, rtol=1e-12)


def test_bad_arguments():
    model, batches, _ = mlp_problem("ce")
    fd = fm.DiagonalFisher.collect(model, batches)
    with pytest.raises(TypeError, match="fisher must be a FisherRepresentation"):
        fm.forgetting_damage({"0.weight": 1}, model, model)
    with pytest.raises(ValueError, match="after lacks"):
        fm.forgetting_damage(fd, model, {"0.weight": torch.zeros(5, 6, dtype=DTYPE)})
    with pytest.raises(ValueError, match=r"before\['0.bias'\] has shape"):
        fm.forgetting_damage(fd, dict(model.state_dict(), **{"0.bias": torch.zeros(2)}), model)
    with pytest.raises(TypeError, match="before must be"):
        fm.forgetting_damage(fd, [1, 2], model)
    with pytest.raises(ValueError, match="strength"):
        fm.ewc_penalty(fd, model, model, strength=-1.0)
    with pytest.raises(TypeError, match="fisher must be a KFACFisher"):
        fm.kfac_laplace_penalty(fd, model, model)
    _, pre = kfac_setup()
    fa = fm.KFACFisher.from_preconditioner(pre)
    with pytest.raises(ValueError, match="num_data"):
        fm.kfac_laplace_penalty(fa, pre.model, pre.model, num_data=0.0)
    with pytest.raises(TypeError, match="fisher_overlap needs"):
        fm.fisher_overlap(fd, fa)
    with pytest.raises(ValueError, match="same parameters"):
        fm.symmetric_damage(
            fd, fm.DiagonalFisher.collect(model, batches, params="0.weight"), model, model
        )
    with pytest.raises(ValueError, match="gamma must lie"):
        fm.OnlineEWC(gamma=1.5)
    with pytest.raises(ValueError, match="consolidate first"):
        fm.OnlineEWC().penalty(model)
    with pytest.raises(TypeError, match="OnlineEWC needs a diagonal"):
        fm.OnlineEWC().consolidate(fa, pre.model)
