"""How the covariance sum's precision moves the designed subspace, on synthetic massive activations.

LLM hidden states carry a few "massive" coordinates (values in the thousands on
a small share of tokens) beside ordinary ones. Over many batches, a float32
running sum of x^T x rounds away what the ordinary directions add; the top-r
subspace A is designed from then drifts. `projector_errors` compares, against an
all-float64 reference over the same float32 activations:

  * fp32_gemm_fp64_sum: each batch's x^T x in float32, summed in float64 (what
    the collector does on accelerators);
  * fp32_all: product and running sum in float32 (the collector before).

The figure is the spectral norm of the difference of the top-`rank` projectors
U_r U_r^T (1 means a direction is lost entirely). `bench scale` prints it.
"""

from __future__ import annotations

import torch


def projector_errors(
    dim: int = 48,
    batches: int = 400,
    tokens: int = 512,
    rank: int = 8,
    seed: int = 0,
    massive: float = 1e4,
    share: float = 0.02,
    num_massive: int = 2,
) -> dict[str, float]:
    """Top-`rank` projector error of the float32-GEMM + float64-sum and all-float32 covariances.

    Activations: a decaying spectrum (1 -> 0.05) in a random basis plus a mean
    of 1, and on `share` of the tokens the first `num_massive` coordinates set to
    about `massive`. Deterministic in `seed`.
    """
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    scales = torch.linspace(1.0, 0.05, dim, dtype=torch.float64)
    reference = torch.zeros(dim, dim, dtype=torch.float64)
    mixed = torch.zeros(dim, dim, dtype=torch.float64)
    single = torch.zeros(dim, dim, dtype=torch.float32)
    for _ in range(batches):
        x = (torch.randn(tokens, dim, generator=g, dtype=torch.float64) * scales) @ basis.T + 1.0
        hot = torch.rand(tokens, generator=g) < share
        noise = 1 + 0.1 * torch.randn(int(hot.sum()), num_massive, generator=g, dtype=torch.float64)
        x[hot, :num_massive] = massive * noise
        x32 = x.float()  # the activations as the model produces them
        x64 = x32.double()
        reference += x64.T @ x64
        mixed += (x32.T @ x32).double()
        single += x32.T @ x32

    def projector(c: torch.Tensor) -> torch.Tensor:
        u, _, _ = torch.linalg.svd(c.double())  # float64 decomposition for every arm: only the sum differs
        return u[:, :rank] @ u[:, :rank].T

    ref = projector(reference)
    return {
        "fp32_gemm_fp64_sum": float(torch.linalg.matrix_norm(projector(mixed) - ref, ord=2)),
        "fp32_all": float(torch.linalg.matrix_norm(projector(single) - ref, ord=2)),
    }
