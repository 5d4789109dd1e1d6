"""The block-diffusion mask: a literal small matrix, a brute-force double loop, many shapes."""

from __future__ import annotations

import pytest
import torch

from bard_core.masks import attention_mask, batch_attention_mask

LITERAL = """
1 . . . . . . . . .
1 1 . . . . . . . .
1 1 1 1 . . . . . .
1 1 1 1 . . . . . .
1 1 1 1 1 1 . . . .
1 1 1 1 1 1 . . . .
1 1 . . . . 1 1 . .
1 1 . . . . 1 1 . .
1 1 1 1 . . . . 1 1
1 1 1 1 . . . . 1 1
"""


def test_matches_the_literal_matrix_of_the_method_page():
    expected = torch.tensor([[c == "1" for c in row.split()] for row in LITERAL.strip().splitlines()])
    assert torch.equal(attention_mask(2, 4, 2), expected)


def brute_force(P: int, R: int, B: int, prompt_mask: str, with_noisy: bool, total: int) -> torch.Tensor:
    """Row by row, key by key, straight from the rules in METHOD.md §2."""
    def where(i):
        if i < P:
            return "p", i
        if i < P + R:
            return "c", i - P
        if with_noisy and i < P + 2 * R:
            return "n", i - P - R
        return "pad", i

    m = torch.zeros(total, total, dtype=torch.bool)
    for i in range(total):
        qs, qi = where(i)
        for j in range(total):
            ks, kj = where(j)
            if qs == "pad" or ks == "pad":
                ok = qs == ks == "pad" and i == j
            elif qs == "p":
                ok = ks == "p" and (kj <= qi if prompt_mask == "causal" else kj // B <= qi // B)
            elif ks == "p":
                ok = True
            elif qs == "c":
                ok = ks == "c" and kj // B <= qi // B
            else:  # noisy row
                ok = (ks == "c" and kj // B < qi // B) or (ks == "n" and kj // B == qi // B)
            m[i, j] = ok
    return m


@pytest.mark.parametrize("prompt_mask", ["causal", "block"])
@pytest.mark.parametrize("with_noisy", [True, False])
@pytest.mark.parametrize(("P", "R", "B"), [(0, 4, 1), (1, 2, 2), (3, 8, 4), (5, 12, 4), (7, 16, 8), (2, 6, 3),
                                         (9, 32, 16), (4, 32, 32), (6, 5, 5)])
def test_equals_brute_force(P, R, B, prompt_mask, with_noisy):
    total = P + (2 * R if with_noisy else R) + 3  # three padding positions
    got = attention_mask(P, R, B, prompt_mask, with_noisy, total_len=total)
    assert torch.equal(got, brute_force(P, R, B, prompt_mask, with_noisy, total))


def test_every_row_attends_to_something_including_padding():
    mask = attention_mask(3, 8, 4, total_len=30)
    assert mask.any(dim=1).all()
    assert mask.diagonal().all()


def test_clean_rows_never_see_noisy_tokens():
    P, R = 5, 16
    mask = attention_mask(P, R, 4)
    assert not mask[P:P + R, P + R:].any()


def test_inference_mask_is_the_training_mask_without_the_noisy_copy():
    P, R, B = 4, 12, 4
    assert torch.equal(attention_mask(P, R, B, with_noisy=False), attention_mask(P, R, B)[: P + R, : P + R])


def test_batch_mask_shape_and_bad_arguments():
    m = batch_attention_mask([2, 5], [4, 8], 30, 4)
    assert m.shape == (2, 1, 30, 30) and m.dtype == torch.bool
    with pytest.raises(ValueError, match="total_len"):
        attention_mask(5, 8, 4, total_len=10)
    with pytest.raises(ValueError, match="prompt_mask"):
        attention_mask(5, 8, 4, prompt_mask="full")
