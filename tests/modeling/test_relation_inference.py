"""relation_inference: segment mapping, dropping, duplicate merging, ranking."""

import pytest
import torch

from spade.modeling.relation.inference import relation_inference


def _pred():
    return {
        "pairs": torch.tensor([[0, 2], [1, 2], [2, 3], [0, 1], [2, 0]]),
        "pair_scores": torch.tensor([0.5, 0.9, 1.0, 1.0, 0.4]),
        "predicate_scores": torch.tensor(
            [[0.2, 0.8], [0.6, 0.4], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]
        ),
    }


# queries 0 and 1 became segment 1, query 2 segment 2, query 3 was dropped
QUERY_TO_SEGMENT = torch.tensor([1, 1, 2, 0])


def test_merges_queries_of_one_segment_and_drops_dropped_and_self_pairs():
    out = relation_inference(_pred(), QUERY_TO_SEGMENT, 100)
    # (1, 2): max(0.5 * [0.2, 0.8], 0.9 * [0.6, 0.4]) = [0.54, 0.4]; (2, 1): 0.4 * [1, 0]
    assert out["triplets"].tolist() == [[1, 2, 0], [2, 1, 0]]
    assert torch.allclose(out["scores"], torch.tensor([0.54, 0.4]))
    # distributions: merged triplet scores / largest pair score of the merged query pairs
    assert torch.allclose(out["predicate_scores"], torch.tensor([[0.6, 0.4 / 0.9], [1.0, 0.0]]))
    keys = [tuple(t) for t in out["triplets"].tolist()]
    assert len(keys) == len(set(keys))


def test_ranked_and_capped():
    out = relation_inference(_pred(), QUERY_TO_SEGMENT, 1)
    assert out["triplets"].tolist() == [[1, 2, 0]]
    out = relation_inference(_pred(), torch.tensor([1, 3, 2, 4]), 100)
    assert out["scores"].tolist() == sorted(out["scores"].tolist(), reverse=True)
    assert len(out["triplets"]) == 5
    # one query pair per segment pair: rows keep the pairs' own distributions (ties: segment order)
    order = [3, 2, 1, 0, 4]
    assert torch.allclose(out["predicate_scores"], _pred()["predicate_scores"][order])
    assert out["triplets"][:, 2].tolist() == [0, 0, 0, 1, 0]


def test_several_predicates_per_pair():
    # (1, 2) merged [0.54, 0.4] and (2, 1) [0.4, 0.0]: with k = 2 every pair gives two rows
    out = relation_inference(_pred(), QUERY_TO_SEGMENT, 100, predicates_per_pair=2)
    assert out["triplets"].tolist() == [[1, 2, 0], [1, 2, 1], [2, 1, 0], [2, 1, 1]]
    assert torch.allclose(out["scores"], torch.tensor([0.54, 0.4, 0.4, 0.0]))
    # a pair's second row hides its first predicate: each row's argmax is its own predicate
    expected = torch.tensor([[0.6, 0.4 / 0.9], [0.0, 0.4 / 0.9], [1.0, 0.0], [0.0, 0.0]])
    assert torch.allclose(out["predicate_scores"], expected)
    # the first row of each pair is exactly the k = 1 output (the evaluator's "single" rows)
    single = relation_inference(_pred(), QUERY_TO_SEGMENT, 100)
    assert out["triplets"][[0, 2]].tolist() == single["triplets"].tolist()
    # k above the number of predicates is capped; the cap on rows still holds
    capped = relation_inference(_pred(), QUERY_TO_SEGMENT, 3, predicates_per_pair=7)
    assert capped["triplets"].tolist() == out["triplets"][:3].tolist()
    with pytest.raises(ValueError, match="predicates_per_pair"):
        relation_inference(_pred(), QUERY_TO_SEGMENT, 10, predicates_per_pair=0)


def test_all_dropped_and_empty_inputs():
    out = relation_inference(_pred(), torch.zeros(4, dtype=torch.long), 100)
    assert out["triplets"].shape == (0, 3) and out["scores"].shape == (0,)
    assert out["predicate_scores"].shape == (0, 2)
    empty = {
        "pairs": torch.zeros(0, 2, dtype=torch.long),
        "pair_scores": torch.zeros(0),
        "predicate_scores": torch.zeros(0, 5),
    }
    assert relation_inference(empty, torch.zeros(0, dtype=torch.long), 10)[
        "predicate_scores"
    ].shape == (0, 5)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="query_to_segment"):
        relation_inference(_pred(), torch.tensor([1, 2]), 10)
    bad = _pred()
    del bad["pair_scores"]
    with pytest.raises(KeyError, match="pair_scores"):
        relation_inference(bad, QUERY_TO_SEGMENT, 10)
    bad = _pred()
    bad["pair_scores"] = bad["pair_scores"][:2]
    with pytest.raises(ValueError, match="do not match"):
        relation_inference(bad, QUERY_TO_SEGMENT, 10)
