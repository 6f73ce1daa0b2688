"""place_positions lays each row's stored per-position targets onto the student's covered positions, in order, and
``fill`` elsewhere: checked against a direct boolean-mask reference on the masks the tasks make (a full prefix, a
causal LM's prefix one short of the row, prompt-masked rows with holes, an empty row)."""

import torch

from kdcache.distill.collator import place_positions


def _reference(value, counts, mask, fill):
    out = value.new_full((*mask.shape, *value.shape[2:]), fill)
    stored = torch.arange(value.shape[1])[None, :] < counts[:, None]  # [B, P]
    out[mask] = value[stored]
    return out


def _masks(B: int, S: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    prefix = torch.arange(S)[None, :] < torch.randint(0, S + 1, (B,), generator=g)[:, None]
    prefix[0] = True  # one full row: the stored tensor is the layout itself
    labels = torch.randint(0, 50, (B, S), generator=g)
    labels[torch.rand(B, S, generator=g) < 0.3] = -100  # prompt tokens and padding carry no loss
    shifted = torch.zeros(B, S, dtype=torch.bool)
    shifted[:, :-1] = labels[:, 1:] != -100  # causal LM: position t predicts token t + 1
    packed = torch.zeros(B, S, dtype=torch.bool)
    packed[:, :-1] = True
    holes = shifted.clone()
    holes[0] = False  # a row with no covered position
    return {"prefix": prefix, "causal-packed": packed, "causal-holes": holes}


def test_matches_the_boolean_reference_for_every_mask_dtype_and_fill():
    g = torch.Generator().manual_seed(0)
    B, S = 5, 17
    for name, mask in _masks(B, S, g).items():
        counts = mask.sum(1)
        P = int(counts.max())
        for tail, dtype in (((6,), torch.int64), ((6,), torch.float32), ((), torch.float32), ((3, 2), torch.float16)):
            value = (torch.randn(B, P, *tail, generator=g) * 100).to(dtype)
            value[torch.arange(P)[None, :] >= counts[:, None]] = 0  # the reader zero-pads beyond each row's positions
            for fill in ((0, -100) if name != "prefix" else (0,)):  # a full prefix is returned as stored (zero-padded)
                got = place_positions(value, counts, mask, fill)
                want = _reference(value, counts, mask, fill)
                assert got.dtype == value.dtype and got.shape == (B, S, *tail), name
                assert torch.equal(got, want), (name, tail, dtype, fill)


def test_a_full_prefix_is_the_stored_tensor_itself():
    value = torch.arange(12.0).reshape(2, 6)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    assert place_positions(value, mask.sum(1), mask) is value
