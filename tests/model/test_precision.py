"""Precision that is part of a contract holds under bf16 autocast: the liquid scan accumulates in fp32
(its chunk matmuls would otherwise run in bf16 under autocast, on the CPU as on CUDA)."""
import torch

from pretrain.model.scan import liquid_scan


def test_scan_is_fp32_under_bf16_autocast():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 100, 3, 8, generator=g) for _ in range(3))
    log_decay = -torch.rand(2, 100, 3, generator=g)
    log_decay[0, 40] = float("-inf")  # a document start
    v.requires_grad_(True)
    y_ref, s_ref = liquid_scan(q, k, v, log_decay, chunk_size=16)
    (grad_ref,) = torch.autograd.grad(y_ref.square().sum(), v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, s = liquid_scan(q, k, v, log_decay, chunk_size=16)
    (grad,) = torch.autograd.grad(y.square().sum(), v)
    assert y.dtype == s.dtype == torch.float32
    assert torch.equal(y, y_ref) and torch.equal(s, s_ref) and torch.equal(grad, grad_ref)
