"""BatchLoader's shuffles depend on (seed, epoch) as a pair: the docstring promises that seed 1
at epoch 0 does not replay seed 0 at epoch 1 (as ``seed + epoch`` would), so two runs with
neighbouring seeds do not see the same batch orders one epoch apart."""

from minipeft.data import BatchLoader


def order(seed: int, epoch: int, group_by_length: bool = False) -> list[list[int]]:
    examples = [{"input_ids": [1] * (1 + i % 7), "label": i % 2} for i in range(64)]
    loader = BatchLoader(examples, batch_size=4, shuffle=True, seed=seed, group_by_length=group_by_length, bucket_size=4)
    loader.set_epoch(epoch)
    return loader.batch_indices()


def test_neighbouring_seeds_do_not_replay_each_other_an_epoch_apart():
    for grouped in (False, True):
        seen = {}
        for seed in range(4):
            for epoch in range(4):
                key = str(order(seed, epoch, grouped))
                assert key not in seen, f"seed {seed} epoch {epoch} repeats seed/epoch {seen[key]}"
                seen[key] = (seed, epoch)
        assert order(2, 3, grouped) == order(2, 3, grouped)  # and each pair is reproducible
