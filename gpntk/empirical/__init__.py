"""Empirical (finite-width) NTK and NNGP of any ``torch.nn.Module``, and Monte Carlo estimates."""

from .functions import empirical_nngp, empirical_ntk, monte_carlo_kernel

__all__ = ["empirical_ntk", "empirical_nngp", "monte_carlo_kernel"]
