"""Stage-1 and stage-2 losses on small hand-made inputs."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from blipkit.train.stage1 import decoder_ids, itc_loss, itg_loss, itm_loss, sample_hard_negatives
from blipkit.train.stage2 import slot_targets, warm_start_loss


def test_itc_is_low_for_matching_pairs_and_uses_max_over_queries():
    torch.manual_seed(0)
    text = F.normalize(torch.randn(4, 8), dim=-1)  # (B, E)
    noise = F.normalize(torch.randn(4, 3, 8), dim=-1)
    image = torch.cat([noise[:, :2], text[:, None]], dim=1)  # one query of each image is its text
    positives = torch.eye(4, dtype=torch.bool)
    temp = torch.tensor(0.05)
    good, count = itc_loss(image, text, image, text, positives, temp, label_smoothing=0.0)
    bad, _ = itc_loss(image, text.roll(1, 0), image, text.roll(1, 0), positives, temp, label_smoothing=0.0)
    assert count == 4 and good / count < 0.1 < bad / count
    smoothed, _ = itc_loss(image, text, image, text, positives, temp, label_smoothing=0.1)
    assert smoothed > good  # label smoothing puts 0.1 of the target mass on the other texts


def test_hard_negatives_are_never_positives():
    sim = torch.randn(6, 6) * 5
    group = torch.tensor([0, 0, 1, 2, 2, 3])  # examples 0/1 and 3/4 describe the same thing
    positives = group[:, None] == group[None, :]
    for seed in range(20):
        neg_text, neg_image = sample_hard_negatives(sim, positives, torch.Generator().manual_seed(seed))
        rows = torch.arange(6)
        assert not positives[rows, neg_text].any() and not positives[neg_image, rows].any()


def test_hard_negatives_follow_the_similarity():
    sim = torch.zeros(3, 3)
    sim[0, 2] = 20.0  # image 0 looks very much like text 2
    neg_text, _ = sample_hard_negatives(sim, torch.eye(3, dtype=torch.bool), torch.Generator().manual_seed(0))
    assert neg_text[0] == 2


def test_itm_and_itg_sums():
    logits = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    total, n = itm_loss(logits, torch.tensor([1, 0]))
    assert n == 2 and math.isclose(float(total), 2 * math.log(2), rel_tol=1e-6)
    ids = torch.tensor([[101, 5, 6, 0]])
    dec = decoder_ids(ids, bos_token_id=1)
    assert dec.tolist() == [[1, 5, 6, 0]] and ids[0, 0] == 101
    lm = torch.zeros(1, 4, 10)
    total, n = itg_loss(lm, dec, (ids != 0).long())
    assert n == 2 and math.isclose(float(total), 2 * math.log(10), rel_tol=1e-6)  # padding not scored


def test_warm_start_targets_and_loss():
    ids = torch.tensor([[7, 8, 9], [5, 0, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert slot_targets(ids, mask, 4).tolist() == [[7, 8, 9, 7], [5, 5, 5, 5]]
    table = torch.randn(10, 6)
    vocabulary = torch.tensor([5, 7, 8, 9])
    targets = slot_targets(ids, mask, 4)
    exact = warm_start_loss(table[targets] * 10, targets, table, vocabulary)  # right and confident
    wrong = warm_start_loss(table[targets.flip(0)] * 10, targets, table, vocabulary)
    assert exact < wrong
