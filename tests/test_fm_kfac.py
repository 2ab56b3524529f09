"""KFACFisher vs dense float64 Kronecker references built from a real K-FAC state.

The factors come from ``kfac_optim.KFACPreconditioner.state_dict()`` after two
steps on a small float64 network with an Embedding (diagonal A), a Conv2d, a
Linear whose G is low-rank (Woodbury; 8 columns < o = 12, the Gram path) and a
Hugging Face Conv1D; the references are ``torch.kron(A, G)`` of those factors,
written out here, with column-major ``vec``. Tolerances: eigenvalues within
1e-12 of the largest, traces and products to 1e-12 relative, log-determinants
to 1e-10 relative (round-off of ``d o`` logarithms).
"""

import math

import pytest
import torch
from torch import nn

import fisher_metrics as fm
import kfac_optim
from tests.fm_reference import (
    DTYPE,
    dense_factors,
    kfac_trained,
    mlp,
    mlp_problem,
    single_thread,  # noqa: F401
)


class Net(nn.Module):
    """ids (B, 3) -> Embedding(10, 4) -> Conv2d(1, 2, 2) -> Linear(40, 12) -> Conv1D(12, 5)."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.emb = nn.Embedding(10, 4)
        self.conv = nn.Conv2d(1, 2, 2, padding=1)
        self.fc = nn.Linear(40, 12)
        self.head = Conv1D(5, 12)
        self.unused = nn.Linear(3, 2)  # never called: no factors, skipped

    def forward(self, ids):
        h = self.emb(ids).unsqueeze(1)
        h = torch.tanh(self.conv(h)).flatten(1)
        return self.head(torch.tanh(self.fc(h)))


def trained(policy: str, seed: int = 0):
    torch.manual_seed(seed)
    return kfac_trained(
        Net().to(DTYPE),
        lambda generator: torch.randint(0, 10, (4, 3), generator=generator),
        5,
        policy=policy,
        hybrid_min_out=12,
        seed=seed,
    )


@pytest.fixture(scope="module", params=["hybrid", "woodbury"])
def setup(request):
    model, pre = trained(request.param)
    return model, pre, fm.KFACFisher.from_preconditioner(pre)


def kron_blocks(pre):
    return {
        name: torch.kron(*dense_factors(e))
        for name, e in pre.state_dict()["layers"].items()
        if e["A"]["ema"] is not None
    }


# Parameter tensors <-> V (o, d), bias as the last column, written out per layer type.
def to_params(model, name, V):
    module = model.get_submodule(name)
    if isinstance(module, nn.Embedding):
        return {f"{name}.weight": V.T}
    w, b = V[:, :-1], V[:, -1]
    if isinstance(module, nn.Conv2d):
        w = w.reshape(module.weight.shape)
    elif not isinstance(module, nn.Linear):  # HF Conv1D stores (in, out)
        w = w.T
    return {f"{name}.weight": w, f"{name}.bias": b}


def to_matrix(model, name, params):
    module = model.get_submodule(name)
    w = params[f"{name}.weight"]
    if isinstance(module, nn.Embedding):
        return w.T
    if isinstance(module, nn.Conv2d):
        w = w.reshape(w.shape[0], -1)
    elif not isinstance(module, nn.Linear):
        w = w.T
    return torch.cat([w, params[f"{name}.bias"][:, None]], 1)


def random_matrices(rep, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(*rep.factors(name)["shape"], generator=generator, dtype=DTYPE)
        for name in rep.layers
    }


def test_layers_and_flat_layout(setup):
    model, pre, rep = setup
    assert rep.layers == ["emb", "conv", "fc", "head"]
    assert rep.skipped_layers.keys() == {"unused"}
    expected = [n for n, _ in model.named_parameters() if not n.startswith("unused")]
    assert rep.param_names == expected
    assert rep.num_params == 40 + 2 * 5 + 12 * 41 + 5 * 13
    low_rank = {name: rep.factors(name)["low_rank"] for name in rep.layers}
    assert low_rank["fc"] and (all(low_rank.values()) == (pre.options.inverse_policy == "woodbury"))
    assert rep.factors("fc")["U"].shape == (12, 8)  # 2 steps x 4 rows < o: Gram path


def test_eigenvalues_trace_logdet_match_kron(setup):
    _, pre, rep = setup
    blocks = kron_blocks(pre)
    total_trace, total_logdet = 0.0, 0.0
    for name, K in blocks.items():
        exact = torch.linalg.eigvalsh(K).flip(0).clamp_min(0)
        got = rep.eigenvalues(name)
        assert got.shape == exact.shape
        assert torch.allclose(got, exact, rtol=0, atol=1e-12 * float(exact[0]))
        assert torch.allclose(
            rep.eigenvalues(name, k=3), exact[:3], rtol=0, atol=1e-12 * float(exact[0])
        )
        assert rep.trace(name) == pytest.approx(float(K.trace()), rel=1e-12)
        eye = torch.eye(K.shape[0], dtype=DTYPE)
        for damping in (1e-3, 0.5):
            ref = float(torch.linalg.slogdet(K + damping * eye)[1])
            assert rep.logdet(damping, name) == pytest.approx(ref, rel=1e-10)
        total_trace += float(K.trace())
        total_logdet += float(torch.linalg.slogdet(K + 1e-2 * eye)[1])
    assert rep.trace() == pytest.approx(total_trace, rel=1e-12)
    assert rep.logdet(1e-2) == pytest.approx(total_logdet, rel=1e-10)
    assert rep.logdet(0.0, "fc") == -math.inf  # low-rank G: singular block


def test_mvp_matches_kron_column_major_vec(setup):
    model, pre, rep = setup
    blocks = kron_blocks(pre)
    Vs = random_matrices(rep)
    params = {}
    for name, V in Vs.items():
        params.update(to_params(model, name, V))
    out = rep.mvp(params)
    assert list(out) == rep.param_names
    quad = 0.0
    for name, V in Vs.items():
        vec = V.T.reshape(-1)  # column-major vec(V)
        expected = (blocks[name] @ vec).reshape(V.shape[1], V.shape[0]).T
        got = to_matrix(model, name, out)
        assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12 * float(expected.abs().max()))
        assert torch.equal(rep.to_matrix(name, params), V)
        quad += float(vec @ blocks[name] @ vec)
    flat = rep.flatten(params)
    assert torch.allclose(rep.mvp(flat), rep.flatten(out), rtol=1e-13, atol=0)
    assert rep.quadratic_form(params) == pytest.approx(quad, rel=1e-12)
    assert rep.quadratic_form(flat) == pytest.approx(quad, rel=1e-12)
    # entries for parameters outside the representation are ignored
    extra = dict(params, **{"unused.weight": torch.ones(2, 3, dtype=DTYPE)})
    assert torch.equal(rep.flatten(rep.mvp(extra)), rep.flatten(out))


def test_top_k_matches_block_diagonal_and_lanczos(setup):
    _, pre, rep = setup
    blocks = kron_blocks(pre)
    dense = torch.block_diag(*[blocks[name] for name in rep.layers])
    exact = torch.linalg.eigvalsh(dense).flip(0)
    top = rep.top_k(7)
    assert torch.allclose(top.values, exact[:7], rtol=0, atol=1e-12 * float(exact[0]))
    for value, layer in zip(top.values, top.layers, strict=True):
        assert float((rep.eigenvalues(layer) - value).abs().min()) <= 1e-12 * float(exact[0])
    assert torch.allclose(
        rep.all_eigenvalues(), exact.clamp_min(0), rtol=0, atol=1e-12 * float(exact[0])
    )
    op = rep.as_operator()
    assert op.shape == (rep.num_params, rep.num_params) and op.param_names == rep.param_names
    res = fm.lanczos(op, k=3, seed=1)
    assert torch.allclose(res.eigenvalues, exact[:3], rtol=1e-9, atol=0)
    assert torch.allclose(op.to_dense(), op.to_dense().T, rtol=0, atol=1e-14)


def test_from_state_dict_equals_from_preconditioner(setup, tmp_path):
    model, pre, rep = setup
    torch.save(pre.state_dict(), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    other = fm.KFACFisher.from_state_dict(state, model)
    assert other.layers == rep.layers and other.param_names == rep.param_names
    flat = torch.randn(rep.num_params, dtype=DTYPE, generator=torch.Generator().manual_seed(3))
    assert torch.equal(other.mvp(flat), rep.mvp(flat))
    for name in rep.layers:
        assert torch.equal(other.eigenvalues(name), rep.eigenvalues(name))
    assert other.trace() == rep.trace() and other.logdet(0.1) == rep.logdet(0.1)
    assert other.steps == rep.steps == 2
    optimizer_state = {"state": {}, "param_groups": [], "kfac": state}
    assert fm.KFACFisher.from_state_dict(optimizer_state, model).trace() == rep.trace()


def test_capacity_from_full_spectrum(setup):
    _, pre, rep = setup
    blocks = kron_blocks(pre)
    exact = torch.linalg.eigvalsh(blocks["head"]).clamp_min(0)
    metrics = rep.capacity("head", sigma=0.1, num_samples=8)
    reference = fm.capacity_metrics(exact, sigma=0.1, num_samples=8)
    for key, value in reference.items():
        assert metrics[key] == pytest.approx(value, rel=1e-9), key
    assert metrics["num_params"] == 65
    table = rep.capacity_by_layer()
    assert list(table) == rep.layers + ["model"]
    assert table["model"]["trace"] == pytest.approx(rep.trace(), rel=1e-12)


def test_compare_hessian_fisher_vs_dense():
    model, batches, problem = mlp_problem("ce")
    res = fm.compare_hessian_fisher(model, batches, k=3, dtype=DTYPE)
    h = torch.linalg.eigvalsh(problem.hessian()).flip(0)[:3]
    g = torch.linalg.eigvalsh(problem.ggn()).flip(0)[:3]
    assert torch.allclose(torch.tensor(res["ratios"], dtype=DTYPE), h / g, rtol=1e-7)
    assert res["top_ratio"] == pytest.approx(float(h[0] / g[0]), rel=1e-7)
    with pytest.raises(ValueError, match="fisher"):
        fm.compare_hessian_fisher(model, batches, fisher="hessian")


def test_bad_arguments(setup):
    model, pre, rep = setup
    with pytest.raises(ValueError, match="layer must be one of"):
        rep.eigenvalues("nope")
    with pytest.raises(TypeError, match="layer"):
        rep.trace(3)
    with pytest.raises(ValueError, match="k must be <= n"):
        rep.top_k(rep.num_params + 1)
    with pytest.raises(ValueError, match="k must be"):
        rep.top_k(0)
    with pytest.raises(ValueError, match="damping"):
        rep.logdet(-1.0)
    with pytest.raises(ValueError, match=r"v must be a floating-point \(n,\)"):
        rep.mvp(torch.zeros(3, dtype=DTYPE))
    with pytest.raises(ValueError, match="lacks entries"):
        rep.mvp({"fc.weight": torch.zeros(12, 40, dtype=DTYPE)})
    with pytest.raises(ValueError, match="shape"):
        rep.mvp({name: torch.zeros(2, dtype=DTYPE) for name in rep.param_names})
    with pytest.raises(TypeError, match="dict"):
        rep.quadratic_form([1.0])
    with pytest.raises(ValueError, match=r"shape \(12, 41\)"):
        rep.from_matrix("fc", torch.zeros(3, 3))
    with pytest.raises(TypeError, match="state_dict"):
        fm.KFACFisher.from_preconditioner(object())
    with pytest.raises(TypeError, match="'layers'"):
        fm.KFACFisher.from_state_dict({"steps": 1}, model)
    with pytest.raises(TypeError, match="model must be"):
        fm.KFACFisher.from_state_dict(pre.state_dict(), "model")
    with pytest.raises(ValueError, match="dtype"):
        fm.KFACFisher.from_preconditioner(pre, dtype=torch.float16)
    wrong = Net().to(DTYPE)
    wrong.fc = nn.Linear(40, 12, bias=False).to(DTYPE)
    with pytest.raises(ValueError, match="layer 'fc': factor A has shape"):
        fm.KFACFisher.from_state_dict(pre.state_dict(), wrong)
    with pytest.raises(ValueError, match="not a module of the model"):
        fm.KFACFisher.from_state_dict(pre.state_dict(), mlp())
    fresh = kfac_optim.KFACPreconditioner(Net().to(DTYPE), kl_clip=None)
    with pytest.raises(ValueError, match="no layer with factors"):
        fm.KFACFisher.from_preconditioner(fresh)
    fresh.remove()


def test_row_sharded_state_refused(setup):
    """One rank's state under woodbury_reduction="row_sharded" holds some rows of U only."""
    model, pre, _ = setup
    state = pre.state_dict()
    entry = state["layers"]["fc"]["G"]
    assert state["layers"]["fc"]["G_low_rank"] and entry["rows"] is None
    entry["cols"], entry["rows"] = entry["cols"][:6], [0, 6]
    with pytest.raises(ValueError, match=r"layer 'fc'.*rows \(0, 6\).*row_sharded"):
        fm.KFACFisher.from_state_dict(state, model)


