"""analyze: ΔW spectra, effective ranks, subspace similarity φ and amplification, against numpy and closed forms."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import lorafit
from lorafit import LoraConfig
from lorafit.tools.analyze import (
    amplification,
    analyze,
    delta_svd,
    energy_rank,
    entropy_rank,
    projection_norms,
    read_updates,
    subspace_similarity,
)
from lorafit.tools.analyze_report import format_tables, write_report
from tests.conftest import randomize_lora, tiny_gpt2, tiny_llama


@pytest.fixture(autouse=True)
def one_thread():
    """These matrices are tiny: one BLAS thread is fastest, and on a shared 2-core machine far faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _save(model, folder, targets, r, seed=0, alpha=None):
    """Inject rank-r LoRA on `targets`, give it random A and B, save it to `folder`; returns the model."""
    lorafit.inject(model, LoraConfig(r=r, alpha=alpha or 2.0 * r, targets=targets))
    randomize_lora(model, seed)
    lorafit.save_adapter(model, folder)
    return model


def _numpy_delta(model, path):
    """Reference ΔW (out, in) from the model's own tensors, float64 numpy."""
    update = model.get_submodule(path).lora["default"]
    return update.lora_B.detach().double().numpy() @ update.lora_A.detach().double().numpy() * update.scale


def _phi_reference(a1, a2):
    """φ(i, j) with the paper's formula, looping, from numpy's SVD."""
    u1 = np.linalg.svd(a1, full_matrices=False)[2].T
    u2 = np.linalg.svd(a2, full_matrices=False)[2].T
    return np.array([[np.linalg.norm(u1[:, :i].T @ u2[:, :j]) ** 2 / min(i, j) for j in range(1, u2.shape[1] + 1)]
                     for i in range(1, u1.shape[1] + 1)])


def test_known_rank_delta_has_numpy_singular_values_and_effective_rank_at_most_k(tmp_path):
    model, k = tiny_llama(), 3
    lorafit.inject(model, LoraConfig(r=8, alpha=16, targets=["q_proj", "v_proj"]))
    randomize_lora(model)
    with torch.no_grad():
        for _, layer in lorafit.lora_layers(model):
            layer.lora["default"].lora_B[:, k:] = 0  # ΔW = B[:, :k] A[:k]: rank k exactly
    lorafit.save_adapter(model, tmp_path / "a")
    rows = analyze(tmp_path / "a")["spectra"]
    assert len(rows) == 4 and {r["module"] for r in rows} == {"self_attn.q_proj", "self_attn.v_proj"}
    for row in rows:
        expected = np.linalg.svd(_numpy_delta(model, row["path"]), compute_uv=False)[:8]
        np.testing.assert_allclose(row["sigma"], expected, rtol=1e-9, atol=1e-12 * expected[0])
        assert row["fro"] == pytest.approx(np.linalg.norm(_numpy_delta(model, row["path"])), rel=1e-12)
        assert max(row["sigma"][k:]) < 1e-12 * row["sigma"][0]
        assert 1 <= row["energy90_rank"] <= k and 1 <= row["entropy_rank"] <= k + 1e-9


