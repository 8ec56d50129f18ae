"""Every method's adapted model compiles whole under torch.compile and computes what it computes
eagerly, forward and gradients.

fullgraph=True makes a graph break an error, so a method whose forward dynamo cannot trace
(a Python-side cache, a data-dependent branch, a tensor read back to the host) fails here by
name. The backend is AOT autograd without code generation ("aot_eager"): it traces the backward
too, through functionalization of the in-place adds that several methods use on the base
output, which is what inductor builds on. The fused LoRA kernels have their own tests
(test_kernels_torch_compile.py).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import minipeft
from tests.models import input_ids, randomize_adapters, tiny_transformers_model

ATTENTION = ["query", "value"]
CONFIGS = {
    "lora": lambda: minipeft.LoraConfig(r=4, target_modules=ATTENTION, task_type="SEQ_CLS"),
    "lora on the embedding": lambda: minipeft.LoraConfig(r=4, target_modules=["word_embeddings", "query"]),
    "lora with trainable tokens": lambda: minipeft.LoraConfig(r=4, target_modules=ATTENTION,
                                                              trainable_token_indices=[1, 2]),
    "dora": lambda: minipeft.LoraConfig(r=4, target_modules=ATTENTION, use_dora=True),
    "adalora": lambda: minipeft.AdaLoraConfig(init_r=4, target_r=2, target_modules=ATTENTION, total_step=10),
    "ia3": lambda: minipeft.IA3Config(target_modules=["query", "value", "output.dense"],
                                      feedforward_modules=["output.dense"]),
    "loha": lambda: minipeft.LoHaConfig(r=4, target_modules=ATTENTION, init_weights=False),
    "lokr": lambda: minipeft.LoKrConfig(r=4, target_modules=ATTENTION, init_weights=False),
    "oft": lambda: minipeft.OFTConfig(r=0, oft_block_size=4, target_modules=ATTENTION, init_weights=False),
    "boft": lambda: minipeft.BOFTConfig(boft_block_size=4, target_modules=ATTENTION, init_weights=False),
    "hra": lambda: minipeft.HRAConfig(r=4, target_modules=ATTENTION, init_weights=False),
    "vera": lambda: minipeft.VeraConfig(r=4, target_modules=ATTENTION, init_weights=False),
    "fourierft": lambda: minipeft.FourierFTConfig(n_frequency=10, target_modules=ATTENTION, init_weights=False),
    "c3a": lambda: minipeft.C3AConfig(block_size=4, target_modules=ATTENTION, init_weights=False),
    "miss": lambda: minipeft.MissConfig(r=4, target_modules=ATTENTION, init_weights=False),
    "road": lambda: minipeft.RoadConfig(target_modules=ATTENTION, group_size=4, init_weights=False),
    "ln tuning": lambda: minipeft.LNTuningConfig(target_modules=["LayerNorm"]),
    "trainable tokens": lambda: minipeft.TrainableTokensConfig(target_modules=["word_embeddings"],
                                                               token_indices=[1, 2]),
    "bottleneck": lambda: minipeft.BottleneckConfig(target_modules=["output.dense"], bottleneck_size=4),
    "prompt tuning": lambda: minipeft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3),
    "prefix tuning": lambda: minipeft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3),
    "p-tuning": lambda: minipeft.PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=3,
                                                     encoder_hidden_size=8),
}


def outputs_and_grads(model, call):
    """call(model)'s logits and the gradient of every trainable parameter for sum(logits * w)."""
    model.zero_grad(set_to_none=True)
    logits = call(model).logits
    (logits * torch.linspace(-1, 1, logits.numel()).view_as(logits)).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return logits.detach(), grads


def assert_compiles_to_the_same(model, call):
    eager_logits, eager_grads = outputs_and_grads(model, call)
    assert eager_grads, "nothing trains"
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with warnings.catch_warnings():
        # Dynamo warns (UserWarning) where it traces around something, a cache for one. (Its own
        # DeprecationWarning at instantiating C3A's autograd.Function is torch's, not ours.)
        warnings.simplefilter("error", UserWarning)
        logits, grads = outputs_and_grads(model, lambda _: call(compiled))
    torch.testing.assert_close(logits, eager_logits, rtol=1e-5, atol=1e-6)
    assert grads.keys() == eager_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.filterwarnings("ignore:.*has a new SEQ_CLS head")
@pytest.mark.parametrize("method", list(CONFIGS))
def test_every_method_compiles_whole(method):
    model = minipeft.get_peft_model(tiny_transformers_model("bert"), CONFIGS[method]())
    randomize_adapters(model, names=("lora_", "ia3_", "hada_", "lokr_", "vera_lambda", "road_", "adapter_"))
    ids = input_ids()
    assert_compiles_to_the_same(model, lambda m: m(input_ids=ids, attention_mask=torch.ones_like(ids)))


@pytest.mark.filterwarnings("ignore:.*has a new SEQ_CLS head")
def test_a_mixed_batch_compiles_whole():
    # Each row its own adapter (adapter_names), the base model's for "__base__".
    model = minipeft.get_peft_model(tiny_transformers_model("bert"), minipeft.LoraConfig(r=4, target_modules=ATTENTION))
    model.add_adapter("other", minipeft.LoraConfig(r=2, target_modules=ATTENTION))
    randomize_adapters(model)
    ids = input_ids(batch=3)
    assert_compiles_to_the_same(model, lambda m: m(input_ids=ids, adapter_names=["default", "other", "__base__"]))
