"""Merge maths against hand-computed tensors, and sparsifiers by their properties."""

from __future__ import annotations

import pytest
import torch

from guardmerge.merge import dare, magnitude_trim, merge_tensor
from guardmerge.merge.sparsify import seed_for, dare_generator

T = torch.tensor


def test_linear_is_weighted_mean_of_sources():
    out = merge_tensor("linear", None, [T([1.0, 2.0]), T([3.0, 6.0])], [1.0, 3.0], [1.0, 1.0])
    assert out.tolist() == [2.5, 5.0]


def test_task_arithmetic():
    base = T([1.0, 1.0])
    out = merge_tensor("task_arithmetic", base, [T([2.0, 0.0]), T([1.0, 3.0])], [1.0, 0.5],
                       [1.0, 1.0], lam=2.0)
    # d1 = [1, -1], d2 = [0, 2]; sum w d = [1, 0]; base + 2 * that
    assert out.tolist() == [3.0, 1.0]


def test_ties_trim_elect_and_disjoint_mean():
    base = T([1.0, 1.0, 1.0, 1.0])
    x1 = base + T([4.0, -3.0, 1.0, 2.0])
    x2 = base + T([2.0, 1.0, -5.0, 0.5])
    out = merge_tensor("ties", base, [x1, x2], [1.0, 2.0], [0.75, 0.75])
    # k = int(0.75 * 4) = 3: t1 = [4, -3, 0, 2], t2 = [2, 1, -5, 0]
    # weighted sum [8, -1, -10, 2] -> signs [+, -, -, +]
    # kept: t1 [4, -3, -, 2], t2 [2, -, -5, -]; means [(4 + 2*2)/3, -3/1, -5*2/2, 2/1]
    expected = base + T([8.0 / 3.0, -3.0, -5.0, 2.0])
    assert torch.allclose(out, expected)


def test_ties_lambda_scales_the_merged_vector():
    base = T([0.0, 0.0])
    out = merge_tensor("ties", base, [T([2.0, -4.0])], [1.0], [1.0], lam=0.5)
    assert out.tolist() == [1.0, -2.0]


def test_sign_election_zero_counts_as_plus_and_zero_over_zero_is_zero():
    base = T([5.0, 5.0])
    # entry 0: +1 and -1 with equal weights: sum 0 elects +, keeps only +1
    # entry 1: both deltas are 0: nothing kept, 0/0 -> 0, result is the base
    out = merge_tensor("ties", base, [base + T([1.0, 0.0]), base + T([-1.0, 0.0])], [1.0, 1.0],
                       [1.0, 1.0])
    assert out.tolist() == [6.0, 5.0]


def test_magnitude_trim_keeps_exactly_k_largest():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(40, 25, generator=g)
    for density, k in [(0.1, 100), (0.37, 370), (1e-6, 1), (1.0, 1000)]:
        t = magnitude_trim(d, density)
        nz = t != 0
        assert int(nz.sum()) == k
        assert torch.equal(t[nz], d[nz])  # kept values unchanged
        if k < d.numel():
            assert d[nz].abs().min() >= d[~nz].abs().max()
    assert torch.equal(d, torch.randn(40, 25, generator=torch.Generator().manual_seed(0)))  # input untouched


def test_dare_rescales_survivors_by_one_over_density():
    d = torch.linspace(-1, 1, 10_000)
    out = dare(d, 0.2, dare_generator(0, "w"))
    kept = out != 0
    assert torch.allclose(out[kept], d[kept] / 0.2)
    assert 0.18 < kept.float().mean().item() < 0.22


def test_dare_expectation_is_the_input():
    d = T([0.5, -1.0, 2.0, 0.0])
    total = torch.zeros(4)
    n = 4000
    for s in range(n):
        total += dare(d, 0.3, dare_generator(s, "x"))
    assert torch.allclose(total / n, d, atol=0.1)


def test_dare_linear_expectation_is_task_arithmetic():
    base = T([1.0, 2.0, 3.0])
    x1, x2 = base + T([1.0, -1.0, 0.5]), base + T([0.5, 0.5, -2.0])
    n = 3000
    acc = torch.zeros(3)
    for s in range(n):
        acc += merge_tensor("dare_linear", base, [x1, x2], [1.0, 1.0], [0.4, 0.6], seed=s, name="t")
    ta = merge_tensor("task_arithmetic", base, [x1, x2], [1.0, 1.0], [1.0, 1.0])
    assert torch.allclose(acc / n, ta, atol=0.1)


def test_dare_ties_single_source_entries_are_base_or_rescaled_delta():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(200, generator=g)
    d = torch.randn(200, generator=g)
    out = merge_tensor("dare_ties", base, [base + d], [1.0], [0.25], lam=1.0, seed=3, name="layer")
    dropped = torch.isclose(out, base)
    assert torch.allclose(out[~dropped], (base + d / 0.25)[~dropped], atol=1e-5)
    assert 0.15 < (~dropped).float().mean() < 0.35


