"""Input and argument checks shared by gpntk's modules: errors that name what is wrong.

Arguments (:func:`integer_argument`, :func:`real_argument`) accept what a user would call an
integer or a real number, whatever library made it: Python ``int``/``float``, numpy scalars
(``np.int64(5)``, ``np.float32(0.1)``), 0-dimensional numpy arrays and one-element real torch
tensors. They refuse, with a message naming the argument, what only looks like one: ``bool``
(``True`` is no width), strings (``"12"`` is no number and no list of digits), complex numbers,
integral-valued floats where an integer is needed (``3.0`` layers), NaN and infinities.

Tensor inputs (:func:`check_inputs`) must be float32 or float64: float16 and bfloat16 have too
small a range for the kernel recursions (squared norms of inputs with entries near 100 overflow
float16) and too few digits for a Cholesky factorisation, so they are refused with a TypeError
naming the dtype rather than returning NaN; convert with ``x.float()`` or ``x.double()``.
"""

from __future__ import annotations

import difflib
import math
import numbers
import operator
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from ._transforms import is_batched

__all__ = [
    "check_input_shape",
    "check_inputs", "check_kernel_inputs", "check_nonnegative", "choice_argument", "expanded_batch_shape",
    "integer_argument", "real_argument", "SUPPORTED_DTYPES",
    "is_real_number", "is_integer", "positive_number", "non_negative_number", "positive_integer",
    "number_in_unit_interval", "training_times", "PARAMETERIZATIONS", "parameterization_arguments",
    "probability_argument", "bool_argument",
]

#: the floating-point dtypes gpntk computes in
SUPPORTED_DTYPES = (torch.float32, torch.float64)


def _describe(value: object) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def integer_argument(
    name: str, value: Any, *, minimum: int | None = None, error: type[Exception] = ValueError
) -> int:
    """``value`` as a Python ``int``: a Python or numpy integer or an integer tensor/array of one element.

    Raises ``error`` (a ValueError subclass by default) naming ``name`` for a bool, a float (even
    ``3.0``), a string, a complex number, or a value below ``minimum``.
    """
    bound = {None: "an integer", 0: "a non-negative integer", 1: "a positive integer"}.get(
        minimum, f"an integer >= {minimum}"
    )
    if isinstance(value, (bool, np.bool_)) or isinstance(value, str):
        raise error(f"{name} must be {bound}, got {_describe(value)}")
    if isinstance(value, (torch.Tensor, np.ndarray)):
        if isinstance(value, np.ndarray):
            size, integral = value.size, value.dtype.kind in "iu"
        else:
            size = value.numel()
            integral = not (value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool)
        if size != 1 or not integral:
            raise error(f"{name} must be {bound}, got {_describe(value)}")
        value = value.reshape(-1)[0].item()
    try:
        result = operator.index(value)
    except TypeError:
        raise error(f"{name} must be {bound}, got {_describe(value)}") from None
    if minimum is not None and result < minimum:
        raise error(f"{name} must be {bound}, got {value!r}")
    return int(result)


def real_argument(
    name: str,
    value: object,
    *,
    minimum: float | None = None,
    strict: bool = False,
    finite: bool = True,
    error: type[Exception] = ValueError,
) -> float:
    """``value`` as a Python ``float``: any real number (Python, numpy, one-element real tensor/array).

    Raises ``error`` naming ``name`` for a bool, a string, a complex number, NaN, an infinity
    (unless ``finite=False``, which still refuses NaN), or a value below ``minimum`` (at or below it
    with ``strict``).
    """
    if isinstance(value, (bool, np.bool_)) or isinstance(value, (str, bytes)):
        raise error(f"{name} must be a number, got {_describe(value)}")
    if isinstance(value, (torch.Tensor, np.ndarray)):
        size = value.size if isinstance(value, np.ndarray) else value.numel()
        complex_or_bool = (
            value.dtype.kind in "cbOSU" if isinstance(value, np.ndarray)
            else value.dtype.is_complex or value.dtype == torch.bool
        )
        if size != 1 or complex_or_bool:
            raise error(f"{name} must be a number, got {_describe(value)}")
        value = value.reshape(-1)[0].item()
    if not isinstance(value, numbers.Real):
        raise error(f"{name} must be a number, got {_describe(value)}")
    result = float(value)
    if math.isnan(result) or (finite and math.isinf(result)):
        raise error(f"{name} must be finite, got {result}")
    if minimum is not None and (result < minimum or (strict and result == minimum)):
        bound = {(0.0, True): "positive", (0.0, False): "non-negative"}.get(
            (minimum, strict), f"{'>' if strict else '>='} {minimum:g}"
        )
        raise error(f"{name} must be {bound}, got {result}")
    return result


