"""Keep a step's products with its weights from the forward, for the backward to reuse.

Every backward rule but exact BPTT's ends with the VJP of the step body over all T steps
at once (:meth:`dsf_compile.LoopBackward.local_gradients`).  Run on the body as it
is, that VJP first recomputes the body's forward: for a GRU or an LSTM layer, the input
and the hidden projection, two GEMMs over T·B rows that the forward has already done.  A
product ``a @ W`` with a loop invariant ``W`` (``linear``, ``mm``, ``addmm``, ``matmul``,
``@``) needs only its operands for its VJP, not its value.  So the forward also returns
every such product at every step (:func:`forward_body`), and the backward runs
:func:`reusing_body`, where each product is :class:`ReuseProduct`: the value saved by
the forward going forwards, the product's own VJP going backwards (one GEMM per operand
over all T·B rows).  What the backward still recomputes is elementwise, which Inductor
fuses into the kernels it needs anyway.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor

_LINEAR = (torch._C._nn.linear, F.linear)
_MATMUL_FUNCTIONS = (torch.mm, torch.matmul, operator.matmul)
_MATMUL_METHODS = ("mm", "matmul", "__matmul__")


@dataclass
class Product:
    """``node`` computes ``a @ right (+ bias)`` with ``right`` (and ``bias``) computed from
    loop invariants only; ``right`` is ``weight.mT`` when ``transposed`` (``linear``)."""

    node: torch.fx.Node
    a: torch.fx.Node
    weight: torch.fx.Node
    bias: torch.fx.Node | None
    transposed: bool


def find_products(body: torch.fx.GraphModule, num_step_inputs: int, num_carries: int) -> list[Product]:
    """The products of ``body`` with an operand computed from its invariants only and the
    other from a step input or a carry (loop-invariant products are not per-step work)."""
    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    varying: set[torch.fx.Node] = set(placeholders[: num_step_inputs + num_carries])
    for node in body.graph.nodes:
        if node.op != "placeholder" and any(i in varying for i in node.all_input_nodes):
            varying.add(node)

    def invariant(value) -> bool:
        return isinstance(value, torch.fx.Node) and value not in varying

    found = []
    for node in body.graph.nodes:
        product = _as_product(node)
        if product is None:
            continue
        a, weight, bias, _ = product
        if a in varying and invariant(weight) and (bias is None or invariant(bias)):
            found.append(Product(node, *product))
    return found


def _as_product(node: torch.fx.Node):
    """``(a, weight, bias, transposed)`` if ``node`` is a product of two values (plus a bias
    added by the same op), else None."""
    args, kwargs = node.args, node.kwargs
    if node.op == "call_function" and node.target in _LINEAR:
        if len(args) + len(kwargs) > 3 or not args or not isinstance(args[0], torch.fx.Node):
            return None
        weight = args[1] if len(args) > 1 else kwargs.get("weight")
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        return (args[0], weight, bias, True) if bias is None or isinstance(bias, torch.fx.Node) else None
    two_operands = len(args) == 2 and not kwargs and all(isinstance(a, torch.fx.Node) for a in args)
    if node.op == "call_function" and node.target in _MATMUL_FUNCTIONS and two_operands:
        return args[0], args[1], None, False
    if node.op == "call_method" and node.target in _MATMUL_METHODS and two_operands:
        return args[0], args[1], None, False
    if node.op == "call_function" and node.target is torch.addmm and len(args) == 3 and not kwargs:
        if all(isinstance(a, torch.fx.Node) for a in args):
            return args[1], args[2], args[0], False
    return None


def forward_body(body: torch.fx.GraphModule, products: list[Product]) -> torch.fx.GraphModule:
    """``body`` returning, after its new carries, the value of each of ``products``."""
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in body.graph.nodes:
        if node.op == "output":
            new_carries = torch.fx.node.map_arg(node.args[0], lambda n: env[n])
        else:
            env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output((*new_carries, *(env[p.node] for p in products)))
    return torch.fx.GraphModule(body, graph)


def reusing_body(body: torch.fx.GraphModule, products: list[Product]) -> torch.fx.GraphModule:
    """``body`` with one more placeholder per product, after its own: the product's saved
    value, returned by :class:`ReuseProduct` in place of computing it."""
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    for node in placeholders:
        env[node] = graph.placeholder(node.name)
    saved = {p.node: graph.placeholder(f"saved_{p.node.name}") for p in products}
    by_node = {p.node: p for p in products}
    for node in body.graph.nodes:
        if node.op == "placeholder":
            continue
        product = by_node.get(node)
        if product is None:
            env[node] = graph.node_copy(node, lambda n: env[n])
            continue
        bias = None if product.bias is None else env[product.bias]
        env[node] = graph.call_function(
            reuse_product, (saved[node], env[product.a], env[product.weight], bias, product.transposed))
    return torch.fx.GraphModule(body, graph)


def reuse_product(saved: Tensor, a: Tensor, weight: Tensor, bias: Tensor | None, transposed: bool) -> Tensor:
    """:class:`ReuseProduct` as a function a graph can name; a product with a vector (no
    matrix to take the gradient of) is recomputed."""
    if weight.dim() != 2:
        return recomputed_product(a, weight, bias, transposed)
    return ReuseProduct.apply(saved, a, weight, bias, transposed)


class ReuseProduct(torch.autograd.Function):
    """``a @ right (+ bias)`` whose value ``saved`` the forward already computed
    (``right = weight.mT`` if ``transposed``, else ``weight``).

    Returns ``saved``; its backward is the product's VJP, which reads only ``a`` and
    ``right``.  Under ``vmap`` over time it runs on all T steps' rows at once, so each
    operand's gradient is one GEMM over T·B rows (autograd's per-step VJPs summed by a
    batched product would build a (T, in, out) weight gradient first).  A product that is
    not of a matrix ``right`` shared by every step is recomputed instead: same value,
    autograd's own VJP."""

    @staticmethod
    def forward(saved: Tensor, a: Tensor, weight: Tensor, bias: Tensor | None, transposed: bool) -> Tensor:
        return saved.view_as(saved)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, a, weight, bias, transposed = inputs
        ctx.save_for_backward(a, weight)
        ctx.bias = None if bias is None else (bias.shape, bias.dtype)
        ctx.transposed = transposed

    @staticmethod
    def backward(ctx, grad: Tensor):
        a, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        # in the widest of the dtypes met (a 16-bit product of float32 weights under
        # autocast), each gradient returned in its input's dtype
        dtype = torch.promote_types(torch.promote_types(grad.dtype, a.dtype), weight.dtype)
        grad, right = grad.to(dtype), (weight.mT if ctx.transposed else weight).to(dtype)
        grad_a = (grad @ right.mT).to(a.dtype) if needs[1] else None
        grad_weight = None
        if needs[2]:
            grad_right = a.reshape(-1, a.shape[-1]).to(dtype).mT @ grad.reshape(-1, grad.shape[-1])
            grad_weight = (grad_right.mT if ctx.transposed else grad_right).to(weight.dtype)
        grad_bias = None
        if ctx.bias is not None and needs[3]:
            shape, bias_dtype = ctx.bias
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).sum_to_size(shape).to(bias_dtype)
        return None, grad_a, grad_weight, grad_bias, None

    @staticmethod
    def vmap(info, in_dims, saved, a, weight, bias, transposed):
        saved_dim, a_dim, weight_dim, bias_dim = in_dims[:4]
        if weight_dim is None and bias_dim is None and weight.dim() == 2:
            saved, a = (_batch_first(t, d, info.batch_size) for t, d in ((saved, saved_dim), (a, a_dim)))
            return ReuseProduct.apply(saved, a, weight, bias, transposed), 0
        recompute = torch.func.vmap(recomputed_product, in_dims=(a_dim, weight_dim, bias_dim, None))
        return recompute(a, weight, bias, transposed), 0


def recomputed_product(a: Tensor, weight: Tensor, bias: Tensor | None, transposed: bool) -> Tensor:
    """The product :class:`ReuseProduct` stands for, computed."""
    value = torch.matmul(a, weight.mT if transposed and weight.dim() == 2 else weight)
    return value if bias is None else value + bias


def _batch_first(t: Tensor, dim: int | None, size: int) -> Tensor:
    return t.expand(size, *t.shape) if dim is None else t.movedim(dim, 0)
