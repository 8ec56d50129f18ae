"""What a config with ``target_modules=None`` adapts in a transformers model, by architecture.

A peft user may leave ``target_modules`` out: peft then looks the model's
``config.model_type`` up in a table per method and adapts the modules it names there, and
writes them into the saved config. The tables below hold the same choices as peft 0.21's (a test compares them), so that such a
config adapts the same modules here and its checkpoint holds the same keys:

- LoRA and the methods that share its table (LoHa, LoKr, OFT, BOFT, HRA, MiSS, RoAd, and with
  small changes VeRA, C3A and FourierFT): the attention's query and value projections, or the
  fused projection that computes query, key and value together where the architecture has one
  (GPT-2's ``c_attn``);
- AdaLoRA: more of each block on some architectures (T5, BART, OPT, RoBERTa, DeBERTa-v2);
- (IA)^3: keys, values and the feed-forward block's output projection, whose *input* it scales;
- LN tuning: normalisation layers, but not always all of them (Qwen's table names the norm after
  attention alone, LLaVA's the projector and embeddings too); an architecture not in the table
  gets every normalisation layer (``ln_tuning.normalisation_layers``).

An architecture missing from a table has no default: ``find_targets`` then asks for the names.
Nothing here imports transformers; the model type is read from ``model.config``.
"""

from __future__ import annotations

from torch import nn

QUERY_VALUE = {
    "t5": ["q", "v"], "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"], "gpt_bigcode": ["c_attn"],
    "bloom": ["query_key_value"], "gpt_neox": ["query_key_value"], "chatglm": ["query_key_value"],
    "falcon": ["query_key_value"], "RefinedWeb": ["query_key_value"], "RefinedWebModel": ["query_key_value"],
    "blip-2": ["q", "v", "q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"], "gptj": ["q_proj", "v_proj"], "gpt_neo": ["q_proj", "v_proj"],
    "bert": ["query", "value"], "roberta": ["query", "value"], "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"], "layoutlm": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"], "deberta": ["in_proj"],
    "llama": ["q_proj", "v_proj"], "llama4": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"], "mixtral": ["q_proj", "v_proj"], "stablelm": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"], "gemma3_text": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "mpt": ["Wqkv"], "codegen": ["qkv_proj"], "btlm": ["c_proj", "c_attn"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
    # a regex, as peft's entry: Gemma 4's language model only, not its vision or audio towers' projections
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
}

# VeRA shares one random pair across its targets, which must then have one shape: phi's
# feed-forward layers are left out. FourierFT and C3A on GPT-2's fused c_attn are replaced by
# the MLP's output projection.
VERA = {**QUERY_VALUE, "phi": ["q_proj", "v_proj"]}
FOURIERFT = C3A = {**QUERY_VALUE, "gpt2": ["mlp.c_proj"], "gpt_bigcode": ["mlp.c_proj"]}

ADALORA = {
    **{k: QUERY_VALUE[k] for k in ("gpt2", "gpt_bigcode", "bloom", "gpt_neox", "gptj", "gpt_neo", "llama", "llama4",
                                   "bert", "deberta", "gemma", "gemma2", "gemma3_text", "gemma4", "qwen2",
                                   "qwen3", "nemotron_h")},
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "roberta": ["query", "key", "value", "dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
}

# (IA)^3: (targets, the feed-forward ones among them).
IA3 = {
    "t5": (["k", "v", "wo"], ["wo"]),
    "mt5": (["k", "v", "wi_1"], []),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "gpt_bigcode": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "bloom": (["query_key_value", "mlp.dense_4h_to_h"], ["mlp.dense_4h_to_h"]),
    "roberta": (["key", "value", "output.dense"], ["output.dense"]),
    "bert": (["key", "value", "output.dense"], ["output.dense"]),
    "opt": (["q_proj", "k_proj", "fc2"], ["fc2"]),
    "bart": (["q_proj", "v_proj", "fc2"], ["fc2"]),
    "phi": (["q_proj", "v_proj", "fc2"], ["fc2"]),
    "gptj": (["q_proj", "v_proj", "fc_out"], ["fc_out"]),
    "gpt_neo": (["q_proj", "v_proj", "c_proj"], ["c_proj"]),
    "gpt_neox": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "falcon": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "RefinedWeb": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "RefinedWebModel": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mixtral": (["k_proj", "v_proj", "w2"], ["w2"]),
    **{k: (["q_proj", "v_proj", "down_proj"], ["down_proj"])
       for k in ("llama4", "gemma", "gemma2", "gemma3_text", "qwen2", "qwen3")},
    "deberta-v2": (["key_proj", "value_proj", "output.dense"], ["output.dense"]),
    "deberta": (["in_proj", "output.dense"], ["output.dense"]),
}


LN_TUNING = {
    "llama": ["input_layernorm", "post_attention_layernorm", "norm"],
    "bloom": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "llava": ["multi_modal_projector", "input_layernorm", "post_attention_layernorm", "norm", "embed_tokens",
              "lm_head"],
    "t5": ["layer_norm", "final_layer_norm"], "mt5": ["layer_norm", "final_layer_norm"],
    "bart": ["self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"],
    "gpt2": ["ln_1", "ln_2", "ln_f"],
    "blip-2": ["layernorm", "LayerNorm", "final_layer_norm", "self_attn_layer_norm"],
    "gptj": ["ln_1", "ln_f"],
    "falcon": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "mistral": ["input_layernorm", "post_attention_layernorm", "norm"],
    "phi": ["input_layernorm", "final_layernorm"],
    "gemma": ["input_layernorm", "post_attention_layernorm", "norm"],
    **{k: ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm",
           "norm"] for k in ("gemma2", "gemma3_text")},
    "qwen2": ["post_attention_layernorm"], "qwen3": ["post_attention_layernorm"],
}


def model_type(model: nn.Module) -> str | None:
    """``model.config.model_type`` of a transformers model, else None."""
    return getattr(getattr(model, "config", None), "model_type", None)


def from_table(table: dict[str, list[str] | str]):
    """A method's ``default_targets`` hook: the names (or the regex) ``table`` gives the model's
    type, or None."""
    def default_targets(model: nn.Module, config) -> list[str] | str | None:
        names = table.get(model_type(model))
        return names if names is None or isinstance(names, str) else list(names)
    return default_targets


def ia3_targets(model: nn.Module, config) -> list[str] | None:
    """(IA)^3's hook: the table's targets, and its feed-forward modules where the config leaves
    them out too (a config naming its targets must name its feed-forward ones: IA3Config)."""
    entry = IA3.get(model_type(model))
    if entry is None:
        return None
    targets, feedforward = entry
    if config.feedforward_modules is None:
        config.feedforward_modules = list(feedforward)
    return list(targets)
