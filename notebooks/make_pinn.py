"""Build notebooks/pinn.ipynb from the cells below and execute it in place.

Run ``python notebooks/make_pinn.py`` (needs the ``bench`` extra: nbformat, nbclient,
ipykernel, matplotlib). The notebook trains a physics-informed network on one torch thread
(under two minutes) and checks every derivative hod computes against ``torch.func``.
"""

from __future__ import annotations

from make_tutorial import execute_and_write

CELLS: list[tuple[str, str]] = [
    ("md", r"""# A Poisson PINN trained with `hod.laplacian`

A physics-informed neural network (PINN) fits a network $u_\theta(x, y)$ to a PDE by
penalising the PDE's residual at random collocation points. Here the PDE is Poisson's
equation on the unit square with zero boundary values,

$$-\Delta u = f \ \text{ in } (0, 1)^2, \qquad u = 0 \ \text{ on the boundary}, \qquad
f(x, y) = 2\pi^2 \sin(\pi x)\sin(\pi y),$$

whose solution is $u^*(x, y) = \sin(\pi x)\sin(\pi y)$. The loss is

$$L(\theta) = \frac{1}{N}\sum_{n} \big(\Delta u_\theta(p_n) + f(p_n)\big)^2
+ \frac{\lambda}{M}\sum_{m} u_\theta(q_m)^2$$

over interior points $p_n$ and boundary points $q_m$, drawn afresh at every step.
`hod.laplacian(u)` computes $\Delta u_\theta$ at all $N$ points in one call of generated
code (Taylor mode, collapsed: see `docs/taylor.md`), and
`loss.backward()` differentiates through that code to the network's parameters.

The last sections show `hod.hvp` and `hod.jet`, each checked against `torch.func`."""),
    ("code", """import math
import time

import matplotlib.pyplot as plt
import torch
from torch.func import functional_call, grad, hessian, jacfwd, jvp, vmap

import hod

torch.manual_seed(0)
torch.set_num_threads(1)  # the timings below are for one CPU thread"""),
    ("md", """## 1. The network and its Laplacian

`u` maps a batch of points `(N, 2)` to `(N,)`. Its rows are independent, so the Laplacian
of each output entry with respect to all `2N` input entries is the Laplacian of that row
with respect to its own point: `hod.laplacian(u)` returns it per row, shape `(N,)`. hod
finds at trace time that the batch rows do not interact and propagates one point's worth of
directions per row, not `2N`."""),
    ("code", """width = 32
net = torch.nn.Sequential(
    torch.nn.Linear(2, width), torch.nn.Tanh(),
    torch.nn.Linear(width, width), torch.nn.Tanh(),
    torch.nn.Linear(width, 1),
)


def u(points):
    return net(points).squeeze(-1)


def exact(points):
    return torch.sin(math.pi * points[:, 0]) * torch.sin(math.pi * points[:, 1])


def source(points):
    return 2 * math.pi**2 * exact(points)


laplacian = hod.laplacian(u)


def laplacian_reference(points):
    \"\"\"torch.func: the trace of each point's Hessian.\"\"\"
    params = dict(net.named_parameters())

    def u_one(p, point):
        return functional_call(net, p, (point[None],)).squeeze()

    H = vmap(hessian(u_one, argnums=1), in_dims=(None, 0))(params, points)
    return H.diagonal(dim1=-2, dim2=-1).sum(-1)


points = torch.rand(256, 2)
torch.testing.assert_close(laplacian(points), laplacian_reference(points))
print("Laplacian at 256 points:", tuple(laplacian(points).shape), "equal to torch.func")"""),
    ("md", """`laplacian.lower(points).code` is the code hod generated for this signature:
straight-line ATen calls. The first-order tangents carry the two input directions for all 256
rows at once, `(2, 256, ...)` (the batch compressed: the first layer multiplies one row's
directions, `(2, 1, 2)`, and expands the product), and the second-order coefficient is
collapsed, `(1, 256, ...)`, the sum over both directions. Its first lines:"""),
    ("code", """lines = laplacian.lower(points).code.strip().splitlines()
print("\\n".join(lines[:24]))
print(f"... {len(lines)} lines in all")"""),
    ("md", """## 2. Training

Adam with a cosine learning-rate schedule, 256 interior and 4 x 32 boundary points drawn
afresh at each step. The shapes stay the same, so the code is generated once (the first
call above) and every later call runs it. The parameters are captured by `u`, not passed:
hod's code reads them by reference, so `optimizer.step()` shows in the next call, and
`loss.backward()` reaches them."""),
    ("code", """def boundary_points(per_side):
    s = torch.rand(per_side)
    zero, one = torch.zeros(per_side), torch.ones(per_side)
    return torch.cat([torch.stack(side, dim=1) for side in
                      [(s, zero), (s, one), (zero, s), (one, s)]])


def pinn_loss(interior, boundary, boundary_weight=100.0):
    residual = laplacian(interior) + source(interior)
    return residual.pow(2).mean() + boundary_weight * u(boundary).pow(2).mean()


steps = 8000
optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
history = []
start = time.perf_counter()
for step in range(steps):
    loss = pinn_loss(torch.rand(256, 2), boundary_points(32))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    schedule.step()
    history.append(loss.item())
    if step % 1000 == 0 or step == steps - 1:
        print(f"step {step:5d}  loss {loss.item():.3e}")
training_s = time.perf_counter() - start
print(f"{steps} steps in {training_s:.1f} s ({1e3 * training_s / steps:.2f} ms per step)")"""),
    ("md", """One training step with hod against the same step with the `torch.func` Laplacian
(median of 50 steps each; the parameter gradients of the two are checked equal first):"""),
    ("code", """def step_time_ms(lap, calls=50):
    interior, boundary = torch.rand(256, 2), boundary_points(32)
    times = []
    for _ in range(calls):
        begin = time.perf_counter()
        residual = lap(interior) + source(interior)
        loss = residual.pow(2).mean() + 100.0 * u(boundary).pow(2).mean()
        grads = torch.autograd.grad(loss, list(net.parameters()))
        times.append(time.perf_counter() - begin)
    return 1e3 * sorted(times)[calls // 2], grads


torch.manual_seed(1)
hod_ms, hod_grads = step_time_ms(laplacian)
torch.manual_seed(1)
func_ms, func_grads = step_time_ms(laplacian_reference)
for a, b in zip(hod_grads, func_grads, strict=True):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
print(f"one step: hod {hod_ms:.2f} ms, torch.func {func_ms:.2f} ms")"""),
    ("md", """## 3. The solution against the exact one

On a 101 x 101 grid. `value_and_grad=True` returns the value, the gradient and the
Laplacian from one pass of generated code; under `vmap` over the grid points (each a
function of one point `(2,)`) the gradient is the per-point gradient `(2,)`. With them we
measure the error of the solution, the error of its gradient, and the PDE residual."""),
    ("code", """side = torch.linspace(0, 1, 101)
grid = torch.stack(torch.meshgrid(side, side, indexing="ij"), dim=-1).reshape(-1, 2)


def u_at(point):
    return u(point[None])[0]


with torch.no_grad():
    value, gradient, lap = vmap(hod.laplacian(u_at, value_and_grad=True))(grid)
exact_value = exact(grid)
exact_gradient = math.pi * torch.stack([
    torch.cos(math.pi * grid[:, 0]) * torch.sin(math.pi * grid[:, 1]),
    torch.sin(math.pi * grid[:, 0]) * torch.cos(math.pi * grid[:, 1]),
], dim=1)
torch.testing.assert_close(gradient, vmap(jacfwd(u_at))(grid).detach())

relative_l2 = ((value - exact_value).norm() / exact_value.norm()).item()
gradient_error = ((gradient - exact_gradient).norm() / exact_gradient.norm()).item()
residual = (lap + source(grid)).abs()
print(f"relative L2 error of u:      {relative_l2:.2e}")
print(f"relative L2 error of grad u: {gradient_error:.2e}")
print(f"PDE residual: mean {residual.mean():.2e}, max {residual.max():.2e} "
      f"(f is up to {source(grid).max():.1f})")"""),
    ("code", """shape = (side.numel(), side.numel())
panels = [
    ("PINN $u_\\\\theta$", value.reshape(shape), "viridis"),
    ("exact $u^*$", exact_value.reshape(shape), "viridis"),
    ("$|u_\\\\theta - u^*|$", (value - exact_value).abs().reshape(shape), "magma"),
]
fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
for ax, (title, field, cmap) in zip(axes, panels, strict=False):
    image = ax.imshow(field.T, origin="lower", extent=(0, 1, 0, 1), cmap=cmap)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, shrink=0.85)
axes[3].semilogy(history, linewidth=0.5)
axes[3].set_title("training loss")
axes[3].set_xlabel("step")
fig.tight_layout()
plt.show()"""),
    ("md", """## 4. `hod.hvp`: Hessian-vector products

`hod.hvp(f)` returns `hf(primals, tangents)`, the Hessian of a scalar `f` times the tangents,
shaped like the differentiated argument: what `torch.func.jvp(torch.func.grad(f), primals,
tangents)[1]` returns. Here the loss of a small logistic regression, with respect to its
weights."""),
    ("code", """D = torch.float64
features, labels = torch.randn(200, 30, dtype=D), torch.randint(0, 2, (200,)).to(D)


def logistic_loss(w):
    logits = features @ w
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)


w, v = torch.randn(30, dtype=D), torch.randn(30, dtype=D)
Hv = hod.hvp(logistic_loss)((w,), (v,))
Hv_reference = jvp(grad(logistic_loss), (w,), (v,))[1]
torch.testing.assert_close(Hv, Hv_reference)
print("H v:", tuple(Hv.shape), "equal to torch.func; |H v| =", f"{Hv.norm().item():.4f}")"""),
    ("md", r"""## 5. `hod.jet`: Taylor coefficients along a path

`hod.jet(f, order)` returns `jf(primals, series)`, which returns `(value, (c_1, ..., c_K))`
with $c_k = \frac{d^k}{dt^k} f(x(t))\big|_{t=0}$: derivatives, not divided by $k!$. A
tensor as the series is the straight path $x(t) = x + t v$; a tuple $(s_1, s_2, \dots)$ is
the curve $x(t) = x + \sum_k s_k t^k / k!$. The reference differentiates
$g(t) = f(x(t))$ with respect to the scalar $t$ by nested `jacfwd`."""),
    ("code", """import copy

net64 = copy.deepcopy(net).double()


def u_point(point):  # the trained network at one point, in float64
    return net64(point[None])[0, 0]


def taylor_reference(f, path, order):
    \"\"\"f(path(0)) and d^k/dt^k f(path(t)) at t = 0, k = 1..order, by nested jacfwd.\"\"\"
    derivatives, g = [], lambda t: f(path(t))
    for _ in range(order):
        g = jacfwd(g)
        derivatives.append(g)
    t = torch.zeros((), dtype=D)
    return f(path(t)), tuple(d(t) for d in derivatives)


x0 = torch.tensor([0.3, 0.6], dtype=D)
v, a = torch.tensor([1.0, -0.5], dtype=D), torch.tensor([0.2, 0.4], dtype=D)
jet4 = hod.jet(u_point, order=4)

value, coefficients = jet4((x0,), v)                      # x(t) = x0 + t v
ref_value, ref_coefficients = taylor_reference(u_point, lambda t: x0 + t * v, 4)
torch.testing.assert_close(value, ref_value)
for c, r in zip(coefficients, ref_coefficients, strict=True):
    torch.testing.assert_close(c, r)
print("straight path, c_1..c_4:", [f"{c.item():+.4f}" for c in coefficients])

value, coefficients = jet4((x0,), (v, a))                 # x(t) = x0 + t v + t^2 a / 2
_, ref_coefficients = taylor_reference(u_point, lambda t: x0 + t * v + t**2 * a / 2, 4)
for c, r in zip(coefficients, ref_coefficients, strict=True):
    torch.testing.assert_close(c, r)
print("curved path,   c_1..c_4:", [f"{c.item():+.4f}" for c in coefficients])"""),
]


def main() -> None:
    execute_and_write(CELLS, "pinn.ipynb", timeout=600)


if __name__ == "__main__":
    main()