@pytest.mark.parametrize("r, out, d", [(4, 12, 9), (16, 6, 10), (8, 20, 5)])  # r above out or in: k = min
def test_delta_svd_reconstructs_b_a_scale_with_orthonormal_factors(r, out, d):
    gen = torch.Generator().manual_seed(r)
    a, b = torch.randn(r, d, generator=gen), torch.randn(out, r, generator=gen)
    u, s, v = delta_svd(a, b, 0.5)
    k = min(r, out, d)
    assert u.shape == (out, k) and s.shape == (k,) and v.shape == (d, k)
    delta = b.double().numpy() @ a.double().numpy() * 0.5
    np.testing.assert_allclose((u * s) @ v.T, delta, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(s, np.linalg.svd(delta, compute_uv=False)[:k], rtol=1e-10)
    torch.testing.assert_close(u.T @ u, torch.eye(k, dtype=torch.float64))
    torch.testing.assert_close(v.T @ v, torch.eye(k, dtype=torch.float64))


def test_effective_ranks_closed_form():
    assert energy_rank(torch.ones(4)) == 4  # 3 of 4 equal values hold 75% < 90%
    assert energy_rank(torch.tensor([3.0, 1.0])) == 1  # 9 / 10 = 90% exactly
    assert energy_rank(torch.tensor([1.0, 2.0, 0.1])) == 2  # order does not matter
    assert energy_rank(torch.zeros(3)) == 0 and entropy_rank(torch.zeros(3)) == 0.0
    assert entropy_rank(torch.ones(5)) == pytest.approx(5.0, rel=1e-12)
    assert entropy_rank(torch.tensor([2.0, 0.0, 0.0])) == pytest.approx(1.0, abs=1e-12)
    p = np.array([2.0, 1.0]) / 3.0
    assert entropy_rank(torch.tensor([2.0, 1.0])) == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-12)


