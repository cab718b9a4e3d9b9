"""Build notebooks/tutorial.ipynb from the cells below and execute it in place.

Run ``python notebooks/make_tutorial.py`` (needs the ``bench`` extra: nbformat, nbclient,
ipykernel). Every cell that computes a derivative checks it against ``torch.func``.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent

CELLS: list[tuple[str, str]] = [
    ("md", """# hod tutorial

`hod` computes higher-order derivatives of PyTorch functions. It traces the function once
per input signature, derives every ATen op by rule, and generates straight-line code that
returns what nested `torch.func` transforms return (`jacrev`, then `jacfwd` for each
further order). This notebook walks through the common uses and checks each result
against `torch.func`."""),
    ("code", """import torch
from torch.func import functional_call, hessian, jacfwd, jacrev, vmap

import hod

torch.manual_seed(0)
D = torch.float64"""),
    ("md", """## 1. The Hessian of a loss

`hod.hessian(f, argnums)` has `f`'s signature. With a tuple `argnums` the result nests
like `torch.func.hessian`: `H[i][j]` is the block for arguments `i` and `j`."""),
    ("code", """def loss(x, W, b):
    return torch.log_softmax(torch.tanh(x @ W + b), dim=-1)[:, 0].mean()

x, W, b = torch.randn(8, 3, dtype=D), torch.randn(3, 4, dtype=D), torch.randn(4, dtype=D)
H = hod.hessian(loss, argnums=(1, 2))(x, W, b)
H_ref = hessian(loss, argnums=(1, 2))(x, W, b)
for i in range(2):
    for j in range(2):
        torch.testing.assert_close(H[i][j], H_ref[i][j])
print("d2 loss / dW dW:", tuple(H[0][0].shape), " d2 loss / dW db:", tuple(H[0][1].shape))"""),
    ("md", """## 2. Per-sample Hessians with `vmap`

A hod function composes with `torch.func.vmap`: here one Hessian of the loss per input
row, with the weights shared (`in_dims=None`)."""),
    ("code", """def sample_loss(x, W, b):
    return torch.tanh(x @ W + b).pow(2).sum()

per_sample = vmap(hod.hessian(sample_loss), in_dims=(0, None, None))(x, W, b)
reference = vmap(hessian(sample_loss), in_dims=(0, None, None))(x, W, b)
torch.testing.assert_close(per_sample, reference)
print("per-sample Hessians:", tuple(per_sample.shape))"""),
    ("md", """## 3. A physics-informed residual with a fourth derivative

The Euler-Bernoulli beam equation `EI u''''(x) = q(x)` needs the fourth derivative of a
network `u(x)` with respect to its scalar input. `hod.derivative(u, 4)` of a scalar
function of a scalar is a scalar; `vmap` evaluates it at every collocation point."""),
    ("code", """width = 16
params = {
    "W1": torch.randn(1, width, dtype=D),
    "b1": torch.randn(width, dtype=D),
    "W2": torch.randn(width, 1, dtype=D) / width**0.5,
}

def u(x, p):
    hidden = torch.tanh(x.reshape(1, 1) @ p["W1"] + p["b1"])
    return (hidden @ p["W2"]).reshape(())

def residual(x, p, EI=1.0):
    q = torch.sin(torch.pi * x)
    return EI * hod.derivative(u, 4)(x, p) - q

xs = torch.linspace(0.0, 1.0, 64, dtype=D)
r = vmap(residual, in_dims=(0, None))(xs, params)

u4_ref = vmap(jacfwd(jacfwd(jacfwd(jacrev(u)))), in_dims=(0, None))(xs, params)
torch.testing.assert_close(r, u4_ref - torch.sin(torch.pi * xs))
print("mean squared residual:", r.pow(2).mean().item())"""),
    ("md", """The residual is differentiable with respect to the network's parameters, so it can
be trained: `torch.func.grad` of the PINN loss goes through the generated code."""),
    ("code", """def pinn_loss(p):
    return vmap(residual, in_dims=(0, None))(xs, p).pow(2).mean()

g = torch.func.grad(pinn_loss)(params)

def pinn_loss_ref(p):
    u4 = vmap(jacfwd(jacfwd(jacfwd(jacrev(u)))), in_dims=(0, None))(xs, p)
    return (u4 - torch.sin(torch.pi * xs)).pow(2).mean()

g_ref = torch.func.grad(pinn_loss_ref)(params)
for name in params:
    torch.testing.assert_close(g[name], g_ref[name])
print({name: tuple(v.shape) for name, v in g.items()})"""),
    ("md", """## 4. Newton's method

On a strictly convex function Newton's method converges in a few steps; each step
solves with the Hessian. The first step is checked against `torch.func`."""),
    ("code", """A, target = 0.5 * torch.randn(20, 5, dtype=D), torch.randn(5, dtype=D)

def objective(w):
    z = A @ w
    return torch.log(1 + torch.exp(z)).sum() + 0.5 * (w * w).sum() - (target * w).sum()

grad_fn, hess_fn = hod.jacobian(objective), hod.hessian(objective)

