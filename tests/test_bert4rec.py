"""BERT4Rec: cloze masking never shows a masked position its label, padding never leaks, prediction
through an appended [mask] token."""

from __future__ import annotations

import pytest
import torch

from genrec.data.batches import Batch
from genrec.models import BERT4Rec, BERT4RecConfig

from conftest import assert_same_output_and_grads, output_and_grads

NUM_ITEMS = 30
CFG = BERT4RecConfig(dim=8, num_blocks=2, num_heads=2, ffn_dim=16, dropout=0.1, attn_dropout=0.1, mask_prob=0.3,
                     max_len=12)


def make_model(seed: int = 0) -> BERT4Rec:
    torch.manual_seed(seed)
    model = BERT4Rec(CFG, NUM_ITEMS)
    with torch.no_grad():  # away from the tiny init so every parameter matters
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.2)
    return model.eval()


def history_batch(lengths, seed=0, width=None) -> Batch:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    L = width or int(lengths.max())
    real = torch.arange(L)[None, :] < lengths[:, None]
    return Batch(items=torch.randint(1, NUM_ITEMS + 1, (len(lengths), L), generator=g) * real, lengths=lengths)


def training_window(lengths, seed=0) -> Batch:
    """A next-item training batch as the loader builds it: inputs and targets shifted by one."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    L = int(lengths.max())
    seq = torch.randint(1, NUM_ITEMS + 1, (len(lengths), L + 1), generator=g)
    real = torch.arange(L)[None, :] < lengths[:, None]
    return Batch(items=seq[:, :L] * real, lengths=lengths, targets=seq[:, 1:] * real)


def test_cloze_batch_masks_and_targets():
    model = make_model()
    batch = training_window([5, 11, 12, 1, 3], seed=1)
    torch.manual_seed(0)
    cloze = model.training_batch(batch)
    assert cloze.cloze
    # the sequence is the whole window: inputs then the last target, the last max_len of it
    full = [torch.cat([batch.items[b, :n], batch.targets[b, n - 1:n]]) for b, n in enumerate(batch.lengths.tolist())]
    full = [f[-CFG.max_len:] for f in full]
    assert cloze.lengths.tolist() == [len(f) for f in full]  # 6, 12 (12 events), 12 (13 -> oldest dropped), 2, 4
    for b, f in enumerate(full):
        n = len(f)
        items, targets = cloze.items[b, :n], cloze.targets[b, :n]
        masked = targets > 0
        assert masked.any()  # every sequence predicts something
        assert torch.all(items[masked] == model.mask_token)  # a masked position holds [mask], never its label
        assert torch.equal(targets[masked], f[masked])
        assert torch.equal(items[~masked], f[~masked])
        assert torch.all(cloze.items[b, n:] == 0) and torch.all(cloze.targets[b, n:] == 0)
    rate = (cloze.targets > 0).sum() / cloze.lengths.sum()
    assert 0.1 < rate < 0.7


def test_masked_position_never_sees_its_label():
    """Two windows that differ only in the label of a position that gets masked: the encoder sees the same
    input, so every output (in particular the masked position's) is identical."""
    model = make_model()
    batch = training_window([8, 8], seed=2)
    torch.manual_seed(5)
    cloze = model.training_batch(batch)
    b, pos = (cloze.targets > 0).nonzero()[0].tolist()
    changed = Batch(items=batch.items.clone(), lengths=batch.lengths, targets=batch.targets.clone())
    new_label = cloze.targets[b, pos] % NUM_ITEMS + 1
    if pos < int(batch.lengths[b]):
        changed.items[b, pos] = new_label
    if pos >= 1:
        changed.targets[b, pos - 1] = new_label
    torch.manual_seed(5)
    cloze2 = model.training_batch(changed)
    assert torch.equal(cloze2.items, cloze.items)  # the label is not in the input
    assert cloze2.targets[b, pos] == new_label
    torch.testing.assert_close(model(cloze2), model(cloze))


@pytest.mark.parametrize("cloze", [False, True])
def test_padding_never_leaks(cloze):
    model = make_model()
    batch = history_batch([5, 3, 1], seed=3)
    if cloze:
        batch = Batch(items=batch.items, lengths=batch.lengths, cloze=True)
    with torch.no_grad():
        base = model(batch)
        junk = batch.items.clone()
        junk[~batch.padding_mask] = 7  # garbage in the padding
        wide = torch.cat([junk, torch.full((3, 4), 9)], dim=1)  # and extra padding columns
        other = model(Batch(items=wide, lengths=batch.lengths, cloze=cloze))
    real = batch.padding_mask
    torch.testing.assert_close(other[:, :base.shape[1]][real], base[real], atol=1e-5, rtol=0)


def test_rows_are_independent_and_bidirectional():
    model = make_model()
    batch = history_batch([6, 4], seed=4)
    with torch.no_grad():
        both = model(batch)
        alone = model(Batch(items=batch.items[1:, :4], lengths=batch.lengths[1:]))
        torch.testing.assert_close(both[1, 3], alone[0, 3], atol=1e-5, rtol=0)
        # bidirectional: in a cloze encoding an early position depends on later items
        cloze = Batch(items=batch.items, lengths=batch.lengths, cloze=True)
        changed = batch.items.clone()
        changed[0, 5] = changed[0, 5] % NUM_ITEMS + 1
        out = model(Batch(items=changed, lengths=batch.lengths, cloze=True))
        assert not torch.allclose(out[0, 0], model(cloze)[0, 0])


def test_prediction_appends_a_mask_token():
    model = make_model()
    batch = history_batch([4, 12, 1], seed=6, width=12)
    with torch.no_grad():
        out = model(batch)
        for b, n in enumerate(batch.lengths.tolist()):
            seq = torch.cat([batch.items[b, :n], torch.tensor([model.mask_token])])[-CFG.max_len:]  # 12: oldest dropped
            h = model.encode(seq[None], torch.tensor([len(seq)]))
            torch.testing.assert_close(out[b, n - 1], h[0, -1], atol=1e-5, rtol=0)
            assert torch.all(out[b, :n - 1] == 0)
    assert model.item_vectors().shape == (NUM_ITEMS + 1, CFG.dim)


def test_config_validation():
    with pytest.raises(ValueError, match="mask_prob"):
        BERT4RecConfig(mask_prob=0.0).validate()
    with pytest.raises(ValueError, match="divisible"):
        BERT4RecConfig(dim=10, num_heads=3).validate()


def test_packed_tokens_and_length_groups_equal_the_padded_batch(monkeypatch):
    """A random batch of mixed lengths runs per-token work on its real tokens and attention per group
    of similar lengths: the same encoding and gradients as the padded batch."""
    import genrec.models.layers as layers

    batch = history_batch([9, 2, 12, 1, 5, 3, 12, 7], seed=5)
    batch = Batch(items=batch.items, lengths=batch.lengths, cloze=True)
    results = []
    for threshold in (0.0, 2.0):  # never pack / always pack
        monkeypatch.setattr(layers, "PACK_BELOW", threshold)
        original = layers.in_length_groups
        monkeypatch.setattr("genrec.models.bert4rec.in_length_groups",
                            lambda fn, seq, lengths: original(fn, seq, lengths, group=3))  # 3 groups
        results.append(output_and_grads(make_model(), batch))
    assert_same_output_and_grads(results[1], results[0], batch.padding_mask, every_parameter=True)
