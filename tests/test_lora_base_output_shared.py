"""LoRA adds its term onto the base layer's output in place only where no one else holds that
output: a forward hook on the base layer keeps what it saw (and its graph stays intact), and
``torch.func.vmap`` over stacked LoRA parameters (ensembles) works. The reference is the same
computation done by hand."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, vmap

import minipeft


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))


def lora(model: nn.Module) -> nn.Module:
    peft_model = minipeft.get_peft_model(model, minipeft.LoraConfig(r=2, target_modules=["0", "2"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    return peft_model


def test_a_hook_on_the_base_layer_keeps_the_base_output_and_its_graph():
    base = mlp()
    seen = []
    base[2].register_forward_hook(lambda module, args, out: seen.append(out))
    model = lora(base)
    x = torch.randn(5, 8)  # 2-D: the case that was written in place under autograd
    y = model(x)
    (y.sum() + 0.1 * seen[-1].pow(2).mean()).backward()  # raised: modified by an inplace operation
    layer = model.base_model.model[2]
    hidden = model.base_model.model[1](model.base_model.model[0](x))
    torch.testing.assert_close(seen[-1], layer.base_layer(hidden))  # the base output, without the LoRA term
    with torch.no_grad():
        model(x)
    torch.testing.assert_close(seen[-1], layer.base_layer(hidden).detach())


def test_vmap_over_stacked_lora_parameters():
    model = lora(mlp()).eval()
    params = dict(model.named_parameters())
    adapter = {n: p.detach() for n, p in params.items() if "lora_" in n}
    frozen = {n: p.detach() for n, p in params.items() if "lora_" not in n}
    stacked = {n: torch.stack([p, p + 0.1, p - 0.2]) for n, p in adapter.items()}
    x = torch.randn(5, 8)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            got = vmap(lambda p: functional_call(model, {**frozen, **p}, (x,)))(stacked)
        want = torch.stack([functional_call(model, {**frozen, **{n: t[i] for n, t in stacked.items()}}, (x,))
                            for i in range(3)])
        assert got.shape == (3, 5, 4)
        torch.testing.assert_close(got, want)


def test_without_hooks_the_term_added_in_place_is_right():
    model = lora(mlp())
    layer = model.base_model.model[0]
    x = torch.randn(5, 8)
    A, B, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base_layer(x) + s * x @ A.T @ B.T)


def test_lora_on_a_module_another_adapter_trains_whole():
    # The base layer chain passes through a trained copy's wrapper (its module is original_module).
    model = minipeft.get_peft_model(mlp(), minipeft.LoraConfig(r=2, target_modules=["0"], modules_to_save=["2"]))
    model.add_adapter("b", minipeft.LoraConfig(r=2, target_modules=["2"], init_lora_weights=False))
    model.set_adapter("b")
    x = torch.randn(5, 8)
    layer = model.base_model.model[2]
    hidden = model.base_model.model[1](model.base_model.model[0](x))
    A, B, s = layer.lora_A["b"].weight, layer.lora_B["b"].weight, layer.scaling["b"]
    with torch.no_grad():
        torch.testing.assert_close(model(x), layer.base_layer(hidden) + s * hidden @ A.T @ B.T)


def test_backward_hooks_on_the_base_layer_or_everywhere_see_the_base_outputs_gradient():
    # A full backward hook wraps the layer's output in a view of its own, which refuses in-place
    # writes: LoRA's forward used to raise there. Reference: the same model adapted by hand.
    x = torch.randn(5, 8)
    expected_model = lora(mlp())
    expected = expected_model(x)
    for register in ("full", "pre", "global"):
        model, seen = lora(mlp()), []
        model.load_state_dict(expected_model.state_dict())
        base = model.base_model.model[2].base_layer
        if register == "full":
            base.register_full_backward_hook(lambda module, grad_in, grad_out: seen.append(grad_out[0]))
        elif register == "pre":
            base.register_full_backward_pre_hook(lambda module, grad_out: seen.append(grad_out[0]))
        else:
            handle = nn.modules.module.register_module_full_backward_hook(
                lambda module, grad_in, grad_out: seen.append(grad_out[0]) if module is base else None)
        try:
            y = model(x)
            y.sum().backward()
        finally:
            if register == "global":
                handle.remove()
        torch.testing.assert_close(y, expected)
        torch.testing.assert_close(seen[0], torch.ones(5, 4))  # d(sum y) / d(base output): LoRA adds to it


def test_a_mixed_batch_leaves_the_base_output_a_hook_holds_as_it_was():
    base = mlp()
    seen = []
    base[0].register_forward_hook(lambda module, args, out: seen.append(out))
    model = lora(base).eval()
    model.add_adapter("b", minipeft.LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False))
    x = torch.randn(4, 8)
    with torch.no_grad():
        model(x, adapter_names=["default", "b", "__base__", "b"])
        torch.testing.assert_close(seen[-1], model.base_model.model[0].base_layer(x), rtol=0, atol=0)


def graph_nodes(tensor: torch.Tensor) -> set[str]:
    """The names of the autograd nodes behind tensor."""
    seen, stack, names = set(), [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def test_a_2d_input_trains_with_the_term_added_in_place_without_copying_the_gradient():
    # In place on a view of the output, even one of its own shape, the backward would clone and
    # copy the whole output gradient (CopySlices); on the output itself it passes it through.
    model = lora(mlp())
    layer = model.base_model.model[0]
    x = torch.randn(5, 8, requires_grad=True)
    y = layer(x)
    assert "CopySlices" not in graph_nodes(y)
    dy = torch.randn_like(y)
    y.backward(dy)
    A, B, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    W = layer.base_layer.weight
    torch.testing.assert_close(x.grad, dy @ W + s * dy @ B @ A)  # by hand: d/dx of x W^T + s x A^T B^T
    torch.testing.assert_close(A.grad, s * (dy @ B).T @ x.detach())
    torch.testing.assert_close(B.grad, s * dy.T @ (x.detach() @ A.T))
