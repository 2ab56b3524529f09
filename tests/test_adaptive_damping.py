"""Adaptive (Levenberg-Marquardt) damping, Martens & Grosse 2015 Sec. 6.5 (kfac_optim.damping).

References are built here in float64: the quadratic model M(delta) from an explicit
``torch.kron(A, G)`` and the flattened step (column-major vec of the weight matrix, bias
the last column). Tolerances: float64 round-off, 1e-10 relative on M and rho; exact
equality (same operations in the same order) for resume.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfac_optim import KFAC
from kfac_optim.damping import LM_DECAY, LevenbergMarquardt

LM = "levenberg_marquardt"
TOL = dict(rtol=1e-10, atol=1e-14)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def batch(step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10 + step)
    return torch.randn(32, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (32,),
                                                                              generator=g)


def closure_for(opt, model, x, y):
    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return closure


def vec(d: torch.Tensor) -> torch.Tensor:
    """Column-major vec: vec(G D A) = (A (x) G) vec(D) for symmetric A."""
    return d.t().reshape(-1)


def dense_quadratic(layers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> float:
    """sum over layers of vec(D)^T kron(A, G) vec(D), A given dense (d, d)."""
    total = 0.0
    for d, a, g in layers:
        v = vec(d.double())
        total += float(v @ torch.kron(a.double(), g.double()) @ v)
    return total


def linear_step(layer: nn.Linear, delta: dict) -> torch.Tensor:
    return torch.cat([delta[layer.weight], delta[layer.bias][:, None]], dim=1)


def reference_model(opt, model, before, grads, damping) -> float:
    """M(delta) from the parameters before and now, the raw gradients and the factors."""
    delta = {p: p.detach() - before[p] for p in model.parameters()}
    linear = sum(float((grads[p] * delta[p]).sum()) for p in model.parameters())
    squares = sum(float(delta[p].square().sum()) for p in model.parameters())
    views = opt.preconditioner.layers
    quad = dense_quadratic([(linear_step(model[i], delta), views[str(i)].A, views[str(i)].G)
                            for i in (0, 2)])
    return linear + 0.5 * (quad + damping * squares)


class ScriptedLoss:
    """A closure whose second call (the re-evaluation after the update) returns
    ``h(theta) + rho * M_ref(delta)``: the ratio the rule must see is ``rho``, exactly when
    KFAC's M(delta) equals the dense reference."""

    def __init__(self, opt, model, x, y, rho):
        self.opt, self.model, self.x, self.y, self.rho = opt, model, x, y, rho
        self.calls, self.models = 0, []

    def __call__(self):
        self.opt.zero_grad()
        loss = F.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        self.calls += 1
        if self.calls % 2 == 1:  # h(theta): remember the point and its gradient
            self.h = float(loss.detach())
            self.before = {p: p.detach().clone() for p in self.model.parameters()}
            self.grads = {p: p.grad.clone() for p in self.model.parameters()}
            self.damping = self.opt.param_groups[0]["damping"]
            return loss
        m = reference_model(self.opt, self.model, self.before, self.grads, self.damping)
        self.models.append(m)
        return torch.tensor(self.h + self.rho * m, dtype=torch.float64)


@pytest.mark.parametrize("rho, factor", [(0.9, LM_DECAY), (0.5, 1.0), (0.1, 1 / LM_DECAY),
                                         (-2.0, 1 / LM_DECAY)])
