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


def test_in_batch_top1_counts_nan_scores_as_misses():
    """argmax takes NaN for the maximum: pair 1's NaN score was a hit both ways (top-1 1 and 1, not
    2/3 and 2/3), and a diverged pair 0 drew every argmax to it (1/3 and 1/3, where rows and columns
    1 and 2 do pick their own pairs).  By hand, NaN pairs miss and the rest rank as usual."""
    nan = float("nan")
    similarity = torch.tensor([[0.9, 0.2, 0.1], [0.1, nan, 0.3], [0.0, 0.1, 0.7]])
    # rows: 0 -> 0 hit, 1 -> NaN pair miss, 2 -> 2 hit; columns: 0 hit, 1 NaN pair miss, 2 -> row 2 hit
    assert [float(x) for x in in_batch_top1(similarity)] == pytest.approx([2 / 3, 2 / 3])
    broken = torch.tensor([[nan, nan, nan], [nan, 0.8, 0.3], [nan, 0.1, 0.7]])  # pair 0 diverged
    # rows 1 and 2 still pick their own texts (1 and 2); pair 0 misses both ways.
    assert [float(x) for x in in_batch_top1(broken)] == pytest.approx([2 / 3, 2 / 3])
    assert [float(x) for x in in_batch_top1(torch.full((3, 3), nan))] == [0.0, 0.0]


def naive_recall(audio, text, text_of_audio, k):
    """R@k both ways by counting, one query at a time: rank = irrelevant candidates scoring >= the best relevant."""
    s = (audio @ text.T).tolist()
    a2t = [sum(s[i][j] >= s[i][t] for j in range(len(text)) if j != t) < k for i, t in enumerate(text_of_audio)]
    t2a = []
    for j in set(text_of_audio):
        best = max(s[i][j] for i, t in enumerate(text_of_audio) if t == j)
        t2a.append(sum(s[i][j] >= best for i, t in enumerate(text_of_audio) if t != j) < k)
    return sum(a2t) / len(a2t), sum(t2a) / len(t2a)


def test_matches_naive_counting_with_ties_and_shared_captions():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        num_texts = int(torch.randint(1, 6, (1,), generator=g))
        text_of_audio = torch.randint(0, num_texts, (int(torch.randint(1, 10, (1,), generator=g)),), generator=g)
        # Small integer coordinates: many exact ties, and most texts describe several audios.
        audio = torch.randint(-1, 2, (len(text_of_audio), 3), generator=g).float()
        text = torch.randint(-1, 2, (num_texts, 3), generator=g).float()
        for k in (1, 2, 4):
            metrics = retrieval_metrics(audio, text, text_of_audio, ks=(k,))
            a2t, t2a = naive_recall(audio, text, text_of_audio.tolist(), k)
            assert (metrics[f"a2t_R@{k}"], metrics[f"t2a_R@{k}"]) == (pytest.approx(a2t), pytest.approx(t2a))


def test_nan_scores_are_misses_not_hits():
    eye = torch.eye(3)
    broken = eye.clone()
    broken[1] = float("nan")  # audio 1 diverged; the others still rank their own text first
    metrics = retrieval_metrics(broken, eye, ks=(1,))
    assert metrics == {"a2t_R@1": pytest.approx(2 / 3), "t2a_R@1": pytest.approx(2 / 3)}
    # All NaN: every candidate ties at the bottom and ties count against, as for a collapsed model.
    everything_nan = retrieval_metrics(torch.full((3, 3), float("nan")), eye, ks=(1, 2))
    assert everything_nan == {"a2t_R@1": 0.0, "a2t_R@2": 0.0, "t2a_R@1": 0.0, "t2a_R@2": 0.0}


@pytest.mark.parametrize(
    ("audio_rows", "text_of_audio", "message"),
    [
        (4, None, r"text_of_audio: required when audio_embeds \(4 rows\) and text_embeds \(3 rows\)"),
        (3, torch.tensor([0, 1, 3]), r"text_of_audio: indices 0..3 outside 0..2 \(3 texts\)"),
        (3, torch.tensor([0, -1, 2]), r"text_of_audio: indices -1..2 outside 0..2"),
        (3, torch.tensor([0, 1]), r"text_of_audio: shape \(2,\), expected \(3,\)"),
        (3, torch.tensor([0.0, 1.0, 2.0]), "text_of_audio: needs integer text indices"),
    ],
)
def test_bad_text_of_audio_is_one_error_naming_it(audio_rows, text_of_audio, message):
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(torch.eye(4)[:audio_rows, :3], torch.eye(3), text_of_audio)


def test_chance_levels_rejects_a_text_index_past_num_texts():
    with pytest.raises(ValueError, match=r"text_of_audio: indices 0..7 outside 0..2"):
        chance_levels(torch.tensor([0, 1, 7]), 3)


@pytest.mark.parametrize("text_of_audio, num_texts, counts", [
    (torch.zeros(0, dtype=torch.long), 0, r"0 audio\(s\) and 0 text\(s\)"),  # was a ZeroDivisionError
    (torch.zeros(0, dtype=torch.long), 3, r"0 audio\(s\) and 3 text\(s\)"),  # was a ZeroDivisionError
    (torch.tensor([0, 0]), 0, r"2 audio\(s\) and 0 text\(s\)"),  # was "outside 0..-1"
])
def test_chance_levels_of_an_empty_eval_set_is_one_error_saying_so(text_of_audio, num_texts, counts):
    with pytest.raises(ValueError, match=rf"^chance_levels: needs at least one audio and one text, got {counts}$"):
        chance_levels(text_of_audio, num_texts)