def check_nonnegative(name: str, value: float, *, strict: bool = False, error: type[Exception] = ValueError) -> None:
    """Raise ``error`` unless ``value`` is a finite number ``>= 0`` (``> 0`` with ``strict``).

    For option values that are already numbers (the command line's): unlike :func:`real_argument`
    nothing is converted, and the one message shows the value as given,
    ``"<name> must be a finite number >= 0, got <value>"`` (``"<name> must be positive and finite,
    got <value>"`` with ``strict``).
    """
    if not (math.isfinite(value) and (value > 0 if strict else value >= 0)):
        bound = "positive and finite" if strict else "a finite number >= 0"
        raise error(f"{name} must be {bound}, got {value}")


def choice_argument(name: str, value: object, choices: Sequence[str]) -> str:
    """``value`` if it is one of the strings ``choices``; otherwise a ValueError listing them.

    The message reads ``"<name> must be 'a', 'b' or 'c', got <value!r>"``.
    """
    if isinstance(value, str) and value in choices:
        return value
    quoted = [repr(choice) for choice in choices]
    listed = quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"
    raise ValueError(f"{name} must be {listed}, got {value!r}")


def check_inputs(name: str, x: Tensor, *, batched: bool) -> None:
    """``x`` must be a finite float32 or float64 tensor of shape ``(..., n, d)`` (``(n, d)`` unless ``batched``)."""
    if not torch.is_tensor(x):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} has dtype {x.dtype}, which gpntk does not compute in (too small a range and precision for "
            "the kernel recursions); convert it with .float() (float32) or .double() (float64)"
        )
    if batched and x.dim() < 2:
        raise ValueError(f"{name} must have shape (..., n, d), got {tuple(x.shape)}")
    if not batched and x.dim() != 2:
        raise ValueError(f"{name} must have shape (n, d), got {tuple(x.shape)}")
    if is_batched(x):  # inside torch.func.vmap values cannot decide a branch: NaN inputs give NaN kernels
        return
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        raise ValueError(f"{name} contains {int(bad.sum())} NaN or infinite values")


def check_kernel_inputs(x1: Tensor, x2: Tensor, *, diag: bool, input_shape: tuple[int, ...] | None = None) -> None:
    """The two inputs of a kernel call: finite float tensors ``(..., n, d)`` of one dtype, device and ``d``.

    With ``diag`` they are paired row by row, so they need as many rows; with ``input_shape``
    each row holds a tensor of that shape.
    """
    for name, x in (("x1", x1), ("x2", x2)):
        check_inputs(name, x, batched=True)
    if x1.dtype != x2.dtype:
        raise TypeError(f"x1 is {x1.dtype} but x2 is {x2.dtype}; convert both to the same dtype")
    if x1.device != x2.device:
        raise ValueError(f"x1 is on {x1.device} but x2 is on {x2.device}")
    if x1.shape[-1] != x2.shape[-1]:
        raise ValueError(
            f"x1 has {x1.shape[-1]} features but x2 has {x2.shape[-1]} (shapes {tuple(x1.shape)} "
            f"and {tuple(x2.shape)})"
        )
    if input_shape is not None and x1.shape[-1] != math.prod(input_shape):
        raise ValueError(
            f"input_shape {input_shape} needs {math.prod(input_shape)} features per row, got {x1.shape[-1]}"
        )
    if x1.shape[-1] == 0:
        raise ValueError("inputs have zero features")
    if diag and x1.shape[-2] != x2.shape[-2]:
        raise ValueError(
            f"diag=True pairs the rows of x1 and x2, which needs as many points in both; got "
            f"{x1.shape[-2]} and {x2.shape[-2]} (shapes {tuple(x1.shape)} and {tuple(x2.shape)})"
        )


