"""linmix._fixed_point_loop, the Python fixed-point loop of the layers, on an affine map
f(y) = y M + c per token with |M| < 1, whose fixed point and implicit gradient are known in closed form."""

from __future__ import annotations

import torch

from linmix._fixed_point_loop import implicit_grad, solve, step_adjoint, token_ratio
from conftest import assert_close


def affine(seed=0, B=2, L=3, d=4):
    g = torch.Generator().manual_seed(seed)
    M = 0.3 * torch.randn(d, d, generator=g, dtype=torch.float64) / d ** 0.5  # a contraction
    c = torch.randn(B, L, d, generator=g, dtype=torch.float64)
    fixed = torch.linalg.solve((torch.eye(d, dtype=torch.float64) - M).T, c.reshape(-1, d).T).T.reshape(B, L, d)
    return M, c, fixed


def test_token_ratio():
    f = torch.tensor([[[2.0, -4.0], [1.0, 1.0], [float("nan"), 0.0]]], dtype=torch.float64)
    y = torch.tensor([[[2.0, -3.0], [1.0, 1.0], [0.0, 0.0]]], dtype=torch.float64)
    assert token_ratio(f, y, 0.0).tolist()[0][:2] == [0.25, 0.0]  # the fused op's rule: unchanged is 0
    assert token_ratio(f, y, 0.0)[0, 2].isnan()
    assert abs(token_ratio(f, y, 1e-8)[0, 0].item() - 1 / (4 + 1e-8)) < 1e-15  # the layers' rule


def test_solve_converges_and_reports():
    M, c, fixed = affine()
    sol = solve(lambda y: y @ M + c, torch.zeros_like(c), max_iter=200, tol=1e-12)
    assert_close(sol.y, fixed)
    assert_close(sol.y_prev @ M + c, sol.y, exact=True)  # y = f(y_prev) without damping
    assert (sol.n_iter < 200).all() and (sol.residual < 1e-12).all()
    # tol = 0: exactly max_iter iterations; damping moves the iterate part of the way
    three = solve(lambda y: y @ M + c, torch.zeros_like(c), max_iter=3)
    assert three.n_iter.tolist() == [3, 3]
    damped = solve(lambda y: y @ M + c, torch.zeros_like(c), max_iter=1, damping=0.5)
    assert_close(damped.y, 0.5 * c)


def test_solve_stops_each_element_and_causal_tokens():
    M, c, _ = affine(B=2)
    c[1] = 0  # an element already at its fixed point (0) stops after one iteration
    sol = solve(lambda y: y @ M + c, torch.zeros_like(c), max_iter=50, tol=1e-6)
    assert sol.n_iter[1] == 1 and sol.n_iter[0] > 1


def test_implicit_grad_is_the_fixed_points():
    M, c, fixed = affine()
    c = c.requires_grad_()
    step = lambda y: y @ M + c  # noqa: E731
    with torch.no_grad():
        y_star = solve(step, torch.zeros_like(c), max_iter=200, tol=1e-13).y
    y = implicit_grad(step(y_star), step_adjoint(lambda y: y @ M + c.detach(), y_star, max_iter=200))
    g = torch.randn_like(y)
    (dc,) = torch.autograd.grad(y, c, g)
    # y* = c (I - M)^-1 per token (row vectors), so dL/dc = g (I - M)^-T
    want = torch.linalg.solve(torch.eye(M.shape[0], dtype=M.dtype) - M, g.reshape(-1, M.shape[0]).T).T
    assert_close(dc, want.reshape(g.shape))
