"""Inverse policies (eig / woodbury / auto / hybrid), storage policies, robust numerics.

All policies must give the same preconditioned gradient on the same factors: compared in
float64 at rtol=1e-7 (solver tolerance), and against dense references built here.
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfac_optim import KFAC, KFACPreconditioner
from kfac_optim.distributed import row_range
from kfac_optim.factors import LowRankFactor, choose_store_device
from kfac_optim.inverse import (
    eigh_psd,
    precondition_woodbury_exact,
    precondition_woodbury_factored,
    robust_cholesky,
    woodbury_solve,
)
from tests.kfac_reference import factors, grad_matrix, kron_exact, linear_rows, probe_layer

TOL = dict(rtol=1e-7, atol=1e-9)


class Net(nn.Module):
    """A wide layer (o=40 > T=8 rows per batch) and a narrow one (o=5 < T)."""

    def __init__(self):
        super().__init__()
        self.wide = nn.Linear(6, 40)
        self.narrow = nn.Linear(40, 5)

    def forward(self, x):
        return self.narrow(torch.tanh(self.wide(x)))


def _batches(n=4, rows=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, 6, generator=g, dtype=torch.float64),
             torch.randint(0, 5, (rows,), generator=g)) for _ in range(n)]


def _run_policy(policy, damping_mode, batches, **kw):
    torch.manual_seed(0)
    model = Net().double()
    pre = KFACPreconditioner(model, damping=1e-2, damping_mode=damping_mode, factor_decay=0.7,
                             factor_update_steps=1, inv_update_steps=1, kl_clip=None,
                             inverse_policy=policy, hybrid_min_out=20, **kw)
    out = []
    for x, y in batches:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pre.step()
        out.append([p.grad.clone() for p in model.parameters()])
    return out, pre


@pytest.mark.parametrize("damping_mode", ["exact", "factored"])
@pytest.mark.parametrize("policy", ["woodbury", "auto", "hybrid"])
def test_policies_match_eig_over_several_steps(policy, damping_mode):
    batches = _batches()
    ref, _ = _run_policy("eig", damping_mode, batches)
    got, pre = _run_policy(policy, damping_mode, batches, auto_rho=1.0)  # auto: k <= o stays
    for step_ref, step_got in zip(ref, got, strict=True):
        for r, g in zip(step_ref, step_got, strict=True):
            torch.testing.assert_close(g, r, **TOL)
    rows = {r["layer"]: r for r in pre.describe()}
    assert rows["wide"]["policy"] == "woodbury"  # 4 updates x 8 rows = 32 columns <= 40
    expected_narrow = "woodbury" if policy == "woodbury" else "eig"  # auto: 8 > rho * 5
    assert rows["narrow"]["policy"] == expected_narrow
    assert rows["wide"]["rank"] == 32


def test_woodbury_solve_matches_explicit_inverse():
    torch.manual_seed(0)
    u, v, mu = torch.randn(30, 7, dtype=torch.float64), torch.randn(30, 4, dtype=torch.float64), 0.3
    gram = u.T @ u + mu * torch.eye(7, dtype=torch.float64)
    got = woodbury_solve(u, robust_cholesky(gram), v, mu)
    ref = torch.linalg.solve(u @ u.T + mu * torch.eye(30, dtype=torch.float64), v)
    torch.testing.assert_close(got, ref, **TOL)


def test_singular_gram_cholesky_backoff_matches_pinv():
    """Duplicate columns make U^T U singular: with no damping the solve falls back on jitter
    (or the pseudo-inverse) and matches the pseudo-inverse solution for a consistent rhs."""
    torch.manual_seed(0)
    u = torch.randn(20, 3, dtype=torch.float64)
    u = torch.cat([u, u[:, :2]], 1)  # rank 3, 5 columns
    gram = u.T @ u
    rhs = u.T @ torch.randn(20, 2, dtype=torch.float64)
    method, factor, jitter = robust_cholesky(gram)
    assert method == "pinv" or jitter > 0
    got = torch.cholesky_solve(rhs, factor) if method == "cholesky" else factor @ rhs
    ref = torch.linalg.pinv(gram, hermitian=True) @ rhs
    torch.testing.assert_close(u @ got, u @ ref, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("damping_mode", ["exact", "factored"])
def test_duplicate_token_batch_does_not_crash_and_matches_eig(damping_mode):
    x, y = _batches(1)[0]
    dup = [(torch.cat([x[:4], x[:4]]), torch.cat([y[:4], y[:4]]))]
    ref, _ = _run_policy("eig", damping_mode, dup)
    got, _ = _run_policy("woodbury", damping_mode, dup)
    for r, g in zip(ref[0], got[0], strict=True):
        torch.testing.assert_close(g, r, **TOL)


def test_woodbury_rank_limit_falls_back_to_dense_and_says_so(caplog):
    batches = _batches()
    ref, _ = _run_policy("eig", "exact", batches)
    with caplog.at_level(logging.INFO, logger="kfac_optim"):
        got, pre = _run_policy("woodbury", "exact", batches, woodbury_max_rank=20)
    assert any("switching to a dense G" in r.message for r in caplog.records)
    assert {r["layer"]: r["policy"] for r in pre.describe()}["wide"] == "eig"
    for r, g in zip(ref[-1], got[-1], strict=True):
        torch.testing.assert_close(g, r, **TOL)


def _top_r(m, r):
    """Best rank-r approximation of a symmetric PSD matrix (dense float64 eigh)."""
    s, q = torch.linalg.eigh(m)
    return (q[:, -r:] * s[-r:]) @ q[:, -r:].T, 1 - float(s[-r:].sum() / s.sum())


def test_truncated_low_rank_factor_matches_dense_recursion():
    """LowRankFactor.truncate keeps G_t = top_r(decay G_{t-1} + (1 - decay) G_batch)."""
    from kfac_optim.factors import LowRankFactor

    g = torch.Generator().manual_seed(0)
    decay, r, weight = 0.8, 6, 0.0
    lr = LowRankFactor()
    ref = torch.zeros(30, 30, dtype=torch.float64)
    for _ in range(4):
        rows = torch.randn(5, 30, generator=g, dtype=torch.float64)
        lr.add(rows, 5.0)
        lr.update(lr.take_batch(), decay)
        ref, dropped_ref = _top_r(decay * ref + (1 - decay) * rows.T @ rows / 5, r)
        weight = decay * weight + (1 - decay)
        dropped = lr.truncate(r)
        assert lr.rank == min(r, lr.rank)
        torch.testing.assert_close(lr.value(), ref / weight, rtol=1e-9, atol=1e-12)
        if lr.updates > 1:  # the first block has rank 5 < r: nothing to drop
            assert dropped == pytest.approx(dropped_ref, rel=1e-9)


def test_truncation_is_lossless_when_the_stack_fits_the_rank():
    """The same batch every step: the stack has rank 8, so woodbury_rank=8 drops nothing and
    all steps match the eig policy (rtol 1e-7)."""
    batches = _batches(1) * 4
    for mode in ("exact", "factored"):
        ref, _ = _run_policy("eig", mode, batches)
        got, pre = _run_policy("woodbury", mode, batches, woodbury_rank=8)
        for step_ref, step_got in zip(ref, got, strict=True):
            for r, g in zip(step_ref, step_got, strict=True):
                torch.testing.assert_close(g, r, **TOL)
        row = {r["layer"]: r for r in pre.describe()}["wide"]
        assert row["rank"] == 8 and row["dropped_G"] < 1e-12


def test_truncated_auto_stays_woodbury_and_matches_dense_reference():
    """auto with rho 0.75 would turn the wide layer (o=40, 4 x 8 columns) dense; with
    woodbury_rank=12 it stays low rank, and each step's preconditioned gradient equals the
    explicit Kronecker solve with the truncated G recursion built here from the batch Gs."""
    batches, decay, r, lam = _batches(), 0.7, 12, 1e-2
    torch.manual_seed(0)
    model = Net().double()
    pre = KFACPreconditioner(model, damping_mode="exact", damping=lam, factor_decay=decay,
                             factor_update_steps=1,
                             inv_update_steps=1, kl_clip=None, inverse_policy="auto",
                             woodbury_rank=r)
    ref_g, weight = torch.zeros(40, 40, dtype=torch.float64), 0.0
    for x, y in batches:
        # Output gradients of the wide layer, outside the model (its hooks would capture).
        w1, b1, w2, b2 = (p.detach() for p in model.parameters())
        h = F.linear(x, w1, b1).requires_grad_()
        (gh,) = torch.autograd.grad(
            F.cross_entropy(F.linear(torch.tanh(h), w2, b2), y, reduction="sum"), h)
        g_batch = gh.T @ gh / len(x)  # G = (1/N) sum g g^T, g of the summed loss
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        v = grad_matrix(model.wide.weight, model.wide.bias)
        pre.step()
        ref_g, _ = _top_r(decay * ref_g + (1 - decay) * g_batch, r)
        weight = decay * weight + (1 - decay)
        layer = pre.layers["wide"]
        assert layer.low_rank and layer.rank == min(r, 8 * layer.factor_updates)
        want = kron_exact(v, layer.A, ref_g / weight, lam)
        torch.testing.assert_close(grad_matrix(model.wide.weight, model.wide.bias), want,
                                   rtol=1e-7, atol=1e-9)
    row = {r["layer"]: r for r in pre.describe()}
    assert row["wide"]["policy"] == "woodbury" and row["wide"]["dropped_G"] > 0
    assert row["narrow"]["policy"] == "eig"  # 8 rows > rho * 5: dense from the start


@pytest.mark.parametrize("policy", ["eig", "woodbury"])
def test_condition_number_clipping_counts_and_matches_reference(policy):
    torch.manual_seed(0)
    model = Net().double()
    x, y = _batches(1)[0]
    layer = model.wide
    xi, g = probe_layer(layer, lambda: F.cross_entropy(model(x), y, reduction="sum"))
    a, gg = factors(*linear_rows(xi, g, True), 8, 8)
    kappa = 50.0

    def clip(m):
        s, q = torch.linalg.eigh(m)
        n = int((s < s.max() / kappa).sum())
        return q @ torch.diag(s.clamp(min=s.max() / kappa)) @ q.T, n

    (a_c, n_a), (g_c, n_g) = clip(a), clip(gg)
    pre = KFACPreconditioner(model, damping_mode="exact", damping=1e-3, factor_update_steps=1,
                             inv_update_steps=1,
                             kl_clip=None, max_condition_number=kappa, inverse_policy=policy)
    F.cross_entropy(model(x), y).backward()
    v = grad_matrix(layer.weight, layer.bias)
    pre.step()
    row = {r["layer"]: r for r in pre.describe()}["wide"]
    assert row["clipped_A"] == n_a and n_a > 0
    assert row["clipped_G"] == n_g
    assert row["cond_A"] == pytest.approx(kappa, rel=1e-6)
    torch.testing.assert_close(grad_matrix(layer.weight, layer.bias),
                               kron_exact(v, a_c, g_c, 1e-3), **TOL)


def test_nan_in_factor_keeps_last_good_inverse():
    torch.manual_seed(0)
    model = Net().double()
    opt = KFAC(model, lr=0.1, factor_update_steps=1, inv_update_steps=1)
    (x, y), (x2, y2) = _batches(2)
    for xb, yb in ((x, y), (x2, y2)):
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
    layer = opt.preconditioner.layers["wide"]
    good = {k: v.clone() for k, v in layer.inverse.state_dict().items()
            if isinstance(v, torch.Tensor)}
    # corrupt the stored factor (the state's tensors are the live ones)
    opt.preconditioner.state_dict()["layers"]["wide"]["A"]["ema"][0, 0] = float("nan")
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step()
    for k, v in good.items():
        assert torch.equal(layer.inverse.state_dict()[k], v)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nan_in_gradients_never_reaches_weights():
    torch.manual_seed(0)
    model = Net().double()
    opt = KFAC(model, lr=0.1, factor_update_steps=1, inv_update_steps=1)
    x, y = _batches(1)[0]
    before = [p.detach().clone() for p in model.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (F.cross_entropy(model(x), y) * float("nan")).backward()
        opt.step()
    assert opt.skipped_steps == 1
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)


def _factor_values(pre):
    return {n: (layer.A, layer.G) for n, layer in pre.layers.items()}


def test_grad_scaler_unscales_statistics_and_drops_overflowed_steps():
    (x1, y1), (x2, y2), (x3, y3) = _batches(3)
    x1, x2, x3 = x1.float(), x2.float(), x3.float()

    def make():
        torch.manual_seed(0)
        return Net()

    ref_model = make()
    ref = KFAC(ref_model, lr=0.1, factor_update_steps=1, inv_update_steps=1, factor_decay=0.5)
    for x, y in ((x1, y1), (x3, y3)):
        ref.zero_grad()
        F.cross_entropy(ref_model(x), y).backward()
        ref.step()

    model = make()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    opt = KFAC(model, lr=0.1, factor_update_steps=1, inv_update_steps=1, factor_decay=0.5,
               grad_scaler=scaler)
    for x, y, overflow in ((x1, y1, False), (x2, y2, True), (x3, y3, False)):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        if overflow:
            loss = loss * torch.tensor(float("inf"))
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    assert scaler.get_scale() < 2.0**12  # the overflow was seen by the scaler
    got, want = _factor_values(opt.preconditioner), _factor_values(ref.preconditioner)
    for name in want:
        for g, w in zip(got[name], want[name], strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_accumulation_steps_equals_one_big_batch():
    x, y = _batches(1, rows=12)[0]
    torch.manual_seed(0)
    big = Net().double()
    torch.manual_seed(0)
    acc = Net().double()
    kw = dict(factor_update_steps=1, inv_update_steps=1, kl_clip=None, damping=1e-2)
    pre_big = KFACPreconditioner(big, **kw)
    pre_acc = KFACPreconditioner(acc, accumulation_steps=3, **kw)
    F.cross_entropy(big(x), y).backward()
    pre_big.step()
    for i in range(3):
        (F.cross_entropy(acc(x[4 * i: 4 * i + 4]), y[4 * i: 4 * i + 4]) / 3).backward()
    pre_acc.step()
    for name, (a, g) in _factor_values(pre_big).items():
        a2, g2 = _factor_values(pre_acc)[name]
        torch.testing.assert_close(a2, a, **TOL)
        torch.testing.assert_close(g2, g, **TOL)
    for p, q in zip(big.parameters(), acc.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, **TOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_factor_storage(dtype):
    batches = [(x.float(), y) for x, y in _batches(2)]

    def run(**kw):
        torch.manual_seed(0)
        model = Net()
        pre = KFACPreconditioner(model, damping=1e-2, factor_update_steps=1, inv_update_steps=1,
                                 kl_clip=None, **kw)
        for x, y in batches:
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
            pre.step()
        return model, pre

    ref_model, _ = run()
    model, pre = run(factor_dtype=dtype, inverse_policy="hybrid", hybrid_min_out=20,
                     woodbury_dtype=dtype)
    layers = pre.layers
    assert layers["narrow"].storage_dtypes["A"] == dtype
    assert layers["wide"].storage_dtypes["G"] == dtype
    # half precision keeps ~3 digits of each factor entry: compare in relative norm
    for p, q in zip(ref_model.parameters(), model.parameters(), strict=True):
        assert (q.grad - p.grad).norm() <= 5e-2 * p.grad.norm()
    usage = pre.memory_usage()
    assert usage["layers"]["wide"]["low_rank"] == 16 * 40 * 2
    assert usage["total"] == sum(r["total"] for r in usage["layers"].values())


def test_store_device_decision():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert choose_store_device(10, gpu, "auto", 100) == gpu
    assert choose_store_device(1000, gpu, "auto", 100) == cpu
    assert choose_store_device(10, gpu, "cpu", 100) == cpu
    assert choose_store_device(1000, gpu, "compute", 100) == gpu
    assert choose_store_device(1000, cpu, "auto", 100) == cpu


def test_resume_with_woodbury_policy_is_exact():
    batches = _batches(6)
    kw = dict(lr=0.05, damping=1e-2, factor_update_steps=2, inv_update_steps=2,
              inverse_policy="auto", damping_mode="factored", factor_decay=0.8)

    def run(model, opt, bs):
        for x, y in bs:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

    torch.manual_seed(0)
    m1 = Net().double()
    init = {k: v.clone() for k, v in m1.state_dict().items()}
    o1 = KFAC(m1, **kw)
    run(m1, o1, batches)
    m2 = Net().double()
    m2.load_state_dict(init)
    o2 = KFAC(m2, **kw)
    run(m2, o2, batches[:3])
    state = (m2.state_dict(), o2.state_dict())
    m3 = Net().double()
    m3.load_state_dict(state[0])
    o3 = KFAC(m3, **kw)
    o3.load_state_dict(state[1])
    run(m3, o3, batches[3:])
    for p, q in zip(m1.parameters(), m3.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("o,k", [(9, 4), (5, 8)])  # thin U; k > o with a repeated column
@pytest.mark.parametrize("kappa", [None, 30.0])
def test_woodbury_from_gram_matches_dense_and_row_slices(o, k, kappa):
    """The row-sharded paths (inverse.precondition_woodbury_exact / _factored) against dense
    float64 references: G = U U^T, eigenvalues clipped below max / kappa (the complement of
    U's range included); row slices (row_range over 2 and 3 ranks) with a reduce that sums
    the slices' U^(r)T V^(r) give the rows of the whole result."""
    g = torch.Generator().manual_seed(o * k)
    u = torch.randn(o, k, generator=g, dtype=torch.float64)
    if k > o:
        u[:, -1] = u[:, 0]
    x = torch.randn(7, 4, generator=g, dtype=torch.float64)
    a, v, lam = x.T @ x / 7, torch.randn(o, 4, generator=g, dtype=torch.float64), 1e-2
    s_full, q_full = torch.linalg.eigh(u @ u.T)
    s_full = s_full.clamp(min=0)
    rest = 0.0 if kappa is None else float(s_full.max()) / kappa
    g_clipped = (q_full * s_full.clamp(min=rest)) @ q_full.T
    s_a, q_a = eigh_psd(a)
    s, w = eigh_psd(u.T @ u)
    got = precondition_woodbury_exact(v, u, s, w, q_a, s_a, lam, rest)
    torch.testing.assert_close(got, kron_exact(v, a, g_clipped, lam), **TOL)
    gram = u.T @ u
    solver = robust_cholesky(gram + 0.3 * torch.eye(k, dtype=torch.float64))
    factored = precondition_woodbury_factored(v, u, solver, 0.3, q_a, s_a, 0.2)
    eye_o, eye_d = torch.eye(o, dtype=torch.float64), torch.eye(4, dtype=torch.float64)
    dense = torch.linalg.solve(u @ u.T + 0.3 * eye_o, v) @ torch.linalg.inv(a + 0.2 * eye_d)
    torch.testing.assert_close(factored, dense, **TOL)
    for ranks in (2, 3):
        slices = [slice(*row_range(o, r, ranks)) for r in range(ranks)]
        exact_rows = _as_ranks(slices, lambda sl, reduce: precondition_woodbury_exact(
            v[sl], u[sl], s, w, q_a, s_a, lam, rest, reduce=reduce))
        factored_rows = _as_ranks(slices, lambda sl, reduce: precondition_woodbury_factored(
            v[sl], u[sl], solver, 0.3, q_a, s_a, 0.2, reduce=reduce))
        torch.testing.assert_close(exact_rows, got, rtol=0, atol=1e-13)
        torch.testing.assert_close(factored_rows, factored, rtol=0, atol=1e-13)


def _as_ranks(slices, fn):
    """``fn(row_slice, reduce)`` for each slice as ranks would run it, the reduce summing
    every slice's partial product (an all-reduce); the slices' results concatenated."""
    partials = []
    for sl in slices:
        fn(sl, lambda p: partials.append(p) or p)
    total = sum(partials)
    return torch.cat([fn(sl, lambda p: total) for sl in slices])


def test_row_range_is_the_fsdp2_split():
    for rows, ranks in ((3, 2), (24, 2), (5, 4), (2, 3), (8192, 3)):
        chunks = torch.arange(rows).chunk(ranks)
        for r in range(ranks):
            start, stop = row_range(rows, r, ranks)
            expected = chunks[r].tolist() if r < len(chunks) else []
            assert list(range(start, stop)) == expected


def test_row_sharded_low_rank_factor_state():
    """A row slice's state says which rows it holds, refuses other rows, and the stacked EMA
    of slices is the slice of the stacked EMA."""
    g = torch.Generator().manual_seed(0)
    blocks = [torch.randn(5, 3, generator=g, dtype=torch.float64) for _ in range(3)]
    whole, part = LowRankFactor(), LowRankFactor(rows=(2, 5))
    for block in blocks:
        whole.update(block, 0.6)
        part.update(block[2:5], 0.6)
    torch.testing.assert_close(part.factor(), whole.factor()[2:5], rtol=0, atol=0)
    assert part.state_dict()["rows"] == [2, 5] and whole.state_dict()["rows"] is None
    with pytest.raises(RuntimeError, match="row-sharded"):
        part.value()
    with pytest.raises(RuntimeError, match="rows"):
        LowRankFactor(rows=(0, 3)).load_state_dict(part.state_dict())
    with pytest.raises(RuntimeError, match="rows"):
        LowRankFactor().load_state_dict(part.state_dict())
    legacy = {k: v for k, v in whole.state_dict().items() if k != "rows"}
    LowRankFactor().load_state_dict(legacy)  # states saved before the key existed


def test_row_sharded_is_ignored_in_a_single_process():
    batches = _batches(2)
    ref, _ = _run_policy("woodbury", "exact", batches)
    got, pre = _run_policy("woodbury", "exact", batches, woodbury_reduction="row_sharded")
    for step_ref, step_got in zip(ref, got, strict=True):
        for r, g in zip(step_ref, step_got, strict=True):
            assert torch.equal(g, r)
    state = pre.state_dict()
    assert state["layers"]["wide"]["G"]["rows"] is None
    g = state["layers"]["wide"]["G"]
    g["cols"], g["rows"] = g["cols"][:20], [0, 20]  # as rank 0 of 2 would save it
    _, fresh = _run_policy("woodbury", "exact", [], woodbury_reduction="row_sharded")
    with pytest.raises(RuntimeError, match=r"layer 'wide'.*rows \(0, 20\).*row_sharded"):
        fresh.load_state_dict(state)


POLICY_ERRORS = [
    (dict(woodbury_reduction="rows"), ValueError, r"woodbury_reduction.*'gather', 'row_sharded'"),
    (dict(woodbury_max_rank=0), ValueError, "woodbury_max_rank"),
    (dict(woodbury_rank=0), ValueError, "woodbury_rank"),
    (dict(auto_rho=0.0), ValueError, "auto_rho"),
    (dict(auto_t_max=1.5), TypeError, "auto_t_max"),
    (dict(hybrid_min_out=-1), ValueError, "hybrid_min_out"),
    (dict(max_condition_number=0.5), ValueError, "max_condition_number"),
    (dict(woodbury_store_device="gpu"), ValueError, "woodbury_store_device"),
    (dict(woodbury_dtype=torch.int8), ValueError, "woodbury_dtype"),
    (dict(accumulation_steps=0), ValueError, "accumulation_steps"),
    (dict(grad_scaler=3), TypeError, "grad_scaler"),
]


@pytest.mark.parametrize("kwargs,exc,name", POLICY_ERRORS)
def test_policy_bad_arguments(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        KFACPreconditioner(Net(), kl_clip=None, **kwargs)


def test_ekfac_eigenvalue_correction_matches_reference():
    """EKFAC (George et al. 2018): S = (1/N) sum_t (Q_G^T g_t)^2 ((Q_A^T a_t)^2)^T replaces
    s_G s_A^T. Step 0 sets the basis from batch 0; step 1 (no inverse update) adds batch 1's
    moments in that basis to the bias-corrected EMA."""
    torch.manual_seed(0)
    model = Net().double()
    batches = _batches(2)
    decay, damping = 0.5, 1e-2
    layer = model.wide
    per_batch = []
    for x, y in batches:
        xi, g = probe_layer(layer, lambda x=x, y=y: F.cross_entropy(model(x), y, reduction="sum"))
        per_batch.append(linear_rows(xi, g, True))
    a0, g0 = factors(*per_batch[0], 8, 8)
    s_a, q_a = torch.linalg.eigh(a0)
    s_g, q_g = torch.linalg.eigh(g0)
    moments = [((gr @ q_g) ** 2).T @ (ar @ q_a) ** 2 / 8 for ar, gr in per_batch]
    s_star = (decay * (1 - decay) * moments[0] + (1 - decay) * moments[1]) / (1 - decay**2)
    pre = KFACPreconditioner(model, damping=damping, factor_decay=decay, factor_update_steps=1,
                             inv_update_steps=2, kl_clip=None, eigenvalue_correction=True)
    for i, (x, y) in enumerate(batches):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        v = grad_matrix(layer.weight, layer.bias)
        pre.step()
        s = moments[0] if i == 0 else s_star
        ref = q_g @ ((q_g.T @ v @ q_a) / (s + damping)) @ q_a.T
        torch.testing.assert_close(grad_matrix(layer.weight, layer.bias), ref, **TOL)


def test_ekfac_embedding_and_error():
    torch.manual_seed(0)
    emb = nn.Embedding(7, 4).double()
    model = nn.Sequential(emb, nn.Tanh(), nn.Linear(4, 3).double())
    ids, y = torch.randint(0, 7, (3, 4)), torch.randint(0, 3, (3, 4))

    def loss(reduction):
        return F.cross_entropy(model(ids).reshape(-1, 3), y.reshape(-1), reduction=reduction)

    xi, g = probe_layer(emb, lambda: loss("sum"))
    onehot = F.one_hot(xi.reshape(-1), 7).double()
    g = g.reshape(-1, 4)
    a, gg = factors(onehot, g, 12, 12)
    s_g, q_g = torch.linalg.eigh(gg)
    s = ((g @ q_g) ** 2).T @ onehot / 12  # Q_A = I for the diagonal A
    pre = KFACPreconditioner(model, damping=1e-2, factor_update_steps=1, inv_update_steps=1,
                             kl_clip=None, eigenvalue_correction=True)
    loss("mean").backward()
    v = emb.weight.grad.T.clone()
    pre.step()
    ref = q_g @ ((q_g.T @ v) / (s + 1e-2))
    torch.testing.assert_close(emb.weight.grad.T, ref, **TOL)
    with pytest.raises(ValueError, match="eigenvalue_correction"):
        KFACPreconditioner(model, kl_clip=None, eigenvalue_correction=True,
                           damping_mode="factored")


def test_inv_device_cpu_matches_auto_and_rejects_garbage():
    batches = _batches(2)
    ref, _ = _run_policy("eig", "exact", batches)
    got, _ = _run_policy("eig", "exact", batches, inv_device="cpu")
    for r, g in zip(ref[-1], got[-1], strict=True):
        assert torch.equal(r, g)
    with pytest.raises(ValueError, match="inv_device"):
        KFACPreconditioner(Net(), kl_clip=None, inv_device="tpu-ish")


@pytest.mark.parametrize("o,rows", [(256, 256), (256, 64)])
def test_woodbury_float32_accuracy_at_full_rank(o, rows):
    """Float32 factors, T = o (the hardest case for a thin basis): the Woodbury result is as
    close to a float64 reference as eig's. Regression: a basis U W s^{-1/2} from the float32
    Gram was not orthonormal and was off by 9e-2 (benchmarks/inverse_policies.py)."""
    d = 64
    torch.manual_seed(0)
    x, r = torch.randn(rows, d), torch.randn(rows, o)
    xb = torch.cat([x, torch.ones(rows, 1)], 1).double()
    r64 = r.double()
    s_a, q_a = torch.linalg.eigh(xb.T @ xb / rows)
    s_g, q_g = torch.linalg.eigh(r64.T @ r64 / rows)
    ref = q_g @ ((q_g.T @ (r64.T @ xb) @ q_a) / (torch.outer(s_g.clamp(min=0), s_a) + 1e-3)) \
        @ q_a.T
    errors = {}
    for policy in ("eig", "woodbury"):
        torch.manual_seed(1)
        m = nn.Linear(d, o)
        pre = KFACPreconditioner(m, inverse_policy=policy, factor_update_steps=1,
                                 inv_update_steps=1, kl_clip=None, loss_reduction="sum")
        (m(x) * r).sum().backward()
        pre.step()
        out = torch.cat([m.weight.grad, m.bias.grad[:, None]], 1).double()
        errors[policy] = float((out - ref).norm() / ref.norm())
    assert errors["woodbury"] < max(3 * errors["eig"], 1e-4), errors


def test_layer_first_seen_off_schedule_gets_its_inverse_at_once():
    """No cold start: a layer without factors at step 0 (here: unused) is preconditioned
    from its first factor update, not raw until the next multiple of inv_update_steps."""
    torch.manual_seed(0)
    first, second = nn.Linear(4, 3).double(), nn.Linear(4, 3).double()
    model = nn.ModuleDict({"first": first, "second": second})
    pre = KFACPreconditioner(model, damping_mode="exact", lr=0.1, kl_clip=None, damping=0.1,
                             factor_update_steps=1, inv_update_steps=100)
    x = torch.randn(16, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))
    F.cross_entropy(first(x), y).backward()
    pre.step()  # step 0: only "first" has factors
    assert pre.layers["first"].inverse is not None and pre.layers["second"].inverse is None
    model.zero_grad()
    F.cross_entropy(second(x), y).backward()  # step 1, off schedule
    v = grad_matrix(second.weight, second.bias)
    pre.step()
    view = pre.layers["second"]
    assert view.inverse is not None and view.diagnostics["policy"] == "eig"
    want = kron_exact(v, view.A, view.G, 0.1)
    torch.testing.assert_close(grad_matrix(second.weight, second.bias), want,
                               rtol=1e-9, atol=1e-12)
