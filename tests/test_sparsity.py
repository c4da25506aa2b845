import pytest
import torch

from peft_sparse.sparsity import (
    SparsityPattern,
    apply_mask,
    follows_nm,
    nm_mask,
    nm_violations,
    pattern_mask,
    sparsity_stats,
    unstructured_mask,
    validate_nm,
)


def _slow_nm_mask(scores, n, m):
    """Obviously-correct reference: loop over groups, keep the n largest, ties to the lower index."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    for r in range(scores.shape[0]):
        for g in range(0, scores.shape[1], m):
            ranked = sorted(range(m), key=lambda j: (-float(scores[r, g + j]), j))
            for j in ranked[:n]:
                mask[r, g + j] = True
    return mask


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 4), (4, 8), (2, 8)])
def test_nm_mask_matches_slow_reference(n, m):
    scores = torch.randn(6, 4 * m)
    mask = nm_mask(scores, n, m)
    assert torch.equal(mask, _slow_nm_mask(scores, n, m))
    assert (mask.reshape(6, -1, m).sum(-1) == n).all()


def test_nm_mask_ties_keep_lower_index():
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 2.0, 2.0, 2.0]])
    assert nm_mask(scores, 2, 4).tolist() == [[True, True, False, False, False, True, True, False]]
    assert torch.equal(nm_mask(scores, 2, 4), _slow_nm_mask(scores, 2, 4))


def test_nm_mask_works_on_leading_batch_dims():
    scores = torch.randn(2, 3, 8)
    mask = nm_mask(scores, 2, 4)
    assert torch.equal(mask[1], nm_mask(scores[1], 2, 4))


def test_unstructured_row_and_layer():
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0], [40.0, 30.0, 20.0, 10.0]])
    assert unstructured_mask(scores, 0.5).tolist() == [[True, True, False, False]] * 2
    assert unstructured_mask(scores, 0.5, scope="layer").tolist() == [
        [False, False, False, False],
        [True, True, True, True],
    ]
    ragged = torch.randn(5, 33)
    assert ((~unstructured_mask(ragged, 0.5)).sum(-1) == 16).all()  # int(33 * 0.5) pruned per row


def test_pattern_parse_and_errors():
    assert SparsityPattern.parse("2:4") == SparsityPattern(n=2, m=4)
    assert SparsityPattern.parse("50%").ratio == 0.5
    assert SparsityPattern.parse(0.7, scope="layer").scope == "layer"
    assert SparsityPattern.parse("1:4").ratio == 0.75
    for bad in ["4:2", "0:4", "2:2", "abc", "1.5", "-0.1"]:
        with pytest.raises(ValueError):
            SparsityPattern.parse(bad)
    with pytest.raises(ValueError, match="q_proj.*not divisible by M=4"):
        SparsityPattern.parse("2:4").check_width(10, "q_proj")


def test_pattern_mask_apply_and_validate():
    weight = torch.randn(8, 16)
    mask = pattern_mask(weight.abs(), SparsityPattern.parse("2:4"))
    pruned = apply_mask(weight.clone(), mask)
    assert follows_nm(pruned, 2, 4) and not follows_nm(weight, 2, 4)
    validate_nm(pruned, 2, 4)
    assert nm_violations(weight, 2, 4) == 32
    with pytest.raises(ValueError, match="layer.x is not 2:4 sparse: 32 of 32 groups"):
        validate_nm(weight, 2, 4, "layer.x")
    assert sparsity_stats(pruned).sparsity == 0.5