def test_dare_ties_at_full_density_equals_ties():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(50, generator=g)
    xs = [base + torch.randn(50, generator=g) for _ in range(3)]
    a = merge_tensor("dare_ties", base, xs, [1.0, 2.0, 0.5], [1.0] * 3, seed=0, name="a")
    b = merge_tensor("ties", base, xs, [1.0, 2.0, 0.5], [1.0] * 3)
    assert torch.allclose(a, b)


def test_seed_depends_on_seed_name_and_source_only():
    assert seed_for(1, "a.weight") == seed_for(1, "a.weight")
    assert seed_for(1, "a.weight", 0) != seed_for(1, "a.weight", 1)
    assert seed_for(1, "a.weight") != seed_for(2, "a.weight")
    assert seed_for(1, "a.weight") != seed_for(1, "b.weight")


def test_bad_arguments():
    with pytest.raises(ValueError, match="density"):
        magnitude_trim(T([1.0]), 0.0)
    with pytest.raises(ValueError, match="unknown merge method"):
        merge_tensor("slerp", T([1.0]), [T([1.0])], [1.0], [1.0])
    with pytest.raises(ValueError, match="one weight and one density per source"):
        merge_tensor("ties", T([1.0]), [T([1.0])], [1.0, 2.0], [0.5])
    with pytest.raises(ValueError, match="density"):
        merge_tensor("dare_ties", T([1.0]), [T([1.0])], [1.0], [0.0])


def test_merge_mask_matches_dare_function_and_blocks_do_not_change_results():
    from guardmerge.merge.sparsify import CHUNK

    n = CHUNK * 2 + 123  # several blocks, the last one partial
    g = torch.Generator().manual_seed(5)
    base, d = torch.randn(n, generator=g), torch.randn(n, generator=g)
    merged = merge_tensor("dare_linear", base, [base + d], [1.0], [0.3], seed=9, name="w")
    expected = base + dare(d, 0.3, dare_generator(9, "w", 0))
    assert torch.allclose(merged, expected, atol=1e-5)


def test_inputs_are_never_modified():
    g = torch.Generator().manual_seed(6)
    base, x1, x2 = (torch.randn(1000, generator=g) for _ in range(3))
    copies = [t.clone() for t in (base, x1, x2)]
    for method in ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear"):
        merge_tensor(method, base, [x1, x2], [1.0, 2.0], [0.5, 0.5], seed=1, name="x")
    from guardmerge.merge import merge_task_vectors

    for method in ("task_arithmetic", "ties", "dare_ties", "dare_linear"):
        merge_task_vectors(method, base, [x1, x2], [1.0, 1.0], [0.5, 0.5])
    for a, b in zip((base, x1, x2), copies):
        assert torch.equal(a, b)


def test_task_vector_path_equals_source_path():
    g = torch.Generator().manual_seed(8)
    base, x1, x2 = (torch.randn(3000, generator=g) for _ in range(3))
    from guardmerge.merge import merge_task_vectors

    for method in ("task_arithmetic", "ties", "dare_ties", "dare_linear"):
        a = merge_tensor(method, base, [x1, x2], [1.0, 2.0], [0.3, 0.6], lam=0.7, seed=4, name="t")
        b = merge_task_vectors(method, base, [x1 - base, x2 - base], [1.0, 2.0], [0.3, 0.6],
                               lam=0.7, seed=4, name="t")
        assert torch.equal(a, b), method


def test_dare_keep_resolves_16_bit_ties_with_the_low_half_exactly():
    import numpy as np

    from guardmerge.merge.sparsify import dare_keep

    density = 0.3
    threshold = int(density * 2**32)
    hi, lo = threshold >> 16, threshold & 0xFFFF

    class Scripted:  # a bit generator whose raw 64-bit words we choose
        def __init__(self, words):
            self.words = list(words)

        def random_raw(self, size):
            out, self.words = self.words[:size], self.words[size:]
            return np.array(out, dtype=np.uint64)

    def pack(*halves):  # four 16-bit draws per 64-bit word, lowest first
        return sum(int(h) << (16 * i) for i, h in enumerate(halves))

    # draws: below hi (kept), above hi (dropped), tie + low below lo (kept), tie + low at lo (dropped)
    gen = Scripted([pack(hi - 1, hi + 1, hi, hi), pack(lo - 1, lo, 0, 0)])
    assert dare_keep(gen, 4, density).tolist() == [1.0, 0.0, 1.0, 0.0]
    assert gen.words == []  # one extra word for the two ties, nothing more
