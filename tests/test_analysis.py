"""ΔW analysis: spectra, effective rank and the paper's subspace similarity on known matrices."""

import math

import pytest
import torch
from torch import nn

from lightning_lora import inject_lora, lora_parameters
from lightning_lora.analysis import (
    delta_stats,
    effective_rank,
    subspace_similarity,
    subspace_similarity_grid,
    summary_metrics,
)


def basis(*rows, d=6):
    """Rows of the identity: an A whose row space is spanned by e_k for k in rows."""
    return torch.eye(d)[list(rows)]


def test_an_adapter_is_fully_similar_to_itself():
    A = torch.randn(4, 10)
    for i in range(1, 5):
        assert subspace_similarity(A, A, i, i) == pytest.approx(1.0)


def test_orthogonal_subspaces_have_similarity_zero():
    assert subspace_similarity(basis(0, 1), basis(2, 3), 2, 2) == pytest.approx(0.0, abs=1e-12)


def test_a_subspace_inside_another_has_similarity_one_either_way():
    small, large = basis(0), basis(0, 1, 2)
    assert subspace_similarity(small, large, 1, 3) == pytest.approx(1.0)
    assert subspace_similarity(large, small, 3, 1) == pytest.approx(1.0)


def test_a_direction_at_45_degrees_shares_half():
    diagonal = (basis(0) + basis(1)) / math.sqrt(2)
    assert subspace_similarity(basis(0), diagonal, 1, 1) == pytest.approx(0.5)


def test_similarity_uses_the_top_singular_directions_in_order():
    # A2's strongest direction is e0, its weaker one e1: i=1 sees only e0.
    A1 = basis(1)
    A2 = torch.stack([3 * torch.eye(6)[0], torch.eye(6)[1]])
    assert subspace_similarity(A1, A2, 1, 1) == pytest.approx(0.0, abs=1e-12)
    assert subspace_similarity(A1, A2, 1, 2) == pytest.approx(1.0)


def test_similarity_ignores_scale_and_rotation_within_the_subspace():
    A = torch.randn(3, 8)
    rotated = torch.linalg.qr(torch.randn(3, 3))[0] @ A * 7.0
    assert subspace_similarity(A, rotated, 3, 3) == pytest.approx(1.0)


def test_grid_matches_pairwise_similarity():
    torch.manual_seed(0)
    A1, A2 = torch.randn(4, 12), torch.randn(8, 12)
    grid = subspace_similarity_grid(A1, A2)
    assert grid.shape == (4, 8)
    for i in range(1, 5):
        for j in range(1, 9):
            assert grid[i - 1, j - 1].item() == pytest.approx(subspace_similarity(A1, A2, i, j), abs=1e-9)
    assert ((grid >= -1e-12) & (grid <= 1 + 1e-12)).all()


def test_random_subspaces_overlap_about_as_chance_predicts():
    # Two random i- and j-dimensional subspaces of R^d share about max(i, j)/d.
    torch.manual_seed(0)
    d = 400
    values = [subspace_similarity(torch.randn(8, d), torch.randn(8, d), 8, 8) for _ in range(5)]
    assert sum(values) / len(values) == pytest.approx(8 / d, rel=0.5)


def test_effective_rank_counts_equal_directions():
    assert effective_rank(torch.tensor([2.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert effective_rank(torch.tensor([1.0, 1.0, 1.0, 1.0])) == pytest.approx(4.0)
    assert effective_rank(torch.zeros(3)) == 0.0
    assert 1.0 < effective_rank(torch.tensor([3.0, 1.0])) < 2.0


def test_delta_stats_equal_the_svd_of_the_dense_update():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 10))
    inject_lora(model, r=4, alpha=8, target_modules=["0", "2"])
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_()
    stats = delta_stats(model)
    assert [s.name for s in stats] == ["0", "2"]
    layer = model[0]
    dense = 2.0 * layer.lora_B["default"] @ layer.lora_A["default"]
    dense_sigma = torch.linalg.svdvals(dense.detach())
    torch.testing.assert_close(torch.tensor(stats[0].singular_values), dense_sigma[:4], rtol=1e-4, atol=1e-4)
    assert dense_sigma[4:].abs().max() < 1e-4  # rank ΔW ≤ r
    assert len(stats[0].singular_values) == 4 and stats[0].r == 4
    assert stats[0].relative_norm == pytest.approx(float(dense.norm() / layer.weight.norm()), rel=1e-5)
    metrics = summary_metrics(stats)
    assert 1.0 <= metrics["lora_delta/effective_rank_mean"] <= 4.0


def test_a_fresh_adapter_has_no_update():
    model = nn.Sequential(nn.Linear(8, 8))
    inject_lora(model, r=2, target_modules=["0"])
    (stats,) = delta_stats(model)
    assert stats.delta_norm == 0.0 and stats.effective_rank == 0.0
