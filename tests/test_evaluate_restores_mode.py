"""evaluate() runs the model in eval mode and hands it back in the mode it found it: a model the
caller had put in eval mode stays there (no dropout switched on behind their back), and one in
training mode goes back to training. Reference: the model's own outputs before the call."""

import torch
from torch import nn

from minipeft.train import evaluate


class Dropped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.drop = nn.Dropout(0.5)

    def forward(self, x, labels=None):
        return self.drop(self.lin(x))


def test_evaluate_leaves_the_mode_it_found():
    torch.manual_seed(0)
    model = Dropped()
    batches = [{"x": torch.randn(6, 4), "labels": torch.randint(0, 3, (6,))}]
    x = batches[0]["x"]

    model.eval()
    with torch.no_grad():
        before = model(x)
    evaluate(model, batches)
    assert not model.training and not model.drop.training
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)  # still deterministic

    model.train()
    evaluate(model, batches)
    assert model.training and model.drop.training


def test_evaluate_leaves_each_submodule_in_its_own_mode():
    # A training model whose dropout the caller froze in eval mode (as for a frozen BatchNorm):
    # it stays in eval after evaluate(), where model.train() would have switched it back on.
    model = Dropped()
    model.train()
    model.drop.eval()
    evaluate(model, [{"x": torch.randn(6, 4), "labels": torch.randint(0, 3, (6,))}])
    assert model.training and model.lin.training and not model.drop.training
