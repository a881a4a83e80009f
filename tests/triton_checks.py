"""The Triton readout against the float64 reference and the torch readout, run in Triton's interpreter.

Run as a script with ``TRITON_INTERPRET=1`` in the environment (tests/test_triton_readout.py does, in a
subprocess, so that the variable is set before Triton is imported); on a CUDA machine without it, the
same checks run on the GPU (``python tests/triton_checks.py --device cuda``). Exits non-zero on the first
failure, printing what differed.
"""

import argparse
import sys

import torch

from nala_diffusion.ops import NaLaParams, rope_2d_tables
from nala_diffusion.ops.feature_maps import nala_key_halves, nala_query_halves, scaled_keys
from nala_diffusion.ops.readout import split_readout

TOLERANCES = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (2e-2, 8e-2)}  # (atol, rtol), as flash-bla's tests


def features(q, k, params):
    k, eps = scaled_keys(k, params)
    return nala_query_halves(q, params), nala_key_halves(k, params), eps


def check_readout(device, dtype, head_dim, tokens, keys, inhibit, rope, heads=2, batch=1):
    generator = torch.Generator().manual_seed(head_dim + tokens + keys)
    q = (torch.randn(batch, heads, tokens, head_dim, generator=generator) * 2).double()
    k = (torch.randn(batch, heads, keys, head_dim, generator=generator) * 2).double()
    v = torch.randn(batch, heads, keys, head_dim, generator=generator).double()
    # per-head lambda and sigma, as learnable and calibrated layers hand them down
    params = NaLaParams(inhibit=inhibit, power_scale=torch.tensor([2.5, 3.5]).double().view(1, heads, 1, 1),
                        norm_scale=torch.tensor([4.0, 6.0]).double().view(1, heads, 1, 1))
    tables = rope_2d_tables((tokens, 1), head_dim, dtype=torch.float64) if rope else None
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    q_parts, k_parts, eps = features(leaves[0], leaves[1], params)
    reference = split_readout(q_parts, k_parts, leaves[2], eps, tables, backend="torch")
    grad_out = torch.randn(reference.shape, generator=generator).double()
    reference_grads = torch.autograd.grad(reference, leaves, grad_out)

    low = [x.to(device, dtype).requires_grad_() for x in (q, k, v)]
    params_low = NaLaParams(inhibit=inhibit, power_scale=params.power_scale.float().to(device),
                            norm_scale=params.norm_scale.float().to(device))
    tables_low = tuple(t.float().to(device) for t in tables) if rope else None
    # the features in the compute dtype (as nala_attention makes them), the readout's inputs in ``dtype``
    q_parts, k_parts, eps = features(low[0].float(), low[1].float(), params_low)
    q_parts, k_parts = [x.to(dtype) for x in q_parts], [x.to(dtype) for x in k_parts]
    results = {}
    for backend in ("triton", "torch"):
        out = split_readout(q_parts, k_parts, low[2], eps, tables_low, backend=backend)
        grads = torch.autograd.grad(out, low, grad_out.to(device, out.dtype), retain_graph=True)
        results[backend] = (out, grads)
    atol, rtol = TOLERANCES[dtype]
    out, grads = results["triton"]
    assert out.dtype == dtype, out.dtype
    case = f"{dtype} d={head_dim} N={tokens} M={keys} {inhibit} rope={rope}"
    if dtype == torch.float32:  # against float64: only the kernel's own rounding
        torch.testing.assert_close(out.double().cpu(), reference, atol=atol, rtol=rtol, msg=lambda m: case + " out: " + m)
        for name, got, want in zip("qkv", grads, reference_grads):
            scale = want.abs().max().item() + 1e-30
            torch.testing.assert_close(got.double().cpu() / scale, want / scale, atol=atol, rtol=rtol,
                                       msg=lambda m, name=name: f"{case} d{name}: {m}")
    # against the torch readout on the same inputs
    torch.testing.assert_close(out.float(), results["torch"][0].float(), atol=atol, rtol=rtol,
                               msg=lambda m: case + " out vs torch: " + m)
    for name, got, want in zip("qkv", grads, results["torch"][1]):
        scale = want.abs().max().item() + 1e-30
        torch.testing.assert_close(got.float() / scale, want.float() / scale, atol=atol, rtol=rtol,
                                   msg=lambda m, name=name: f"{case} d{name} vs torch: {m}")
    return case


