"""Scalar summaries of a spectrum: extreme eigenvalues, condition numbers, negative part, effective rank.

For eigenvalues ``λ_1 ≤ … ≤ λ_P`` of ``C`` and a damping ``δ ≥ 0``:

- ``λ_max``, ``λ_min``;
- ``κ₊ = λ_max / λ_min⁺``, the condition number of the positive part, ``λ_min⁺`` the smallest eigenvalue
  above the threshold ``τ`` (eigenvalues within ``τ`` of zero count as zero);
- ``κ_δ = (λ_max + δ) / (λ_min + δ)``, the condition number of the damped matrix ``C + δI`` (``inf``
  when ``C + δI`` is not positive definite);
- the negative count ``#{λ_i < −τ}`` and negative mass ``Σ_{λ_i < −τ} |λ_i| / Σ_i |λ_i|``;
- the effective rank ``exp(−Σ_i p_i log p_i)``, ``p_i = |λ_i| / Σ_j |λ_j|`` (Roy & Vetterli 2007): ``r``
  for ``r`` equal nonzero eigenvalues, smaller when a few dominate.

From a dense spectrum these are exact. From an SLQ spectrum the sums are quadratures,
``Σ_i g(λ_i) ≈ P · (1/n) Σ_probes Σ_j τ_j g(θ_j)``, so the counts, the mass and the effective rank are
estimates, ``λ_max``/``λ_min`` are the extreme Ritz values, and ``κ₊`` (which needs the smallest
positive eigenvalue, an interior one for an indefinite or singular matrix) is not available. From a
partial spectrum (Lanczos, or dense with ``k``) only the computed extremes are: ``λ_max`` from
``"LA"`` and ``"BE"`` (and from ``"LM"`` when a positive eigenvalue is among them), ``λ_min`` from
``"SA"`` and ``"BE"`` (and ``"LM"`` with a negative one). Quantities a spectrum cannot give are ``nan``.
"""

import math
from dataclasses import dataclass

import torch

from curvlab.errors import require_number
from curvlab.spectra.spectrum import Spectrum

LABELS = {
    "lambda_max": "λ_max",
    "lambda_min": "λ_min",
    "condition_positive": "κ₊ = λ_max / λ_min⁺ (positive part)",
    "condition_damped": "κ_δ = (λ_max + δ) / (λ_min + δ)",
    "negative_count": "#{λ < −τ} (negative eigenvalues)",
    "negative_mass": "Σ|λ₋| / Σ|λ| (negative mass)",
    "effective_rank": "exp H(|λ| / Σ|λ|) (effective rank)",
}


@dataclass(frozen=True)
class SpectralSummary:
    """The quantities of the module docstring; ``nan`` where the spectrum cannot give one.

    Attributes:
        damping: the ``δ`` of ``condition_damped``.
        threshold: the ``τ`` below which ``|λ|`` counts as zero.
        source: how the numbers were obtained, e.g. ``"dense eigh"`` or ``"SLQ estimate, 10 probes × 80 steps"``.
    """

    lambda_max: float
    lambda_min: float
    condition_positive: float
    condition_damped: float
    negative_count: float
    negative_mass: float
    effective_rank: float
    damping: float
    threshold: float
    source: str

    def rows(self) -> list[tuple[str, float]]:
        """``(label, value)`` for every quantity, labelled as in :data:`LABELS`."""
        return [(label, getattr(self, name)) for name, label in LABELS.items()]


