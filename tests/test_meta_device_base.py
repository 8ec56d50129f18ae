"""A base model built on the meta device (the big-model recipe: the skeleton first, the weights
loaded after with ``load_state_dict(..., assign=True)``) takes adapters as a real one does: they
are placed beside the base weights, on meta, and once a full state dict is assigned the model
computes what the same model built on the CPU computes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import minipeft


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.fc2(torch.relu(self.fc1(x))))


CONFIGS = {
    "lora": lambda: minipeft.LoraConfig(r=4, target_modules=["fc1", "fc2"], modules_to_save=["head"]),
    "dora": lambda: minipeft.LoraConfig(r=4, target_modules=["fc1", "fc2"], use_dora=True),
    "oft": lambda: minipeft.OFTConfig(r=0, oft_block_size=4, target_modules=["fc1"]),
    "adalora": lambda: minipeft.AdaLoraConfig(target_modules=["fc1"], total_step=10),
    "ia3": lambda: minipeft.IA3Config(target_modules=["fc1", "fc2"], feedforward_modules=["fc2"]),
}


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_adapters_on_a_meta_base_compute_as_on_a_real_one_once_assigned(method):
    torch.manual_seed(0)
    real = minipeft.get_peft_model(Net(), CONFIGS[method]())
    with torch.no_grad():
        for p in real.parameters():
            p.add_(0.1 * torch.randn_like(p))  # trained-looking adapters, so that a lost one shows
    with torch.device("meta"):
        skeleton = Net()
    model = minipeft.get_peft_model(skeleton, CONFIGS[method]())  # raised: set_data does not reach meta
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert [(n, p.requires_grad) for n, p in model.named_parameters()] == \
           [(n, p.requires_grad) for n, p in real.named_parameters()]
    model.load_state_dict(real.state_dict(), assign=True)
    x = torch.randn(5, 8)
    torch.testing.assert_close(model(x), real(x))
