"""torch.compile (inductor, CPU) of NaLa DiTs: the same outputs and gradients as eager, whole graphs."""

import pytest
import torch
from helpers import tiny_nala

from nala_diffusion import NaLaDiTPipeline, demo_pipeline_path

CONFIGS = {
    "nala": dict(attention_type="nala"),
    "nala_cosine": dict(attention_type="nala", inhibit="cosine"),
    "nala_lepe_gate_rope_learnable": dict(attention_type="nala", use_lepe=True, use_gate=True, use_rope=True,
                                          norm_scale_mode="learnable"),
    "softmax": dict(attention_type="softmax"),
    "relu_linear": dict(attention_type="relu_linear"),
    "elu_linear": dict(attention_type="elu_linear"),
    "hybrid": dict(attention_types=["nala", "softmax"]),
}


def inputs(channels=3, size=16):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, channels, size, size, generator=generator)
    return x, torch.tensor([10, 500]), torch.tensor([1, 2])


def check_compiled_matches_eager(model, x, t, y, train: bool):
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)  # one graph: no break anywhere in the forward
    with torch.no_grad():
        eager = model.eval()(x, timestep=t, class_labels=y).sample
        fused = compiled(x, timestep=t, class_labels=y).sample
    scale = eager.abs().max()
    assert scale > 0
    torch.testing.assert_close(fused, eager, rtol=0, atol=1e-4 * scale)  # float32 sums in another order
    if not train:
        return
    model.train()
    eager_loss = model(x, timestep=t, class_labels=y).sample.square().mean()
    eager_loss.backward()
    eager_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    loss = compiled(x, timestep=t, class_labels=y).sample.square().mean()
    loss.backward()
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=0)
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == eager_grads.keys() and grads
    top = max(grad.abs().max() for grad in eager_grads.values())
    # float32 sums in another order: 5e-4 of the tensor's (or 1 % of the top) scale (the cosine inhibit's powers
    # and angles reach 2.2e-4 on the first block's query projection; a wrong gradient is off by its own size)
    for name, grad in grads.items():
        allowed = 5e-4 * max(eager_grads[name].abs().max(), 1e-2 * top)
        torch.testing.assert_close(grad, eager_grads[name], rtol=0, atol=allowed, msg=name)


@pytest.mark.slow
def test_compiled_demo_transformer_matches_eager():
    model = NaLaDiTPipeline.from_pretrained(demo_pipeline_path()).transformer
    check_compiled_matches_eager(model, *inputs(size=32), train=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_compiled_training_and_sampling_match_eager(name):
    check_compiled_matches_eager(tiny_nala(**CONFIGS[name]), *inputs(), train=True)


@pytest.mark.slow
def test_a_pipeline_with_a_compiled_transformer_samples_the_same_images():
    pipe = NaLaDiTPipeline.from_pretrained(demo_pipeline_path())
    pipe.set_progress_bar_config(disable=True)

    def sample():
        generators = [torch.Generator().manual_seed(i) for i in range(2)]
        return pipe([1, 6], num_inference_steps=4, generator=generators, output_type="pt").images

    eager = sample()
    torch._dynamo.reset()
    pipe.transformer = torch.compile(pipe.transformer)
    compiled = sample()
    assert compiled.shape == eager.shape == (2, 3, 32, 32)
    assert (compiled - eager).abs().max() < 2e-3  # pixels in [0, 1]: well under one 8-bit level
