"""Every structured block's product, damped inverse and power equal those of its dense matrix (float64)."""

import pytest
import torch

from curvlab.approx import (DenseBlock, DiagonalBlock, EigenbasisBlock, Homogeneous, KroneckerBlock, LowRankBlock,
                            Reshape)
from curvlab.errors import InvalidProblem


def _spd(n, generator, rank=None):
    a = torch.randn(n, rank or n, generator=generator, dtype=torch.float64)
    return a @ a.T / n


def _dense_power(m, p):
    values, vectors = torch.linalg.eigh(m)
    return (vectors * values.clamp(min=0) ** p) @ vectors.T


def _blocks():
    g = torch.Generator().manual_seed(0)
    A, B, C = _spd(3, g), _spd(4, g), _spd(2, g)
    Q = [torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0] for n in (4, 3)]
    S = torch.rand(4, 3, generator=g, dtype=torch.float64) + 0.1
    U = torch.randn(7, 3, generator=g, dtype=torch.float64)
    core = _spd(3, g)
    return {
        "diagonal": DiagonalBlock(torch.rand(6, generator=g, dtype=torch.float64) + 0.1),
        "dense": DenseBlock(_spd(5, g)),
        "kronecker": KroneckerBlock([B, A], Reshape((4, 3))),
        "kronecker3": KroneckerBlock([C, B, A], Reshape((2, 4, 3))),
        "homogeneous": KroneckerBlock([B, _spd(4, g)], Homogeneous(4, 3)),
        "eigenbasis": EigenbasisBlock(Q, S, Reshape((4, 3))),
        "lowrank": LowRankBlock(U, core),
        "lowrank+diagonal": LowRankBlock(U, core, torch.rand(7, generator=g, dtype=torch.float64) + 0.1),
    }


BLOCKS = _blocks()


def test_kronecker_block_is_the_row_major_kronecker_product():
    block = BLOCKS["kronecker"]
    B, A = block.factors
    assert torch.allclose(block.to_dense(), torch.kron(B, A), rtol=1e-14, atol=1e-14)
    three = BLOCKS["kronecker3"]
    assert torch.allclose(three.to_dense(), torch.kron(torch.kron(*three.factors[:2]), three.factors[2]), atol=1e-14)


def test_homogeneous_layout_joins_weight_and_bias_as_last_column():
    layout = Homogeneous(4, 3)
    rows = torch.arange(16.0).reshape(1, 16)
    tensor = layout.to_tensor(rows)
    assert torch.equal(tensor[0, :, :3], rows[0, :12].reshape(4, 3))
    assert torch.equal(tensor[0, :, 3], rows[0, 12:])
    assert torch.equal(layout.to_rows(tensor), rows)


@pytest.mark.parametrize("name", list(BLOCKS))
def test_damped_inverse_undoes_the_damped_block(name):
    block = BLOCKS[name]
    dense = block.to_dense()
    damping = 0.3
    inverse = block.inverse(damping).to_dense()
    eye = torch.eye(block.size, dtype=torch.float64)
    # Both sides are O(1) matrices with condition numbers below 100: rounding stays near 1e-13.
    assert torch.allclose(inverse @ (dense + damping * eye), eye, atol=1e-12)


@pytest.mark.parametrize("name", [n for n in BLOCKS if n != "lowrank+diagonal"])
@pytest.mark.parametrize("p", [0.5, -0.25, 2.0])
def test_power_equals_the_dense_matrix_power(name, p):
    block = BLOCKS[name]
    dense = block.to_dense()
    if p < 0 and name == "lowrank":
        with pytest.raises(InvalidProblem, match="singular"):
            block.power(p)
        return
    assert torch.allclose(block.power(p).to_dense(), _dense_power(dense, p), atol=1e-12)


def test_power_of_a_diagonal_plus_low_rank_block_is_refused():
    with pytest.raises(InvalidProblem, match="no cheap power"):
        BLOCKS["lowrank+diagonal"].power(0.5)


def test_fractional_power_of_an_indefinite_block_is_refused():
    with pytest.raises(InvalidProblem, match="negative eigenvalues"):
        DenseBlock(torch.diag(torch.tensor([1.0, -1.0], dtype=torch.float64))).power(0.5)