def test_rule_moves_damping_by_omega(rho, factor):
    """rho > 3/4: lambda * omega; in between: unchanged; rho < 1/4: lambda / omega (T1 = 1,
    omega = 19/20), with KFAC's M(delta) equal to the dense reference."""
    model = mlp()
    x, y = batch()
    opt = KFAC(model, lr=0.05, damping=1e-2, damping_adaptation=LM, damping_adaptation_steps=1,
               factor_update_steps=1, inv_update_steps=1)
    closure = ScriptedLoss(opt, model, x, y, rho)
    damping = 1e-2
    for _ in range(3):
        opt.step(closure)
        assert closure.models[-1] < 0  # a descent step of the model
        assert opt.damping_adaptation.rho == pytest.approx(rho, rel=1e-9)
        damping *= factor
        assert opt.param_groups[0]["damping"] == pytest.approx(damping, rel=1e-12)
        assert opt.preconditioner.describe()[0]["rho"] == opt.damping_adaptation.rho
    assert closure.calls == 6
    # the next step's preconditioner used the adapted value
    assert opt.preconditioner.last_step.damping == pytest.approx(damping / factor, rel=1e-12)


def test_interval_and_omega():
    """T1 = 3: adapted at the 3rd, 6th, ... step only, by omega = (19/20)^3."""
    model = mlp()
    x, y = batch()
    opt = KFAC(model, lr=0.05, damping=1e-2, damping_adaptation=LM, damping_adaptation_steps=3,
               factor_update_steps=1, inv_update_steps=1)
    closure = ScriptedLoss(opt, model, x, y, 0.9)
    seen = []
    for _ in range(6):
        opt.step(closure)
        seen.append(opt.param_groups[0]["damping"])
    omega = (19 / 20) ** 3
    assert opt.damping_adaptation.omega == pytest.approx(omega, rel=1e-15)
    want = [1e-2, 1e-2, 1e-2 * omega, 1e-2 * omega, 1e-2 * omega, 1e-2 * omega**2]
    assert seen == pytest.approx(want, rel=1e-12)
    assert closure.calls == 6 + 2  # one re-evaluation per adaptation step
    assert opt.damping_adaptation.lowered == 2 and opt.damping_adaptation.raised == 0


def test_clamped_into_range():
    model = mlp()
    x, y = batch()
    opt = KFAC(model, lr=0.05, damping=1e-2, damping_adaptation=LM, damping_adaptation_steps=1,
               damping_max=1.05e-2, factor_update_steps=1)
    closure = ScriptedLoss(opt, model, x, y, 0.0)
    for _ in range(3):
        opt.step(closure)
    assert opt.param_groups[0]["damping"] == 1.05e-2


def test_nonfinite_loss_raises_damping():
    """h(theta + delta) = inf counts as rho = -inf: lambda / omega, nothing non-finite."""
    model = mlp()
    x, y = batch()
    opt = KFAC(model, lr=0.05, damping=1e-2, damping_adaptation=LM, damping_adaptation_steps=1)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss if len(calls) % 2 else torch.tensor(math.inf)

    opt.step(closure)
    assert opt.damping_adaptation.rho == -math.inf
    assert opt.param_groups[0]["damping"] == pytest.approx(1e-2 / LM_DECAY, rel=1e-12)


def test_ratio_edge_cases():
    lm = LevenbergMarquardt(1)
    assert lm.ratio(1.0, 0.5, -1.0) == 0.5
    assert math.isnan(lm.ratio(1.0, 0.5, 0.0))  # M(delta) = 0: a zero step
    assert math.isnan(lm.ratio(1.0, 0.5, math.nan))
    assert lm.adjust(1e-2, math.nan) == 1e-2  # undefined: unchanged
    assert lm.ratio(1.0, 0.5, 0.3) == -math.inf  # the damped model predicts an increase
    assert lm.ratio(1.0, math.nan, -1.0) == -math.inf
    assert lm.adjust(1e-2, -math.inf) == pytest.approx(1e-2 / LM_DECAY, rel=1e-15)