def expanded_batch_shape(sizes: tuple[Any, ...], current: torch.Size) -> torch.Size:
    """The batch shape asked of ``Kernel.expand_batch(*sizes)`` (sizes or one iterable), checked against ``current``."""
    if len(sizes) == 1 and hasattr(sizes[0], "__iter__"):
        shape = torch.Size(sizes[0])
    else:
        shape = torch.Size(sizes)
    try:
        torch.broadcast_shapes(shape, current)
    except RuntimeError:
        raise RuntimeError(f"Cannot expand a kernel with batch shape {current} to {shape}") from None
    return shape


def check_input_shape(input_shape: Sequence[int] | None) -> tuple[int, ...] | None:
    """``input_shape`` as a tuple of positive ints (``(C, *spatial)`` or ``(d,)``), or ``None``."""
    if input_shape is None:
        return None
    message = f"input_shape must be a sequence of positive integers, got {input_shape!r}"
    if isinstance(input_shape, (str, bytes)):
        raise ValueError(message)
    try:
        shape = tuple(integer_argument("input_shape", s, minimum=1) for s in input_shape)
    except (TypeError, ValueError):
        raise ValueError(message) from None
    if not shape:
        raise ValueError(message)
    return shape


# --- numbers and times as the trained ensemble takes them ----------------------------------------
# (stricter about what counts as an integer than integer_argument: no one-element tensors)


def is_real_number(value: object) -> bool:
    """A real number: Python or NumPy (not bool), or a one-element real tensor."""
    if isinstance(value, (bool, np.bool_)):
        return False
    if torch.is_tensor(value):
        return value.numel() == 1 and not value.is_complex() and value.dtype != torch.bool
    return isinstance(value, numbers.Real)


def is_integer(value: object) -> bool:
    """An integer: Python or NumPy (not bool)."""
    return not isinstance(value, (bool, np.bool_)) and isinstance(value, numbers.Integral)


def positive_number(name: str, value: Any) -> float:
    """``value`` as a positive finite ``float`` (TypeError if it is no real number, ValueError if out of range)."""
    if not is_real_number(value):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be positive and finite, got {value}")
    return value


def non_negative_number(name: str, value: Any) -> float:
    """``value`` as a non-negative finite ``float`` (a ridge such as ``diag_reg``)."""
    if not is_real_number(value):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be non-negative and finite, got {value}")
    return value


def positive_integer(name: str, value: Any) -> int:
    """``value`` (a Python or NumPy integer, not bool) as a positive ``int``; ValueError otherwise."""
    if not is_integer(value) or int(value) < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def number_in_unit_interval(name: str, value: Any) -> float:
    """``value`` as a ``float`` strictly between 0 and 1 (a relative tolerance); ValueError otherwise."""
    if not is_real_number(value) or not 0 < float(value) < 1:
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")
    return float(value)


