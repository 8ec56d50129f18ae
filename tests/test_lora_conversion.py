"""convert_to_lora / save_as_lora: an adapter's weight updates as a LoRA, by truncated SVD.

The references: at ``rank=1.0`` (all of each update's energy) the LoRA, loaded into a fresh base
model here and in peft, computes what the adapter computed; at a lower rank, each layer's
``B A`` is peft's own conversion's, and the rank a float picks is peft's; and the error of a
rank-k update is the energy of the singular values left out (Eckart-Young)."""

from __future__ import annotations

import copy

import pytest
import torch

import minipeft
from tests.models import TinyNet, input_ids, randomize_adapters, tiny_transformers_model
from tests.test_torch_compile import ATTENTION, CONFIGS

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:.*has a new SEQ_CLS head")  # (the heads stay as loaded)

# Every method that merges into its weights, on a small BERT (the configs the compile tests use):
# adding to W, and transforming it (OFT, BOFT, HRA, RoAd, (IA)^3: ΔW then holds W; (IA)^3 on an
# output scales the bias too, which lora_B's bias carries).
MERGING = ["loha", "lokr", "vera", "fourierft", "c3a", "miss", "adalora", "dora", "oft", "boft", "hra", "road", "ia3"]
METHODS = {name: CONFIGS[name] for name in MERGING}
# carried over: a head trained whole (SEQ_CLS), and trained tokens
METHODS["lora + head + tokens"] = lambda: minipeft.LoraConfig(
    r=4, target_modules=ATTENTION, task_type="SEQ_CLS", trainable_token_indices={"word_embeddings": [1, 2]})


def adapted(config):
    torch.manual_seed(0)
    model = minipeft.get_peft_model(tiny_transformers_model("bert"), config).eval()
    with torch.no_grad():  # every trained tensor moved, so that no identity init hides a layer
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("method", list(METHODS))
def test_at_full_energy_the_lora_computes_what_the_adapter_did(tmp_path, method):
    model = adapted(METHODS[method]())
    ids = input_ids()
    expected = model(ids).logits
    minipeft.save_as_lora(tmp_path, model, rank=1.0)
    config = minipeft.PeftConfig.from_pretrained(tmp_path)
    assert config.peft_type == minipeft.PeftType.LORA and config.lora_alpha == config.r
    for library in (minipeft, peft):
        base = tiny_transformers_model("bert")  # (seeded: the same base weights)
        lora = library.PeftModel.from_pretrained(base, str(tmp_path)).eval()
        torch.testing.assert_close(lora(ids).logits, expected, rtol=1e-4, atol=1e-5, msg=library.__name__)


@pytest.mark.parametrize("rank", [2, 3, 0.6])
def test_a_lower_rank_is_peft_s_conversion(rank):
    torch.manual_seed(0)
    base = tiny_transformers_model("bert")
    config = dict(r=4, target_modules=ATTENTION, init_weights=False)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoHaConfig(**config))
    ours = minipeft.get_peft_model(copy.deepcopy(base), minipeft.LoHaConfig(**config))
    ours.load_state_dict(theirs.state_dict())
    their_config, their_tensors = peft.convert_to_lora(theirs, rank=rank)
    our_config, our_tensors = minipeft.convert_to_lora(ours, rank=rank)
    assert {k: v.shape for k, v in our_tensors.items()} == {k: v.shape for k, v in their_tensors.items()}
    for key in [k for k in our_tensors if k.endswith("lora_A.weight")]:
        B_key = key.replace("lora_A", "lora_B")
        ours_BA, theirs_BA = our_tensors[B_key] @ our_tensors[key], their_tensors[B_key] @ their_tensors[key]
        torch.testing.assert_close(ours_BA, theirs_BA, rtol=1e-4, atol=1e-6, msg=key)
        # each layer's rank, and scaling 1, by our config as it will be read
        layer_rank = our_tensors[key].shape[0]
        name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        assert our_config.rank_and_alpha(name) == (layer_rank, layer_rank)
    if isinstance(rank, float):
        assert len({t.shape[0] for k, t in our_tensors.items() if k.endswith("lora_A.weight")}) > 1  # ranks differ


def test_the_error_of_a_rank_k_lora_is_the_energy_left_out():
    # Eckart-Young: ||ΔW - B A||_F^2 = sum of the squared singular values beyond the k-th.
    model = adapted(METHODS["lokr"]())
    layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
    delta = layer.delta_weight("default").float()
    S = torch.linalg.svdvals(delta)
    _, tensors = minipeft.convert_to_lora(model, rank=3)
    key = "base_model.model.bert.encoder.layer.0.attention.self.query"
    BA = tensors[f"{key}.lora_B.weight"] @ tensors[f"{key}.lora_A.weight"]
    torch.testing.assert_close((delta - BA).pow(2).sum(), S[3:].pow(2).sum(), rtol=1e-3, atol=1e-8)