def test_tied_weight_aliases_and_float32():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=1, n_head=2, n_embd=8, vocab_size=11, n_positions=8, bos_token_id=0, eos_token_id=0
    )
    model = GPT2LMHeadModel(config)
    pre = kfac_optim.KFACPreconditioner(model, kl_clip=None, factor_update_steps=1)
    ids = torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    pre.step()
    rep = fm.KFACFisher.from_preconditioner(pre, dtype=torch.float32)
    assert rep.dtype == torch.float32
    assert "lm_head" in rep.layers and rep.layer_params["lm_head"] == ["transformer.wte.weight"]
    assert rep.param_names.count("transformer.wte.weight") == 1
    v = {name: torch.ones(shape) for name, shape in rep.param_shapes.items()}
    alias = dict(v)
    alias["lm_head.weight"] = alias.pop("transformer.wte.weight")
    assert torch.equal(rep.flatten(rep.mvp(alias)), rep.flatten(rep.mvp(v)))
    pre.remove()


class DiagonalFisher(fm.FisherRepresentation):
    """A minimal second implementation (diagonal blocks): only the two abstract methods."""

    def __init__(self, diagonals):
        self.layers = list(diagonals)
        self.layer_params = {name: [name] for name in diagonals}
        self.param_names = list(diagonals)
        self.param_shapes = {name: d.shape for name, d in diagonals.items()}
        self.aliases = {name: name for name in diagonals}
        self.dtype, self.device = DTYPE, torch.device("cpu")
        self.diagonals = diagonals

    def eigenvalues(self, layer, k=None):
        values = torch.sort(self.diagonals[self._check_layer(layer)].reshape(-1), descending=True)
        return values.values if k is None else values.values[:k]

    def _layer_mvp(self, layer, tensors):
        return {layer: self.diagonals[layer] * tensors[layer]}


def test_interface_defaults_on_a_diagonal_representation():
    generator = torch.Generator().manual_seed(0)
    diagonals = {
        "w": torch.rand(3, 4, generator=generator, dtype=DTYPE),
        "b": torch.rand(5, generator=generator, dtype=DTYPE),
    }
    rep = DiagonalFisher(diagonals)
    dense = torch.diag(torch.cat([diagonals["w"].reshape(-1), diagonals["b"]]))
    values = torch.linalg.eigvalsh(dense).flip(0)
    assert rep.trace() == pytest.approx(float(dense.trace()), rel=1e-14)
    assert rep.logdet(0.1) == pytest.approx(
        float(torch.logdet(dense + 0.1 * torch.eye(17, dtype=DTYPE))), rel=1e-13
    )
    assert torch.equal(rep.top_k(4).values, values[:4])
    assert torch.allclose(rep.as_operator().to_dense(), dense, rtol=0, atol=0)
    delta = torch.randn(17, generator=generator, dtype=DTYPE)
    assert rep.quadratic_form(delta) == pytest.approx(float(delta @ dense @ delta), rel=1e-13)
    assert rep.capacity()["num_params"] == 17
    with pytest.raises(TypeError):
        fm.FisherRepresentation()
