"""A check shared by the methods whose merges do not commute (OFT's family, MiSS "bat", RoAd):
each changes the weight the next one acts on, so two adapters active on one layer merge only in
their active order."""

from __future__ import annotations

import copy

import pytest
import torch

from minipeft import injection


def assert_merge_in_order_and_unmerge(model, base, run, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    """``model`` holds adapters "default" and "b" on ``base`` (a copy of its base model). With both
    active: merging "b" alone is refused, merging both in order gives the unmerged outputs of
    ``run(model)``, and unmerging gives ``base``'s weights back."""
    injection.set_adapter(model.get_base_model(), ["default", "b"])
    with torch.no_grad():
        both = run(model)
        with pytest.raises(ValueError, match="merge them in order"):
            model.merge_adapter(["b"])
        model.merge_adapter(["default", "b"])
        torch.testing.assert_close(run(model), both, atol=atol, rtol=rtol)
        model.unmerge_adapter()
        restored = copy.deepcopy(model).unload().state_dict()
    for name, t in base.state_dict().items():
        torch.testing.assert_close(restored[name], t, atol=atol, rtol=rtol)