def newton_step(w, grad_fn, hess_fn):
    return w - torch.linalg.solve(hess_fn(w), grad_fn(w))

w = torch.zeros(5, dtype=D)
first_ref = newton_step(w, jacrev(objective), hessian(objective))
torch.testing.assert_close(newton_step(w, grad_fn, hess_fn), first_ref)
for step in range(6):
    w = newton_step(w, grad_fn, hess_fn)
    print(f"step {step + 1}: |gradient| = {grad_fn(w).norm().item():.2e}")"""),
    ("md", """## 5. Modules through `functional_call`

Parameters of an `nn.Module` are differentiated as a dict, as in `torch.func`."""),
    ("code", """layers = [torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)]
model = torch.nn.Sequential(*layers).to(D)
weights = {k: v.detach() for k, v in model.named_parameters()}

def model_loss(p, x):
    return functional_call(model, p, (x,)).pow(2).mean()

H = hod.hessian(model_loss)(weights, x)
H_ref = hessian(model_loss)(weights, x)
for row in weights:
    for column in weights:
        torch.testing.assert_close(H[row][column], H_ref[row][column])
print("blocks with 0.weight:", {name: tuple(H[name]["0.weight"].shape) for name in weights})"""),
    ("md", """## 6. Reading the generated code

`fn.lower(*args)` returns what hod generated for that signature: `.code` is plain Python
over ATen ops, `.mode` says whether it ran forward or finished with a reverse sweep."""),
    ("code", """fn = hod.hessian(sample_loss)
lowered = fn.lower(x[0], W, b)
print("mode:", lowered.mode, "| seed size:", lowered.seed_size)
print(lowered.code)"""),
    ("md", """## 7. Compiling the generated code

With `compile=True` each signature's generated code also goes through `torch.compile`. The
first call compiles (seconds); later calls run fused loops instead of one ATen call per
derivative term, which pays off at orders 3 and 4. The values are the same."""),
    ("code", """import statistics
import time

from torch.utils._pytree import tree_leaves


def two_layers(x, W1, W2):
    return torch.tanh(torch.tanh(x @ W1) @ W2).sum()


args = (torch.rand(4, 4), torch.rand(4, 4), torch.rand(4, 4))
eager = hod.derivative(two_layers, 3, argnums=(0, 1, 2))
compiled = hod.derivative(two_layers, 3, argnums=(0, 1, 2), compile=True)
start = time.perf_counter()
D3 = compiled(*args)
print(f"first compiled call (trace, generate, compile): {time.perf_counter() - start:.1f} s")
for a, b in zip(tree_leaves(D3), tree_leaves(eager(*args)), strict=True):
    torch.testing.assert_close(a, b)


def median_ms(fn, calls=50):
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


print(f"eager {median_ms(eager):.3f} ms, compiled {median_ms(compiled):.3f} ms per call")"""),
    ("md", """## 8. A first layer split off

When `f` reads a differentiated weight only in `x @ W` (or `F.linear(x, W, b)`), hod
differentiates the rest of `f` with respect to `h = x @ W`, whose rows are independent
examples (a few seeds each), and composes the blocks for `x` and `W` from those by the
chain rule. `lower(...).first_layer` says where it split; the seed space shrinks from
`x`'s and `W`'s seeds to `h`'s. Below, the same MLP with its input scaled first, so that
no layer reads an input directly, is derived over all seeds."""),
    ("code", """def relu_softmax(x, W1, W2):
    return torch.softmax(torch.relu(x @ W1) @ W2, dim=1).sum()


def relu_softmax_scaled(x, W1, W2):  # the first layer reads 1 * x, not an input
    return relu_softmax(1.0 * x, W1, W2)


args = (torch.rand(4, 8), torch.rand(8, 8), torch.rand(8, 8))
split = hod.derivative(relu_softmax, 3, argnums=(0, 1, 2))
plain = hod.derivative(relu_softmax_scaled, 3, argnums=(0, 1, 2))
print("split:", split.lower(*args).first_layer, "| seeds", split.lower(*args).seed_size,
      "against", plain.lower(*args).seed_size)
for a, b in zip(tree_leaves(split(*args)), tree_leaves(plain(*args)), strict=True):
    torch.testing.assert_close(a, b)
print(f"split {median_ms(split):.3f} ms, not split {median_ms(plain):.3f} ms per call")"""),
]


def build(cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    """A notebook of ``cells`` (``("md" | "code", source)``), not yet executed."""
    nb = nbformat.v4.new_notebook()
    make = {"md": nbformat.v4.new_markdown_cell, "code": nbformat.v4.new_code_cell}
    nb.cells = [make[kind](source) for kind, source in cells]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    return nb


def execute_and_write(cells: list[tuple[str, str]], name: str, timeout: int) -> None:
    """Build the notebook, run every cell in this folder, and write it as ``name``."""
    nb = build(cells)
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(HERE)}}).execute()
    nbformat.write(nb, HERE / name)


def main() -> None:
    execute_and_write(CELLS, "tutorial.ipynb", timeout=300)


if __name__ == "__main__":
    main()
