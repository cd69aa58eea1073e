"""How parity tests decide: a near-tie may go either way, nothing else may (tests/ties.py); the
official fixtures are required in CI."""
import pytest
import torch
from ties import follow_fixture

# One image, six tokens; tokens 1 and 2 are tied to an ulp, the rest are far apart.
SCORES = torch.tensor([[0.9, 0.5, 0.5 - 3e-8, 0.3, 0.2, 0.1]])


def top(k):
    return lambda scores: scores.topk(k, dim=1).indices


def follow(k, reference):
    return follow_fixture(top(k), lambda scores, ours: torch.tensor([reference]), lambda scores: scores)


def test_tied_tokens_in_the_other_order_pass_and_take_the_reference_order():
    assert follow(4, [0, 2, 1, 3])(SCORES).tolist() == [[0, 2, 1, 3]]


def test_a_tie_at_the_edge_of_the_selection_passes():
    # We keep token 1, the reference its tied neighbour 2.
    assert follow(2, [0, 2])(SCORES).tolist() == [[0, 2]]


def test_two_rows_that_are_not_tied_swapped_fail():
    with pytest.raises(AssertionError, match="ranking is not the reference's"):
        follow(4, [0, 3, 2, 1])(SCORES)


def test_another_token_that_is_not_tied_fails():
    # Same scores position by position would need token 4 in place of 3: 0.2 vs 0.3 is no tie.
    with pytest.raises(AssertionError):
        follow(4, [0, 1, 2, 4])(SCORES)


def test_an_edge_decided_by_more_than_the_tolerance_fails():
    # Tokens 1 and 2 compete for the last place: 5e-5 apart is a tie at tol 1e-4, 2e-4 apart is not.
    scores = torch.tensor([[0.9, 0.3, 0.3 - 2e-4]])
    with pytest.raises(AssertionError):
        follow_fixture(top(2), lambda s, ours: torch.tensor([[0, 2]]), lambda s: s)(scores)
    scores = torch.tensor([[0.9, 0.3, 0.3 - 5e-5]])
    assert follow_fixture(top(2), lambda s, ours: torch.tensor([[0, 2]]), lambda s: s)(scores).tolist() == [[0, 2]]


def test_fixture_tests_fail_in_ci_when_shared_is_missing(tmp_path, monkeypatch):
    from conftest import require_shared
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        require_shared(tmp_path / "shared")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        require_shared(tmp_path / "shared")
    assert require_shared(tmp_path) == tmp_path
