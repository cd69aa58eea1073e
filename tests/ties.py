"""Parity through ranking steps whose near-ties no CPU decides the same way.

Two correct float32 implementations round differently (another GEMM kernel, another CPU), so two
tokens whose ranking scores differ by an ulp can swap places, and a token at the edge of a
selection or next to a better one in NMS can trade places with its neighbour. A parity test must
not depend on those decisions, and must still catch every other difference. ``follow_fixture``
wraps a ranking step: where a decision's margin is below the test's tolerance it takes the
reference's side; every other decision must already be ours."""
from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor


def follow_fixture(select, picks, ranking, tol: float = 1e-4):
    """Wraps ``select(scores, *args) -> [B, k]`` token indices, best first.

    picks(scores, ours) -> [B, k]: the tokens the reference picked, in its order (``ours``, our
    own picks, settles which of several identical tokens it means).
    ranking(scores) -> [B, S]: the value each token is ranked by (what ``tol`` applies to).

    Checks, then returns the reference's picks so everything downstream compares row for row:
    - position by position, our ranked scores and the reference's agree within ``tol``;
    - with the reference's picks favoured by ``tol`` (every decision closer than the tolerance
      goes its way), our step picks exactly the reference's set.
    """

    def wrapped(scores: Tensor, *args):
        ours = select(scores, *args)
        ref = picks(scores, ours)
        rank = ranking(scores)
        assert ours.shape == ref.shape, f"we pick {tuple(ours.shape)} tokens, the reference {tuple(ref.shape)}"
        torch.testing.assert_close(rank.gather(1, ours), rank.gather(1, ref), atol=tol, rtol=0,
                                   msg=lambda m: f"our ranking is not the reference's beyond ties:\n{m}")
        favour = torch.zeros_like(rank).scatter(1, ref, tol)
        settled = select(scores + (favour[..., None] if scores.dim() == 3 else favour), *args)
        for b in range(ref.shape[0]):
            missing = set(ref[b].tolist()) - set(settled[b].tolist())
            assert not missing, f"image {b}: the reference picked tokens {sorted(missing)[:8]} that we do not, beyond ties"
        return ref

    return wrapped


def picks_by_value(expected_rows: Tensor, ranking, tol: float = 1e-4):
    """``picks`` for a step whose picked rows the reference stored (e.g. the two-stage logits of
    the selected queries, [B, k, C]): each stored row is matched to the token whose row of ``scores``
    [B, S, C] equals it within ``tol``. Among tokens with identical rows (padding), ours are taken."""

    def picks(scores: Tensor, ours: Tensor) -> Tensor:
        out = []
        for b in range(scores.shape[0]):
            # Only tokens ranked at least as high as the reference's last pick can match one of its rows.
            cand = (ranking(scores[b]) >= ranking(expected_rows[b]).min() - tol).nonzero().squeeze(1)
            dist = (expected_rows[b][:, None, :] - scores[b, cand][None]).abs().amax(-1)  # [k stored, candidates]
            not_ours = ~torch.isin(cand, ours[b])
            rows, cols = linear_sum_assignment((dist + tol / 10 * not_ours).numpy())
            worst = float(dist[rows, cols].max())
            assert len(rows) == len(expected_rows[b]) and worst < tol, \
                f"image {b}: a stored row matches no token of ours (closest {worst:.2e})"
            out.append(cand[torch.as_tensor(cols)])
        return torch.stack(out)

    return picks


def best_class(logits: Tensor) -> Tensor:
    """The query-selection ranking of DINO, Focus-DETR and Salience DETR: each token's best class logit."""
    return logits.max(-1).values
