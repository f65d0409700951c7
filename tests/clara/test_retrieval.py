"""Retrieval metrics on hand-made cases."""

from __future__ import annotations

import pytest
import torch

from clara.retrieval import chance_levels, first_relevant_rank, in_batch_top1, recall_at_k, retrieval_metrics


def test_first_relevant_rank_counts_irrelevant_candidates_at_or_above():
    similarity = torch.tensor(
        [
            [0.9, 0.1, 0.2],  # relevant 0 is best -> rank 0
            [0.5, 0.4, 0.6],  # relevant 1 is last -> rank 2
            [0.3, 0.3, 0.3],  # relevant 2 tied with both others -> ties count against: rank 2
        ]
    )
    relevant = torch.eye(3, dtype=torch.bool)
    assert first_relevant_rank(similarity, relevant).tolist() == [0, 2, 2]


def test_recall_at_k_by_hand():
    similarity = torch.tensor([[0.9, 0.1, 0.2], [0.5, 0.4, 0.6], [0.1, 0.8, 0.3]])
    relevant = torch.eye(3, dtype=torch.bool)
    # ranks: 0, 2, 1
    assert recall_at_k(similarity, relevant, ks=(1, 2, 3)) == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3), 3: 1.0}


def test_retrieval_metrics_paired_both_directions():
    audio = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    metrics = retrieval_metrics(audio, text, ks=(1, 2))
    # a2t: audio0 -> text0 best (hit); audio1 best text2 (0.8 vs 1.0: text2 = 1.0), text1 0.8 -> rank 1;
    # audio2: text1 = 1.0 (0.36 + 0.64) beats text2 = 0.8 -> miss at 1, hit at 2.
    assert metrics["a2t_R@1"] == pytest.approx(1 / 3)
    assert metrics["a2t_R@2"] == pytest.approx(1.0)
    # t2a: text0 -> audio0 (1.0) hit; text1 -> audio2 (1.0) beats audio1 (0.8): rank 1;
    # text2 -> audio1 (1.0) beats audio2 (0.8): rank 1.
    assert metrics["t2a_R@1"] == pytest.approx(1 / 3)
    assert metrics["t2a_R@2"] == pytest.approx(1.0)


def test_perfect_and_collapsed_embeddings():
    eye = torch.eye(4)
    perfect = retrieval_metrics(eye, eye)
    assert all(value == 1.0 for value in perfect.values())
    same = torch.ones(4, 4) / 2
    collapsed = retrieval_metrics(same, same, ks=(1, 3))
    assert collapsed["a2t_R@1"] == 0.0 and collapsed["t2a_R@3"] == 0.0


def test_shared_captions_count_any_described_audio():
    # Two audios share text 0; text 1 describes audio 2.
    audio = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text_of_audio = torch.tensor([0, 0, 1])
    metrics = retrieval_metrics(audio, text, text_of_audio, ks=(1,))
    # a2t: audio1 scores text0 0.8 > text1 0.6: hit; all three hit.
    assert metrics["a2t_R@1"] == 1.0
    # t2a: text0's best audio is audio0 (relevant); text1's best is audio2: both hit.
    assert metrics["t2a_R@1"] == 1.0


def test_chance_levels():
    paired = chance_levels(torch.arange(10), 10, ks=(1, 5, 10))
    assert paired["a2t_R@1"] == pytest.approx(0.1)
    assert paired["t2a_R@5"] == pytest.approx(0.5)
    assert paired["t2a_R@10"] == pytest.approx(1.0)
    # Each of 2 texts describes 2 of 4 audios: a text misses at k=1 with probability 2/4.
    shared = chance_levels(torch.tensor([0, 0, 1, 1]), 2, ks=(1, 2))
    assert shared["t2a_R@1"] == pytest.approx(0.5)
    assert shared["t2a_R@2"] == pytest.approx(1 - 1 / 6)  # both top-2 from the other pair: 1 of C(4,2)
    assert shared["a2t_R@2"] == 1.0


def test_chance_matches_random_embeddings_on_average():
    torch.manual_seed(0)
    text_of_audio = torch.arange(20).repeat(2)  # 40 audios, 2 per text
    totals = torch.zeros(2)
    for _ in range(200):
        audio = torch.nn.functional.normalize(torch.randn(40, 8), dim=-1)
        text = torch.nn.functional.normalize(torch.randn(20, 8), dim=-1)
        metrics = retrieval_metrics(audio, text, text_of_audio, ks=(5,))
        totals += torch.tensor([metrics["a2t_R@5"], metrics["t2a_R@5"]])
    chance = chance_levels(text_of_audio, 20, ks=(5,))
    assert (totals / 200).tolist() == pytest.approx([chance["a2t_R@5"], chance["t2a_R@5"]], abs=0.03)


def test_in_batch_top1():
    similarity = torch.tensor([[0.9, 0.2, 0.1], [0.8, 0.3, 0.1], [0.0, 0.1, 0.7]])
    a2t, t2a = in_batch_top1(similarity)
    # rows: 0 -> 0 hit, 1 -> 0 miss, 2 -> 2 hit; columns: 0 -> row 0 hit, 1 -> row 1 hit, 2 -> row 2 hit
    assert float(a2t) == pytest.approx(2 / 3)
    assert float(t2a) == pytest.approx(1.0)