def check_model(device):
    """A whole NaLa DiT, forward and backward, Triton readout against the torch readout."""
    from nala_diffusion import NaLaDiTTransformer2DModel, set_attention_backend

    torch.manual_seed(0)
    model = NaLaDiTTransformer2DModel(num_layers=2, num_attention_heads=2, attention_head_dim=32, in_channels=3,
                                      out_channels=3, sample_size=12, patch_size=2, num_classes=4,
                                      norm_num_groups=1, use_rope=True).to(device)
    from nala_diffusion.ops import triton_readout

    calls = []
    kernel = triton_readout.triton_split_readout
    triton_readout.triton_split_readout = lambda *a, **k: calls.append(1) or kernel(*a, **k)
    x = torch.randn(2, 3, 12, 12, device=device)
    t, y = torch.tensor([10, 600], device=device), torch.tensor([1, 3], device=device)
    outputs = {}
    for backend in ("triton", "torch"):
        assert set_attention_backend(model, backend) == 2
        model.zero_grad()
        out = model(x, timestep=t, class_labels=y).sample
        out.square().mean().backward()
        outputs[backend] = (out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    triton_readout.triton_split_readout = kernel
    assert len(calls) == 2, f"the Triton readout ran {len(calls)} times for 2 NaLa layers"  # not a silent fallback
    torch.testing.assert_close(outputs["triton"][0], outputs["torch"][0], atol=1e-5, rtol=1e-4)
    for name, grad in outputs["torch"][1].items():
        torch.testing.assert_close(outputs["triton"][1][name], grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: n + m)
    return "NaLa DiT forward and backward (RoPE), triton == torch"


def check_linear(device):
    """ReLU linear attention (one feature block) through the Triton readout."""
    from nala_diffusion.ops import linear_attention

    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 45, 64, generator=generator).to(device).requires_grad_() for _ in range(3))
    outs = {}
    for backend in ("triton", "torch"):
        out = linear_attention(q, k, v, backend=backend)
        outs[backend] = (out, torch.autograd.grad(out.square().sum(), (q, k, v)))
    torch.testing.assert_close(outs["triton"][0], outs["torch"][0], atol=1e-5, rtol=1e-4)
    for got, want in zip(outs["triton"][1], outs["torch"][1]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    return "ReLU linear attention, forward and gradients, triton == torch"


def check_compiled(device):
    """torch.compile(fullgraph=True) of NaLa with the Triton readout: the custom op is traced, forward and
    backward, and computes what the eager torch readout does."""
    from nala_diffusion.ops import nala_attention

    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 40, 32, generator=generator).to(device) for _ in range(3))
    loss = torch.compile(lambda q, k, v: nala_attention(q, k, v, backend="triton").square().sum(), fullgraph=True)
    leaf = q.clone().requires_grad_()
    compiled = loss(leaf, k, v)
    compiled.backward()
    eager_leaf = q.clone().requires_grad_()
    eager = nala_attention(eager_leaf, k, v, backend="torch").square().sum()
    eager.backward()
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(leaf.grad, eager_leaf.grad, atol=1e-4, rtol=1e-4)
    return "torch.compile(fullgraph=True) through the Triton readout, forward and backward"


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="fewer cases")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    from nala_diffusion.ops import triton_readout

    triton_readout.TARGET_PROGRAMS = 8  # several programs per row: the partial states are reduced
    cases = [(torch.float32, 32, 37, 37, "relu_split", False), (torch.float32, 64, 40, 40, "cosine", True),
             (torch.float32, 72, 33, 51, "relu_split", False), (torch.float32, 128, 20, 20, "cosine", False),
             (torch.float32, 64, 35, 35, "relu_split", True), (torch.float32, 32, 19, 70, "cosine", False),
             (torch.bfloat16, 64, 40, 40, "relu_split", True), (torch.bfloat16, 32, 37, 29, "cosine", False)]
    if args.quick:
        cases = cases[:2] + cases[-2:]
    for case in cases:
        print("ok", check_readout(device, *case), flush=True)
    print("ok", check_linear(device), flush=True)
    print("ok", check_model(device), flush=True)
    print("ok", check_compiled(device), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
