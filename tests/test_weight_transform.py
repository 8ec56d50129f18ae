"""What OFT, HRA and BOFT share (tuners/weight_transform.py), on the layers peft does not adapt with
them: GPT-2's Conv1D (a transposed weight), Conv1d, Conv3d with dilation and a grouped Conv2d.
The forward, which transforms the input or builds the kernel, must equal the merged weights."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from minipeft import BOFTConfig, HRAConfig, OFTConfig, get_peft_model
from tests.models import input_ids, tiny_transformers_model

CONFIGS = {"oft": lambda targets: OFTConfig(oft_block_size=4, target_modules=targets, init_weights=False),
           "hra": lambda targets: HRAConfig(r=4, target_modules=targets, init_weights=False),
           "boft": lambda targets: BOFTConfig(boft_block_size=2, boft_n_butterfly_factor=2, target_modules=targets,
                                              init_weights=False)}


@pytest.mark.parametrize("method", list(CONFIGS))
@pytest.mark.parametrize("kind", ["gpt2 conv1d", "conv1d", "dilated conv3d", "grouped conv2d"])
def test_layers_peft_does_not_adapt_merge_to_what_their_forward_computes(method, kind):
    torch.manual_seed(0)
    if kind == "gpt2 conv1d":
        base, targets = tiny_transformers_model("gpt2"), ["c_attn", "c_fc"]
        run = lambda model: model(input_ids=input_ids()).logits  # noqa: E731
    else:
        conv, x = {"conv1d": (nn.Conv1d(4, 6, 3, padding=1), torch.randn(2, 4, 9)),
                   "dilated conv3d": (nn.Conv3d(2, 3, 2, dilation=2), torch.randn(2, 2, 5, 5, 5)),
                   "grouped conv2d": (nn.Conv2d(8, 6, 3, groups=2), torch.randn(2, 8, 6, 6))}[kind]
        base, targets = nn.Sequential(conv), ["0"]
        run = lambda model: model(x)  # noqa: E731
    model = get_peft_model(copy.deepcopy(base), CONFIGS[method](targets))
    with torch.no_grad():
        adapted = run(model)
        assert not torch.allclose(adapted, run(base), atol=1e-4)  # the adapter does change the output
        merged = run(copy.deepcopy(model).merge_and_unload())
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_training_after_a_forward_in_inference_mode(method):
    # The index tensors OFT and BOFT keep (index_cache) are made outside inference mode: one made
    # inside it could not be saved for a later training step's backward.
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(8, 8)), CONFIGS[method](["0"]))
    with torch.inference_mode():
        model(torch.randn(2, 8))
    model.train()
    model(torch.randn(2, 8)).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
