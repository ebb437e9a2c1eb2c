"""Blocked triangular and symmetric products against the dense products, in float64, with recursion depths from 0 to 4."""

import pytest
import torch

from curvlab.approx import triangular
from curvlab.approx.triangular import (symmetric_product, triangular_matmul, upper_gram_difference,
                                      upper_triangular_product)

SIZES = [1, 4, 5, 9, 16, 37, 70]  # with BLOCK = 4: leaves of every size 1–4, odd splits, up to four levels


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(triangular, "BLOCK", 4)


def _upper(n, generator):
    return torch.randn(n, n, dtype=torch.float64, generator=generator).triu_()


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("upper", [True, False])
def test_triangular_matmul_equals_the_dense_product(n, upper):
    generator = torch.Generator().manual_seed(n)
    t = _upper(n, generator)
    t = t if upper else t.T
    x = torch.randn(n, 3, dtype=torch.float64, generator=generator)
    torch.testing.assert_close(triangular_matmul(t, x, upper), t @ x, rtol=1e-13, atol=1e-13)
    # strided operands (transposed views), as PSGD's second mode passes them
    xt = torch.randn(3, n, dtype=torch.float64, generator=generator).T
    torch.testing.assert_close(triangular_matmul(t, xt, upper), t @ xt, rtol=1e-13, atol=1e-13)


def test_the_other_triangle_is_not_read_outside_the_diagonal_blocks():
    generator = torch.Generator().manual_seed(0)
    t = _upper(37, generator)
    garbage = t + torch.randn(37, 37, dtype=torch.float64, generator=generator).tril_(-5)
    x = torch.randn(37, 2, dtype=torch.float64, generator=generator)
    torch.testing.assert_close(triangular_matmul(garbage, x), t @ x, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("n", SIZES)
def test_upper_triangular_product_equals_the_dense_product_and_is_upper_triangular(n):
    generator = torch.Generator().manual_seed(n)
    u, v = _upper(n, generator), _upper(n, generator)
    product = upper_triangular_product(u, v)
    torch.testing.assert_close(product, u @ v, rtol=1e-13, atol=1e-13)
    assert torch.equal(product, product.triu())


@pytest.mark.parametrize("n", SIZES)
def test_upper_gram_difference_equals_the_dense_one(n):
    generator = torch.Generator().manual_seed(n)
    a, b = (torch.randn(n, 6, dtype=torch.float64, generator=generator) for _ in range(2))
    torch.testing.assert_close(upper_gram_difference(a, b), torch.triu(a @ a.T - b @ b.T), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(upper_gram_difference(a.T.contiguous().T, b), torch.triu(a @ a.T - b @ b.T),
                               rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("n", SIZES)
def test_symmetric_product_of_commuting_symmetric_matrices_equals_the_dense_product(n):
    generator = torch.Generator().manual_seed(n)
    a = torch.randn(n, n, dtype=torch.float64, generator=generator)
    a = a + a.T
    b = a @ a - 2 * a  # a polynomial in a: symmetric, commutes with a
    torch.testing.assert_close(symmetric_product(a, b), a @ b, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(symmetric_product(b, a), b @ a, rtol=1e-13, atol=1e-13)