@pytest.mark.parametrize("policy", ["eig", "woodbury"])
def test_curvature_quadratic_dense_reference(policy):
    """delta^T F delta over Linear (bias column), Conv2d (im2col matrix), Embedding
    (diagonal A, transposed matrix) and a low-rank G (woodbury), against kron(A, G)."""
    torch.manual_seed(1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(6, 4)
            self.conv = nn.Conv2d(2, 3, 2)
            self.lin = nn.Linear(4 + 3 * 4, 5)

        def forward(self, ids, img):
            h = torch.cat([self.emb(ids).mean(1), self.conv(img).flatten(1)], dim=1)
            return self.lin(torch.tanh(h))

    net = Net().double()
    ids = torch.randint(0, 6, (8, 3))
    img = torch.randn(8, 2, 3, 3, dtype=torch.float64)
    y = torch.randint(0, 5, (8,))
    opt = KFAC(net, lr=0.1, kl_clip=None, inverse_policy=policy, factor_update_steps=1)
    opt.zero_grad()
    F.cross_entropy(net(ids, img), y).backward()
    opt.step()
    pre = opt.preconditioner
    assert pre.layers["lin"].low_rank == (policy == "woodbury")
    delta = {p: torch.randn_like(p) for p in net.parameters()}
    got = float(pre.curvature_quadratic(lambda p: delta.get(p)))
    views = pre.layers
    conv_d = torch.cat([delta[net.conv.weight].reshape(3, -1), delta[net.conv.bias][:, None]], 1)
    want = dense_quadratic([
        (linear_step(net.lin, delta), views["lin"].A, views["lin"].G),
        (conv_d, views["conv"].A, views["conv"].G),
        (delta[net.emb.weight].t(), torch.diag(views["emb"].A), views["emb"].G),
    ])
    assert got == pytest.approx(want, rel=1e-10)
    assert got > 0


def test_resume_reproduces_uninterrupted_run():
    def build(model):
        return KFAC(model, lr=0.1, damping=3e-2, damping_adaptation=LM,
                    damping_adaptation_steps=2, factor_update_steps=1, inv_update_steps=3)

    def run(model, opt, steps):
        for s in steps:
            opt.step(closure_for(opt, model, *batch(s)))

    model = mlp()
    opt = build(model)
    run(model, opt, range(10))
    half_model = mlp()
    half = build(half_model)
    run(half_model, half, range(5))
    saved = copy.deepcopy(half.state_dict())
    assert saved["damping_adaptation"]["steps"] == 5
    resumed_model = mlp()
    resumed_model.load_state_dict(half_model.state_dict())
    resumed = build(resumed_model)
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["damping"] == half.param_groups[0]["damping"]
    run(resumed_model, resumed, range(5, 10))
    for p, q in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(p, q)
    assert resumed.param_groups[0]["damping"] == opt.param_groups[0]["damping"]
    assert resumed.damping_adaptation.state_dict() == opt.damping_adaptation.state_dict()
    assert opt.damping_adaptation.raised + opt.damping_adaptation.lowered == 5


def test_state_dict_plain_right_after_construction():
    opt = KFAC(mlp(), lr=0.1, damping_adaptation=LM)
    state = opt.state_dict()["damping_adaptation"]
    assert all(v is None or isinstance(v, (int, float)) for v in state.values())


def test_no_closure_error_names_the_option():
    model = mlp()
    x, y = batch()
    opt = KFAC(model, lr=0.1, damping_adaptation=LM)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="damping_adaptation.*step\\(closure\\)"):
        opt.step()


def test_closure_must_return_the_loss():
    model = mlp()
    x, y = batch()
    opt = KFAC(model, lr=0.1, damping_adaptation=LM, damping_adaptation_steps=1)

    def closure():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()

    with pytest.raises(TypeError, match="closure must return the loss"):
        opt.step(closure)


