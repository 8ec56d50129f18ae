"""A new adapter wrapper takes the train/eval mode of the module it replaces, so adding an adapter
to a model in eval mode does not switch dropout on behind the user's back (the wrapper would
otherwise start in nn.Module's default, training). Reference: the same adapter without dropout."""

from __future__ import annotations

import copy

import torch
from torch import nn

from minipeft import BottleneckConfig, LoraConfig, get_peft_model
from minipeft.tuners.base import AdapterLayer
from tests.models import TinyNet, input_ids, randomize_adapters


def test_adapters_added_to_an_eval_model_run_without_dropout():
    base = TinyNet().eval()
    ids = input_ids()
    for with_dropout, without in (
        (LoraConfig(r=2, lora_dropout=0.9, target_modules=["fc1", "conv1d"]),
         LoraConfig(r=2, lora_dropout=0.0, target_modules=["fc1", "conv1d"])),
        (BottleneckConfig(target_modules=["fc2"], bottleneck_size=2, adapter_dropout=0.9),
         BottleneckConfig(target_modules=["fc2"], bottleneck_size=2, adapter_dropout=0.0)),
    ):
        model = get_peft_model(copy.deepcopy(base), with_dropout)
        reference = get_peft_model(copy.deepcopy(base), without)
        randomize_adapters(model, names=("lora_", "adapter_"), std=0.3)
        reference.load_state_dict(model.state_dict())
        assert all(not m.training for m in model.get_base_model().modules() if isinstance(m, AdapterLayer))
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids), reference(input_ids=ids), rtol=0, atol=1e-6)


def test_adapters_added_to_a_training_model_train():
    model = get_peft_model(TinyNet().train(), LoraConfig(r=2, lora_dropout=0.5, target_modules=["fc1"]))
    layer = model.base_model.model.blocks[0]["fc1"]
    assert layer.training and layer.lora_dropout["default"].training


def test_a_peft_model_of_an_eval_model_says_it_is_in_eval():
    # model.training must tell a training loop what the adapters do: eval, as they are (dropout off).
    from minipeft import PromptEncoderConfig

    model = get_peft_model(TinyNet().eval(), LoraConfig(r=2, lora_dropout=0.5, target_modules=["fc1"]))
    assert not model.training and not model.base_model.training
    model.train()
    assert all(m.training for m in model.modules())
    assert get_peft_model(TinyNet(), LoraConfig(r=2, target_modules=["fc1"])).training

    from tests.models import tiny_transformers_model

    prompt = get_peft_model(tiny_transformers_model("llama"),  # (eval: as from_pretrained returns it)
                            PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, encoder_hidden_size=8))
    assert not prompt.training and not any(m.training for m in prompt.prompt_encoder.modules())


class BlockWithFrozenNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.norm = nn.Linear(8, 8), nn.BatchNorm1d(8)

    def forward(self, x):
        return self.norm(self.fc(x))


def test_a_submodule_the_user_put_in_eval_stays_there_inside_a_wrapped_module():
    # Wrapping a block (modules_to_save, a bottleneck adapter around it) used to call the wrapper's
    # recursive train(): the frozen batch norm inside went back to batch statistics, and the output
    # changed at injection. peft leaves the modes alone.
    def make():
        torch.manual_seed(0)
        model = nn.Sequential(BlockWithFrozenNorm(), nn.Linear(8, 2)).train()
        model[0].norm.eval()
        return model

    x = torch.randn(4, 8) * 3 + 1
    expected = make()(x)
    for config in (LoraConfig(target_modules=["1"], modules_to_save=["0"]),
                   BottleneckConfig(target_modules=["0"], bottleneck_size=2, hidden_size=8)):
        model = get_peft_model(make(), config)
        norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
        assert norms and not any(m.training for m in norms)
        assert all(m.training for m in model.modules() if isinstance(m, AdapterLayer))
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