def training_times(t: Any) -> tuple[list[float], bool]:
    """The times as floats and whether they were a 1-D tensor or array (a batch).

    ``t`` is a real number (Python or NumPy, ``math.inf``), or a 1-D tensor or NumPy array of them
    (a 0-d one counts as a number); every time is ``>= 0``.
    """
    if isinstance(t, np.ndarray):
        if t.dtype.kind not in "iuf":
            raise TypeError(f"t must hold real numbers, got a NumPy array of dtype {t.dtype}")
        t = torch.from_numpy(np.asarray(t, dtype=np.float64))
    if torch.is_tensor(t):
        if t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"t must hold real numbers, got a tensor of dtype {t.dtype}")
        if t.dim() > 1:
            raise ValueError(f"t must be a number or a 1-D tensor of times, got shape {tuple(t.shape)}")
        batched = t.dim() == 1
        values = [float(v) for v in t.detach().reshape(-1).tolist()]
        if batched and not values:
            raise ValueError("t is an empty tensor of times")
    else:
        if not is_real_number(t):
            raise TypeError(
                f"t must be a number, math.inf or a 1-D tensor of times, got {t!r} ({type(t).__name__})"
            )
        values = [float(t)]
        batched = False
    for value in values:
        if math.isnan(value) or value < 0:
            raise ValueError(f"training time t must be >= 0 (or math.inf), got {value}")
    return values, batched


def probability_argument(name: str, value: object, *, error: type[Exception] = ValueError) -> float:
    """``value`` as a Python ``float`` in ``[0, 1)`` (a drop probability), or ``error`` naming ``name``.

    Any real number is accepted as by :func:`real_argument`; 1 and above are refused (nothing would
    be kept).
    """
    result = real_argument(name, value, minimum=0.0, error=error)
    if result >= 1.0:
        raise error(f"{name} must be in [0, 1) (the probability of dropping a unit), got {result}")
    return result


#: the parameterizations of affine layers (``Dense``, ``Conv``)
PARAMETERIZATIONS = ("ntk", "standard")


def parameterization_arguments(
    layer: str, parameterization: object, in_width: object, *, error: type[Exception] = ValueError
) -> tuple[str, int | None]:
    """``(parameterization, in_width)`` of an affine layer named ``layer``, checked together.

    ``"standard"`` needs ``in_width`` (the layer's number of input features or channels, a
    positive integer); ``"ntk"`` refuses it (its kernel does not depend on the widths).
    """
    if parameterization not in PARAMETERIZATIONS:
        raise error(f"{layer} parameterization must be 'ntk' or 'standard', got {parameterization!r}")
    if parameterization == "ntk":
        if in_width is not None:
            raise error(
                f"{layer} got in_width={in_width!r} with parameterization='ntk', whose kernel does not depend on "
                "the widths; in_width belongs to parameterization='standard'"
            )
        return "ntk", None
    if in_width is None:
        raise error(
            f"{layer} with parameterization='standard' needs in_width, its number of input features (channels "
            "for a convolution): the standard-parameterization NTK grows with the widths"
        )
    return "standard", integer_argument("in_width", in_width, minimum=1, error=error)


def bool_argument(name: str, value: Any, *, error: type[Exception] = ValueError) -> bool:
    """``value`` if it is a ``bool`` (Python or numpy); ``error`` naming ``name`` otherwise.

    Integers, strings and ``None`` are refused: ``approximate="tanh"`` or ``do_clip=1`` is no flag.
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise error(f"{name} must be True or False, got {_describe(value)}")


def check_keywords(builder: str, given: Mapping[str, Any] | Sequence[str], accepted: Sequence[str]) -> None:
    """Raise ``TypeError`` naming ``builder`` and the first keyword of ``given`` not in ``accepted``.

    The message suggests the closest accepted name (``difflib``) and lists them all, as Python's
    own "got an unexpected keyword argument" would not name the builder when the keywords are
    passed on through ``**kwargs``.
    """
    unknown = [name for name in given if name not in accepted]
    if not unknown:
        return
    name = unknown[0]
    close = difflib.get_close_matches(name, accepted, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise TypeError(
        f"{builder}() got an unexpected keyword argument {name!r}{hint}; it takes {', '.join(accepted)}"
    )
