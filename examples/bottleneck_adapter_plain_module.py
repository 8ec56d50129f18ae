"""Bottleneck adapters on a plain, hand-written nn.Module: no transformers anywhere.

1. Pretrain a small residual MLP on task A (regression of a smooth function).
2. Freeze it and insert bottleneck adapters after each whole block (a custom module, not a
   Linear: the adapter only needs the block's output width, read from its LayerNorm).
3. Train only the adapters on a related task B and print the loss before and after.
4. ``unload()`` hands back the original network, unchanged.

Runs in a few seconds on a CPU:  python examples/bottleneck_adapter_plain_module.py
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minipeft import BottleneckConfig, get_peft_model  # noqa: E402

D_IN, D, N_BLOCKS = 4, 32, 3


class Block(nn.Module):
    """Pre-norm residual feed-forward block: x + W2 gelu(W1 LN(x)). Maps width D to D."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.fc1, self.fc2 = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, D) -> (B, D)
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm(x))))


class Regressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(D_IN, D)
        self.blocks = nn.ModuleList(Block() for _ in range(N_BLOCKS))
        self.head = nn.Linear(D, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, D_IN) -> (B,)
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h).squeeze(-1)


def task(n: int, shift: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """y = sin(x . w + shift) + 0.5 * x_0 * x_1: task A has shift 0, task B a phase shift."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D_IN, generator=g)
    w = torch.tensor([1.0, -2.0, 0.5, 1.5])
    return x, torch.sin(x @ w + shift) + 0.5 * x[:, 0] * x[:, 1]


def fit(model: nn.Module, x, y, steps: int, lr: float) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


@torch.no_grad()
def mse(model: nn.Module, x, y) -> float:
    return nn.functional.mse_loss(model(x), y).item()


def main(argv=None) -> None:
    # no options: --help describes the example, and a mistyped flag is an error, not ignored
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    start = time.perf_counter()
    torch.set_num_threads(1)  # matrices this small gain nothing from threads, and lose to their overhead
    torch.manual_seed(0)
    model = Regressor()
    xa, ya = task(512, shift=0.0, seed=0)
    fit(model, xa, ya, steps=150, lr=5e-3)
    print(f"pretrained on task A: mse {mse(model, xa, ya):.4f}")

    xb, yb = task(512, shift=1.0, seed=1)
    xb_test, yb_test = task(512, shift=1.0, seed=2)
    before = mse(model, xb_test, yb_test)
    reference = model(xb_test).detach()

    # One adapter after every whole Block (matched by name: "blocks.0", "blocks.1", ...).
    config = BottleneckConfig(target_modules=r"blocks\.\d+", bottleneck_size=8, non_linearity="gelu")
    peft_model = get_peft_model(model, config)
    peft_model.print_trainable_parameters()  # 3 blocks x (2*32*8 + 8 + 32) = 1656
    assert torch.equal(peft_model(xb_test), reference), "up starts at zero: identity at init"

    fit(peft_model, xb, yb, steps=150, lr=1e-2)
    after = mse(peft_model, xb_test, yb_test)
    print(f"task B held-out mse: before adapter {before:.4f} -> after {after:.4f}")

    base = peft_model.unload()
    assert torch.equal(base(xb_test), reference), "unload() returns the untouched base model"
    print(f"unloaded: base model restored exactly ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
