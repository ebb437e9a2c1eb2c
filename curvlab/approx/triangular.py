"""Products with triangular matrices, and products known to be symmetric, by 2 × 2 blocks that skip work.

torch has no triangular matrix product (BLAS ``trmm``). Split at ``h = n/2``, an upper-triangular
``U = [[U₁₁, U₁₂], [0, U₂₂]]`` gives ``U X = [U₁₁X₁ + U₁₂X₂; U₂₂X₂]``: three dense products of half
size instead of four, recursively down to :data:`BLOCK`, so ``9/16`` of a dense product's flops at three
levels (``n = 8·BLOCK``), tending to ``1/2``; a product of two upper-triangular matrices needs only its
upper blocks (``15/64`` at three levels, tending to ``1/6``). These are PSGD's products (its factors ``Q``
are upper triangular): on 2 CPU threads, ``n = 2048``, float32, ``Q X`` took 0.54 and ``Q₁Q₂`` 0.35 of
the dense product's time. A product known to be symmetric (of two commuting symmetric matrices, as
Shampoo's coupled Newton iterates are) needs only its blocks on and above the diagonal, the rest a
transposed copy: ``9/16`` of the flops at three levels, 0.62–0.67 of the dense time at ``n = 784, 2048``.
"""

import torch

#: Blocks of this size or smaller are multiplied densely (256 was the fastest of 256, 512, 1024 above).
BLOCK = 256


def triangular_matmul(t: torch.Tensor, x: torch.Tensor, upper: bool = True) -> torch.Tensor:
    """``T X`` for ``T`` ``(n, n)`` upper (or lower) triangular and ``X`` ``(n, k)``; ``T``'s other triangle is not read
    beyond the diagonal blocks of size :data:`BLOCK`, where it must be zero."""
    n = t.shape[0]
    if n <= BLOCK:
        return t @ x
    h = n // 2
    out = torch.empty(n, x.shape[1], dtype=torch.result_type(t, x), device=x.device)
    if upper:
        torch.addmm(triangular_matmul(t[:h, :h], x[:h]), t[:h, h:], x[h:], out=out[:h])
        out[h:] = triangular_matmul(t[h:, h:], x[h:])
    else:
        out[:h] = triangular_matmul(t[:h, :h], x[:h], upper=False)
        torch.addmm(triangular_matmul(t[h:, h:], x[h:], upper=False), t[h:, :h], x[:h], out=out[h:])
    return out


def upper_triangular_product(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``U V`` for upper-triangular ``U``, ``V`` ``(n, n)``: upper triangular, its lower blocks written as zeros."""
    n = u.shape[0]
    if n <= BLOCK:
        return u @ v
    h = n // 2
    out = torch.zeros(n, n, dtype=torch.result_type(u, v), device=u.device)
    out[:h, :h] = upper_triangular_product(u[:h, :h], v[:h, :h])
    corner = triangular_matmul(u[:h, :h], v[:h, h:])  # U₁₁V₁₂ + U₁₂V₂₂, the second as (V₂₂ᵀ U₁₂ᵀ)ᵀ
    out[:h, h:] = triangular_matmul(v[h:, h:].T, u[:h, h:].T, upper=False).T.add_(corner)
    out[h:, h:] = upper_triangular_product(u[h:, h:], v[h:, h:])
    return out


def upper_gram_difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``triu(A Aᵀ − B Bᵀ)`` for ``A``, ``B`` ``(n, k)``, computing only the blocks on and above the diagonal."""
    n = a.shape[0]
    if n <= BLOCK:
        return (a @ a.T).addmm_(b, b.T, alpha=-1).triu_()
    h = n // 2
    out = torch.zeros(n, n, dtype=torch.result_type(a, b), device=a.device)
    out[:h, :h] = upper_gram_difference(a[:h], b[:h])
    torch.addmm(a[:h] @ a[h:].T, b[:h], b[h:].T, alpha=-1, out=out[:h, h:])
    out[h:, h:] = upper_gram_difference(a[h:], b[h:])
    return out


def symmetric_product(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``X Y`` for ``X``, ``Y`` ``(n, n)`` whose product is symmetric (e.g. commuting symmetric matrices): the blocks
    above the diagonal are computed, those below copied from them (leaves of :data:`BLOCK` dense)."""
    out = torch.empty(x.shape[0], y.shape[1], dtype=torch.result_type(x, y), device=x.device)
    _upper_product(x, y, out)
    return out


def _upper_product(x: torch.Tensor, y: torch.Tensor, out: torch.Tensor) -> None:
    """Write ``X Y`` into ``out`` ``(n, n)`` from its blocks on and above the diagonal, mirroring the others."""
    n = out.shape[0]
    if n <= BLOCK:
        torch.mm(x, y, out=out)
        return
    h = n // 2
    _upper_product(x[:h], y[:, :h], out[:h, :h])
    torch.mm(x[:h], y[:, h:], out=out[:h, h:])
    out[h:, :h] = out[:h, h:].T
    _upper_product(x[h:], y[:, h:], out[h:, h:])
