"""The seed study's architectures: their sizes, their layers, and their use under torch.func."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, vmap

import curvlab
from curvlab.models import STUDY_MODELS, study_model


def conv(c_in, c_out, k, bias=True):
    return c_in * c_out * k * k + (c_out if bias else 0)


def linear(d_in, d_out):
    return d_in * d_out + d_out


def resnet18_count(width=64, classes=10):
    count = conv(3, width, 3, bias=False) + 2 * width  # stem conv and batch norm
    fan_in = width
    for stage in range(4):
        fan_out = width * 2 ** stage
        for first, block_in in ((True, fan_in), (False, fan_out)):
            count += conv(block_in, fan_out, 3, bias=False) + conv(fan_out, fan_out, 3, bias=False) + 4 * fan_out
            if first and stage > 0:  # the first block of a downsampling stage has a 1×1 conv shortcut
                count += conv(block_in, fan_out, 1, bias=False) + 2 * fan_out
        fan_in = fan_out
    return count + linear(fan_in, classes)


def vit_count(dim=192, depth=12, mlp_ratio=4, patch=4, image=32, classes=10):
    tokens = (image // patch) ** 2 + 1
    block = 2 * 2 * dim + linear(dim, 3 * dim) + linear(dim, dim) + linear(dim, mlp_ratio * dim) + linear(
        mlp_ratio * dim, dim)
    return conv(3, dim, patch) + dim + tokens * dim + depth * block + 2 * dim + linear(dim, classes)


@pytest.mark.parametrize("name, expected", [
    ("mlp", linear(784, 2048) + linear(2048, 2048) + linear(2048, 10)),
    ("cnn", conv(3, 32, 5) + conv(32, 64, 5) + linear(64 * 8 * 8, 512) + linear(512, 10)),
    ("resnet18", resnet18_count()),
    ("vit_tiny", vit_count()),
])
def test_full_scale_models_have_the_study_s_parameter_counts(name, expected):
    model, _ = study_model(name, "full")
    assert sum(p.numel() for p in model.parameters()) == expected
    assert expected in (5_824_522, 2_156_490, 11_173_962, 5_362_762)


@pytest.mark.parametrize("name", list(STUDY_MODELS))
def test_cpu_scale_models_keep_the_architecture_and_classify_their_inputs(name):
    model, about = study_model(name, "cpu")
    full, _ = study_model(name, "full")
    assert {type(m) for m in model.modules()} == {type(m) for m in full.modules()}
    assert model(torch.randn(3, *about.input_shape)).shape == (3, about.classes)
    assert f"{name}" in about.name and "parameters" in about.describe(model, "cpu")


@pytest.mark.parametrize("name", list(STUDY_MODELS))
def test_every_weight_matrix_lives_in_a_linear_or_conv_layer(name):
    model, _ = study_model(name, "cpu")
    owners = {f"{prefix}.{local}" if prefix else local: module for prefix, module in model.named_modules()
              for local, _ in module.named_parameters(recurse=False)}
    raw = {parameter for parameter, p in model.named_parameters()
           if p.ndim >= 2 and not isinstance(owners[parameter], nn.Linear | nn.Conv2d)}
    assert raw == ({"class_token", "position"} if name == "vit_tiny" else set())


@pytest.mark.parametrize("name", list(STUDY_MODELS))
def test_per_example_forward_under_vmap_equals_the_batched_forward(name):
    model, about = study_model(name, "cpu", seed=1)
    model = model.double().eval()
    X = torch.randn(4, *about.input_shape, dtype=torch.float64)
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    per_example = vmap(lambda x: functional_call(model, params, (x[None],))[0])(X)
    torch.testing.assert_close(per_example, model(X), atol=1e-10, rtol=1e-10)


def test_the_seed_fixes_the_weights_and_leaves_the_caller_s_random_state_alone():
    state = torch.random.get_rng_state()
    first, _ = study_model("cnn", "cpu", seed=3)
    second, _ = study_model("cnn", "cpu", seed=3)
    other, _ = study_model("cnn", "cpu", seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    for a, b, c in zip(first.parameters(), second.parameters(), other.parameters()):
        assert torch.equal(a, b)
    assert not all(torch.equal(a, c) for a, c in zip(first.parameters(), other.parameters()))


@pytest.mark.parametrize("name, scale, fragment", [("lenet", "cpu", "unknown model 'lenet'"),
                                                   ("mlp", "tiny", "unknown scale 'tiny'")])
def test_unknown_models_and_scales_are_refused_with_the_choices(name, scale, fragment):
    with pytest.raises(curvlab.InvalidProblem, match=fragment):
        study_model(name, scale)
