"""The combining maths, tensor by tensor, against PEFT's merge_utils and plain fp64 algebra."""

import pytest
import torch

from lorafit.core import task_arithmetic as ta
from tests.conftest import gaussian

TENSORS = [gaussian((6, 10), seed=i) for i in range(3)]
WEIGHTS = [0.7, -0.4, 1.3]


@pytest.fixture
def merge_utils():
    return pytest.importorskip("peft.utils.merge_utils")


def test_weighted_sum_is_the_fp64_sum():
    want = sum(w * t.double() for w, t in zip(WEIGHTS, TENSORS, strict=True))
    assert (ta.weighted_sum(TENSORS, WEIGHTS).double() - want).abs().max().item() <= 1e-6


@pytest.mark.parametrize("majority", ["total", "frequency"])
@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_equals_peft(majority, density, merge_utils):
    ours = ta.ties(TENSORS, WEIGHTS, density, majority)
    theirs = merge_utils.ties(TENSORS, torch.tensor(WEIGHTS), density, majority)
    assert (ours - theirs).abs().max().item() <= 1e-6


def test_ties_averages_only_the_kept_entries_of_the_elected_sign():
    a, b, c = torch.tensor([[3.0, -1.0]]), torch.tensor([[-2.0, -1.0]]), torch.tensor([[1.0, 4.0]])
    # column 0: 3 - 2 + 1 > 0 elects +, so 3 and 1 are averaged; column 1: -1 - 1 + 4 > 0 elects +: only 4
    assert ta.ties([a, b, c], [1.0, 1.0, 1.0], 1.0, "total").tolist() == [[2.0, 4.0]]
    # by count, column 1 has two minus signs: -1 and -1 are averaged
    assert ta.ties([a, b, c], [1.0, 1.0, 1.0], 1.0, "frequency").tolist() == [[2.0, -1.0]]


def test_keep_largest_keeps_the_top_fraction_by_magnitude():
    t = torch.tensor([0.1, -5.0, 2.0, -0.3, 4.0])
    assert ta.keep_largest(t, 0.4).tolist() == [0.0, -5.0, 0.0, 0.0, 4.0]


@pytest.mark.parametrize("density", [0.3, 0.9])
def test_dare_linear_draws_the_same_masks_as_peft_from_the_same_seed(density, merge_utils):
    torch.manual_seed(11)
    theirs = merge_utils.dare_linear(TENSORS, torch.tensor(WEIGHTS), density)
    ours = ta.dare_linear(TENSORS, WEIGHTS, density, torch.Generator().manual_seed(11))
    assert (ours - theirs).abs().max().item() <= 1e-6


def test_dare_keeps_about_density_of_the_entries_and_the_expectation():
    big = gaussian((200, 200), seed=5)
    runs = torch.stack([ta.drop_random(big, 0.25, torch.Generator().manual_seed(s)) for s in range(200)])
    kept = (runs != 0).double().mean().item()
    assert abs(kept - 0.25) < 0.005  # 8M Bernoulli(0.25) draws: the standard error is 1.5e-4
    assert (runs[0][runs[0] != 0] - 4 * big[runs[0] != 0]).abs().max().item() <= 1e-5  # survivors / density
    # the mean over 200 draws is unbiased: each entry's error has std |x| sqrt((1 - d) / d / 200) = 0.12 |x|
    assert ((runs.mean(0) - big).abs() <= 0.6 * big.abs() + 1e-6).double().mean().item() > 0.99


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_low_rank_split_is_the_best_rank_r_approximation(rank):
    delta = (gaussian((8, 5), seed=1) @ gaussian((5, 12), seed=2)).double()  # rank 5
    b, a = ta.low_rank_split(delta.float(), rank)
    assert b.shape == (8, rank) and a.shape == (rank, 12)
    s = torch.linalg.svdvals(delta)
    best = s[rank:].pow(2).sum().sqrt().item()  # Eckart-Young: the smallest Frobenius error of any rank-r matrix
    assert abs(torch.linalg.norm(delta - (b @ a).double()).item() - best) <= 1e-4 * s[0].item()


def test_low_rank_split_clamps_to_the_quantile():
    delta = gaussian((8, 12), seed=3)
    b, a = ta.low_rank_split(delta, 4, clamp=0.8)
    limit = torch.quantile(torch.cat([x.flatten() for x in ta.low_rank_split(delta, 4)]), 0.8).item()
    assert max(b.abs().max().item(), a.abs().max().item()) <= limit + 1e-6