def spectral_summary(spec: Spectrum, damping: float = 0.0, threshold: float | None = None) -> SpectralSummary:
    """The derived quantities of ``spec`` (see the module docstring).

    Args:
        spec: from :func:`curvlab.spectrum` (``"dense"`` with all eigenvalues for the complete set).
        damping: ``δ ≥ 0`` of the damped condition number.
        threshold: ``τ``; default ``P · ε · max|λ|`` for dense spectra (the rounding level of
            ``eigh``) and ``10⁻⁶ max|θ|`` for SLQ.

    Examples:
        >>> import torch
        >>> from curvlab.spectra.spectrum import Spectrum
        >>> values = torch.tensor([-1.0, 0.0, 2.0, 2.0], dtype=torch.float64)
        >>> spec = Spectrum(values, None, torch.zeros(4), torch.ones(4, dtype=torch.bool), 4, "dense", size=4)
        >>> s = spectral_summary(spec, damping=2.0)
        >>> s.condition_positive, s.condition_damped, s.negative_count, s.negative_mass
        (1.0, 4.0, 1.0, 0.2)
    """
    damping = require_number("damping", damping, strict=False)
    if spec.method == "slq":
        return _from_quadrature(spec, float(damping), threshold)
    values = spec.eigenvalues.detach().double().cpu()
    scale = float(values.abs().max())
    if threshold is None:
        threshold = spec.size * torch.finfo(spec.eigenvalues.dtype).eps * scale
    if spec.which is None:
        positive = values[values > threshold]
        negative = values[values < -threshold]
        return SpectralSummary(
            float(values[-1]), float(values[0]),
            float(values[-1] / positive[0]) if positive.numel() else math.nan,
            _damped_condition(float(values[-1]), float(values[0]), damping),
            float(negative.numel()), _ratio(float(negative.abs().sum()), float(values.abs().sum())),
            _effective_rank(values, torch.ones_like(values)), float(damping), float(threshold), "dense eigh",
        )
    has_top = spec.which in ("LA", "BE") or (spec.which == "LM" and values[-1] > 0)
    has_bottom = spec.which in ("SA", "BE") or (spec.which == "LM" and values[0] < 0)
    top = float(values[-1]) if has_top else math.nan
    bottom = float(values[0]) if has_bottom else math.nan
    unconverged = int((~spec.converged).sum())
    source = f"{spec.method}, {values.numel()} of {spec.size} eigenvalues (which={spec.which!r})" + (
        f", {unconverged} not converged" if unconverged else "")
    return SpectralSummary(top, bottom, math.nan, _damped_condition(top, bottom, damping), math.nan, math.nan,
                           math.nan, float(damping), float(threshold), source)


def _from_quadrature(spec: Spectrum, damping: float, threshold: float | None) -> SpectralSummary:
    nodes, weights = spec.nodes, spec.weights / spec.weights.shape[0]
    real = weights > 0
    nodes, weights = nodes[real], weights[real]
    scale = float(nodes.abs().max())
    threshold = 1e-6 * scale if threshold is None else threshold
    negative = nodes < -threshold
    lam_min, lam_max = float(spec.eigenvalues[0]), float(spec.eigenvalues[-1])
    return SpectralSummary(
        lam_max, lam_min, math.nan, _damped_condition(lam_max, lam_min, damping),
        float(spec.size * weights[negative].sum()),
        _ratio(float((weights * nodes.abs())[negative].sum()), float((weights * nodes.abs()).sum())),
        _effective_rank(nodes, spec.size * weights), damping, float(threshold),
        f"SLQ estimate, {spec.weights.shape[0]} probes × {spec.weights.shape[1]} steps",
    )


def _damped_condition(top: float, bottom: float, damping: float) -> float:
    if math.isnan(top) or math.isnan(bottom):
        return math.nan
    return (top + damping) / (bottom + damping) if bottom + damping > 0 else math.inf


def _ratio(part: float, whole: float) -> float:
    return part / whole if whole > 0 else 0.0


def _effective_rank(values: torch.Tensor, multiplicity: torch.Tensor) -> float:
    """``exp(−Σ p log p)`` over eigenvalues ``values`` each counted ``multiplicity`` times."""
    magnitude = values.abs()
    total = float((multiplicity * magnitude).sum())
    if total == 0:
        return 0.0
    p = magnitude / total
    terms = torch.where(p > 0, p * torch.log(p.clamp(min=torch.finfo(p.dtype).tiny)), torch.zeros_like(p))
    return math.exp(-float((multiplicity * terms).sum()))
