"""The one refinement loop with a toy parameterisation: a point x (G, n) fitting targets t (G, K, n).

Independent answers: the mean-squared fit's optimum is the mean of the targets (closed form); a
loop that only makes things worse must hand back the start under either BestFrom policy.
"""

from __future__ import annotations

import pytest
import torch

from hydraopt.merge.adam import module_rms
from hydraopt.merge.refine import BestFrom, refine_parameters


class ToyFit:
    """Point [x (G, n)]; error of task i: mean_j (x_j - t_ij)²."""

    check_every: int | None = 1
    hand_written = False

    def __init__(self, targets: torch.Tensor, best_from: BestFrom):
        self.targets, self.best_from = targets, best_from
        self.begun = self.finished = 0

    def scales(self, point):
        return [module_rms(point[0])[:, None]]

    def error(self, point):
        return (point[0][:, None, :] - self.targets).square().mean(-1)  # (G, K)

    def begin(self):
        self.begun += 1

    def loss(self, point):
        return self.error(point).mean(1)

    def loss_and_grads(self, point, with_loss):
        raise AssertionError("autograd path only")

    def finish(self, point):
        self.finished += 1
        return self.error(point), True


class HandWrittenToyFit(ToyFit):
    """The same fit with its gradient by hand: d/dx mean_i mean_j (x_j - t_ij)² = 2 (x - t̄) / n."""

    hand_written = True

    def loss_and_grads(self, point, with_loss):
        x = point[0]
        grad = 2 * (x - self.targets.mean(1)) / x.shape[1]
        return (self.loss(point) if with_loss else None), [grad]


TARGETS = torch.tensor([[[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]], [[0.5, -1.0, 2.0], [1.5, 1.0, 0.0]]])
START = torch.tensor([[4.0, -3.0, 1.0], [2.0, 2.0, -2.0]])


@pytest.mark.parametrize("problem_class", [ToyFit, HandWrittenToyFit])
@pytest.mark.parametrize("best_from", ["start", "loop"])
def test_converges_to_the_closed_form_mean(problem_class, best_from):
    problem = problem_class(TARGETS, best_from)
    (x,), err = refine_parameters(problem, [START], steps=400, lr=0.1)
    assert torch.allclose(x, TARGETS.mean(1), atol=1e-3)
    assert torch.allclose(err, problem.error([x]))  # the returned error is the point's
    assert (problem.begun, problem.finished) == (1, 1)


@pytest.mark.parametrize("best_from", ["start", "loop"])
def test_a_loop_that_only_worsens_returns_the_start(best_from):
    at_optimum = TARGETS.mean(1)  # every step of Adam moves away from it
    problem = ToyFit(TARGETS, best_from)
    (x,), err = refine_parameters(problem, [at_optimum], steps=5, lr=0.5)
    assert torch.equal(x, at_optimum)
    assert torch.equal(err, problem.error([at_optimum]))


def test_zero_steps_return_the_start_evaluated_without_setting_up():
    problem = ToyFit(TARGETS, "loop")
    (x,), err = refine_parameters(problem, [START], steps=0, lr=0.1)
    assert x is START and torch.equal(err, problem.error([START]))
    assert (problem.begun, problem.finished) == (0, 0)


def test_modules_keep_their_own_best():
    # Module 0 starts at its optimum (steps only worsen it), module 1 far away: one keeps the
    # start, the other improves.
    start = torch.stack([TARGETS[0].mean(0), START[1]])
    (x,), _ = refine_parameters(ToyFit(TARGETS, "start"), [start], steps=50, lr=0.1)
    assert torch.equal(x[0], start[0])
    assert (
        ToyFit(TARGETS, "start").error([x])[1].mean()
        < ToyFit(TARGETS, "start").error([start])[1].mean()
    )
