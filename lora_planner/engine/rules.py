"""Per-op rules: what an op keeps for backward, and what its backward allocates.

This table is the engine's only knowledge of ops. Each rule answers two questions, as torch's
`derivatives.yaml` and the generated autograd code answer them (torch 2.x, CPU kernels):

- `saves(inputs, outputs, needs)`: the tensors the op's autograd node keeps. A product keeps each
  operand only when the *other* needs a gradient (mm keeps `mat2` for `self`'s gradient, `self` for
  `mat2`'s), so a frozen weight's matmul keeps no input;
- `backward(op, size, needs)`: for each input, the bytes of the gradient its backward allocates
  (None: no gradient; 0: the incoming gradient passed on as it is, no allocation), and the bytes of
  the scratch it holds while it runs beside them (freed before the node returns).

A gradient has its tensor's size and dtype, so every figure is a tensor's bytes; nothing here is
keyed to a model family.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

Grads = tuple[int | None, ...]


@dataclass(frozen=True)
class Rule:
    saves: Callable[[tuple[int, ...], tuple[int, ...], tuple[bool, ...]], tuple[int, ...]]
    backward: Callable[[object, Callable[[int], int], tuple[bool, ...]], tuple[Grads, int]]


def _none(inputs, outputs, needs) -> tuple[int, ...]:
    return ()


def _inputs(inputs, outputs, needs) -> tuple[int, ...]:
    return tuple(inputs)


def _outputs(inputs, outputs, needs) -> tuple[int, ...]:
    return outputs[:1]


def _crossed(inputs, outputs, needs) -> tuple[int, ...]:
    """A product's operands: the first kept when the second needs a gradient, and the other way."""
    a, b = inputs[0], inputs[1]
    return tuple(t for t, other in ((a, needs[1]), (b, needs[0])) if other)


def _fresh(op, size, needs) -> tuple[Grads, int]:
    """Every input that needs one gets a new gradient of its own size; no scratch."""
    return tuple(size(t) if n else None for t, n in zip(op.inputs, needs, strict=True)), 0


def _through(op, size, needs) -> tuple[Grads, int]:
    """The incoming gradient passed on (a view's, an addition's of equal shapes): no allocation;
    an input smaller than the output (a broadcast) gets the gradient summed to its size."""
    out = size(op.outputs[0])
    return tuple(None if not n else (0 if size(t) == out else size(t))
                 for t, n in zip(op.inputs, needs, strict=True)), 0


def _product(op, size, needs) -> tuple[Grads, int]:
    """mul: grad x other for each operand; a broadcast operand's product is made at the output's size
    and summed to its own, the full-size product held as scratch meanwhile."""
    out = size(op.outputs[0])
    grads = tuple(size(t) if n else None for t, n in zip(op.inputs, needs, strict=True))
    scratch = max((out for t, n in zip(op.inputs, needs, strict=True) if n and size(t) < out), default=0)
    return grads, scratch


def _scaled_twice(op, size, needs) -> tuple[Grads, int]:
    """pow(x, e) and rsqrt: grad * (e * x ** (e - 1)) and -0.5 * grad * y ** 3 make two
    intermediates of the input's size before the gradient."""
    return ((size(op.inputs[0]),) if needs[0] else (None,)), 2 * size(op.inputs[0])


def _linear(op, size, needs) -> tuple[Grads, int]:
    """x @ W (+ b): grad_x = grad @ W, grad_W = x^T @ grad, grad_b = grad summed over tokens."""
    return _fresh(op, size, needs)


def _split(op, size, needs) -> tuple[Grads, int]:
    """The parts' gradients concatenated into one of the whole's size (`cat`)."""
    return ((size(op.inputs[0]),) if needs[0] else (None,)), 0


def _first_only(op, size, needs) -> tuple[Grads, int]:
    """Only the first input is differentiable (the others are indices, masks or statistics)."""
    pairs = enumerate(zip(op.inputs, needs, strict=True))
    return tuple(size(t) if n and i == 0 else None for i, (t, n) in pairs), 0


def _embedding(op, size, needs) -> tuple[Grads, int]:
    """embedding(weight, ids): a dense gradient of the whole table (`embedding_dense_backward`)."""
    return _first_only(op, size, needs)


def _no_node(op, size, needs) -> tuple[Grads, int]:
    return tuple(None for _ in op.inputs), 0


RULES: dict[str, Rule] = {
    # x @ W^T (+ b): nn.Linear, GPT-2's Conv1D (addmm), the LM head
    "linear": Rule(_crossed, _linear),
    # a @ b (batched): the eager attention's scores and output
    "matmul": Rule(_crossed, _fresh),
    "add": Rule(_none, _through),
    # a 0-d loss divided by the labelled tokens' count (an integer tensor: no gradient), which it keeps
    "div": Rule(lambda i, o, n: i[1:], _first_only),
    "mul": Rule(_crossed, _product),
    # x * a Python number: grad * the number
    "scale": Rule(_none, _fresh),
    "pow": Rule(_inputs, _scaled_twice),
    "rsqrt": Rule(_outputs, _scaled_twice),
    # mean over the last dimension: the gradient expanded and divided, at the input's size
    "mean": Rule(_none, _fresh),
    "neg": Rule(_none, _fresh),
    # pointwise unary ops whose backward reads the input (silu, gelu) or the output (tanh)
    "silu": Rule(_inputs, _fresh),
    "gelu": Rule(_inputs, _fresh),
    "tanh": Rule(_outputs, _fresh),
    # concatenation: each input's gradient is a slice of the incoming one
    "cat": Rule(_none, _through),
    "split": Rule(_none, _split),
    "chunk": Rule(_none, _split),
    # one slice of a tensor: its gradient is a zeroed tensor of the whole's size with the slice copied in
    "slice": Rule(_none, _split),
    # a contiguous copy (clone): the gradient passed on
    "copy": Rule(_none, _through),
    # a dtype cast (`_to_copy`): the gradient cast back, a new tensor of the input's dtype
    "cast": Rule(_none, _fresh),
    # softmax / log_softmax keep their output; the gradient is the input's size
    "softmax": Rule(_outputs, _first_only),
    "log_softmax": Rule(_outputs, _first_only),
    # native_layer_norm(x, w, b) -> (y, mean, rstd): keeps x, w, b and both statistics
    "layer_norm": Rule(lambda i, o, n: (*i, *o[1:]), _fresh),
    "embedding": Rule(lambda i, o, n: i[1:], _embedding),
    # the CPU flash kernel (q, k, v) -> (out, logsumexp): keeps q, k, v, out and logsumexp
    "sdpa": Rule(lambda i, o, n: (*i, *o), _fresh),
    # nll_loss(logp, target) -> (loss, total_weight): keeps logp, target, total_weight
    "nll_loss": Rule(lambda i, o, n: (*i, o[1]), _first_only),
    # repeat_kv's expand + reshape copy: the gradient summed back over the copies
    "repeat": Rule(_none, _fresh),
    # a checkpointed region's first op: keeps the region's input (and the RNG state) for the recompute
    "checkpoint": Rule(_none, _no_node),
    "hold": Rule(_none, _no_node),
    # ops on indices, masks and constants (positions, cos / sin): nothing differentiable
    "constant": Rule(_none, _no_node),
}