def test_every_layer_kind_lora_adapts_converts(tmp_path):
    # An embedding, both convolutions and linear layers, from LoHa/LoKr's merged updates.
    torch.manual_seed(0)
    for config in [minipeft.LoHaConfig(r=4, target_modules=["fc1", "conv1d", "conv2d"], init_weights=False),
                   minipeft.LoraConfig(r=4, target_modules=["fc2", "embed", "conv1d"], use_dora=True)]:
        model = minipeft.get_peft_model(TinyNet(), config).eval()
        randomize_adapters(model, names=("hada_", "lora_"))
        minipeft.save_as_lora(tmp_path / type(config).__name__, model, rank=1.0)
        torch.manual_seed(0)
        lora = minipeft.PeftModel.from_pretrained(TinyNet(), tmp_path / type(config).__name__)
        torch.testing.assert_close(lora(input_ids()), model(input_ids()), rtol=1e-4, atol=1e-5)
        torch.manual_seed(0)


def test_what_cannot_convert_is_refused_by_name():
    torch.manual_seed(0)
    loha = minipeft.get_peft_model(TinyNet(), minipeft.LoHaConfig(r=4, target_modules=["fc1", "conv2d"]))
    for rank, error, message in [
        (0, ValueError, "rank is at least 1, got 0"),
        (1.5, ValueError, r"a float rank is the fraction of each update's energy to keep, in \(0, 1\]; got 1.5"),
        ("4", TypeError, "rank is an int"),
        (8, ValueError, r"rank=8 is above the full rank of 'conv2d' \(full rank 4\)"),
    ]:
        with pytest.raises(error, match=message):
            minipeft.convert_to_lora(loha, rank=rank)
    with pytest.raises(ValueError, match=r"no adapter 'other' to convert; the model holds \['default'\]"):
        minipeft.convert_to_lora(loha, rank=2, adapter_name="other")
    injected = minipeft.inject_adapter_in_model(minipeft.LoHaConfig(r=4, target_modules=["fc1"]), TinyNet())
    with pytest.raises(TypeError, match="convert_to_lora takes a PeftModel, got TinyNet"):
        minipeft.convert_to_lora(injected, rank=2)
    prompt = minipeft.get_peft_model(tiny_transformers_model("bert"), minipeft.PromptTuningConfig(
        task_type="SEQ_CLS", num_virtual_tokens=3))
    with pytest.raises(TypeError, match="is PROMPT_TUNING: virtual tokens beside the model change no weight"):
        minipeft.convert_to_lora(prompt, rank=2)

    bottleneck = minipeft.get_peft_model(TinyNet(), minipeft.BottleneckConfig(target_modules=["fc2"], bottleneck_size=4))
    with pytest.raises(TypeError, match=r"'blocks.0.fc2' \(BottleneckLayer does not merge into a weight\)"):
        minipeft.convert_to_lora(bottleneck, rank=2)
    biased = minipeft.get_peft_model(TinyNet(), minipeft.LoraConfig(r=4, target_modules=["fc1"], bias="all"))
    with pytest.raises(ValueError, match=r"trains the base model's biases \(bias='all'\)"):
        minipeft.convert_to_lora(biased, rank=2)


def test_another_wrappers_merged_adapter_is_refused():
    # OFT around a LoRA on fc1: with the LoRA merged, OFT's W' - W would hold the LoRA's update too.
    torch.manual_seed(0)
    model = minipeft.get_peft_model(TinyNet(), minipeft.LoraConfig(r=4, target_modules=["fc1"], init_lora_weights=False))
    model.add_adapter("oft", minipeft.OFTConfig(r=0, oft_block_size=4, target_modules=["fc1"], init_weights=False))
    before = minipeft.convert_to_lora(model, rank=1.0, adapter_name="oft")[1]
    model.merge_adapter(["default"])
    with pytest.raises(TypeError, match=r"adapter\(s\) \['default'\] of another wrapper are merged into its weight"):
        minipeft.convert_to_lora(model, rank=1.0, adapter_name="oft")
    model.unmerge_adapter()
    after = minipeft.convert_to_lora(model, rank=1.0, adapter_name="oft")[1]
    for key in [k for k in before if k.endswith("lora_A.weight")]:
        B_key = key.replace("lora_A", "lora_B")
        torch.testing.assert_close(after[B_key] @ after[key], before[B_key] @ before[key], rtol=1e-4, atol=1e-5)


def test_targets_name_the_converted_layers_alone(tmp_path):
    # LoRA on the top-level "fc" only: the list entry "fc" would also select "sub.fc".
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.sub = torch.nn.Linear(8, 8), torch.nn.Module()
            self.sub.fc = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.sub.fc(self.fc(x))

    torch.manual_seed(0)
    model = minipeft.get_peft_model(Net(), minipeft.LoHaConfig(r=2, target_modules=["fc"], exclude_modules=["sub.fc"],
                                                               init_weights=False))
    minipeft.save_as_lora(tmp_path, model, rank=1.0)
    assert minipeft.PeftConfig.from_pretrained(tmp_path).target_modules == "fc"  # a regex: whole names
    x = torch.randn(3, 8)
    for library in (minipeft, peft):
        torch.manual_seed(0)
        lora = library.PeftModel.from_pretrained(Net(), str(tmp_path))
        assert not hasattr(lora.base_model.model.sub.fc, "lora_A")
        torch.testing.assert_close(lora(x), model(x), rtol=1e-4, atol=1e-5)