@pytest.mark.parametrize("kwargs, match", [
    (dict(damping_adaptation="lm"), "damping_adaptation='lm' is not accepted"),
    (dict(damping_adaptation=LM, damping_adaptation_steps=0), "damping_adaptation_steps"),
    (dict(damping_adaptation=LM, damping_min=1.0, damping_max=0.1), "damping_min=1.0 must be"),
    (dict(damping_adaptation=LM, damping=20.0), "must lie in \\[damping_min, damping_max\\]"),
    (dict(damping_adaptation=LM, damping_min=0.0), "damping_min must be > 0"),
    (dict(damping_adaptation=LM, loss_reduction="sum"), "loss_reduction='mean'"),
    (dict(damping_adaptation=LM, woodbury_reduction="row_sharded"),
     "woodbury_reduction='gather'"),
    (dict(damping_adaptation=LM, damping_scale="relative"), "damping_scale='absolute'"),
])
def test_refusals(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        KFAC(mlp(), lr=0.1, **kwargs)


@pytest.mark.parametrize("damping, lr", [(1e-1, 1.0), (1e-2, 0.5)])
def test_short_run_does_not_diverge(damping, lr):
    """60 full-batch steps on a 4-class problem, without KL clip: the loss stays finite and
    falls by 100x (the fixed-damping run of the same settings reaches 7e-3 and 1.6e-3; the
    adaptive one about half of that, measured), the damping moves and stays in range."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 4))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 10, generator=g)
    y = (x[:, :4] * 3).argmax(1)
    opt = KFAC(model, lr=lr, momentum=0.0, base="sgd", damping=damping, kl_clip=None,
               damping_adaptation=LM, damping_adaptation_steps=2,
               factor_update_steps=1, inv_update_steps=2)
    closure = closure_for(opt, model, x, y)
    losses = [float(opt.step(closure).detach()) for _ in range(60)]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.01 * losses[0]
    lm = opt.damping_adaptation
    assert lm.lowered > 0
    assert lm.damping_min <= opt.param_groups[0]["damping"] < damping


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    from tests.launch import TORCHRUN_2, launch

    out = tmp_path_factory.mktemp("damping") / "results.json"
    return launch(TORCHRUN_2, Path(__file__).with_name("damping_worker.py"), [str(out)], out)


@pytest.mark.parametrize("placement", ["replicate", "owner"])
def test_two_ranks_same_rho_as_single_process(two_ranks, placement):
    """DDP, each rank half of every batch: the closure's losses are averaged over ranks, so
    rho and the damping are the same on both ranks (exactly) and equal the single-process
    run on the whole batch (float64 round-off: 1e-9 relative; parameters 1e-10). In owner
    mode delta^T F delta is summed over the layers' owners."""
    r = two_ranks[placement]
    assert r["ranks"][0] == r["ranks"][1]
    assert all(math.isfinite(v) for v in r["reference"]["rho"])
    assert len(set(r["reference"]["damping"])) > 1  # the damping moved
    assert r["max_rho_rel"] < 1e-9
    assert r["ranks"][0]["damping"] == pytest.approx(r["reference"]["damping"], rel=1e-12)
    assert r["max_param_diff"] < 1e-10


def test_reevaluation_feeds_no_statistics():
    """The second closure call (h(theta + delta)) runs with capture off: nothing pending for
    the next factor update, and the factors equal those of a run without adaptation."""
    x, y = batch()
    runs = []
    for adaptation in (LM, None):
        model = mlp()
        opt = KFAC(model, lr=0.05, damping=1e-2, damping_adaptation=adaptation,
                   damping_adaptation_steps=1, factor_update_steps=1)
        opt.step(closure_for(opt, model, x, y))
        assert not any(view.pending for view in opt.preconditioner.layers.values())
        runs.append(opt.preconditioner.layers)
    for name in ("0", "2"):
        assert torch.equal(runs[0][name].A, runs[1][name].A)
        assert torch.equal(runs[0][name].G, runs[1][name].G)


def test_refused_construction_leaves_no_hooks():
    model = mlp()
    with pytest.raises(ValueError, match="loss_reduction"):
        KFAC(model, lr=0.1, damping_adaptation=LM, loss_reduction="sum")
    assert all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
               for m in model.modules())
