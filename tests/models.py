"""Tiny models shared by the tests: transformers architectures built from configs (no
downloads) and a hand-written module, all small enough to run in milliseconds on a CPU."""

from __future__ import annotations

import torch
from torch import nn

VOCAB = 64


def tiny_transformers_model(kind: str) -> nn.Module:
    import transformers

    torch.manual_seed(0)
    if kind == "distilbert":
        cfg = transformers.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, hidden_dim=48)
        return transformers.DistilBertForSequenceClassification(cfg).eval()
    if kind == "bert":
        cfg = transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48
        )
        return transformers.BertForSequenceClassification(cfg).eval()
    if kind == "bert_model":  # the plain encoder, no head: module names start at "encoder."
        cfg = transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48
        )
        return transformers.BertModel(cfg).eval()
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=32)
        return transformers.GPT2LMHeadModel(cfg).eval()
    if kind == "llama":
        cfg = transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2,
        )
        return transformers.LlamaForCausalLM(cfg).eval()
    if kind == "qwen3":  # norms inside attention (q_norm, k_norm), which peft's LN-tuning table leaves out
        cfg = transformers.Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8)
        return transformers.Qwen3ForCausalLM(cfg).eval()
    if kind == "t5":  # encoder-decoder; its feed-forward reads `self.wo.weight` itself
        cfg = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                    decoder_start_token_id=0)
        return transformers.T5ForConditionalGeneration(cfg).eval()
    raise ValueError(kind)


class TinyNet(nn.Module):
    """A hand-written model with every layer type LoRA supports."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.conv1d = nn.Conv1d(16, 16, kernel_size=3, padding=1)
        self.conv2d = nn.Conv2d(1, 4, kernel_size=3, padding=1)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"fc1": nn.Linear(16, 32), "fc2": nn.Linear(32, 16), "norm": nn.LayerNorm(16)})
            for _ in range(2)
        )
        self.head = nn.Linear(16, 3)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)  # (B, T, 16)
        h = h + self.conv1d(h.transpose(1, 2)).transpose(1, 2)
        h = h + self.conv2d(h.unsqueeze(1)).mean(1)
        for block in self.blocks:
            h = block["norm"](h + block["fc2"](torch.relu(block["fc1"](h))))
        return self.head(h.mean(1))


def input_ids(batch: int = 2, length: int = 7, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, length), generator=g)


def randomize_adapters(
    model: nn.Module, seed: int = 0, names=("lora_", "modules_to_save"), std: float = 0.1, mean: float = 0.0
) -> None:
    """Give every adapter tensor random values so that zero-initialised B cannot hide a bug.

    Each matched tensor becomes ``mean + std * N(0, 1)`` (plus one for DoRA magnitudes), e.g.
    ``names=("ia3_l",), std=0.3, mean=1.0`` for (IA)^3 vectors near identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(n in name for n in names):
                p.copy_(torch.randn(p.shape, generator=g) * std + mean + (1.0 if "magnitude" in name else 0.0))


def first_output(out) -> torch.Tensor:
    """The main tensor of a transformers output: logits, else the last hidden state."""
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def greedy_without_cache(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding by re-running the whole sequence: the reference for cached generate()."""
    for _ in range(steps):
        logits = model(input_ids=ids, use_cache=False).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float, steps: int) -> list[float]:
    """A few full-batch Adam steps on the trainable parameters; the MSE loss after each."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def padded_batch(length: int = 6, padded: bool = True) -> dict:
    """Two sequences of token ids; with ``padded`` the second row's last two tokens are padding."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (2, length), generator=g)
    mask = torch.ones(2, length, dtype=torch.long)
    if padded:
        mask[1, -2:] = 0  # right padding in the second row
    return {"input_ids": ids, "attention_mask": mask}