def test_phi_matches_the_papers_formula_and_is_symmetric():
    gen = torch.Generator().manual_seed(0)
    a1 = torch.randn(4, 20, generator=gen, dtype=torch.float64)
    a2 = torch.randn(7, 20, generator=gen, dtype=torch.float64)
    phi = subspace_similarity(a1, a2)
    assert phi.shape == (4, 7)
    np.testing.assert_allclose(phi.numpy(), _phi_reference(a1.numpy(), a2.numpy()), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(subspace_similarity(a2, a1), phi.T, rtol=1e-12, atol=1e-12)
    assert phi.min() >= 0 and phi.max() <= 1 + 1e-12


def test_phi_of_an_adapter_with_itself_is_one(tmp_path):
    _save(tiny_llama(), tmp_path / "a", ["q_proj", "v_proj"], r=8)
    sim = analyze(tmp_path / "a", tmp_path / "a")["similarity"]
    assert len(sim["modules"]) == 4 and set(sim["mean"]) == {"self_attn.q_proj", "self_attn.v_proj"}
    for row in sim["modules"]:
        np.testing.assert_allclose(row["phi"], np.ones((8, 8)), atol=1e-10)  # the diagonal, and (i ≤ j) everything
        assert row["random_all"] == pytest.approx(8 / 64)


def test_phi_against_the_orthogonal_complement_is_zero_and_against_another_rank_matches_numpy(tmp_path):
    first = _save(tiny_llama(), tmp_path / "r4", ["q_proj"], r=4, seed=1)
    second = tiny_llama()
    lorafit.inject(second, LoraConfig(r=16, alpha=32, targets=["q_proj"]))
    randomize_lora(second, seed=2)
    lorafit.save_adapter(second, tmp_path / "r16")
    with torch.no_grad():  # rows of A2 projected onto the orthogonal complement of A1's row space
        for path, layer in lorafit.lora_layers(second):
            a1 = first.get_submodule(path).lora["default"].lora_A.double()  # (4, 64)
            q = torch.linalg.qr(a1.T).Q  # (64, 4)
            a2 = layer.lora["default"].lora_A
            a2.copy_((a2.double() - a2.double() @ q @ q.T).float())
    lorafit.save_adapter(second, tmp_path / "orth")
    for row in analyze(tmp_path / "r4", tmp_path / "orth")["similarity"]["modules"]:
        assert np.abs(row["phi"]).max() < 1e-10
    _, updates1 = read_updates(tmp_path / "r4")
    _, updates2 = read_updates(tmp_path / "r16")
    sim = analyze(tmp_path / "r4", tmp_path / "r16")["similarity"]
    for row, u1, u2 in zip(sim["modules"], updates1, updates2):
        np.testing.assert_allclose(row["phi"], _phi_reference(u1.A.numpy(), u2.A.numpy()), rtol=1e-9, atol=1e-12)
    mean = np.mean([row["phi"] for row in sim["modules"]], axis=0)
    np.testing.assert_allclose(sim["mean"]["self_attn.q_proj"]["phi"], mean, rtol=1e-12)


@pytest.mark.parametrize("build, target", [(tiny_llama, "model.layers.1.self_attn.q_proj"),
                                           (tiny_gpt2, "transformer.h.1.attn.c_proj"),  # Conv1D, square: (in, out)
                                           (tiny_gpt2, "transformer.h.0.attn.c_attn")])  # Conv1D, fused q|k|v
def test_delta_along_the_top_direction_of_w_projects_to_sigma_1(tmp_path, build, target):
    model, c = build(), 0.7
    base = {k: v.clone() for k, v in model.state_dict().items()}
    lorafit.inject(model, LoraConfig(r=1, alpha=1.0, targets=[target]))
    layer = model.get_submodule(target)
    w = layer.weight.detach().double()
    w = w.T if layer.fan_in_fan_out else w  # (out, in)
    u, s, vh = torch.linalg.svd(w)
    with torch.no_grad():  # ΔW = c · u1 v1ᵀ
        layer.lora["default"].lora_A.copy_(vh[:1])
        layer.lora["default"].lora_B.copy_(c * u[:, :1])
    lorafit.save_adapter(model, tmp_path / "a")
    for weights in (base, model):  # a state dict, or the model with the adapter injected (not merged)
        (row,) = amplification(weights, tmp_path / "a")
        assert row["proj_delta"] == pytest.approx(float(s[0]), rel=1e-6)  # ‖u1ᵀ W v1‖ = σ1(W)
        assert row["proj_w"] == pytest.approx(float(s[0]), rel=1e-12)
        assert row["delta_fro"] == pytest.approx(c, rel=1e-6)
        assert row["factor"] == pytest.approx(c / float(s[0]), rel=1e-6)
        assert row["fused"] == target.endswith("c_attn")
    lorafit.merge(model)
    with pytest.raises(ValueError, match="merged"):
        amplification(model, tmp_path / "a")


def test_amplification_matches_numpy_on_gpt2_conv1d(tmp_path):
    model = tiny_gpt2()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    _save(model, tmp_path / "a", ["c_attn", "c_proj"], r=4)
    rows = amplification(base, tmp_path / "a", seed=3)
    assert len(rows) == 6  # attn.c_attn (fused, 32 -> 96), attn.c_proj (square), mlp.c_proj (128 -> 32)
    for row in rows:
        delta = _numpy_delta(model, row["path"])
        w = base[row["path"] + ".weight"].double().numpy().T  # Conv1D stores (in, out)
        u, s, vt = np.linalg.svd(delta)
        uw, sw, vtw = np.linalg.svd(w)
        assert row["proj_delta"] == pytest.approx(np.linalg.norm(u[:, :4].T @ w @ vt[:4].T), rel=1e-6)
        assert row["proj_w"] == pytest.approx(np.linalg.norm(uw[:, :4].T @ w @ vtw[:4].T), rel=1e-9)
        assert row["w_fro"] == pytest.approx(np.linalg.norm(w), rel=1e-12)
        assert row["delta_fro"] == pytest.approx(np.linalg.norm(delta), rel=1e-9)
        assert row["factor"] == pytest.approx(row["delta_fro"] / row["proj_delta"], rel=1e-12)
    assert amplification(base, tmp_path / "a", seed=3) == rows  # seeded


def test_embedding_delta_is_vocab_to_dim_and_its_table_is_transposed(tmp_path):
    model = tiny_llama()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    _save(model, tmp_path / "a", ["embed_tokens"], r=4)
    (row,) = amplification(base, tmp_path / "a")
    update = model.get_submodule("model.embed_tokens").lora["default"]
    delta = (update.lora_embedding_B @ update.lora_embedding_A).detach().double().numpy() * update.scale  # (64, 128)
    w = base["model.embed_tokens.weight"].double().numpy().T  # the table is (vocab, dim): transposed to (dim, vocab)
    u, _, vt = np.linalg.svd(delta)
    assert row["proj_delta"] == pytest.approx(np.linalg.norm(u[:, :4].T @ w @ vt[:4].T), rel=1e-6)
    assert row["delta_fro"] == pytest.approx(np.linalg.norm(delta), rel=1e-9)


def test_random_projection_is_small_in_high_dimension():
    gen = torch.Generator().manual_seed(0)
    d, k = 128, 4
    w = torch.randn(d, d, generator=gen, dtype=torch.float64)
    dirs = torch.linalg.qr(torch.randn(d, k, generator=gen, dtype=torch.float64)).Q
    squares = [projection_norms(w, dirs, torch.ones(k), dirs, torch.Generator().manual_seed(s))["proj_random"] ** 2
               for s in range(16)]
    expected = k * k * float(w.norm()) ** 2 / (d * d)  # E‖UᵀWV‖² for random orthonormal U, V
    assert np.mean(squares) == pytest.approx(expected, rel=0.3)
    row = projection_norms(w, dirs, torch.ones(k), dirs, gen)
    assert row["proj_random"] < 0.1 * row["w_fro"] and row["proj_w"] > 5 * row["proj_random"]


def test_trained_adapter_finds_a_rank_one_target_and_its_direction(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(24, 16, bias=False)

    torch.manual_seed(0)
    net = Net()
    u, v = torch.randn(16), torch.randn(24)
    u, v = u / u.norm(), v / v.norm()
    target = net.fc.weight.detach() + 2.0 * torch.outer(u, v)  # the task: W0 + a rank-1 change
    lorafit.inject(net, LoraConfig(r=8, alpha=8, init="gaussian", targets=["fc"]))
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=0.02)
    for _ in range(300):
        x = torch.randn(64, 24)
        loss = ((net.fc(x) - x @ target.T) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    lorafit.save_adapter(net, tmp_path / "a")
    (row,) = analyze(tmp_path / "a")["spectra"]
    assert row["energy90_rank"] == 1 and row["layer"] is None and row["module"] == "fc"
    _, updates = read_updates(tmp_path / "a")
    delta = updates[0].B @ updates[0].A * updates[0].scale
    left = torch.linalg.svd(delta).U[:, 0]
    assert abs(float(left @ u.double())) > 0.99 and row["sigma"][0] == pytest.approx(2.0, rel=0.05)


def test_errors_name_the_key_and_the_orientation(tmp_path):
    model = tiny_gpt2()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    _save(model, tmp_path / "a", ["c_attn"], r=2)
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.attn\.c_attn\.weight"):
        amplification({k: v for k, v in base.items() if "h.0.attn.c_attn" not in k}, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, "fan_in_fan_out": False}))
    with pytest.raises(ValueError, match="fan_in_fan_out"):
        amplification(base, tmp_path / "a")
    _save(tiny_llama(), tmp_path / "llama", ["q_proj"], r=2)
    with pytest.raises(ValueError, match="share no module"):
        analyze(tmp_path / "a", tmp_path / "llama")


def test_write_report_writes_json_markdown_and_pngs(tmp_path):
    model = tiny_llama()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    _save(model, tmp_path / "r2", ["q_proj", "v_proj"], r=2)
    _save(tiny_llama(), tmp_path / "r8", ["q_proj", "v_proj"], r=8, seed=1)
    result = analyze(tmp_path / "r2", tmp_path / "r8", base_weights=base)
    paths = write_report(result, tmp_path / "out")
    names = sorted(p.name for p in paths)
    assert names == ["amplification.png", "analyze.json", "analyze.md", "phi_self_attn_q_proj.png",
                     "phi_self_attn_v_proj.png", "spectra.png", "spectra_other.png"]
    for path in paths:
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "out" / "analyze.json").read_text())["adapter"]["r"] == 2
    markdown = (tmp_path / "out" / "analyze.md").read_text()
    assert "## Amplification" in markdown and "## Subspace similarity" in markdown and "# Per layer" in markdown
    summary = format_tables(result)
    assert summary.count("| self_attn.q_proj |") == 3  # one summary row in each of the three tables
    assert not list((tmp_path / "out").glob(".*.tmp"))  # atomic writes leave no temp files
