"""The op cases: for every public linmix op, which arguments it takes, how to build its inputs, and its
float64 reference. The contract tests, the benchmark, the sanitizer runner and the context-parallel bench
build their inputs here, so every op is described once.

A :class:`Case` lists

- the op's size names with small odd defaults (``sizes``), and which of them is the batch and the time axis;
- its tensor inputs (``tensors``: a function of the sizes, of the forms asked for and of the options that
  change a tensor's layout, giving one :class:`Input` per tensor: its dims by size name and how its values
  are drawn);
- its documented arguments and the values worth running (``args``: one :class:`Arg` each);
- how to call the op and its reference so that both give the same tuple of outputs (``run``, ``reference``).

Enumerating "every op, every documented argument, small odd shapes"::

    for case in CASES.values():
        for choice in variants(case):                  # the default call, then one argument changed at a time
            x = make(case, device, torch.float64, seed=1, **choice)
            outs, refs = case.run(x), case.reference(x)

``make`` returns the op's keyword arguments (an :class:`Inputs` dict that also knows each tensor's dims, e.g.
``x.time_dim("q")``), so ``case.fn(**x)`` is the call. Values are drawn in float32 from one generator on the
target device (the same seed gives the same numbers in every dtype, up to rounding), in ranges where every
op is well conditioned: decays below 1, GLA gates as a GLA layer makes them, fixed-point inputs contractive.

The public layers of linmix.nn are described in the same form in linmix._layer_cases (``LAYERS``).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Callable

import torch
import torch.nn.functional as F

from . import reference as R
from .ops.fixed_point_rnn import fixed_point_rnn
from .ops.gla import chunk_gla, fused_recurrent_gla
from .ops.linear_scan import linear_scan
from .ops.selective_scan import selective_scan, selective_state_update

Init = Callable[[torch.Generator, tuple, str], torch.Tensor]  # (generator, shape, device) -> values


def normal(scale: float = 1.0) -> Init:
    return lambda g, shape, dev: scale * torch.randn(shape, generator=g, device=dev)


def uniform(lo: float, hi: float) -> Init:
    return lambda g, shape, dev: lo + (hi - lo) * torch.rand(shape, generator=g, device=dev)


def unit_vectors(g, shape, dev):
    """Rows of unit length along the last dim (Householder directions)."""
    return F.normalize(torch.randn(shape, generator=g, device=dev), dim=-1)


def gla_gate(g, shape, dev):
    """A GLA layer's log forget gate: logsigmoid(x) / 16 (its gate-logit normaliser), <= 0."""
    return F.logsigmoid(torch.randn(shape, generator=g, device=dev)) / 16


def cache_rows(g, shape, dev):
    """state_batch_indices for a cache of b + 2 rows: distinct rows in random order, the second one -1 (padding)."""
    (b,) = shape
    idx = torch.randperm(b + 2, generator=g, device=dev)[:b]
    if b > 1:
        idx[1] = -1
    return idx


def offsets(total: int) -> Init:
    """cu_seqlens: shape[0] rising offsets from 0 to total (packed sequences, empty ones included)."""
    def init(g, shape, dev):
        cuts = torch.randint(0, total + 1, (shape[0] - 2,), generator=g, device=dev).sort().values
        return torch.cat([cuts.new_zeros(1), cuts, cuts.new_full((1,), total)])
    return init


@dataclasses.dataclass(frozen=True)
class Input:
    """One tensor input: its dims (size names or integers, e.g. "B T H K"), how its values are drawn, and its
    dtype: "act" the case's dtype, "acc" float32 (float64 with float64 activations), "index" as drawn (int64).
    Dims in ``tied`` are drawn with size 1 and broadcast (stride 0), as Mamba-2 ties parameters per head."""

    dims: str
    init: Init = normal()
    dtype: str = "act"
    tied: str = ""
    device: str | None = None  # e.g. "cpu" for an argument read on the host whatever the device


@dataclasses.dataclass(frozen=True)
class Arg:
    """A documented argument and the values worth running; values[0] is the default. For an option, the op's
    own default (``make`` leaves it out unless asked); for a tensor (``tensor=True``), the form ``make`` builds
    unless told otherwise: None (not passed), "given", or a named layout such as "grouped". Every backend takes
    every value. ``needs``: the choices its other values take effect with (a layer's conv_size needs
    use_short_conv=True), which ``variants`` sets alongside."""

    name: str
    values: tuple
    tensor: bool = False
    needs: dict | None = None  # the other arguments its other values only act with (set with them in variants)


@dataclasses.dataclass(frozen=True)
class Case:
    """One public op: see the module docstring."""

    name: str
    fn: Callable  # the public op, linmix.<name>
    sizes: dict[str, int]  # size name -> small odd default
    batch: str  # the batch size's name
    time: str | None  # the sequence length's name (None: one decoding step)
    # (sizes, **tensor forms, **the options among its own parameters) -> the tensor inputs; may set sizes
    tensors: Callable[..., dict[str, Input | None]]
    args: tuple[Arg, ...]
    reference: Callable[..., tuple]  # the op's keyword arguments -> float64 outputs, as run() gives them
    grads: tuple[str, ...]  # the differentiable tensor inputs
    in_place: str | None = None  # the input the op updates in place (run() works on a copy and returns it last)
    # The documented errors: (choices for make, the exception, a regex its message matches) per refused call.
    refuses: tuple[tuple[dict, type, str], ...] = ()

    def run(self, x: dict) -> tuple[torch.Tensor, ...]:
        """The op on x, its outputs as a tuple (None outputs left out). The input updated in place is a copy
        with the same strides."""
        if self.in_place:
            t = x[self.in_place]
            x = {**x, self.in_place: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t)}
        out = self.fn(**x)
        out = tuple(t for t in (out if isinstance(out, tuple) else (out,)) if t is not None)
        return out + (x[self.in_place],) if self.in_place else out


class Inputs(dict):
    """The op's keyword arguments, plus ``dims``: each tensor input's dims by size name."""

    def __init__(self, values: dict, dims: dict[str, tuple[str, ...]], time: str | None):
        super().__init__(values)
        self.dims, self.time = dims, time

    def time_dim(self, name: str) -> int | None:
        """The index of the time axis in input `name` (None: the input has none)."""
        dims = self.dims.get(name, ())
        return dims.index(self.time) if self.time in dims else None


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def make(case: Case, device: str = "cpu", dtype: torch.dtype = torch.float32, *, seed: int = 0,
         sizes: dict | None = None, **choices) -> Inputs:
    """The keyword arguments of one call of case's op: tensors drawn for `sizes` (the case's defaults for those
    not given) in the forms named in `choices`, and the options in `choices` passed as given."""
    unknown = set(choices) - {a.name for a in case.args}
    if unknown:
        raise ValueError(f"{case.name} takes no argument {sorted(unknown)}")
    s = {**case.sizes, **(sizes or {})}
    forms = {a.name: choices.pop(a.name, a.values[0]) for a in case.args if a.tensor}
    params = inspect.signature(case.tensors).parameters  # a layer's takes every option: they shape its weights
    takes_all = any(p.kind == p.VAR_KEYWORD for p in params.values())
    layout = {k: v for k, v in choices.items() if takes_all or k in params}
    specs = {k: v for k, v in case.tensors(s, **forms, **layout).items() if v is not None}
    gen = {d: torch.Generator(d).manual_seed(seed) for d in {device, "cpu"}}
    values, dims = {}, {}
    for name, spec in specs.items():
        dims[name] = tuple(spec.dims.split())
        dev = spec.device or device
        shape = tuple(s[d] if d in s else int(d) for d in dims[name])
        drawn = tuple(1 if d in spec.tied.split() else n for d, n in zip(dims[name], shape))
        t = spec.init(gen[dev], drawn, dev)
        if spec.dtype != "index":
            t = t.to(dtype if spec.dtype == "act" else _acc(dtype))
        values[name] = t.expand(shape) if spec.tied else t
    return Inputs({**values, **choices}, dims, case.time)


def variants(case: Case):
    """The default call ({}), then every other value of every documented argument, one at a time (the choices
    for make)."""
    yield {}
    for arg in case.args:
        for v in arg.values[1:]:
            yield {**(arg.needs or {}), arg.name: v}


def _segments(cu_seqlens: torch.Tensor | None, total: int) -> list[tuple[int, int]]:
    c = [0, total] if cu_seqlens is None else cu_seqlens.tolist()
    return list(zip(c, c[1:]))


# ------------------------------------------------------------------------------------------- linear_scan

def _linear_scan_tensors(s, h0=None, cu_seqlens=None):
    if cu_seqlens:
        s.update(B=1, N=3)
    return {"a": Input("B T D", uniform(0.5, 1.0)), "b": Input("B T D"),
            "h0": h0 and Input("N D" if cu_seqlens else "B D", dtype="acc"),
            "cu_seqlens": cu_seqlens and Input(str(s["N"] + 1), offsets(s["T"]), "index")}


def _linear_scan_reference(a, b, h0=None, reverse=False, cu_seqlens=None):
    """Each packed sequence on its own."""
    return (torch.cat([R.linear_scan_ref(a[:, s:e], b[:, s:e], h0 if cu_seqlens is None or h0 is None else
                                         h0[i : i + 1], reverse=reverse)
                       for i, (s, e) in enumerate(_segments(cu_seqlens, a.shape[1]))], 1),)


LINEAR_SCAN = Case(
    "linear_scan", linear_scan, dict(B=2, T=7, D=5), "B", "T", _linear_scan_tensors,
    args=(Arg("h0", (None, "given"), tensor=True), Arg("reverse", (False, True)),
          Arg("cu_seqlens", (None, "given"), tensor=True)),
    reference=_linear_scan_reference,
    grads=("a", "b", "h0"),
)


# ---------------------------------------------------------------------------------------- selective_scan

_BC_FORMS = {"variable": "b n L", "fixed": "d n", "grouped": "b g n L"}


def _selective_scan_tensors(s, B="variable", C="variable", D=None, z=None, delta_bias=None, initial_state=None,
                            cu_seqlens=None):
    if cu_seqlens:
        s.update(b=1, N=3)
    return {
        "u": Input("b d L"), "delta": Input("b d L", uniform(0.0, 0.5)),
        "A": Input("d n", uniform(-1.5, -0.5), "acc"),
        "B": Input(_BC_FORMS[B], dtype="acc" if B == "fixed" else "act"),
        "C": Input(_BC_FORMS[C], dtype="acc" if C == "fixed" else "act"),
        "D": D and Input("d", dtype="acc"), "z": z and Input("b d L"),
        "delta_bias": delta_bias and Input("d", uniform(0.0, 0.3), "acc"),
        "initial_state": initial_state and Input("N d n" if cu_seqlens else "b d n", dtype="acc"),
        "cu_seqlens": cu_seqlens and Input(str(s["N"] + 1), offsets(s["L"]), "index"),
    }


def _selective_scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                              initial_state=None, return_final_state=False, cu_seqlens=None, deterministic=False):
    """Each packed sequence on its own (deterministic changes no value)."""
    outs, finals = [], []
    for i, (s, e) in enumerate(_segments(cu_seqlens, u.shape[-1])):
        cut = lambda t: t if t is None or t.dim() == 2 else t[..., s:e]  # noqa: E731  (fixed B/C have no time)
        h0 = initial_state if cu_seqlens is None or initial_state is None else initial_state[i : i + 1]
        out, fin = R.selective_scan_ref(cut(u), cut(delta), A, cut(B), cut(C), D, cut(z), delta_bias,
                                        delta_softplus, h0, return_final_state=True)
        outs.append(out), finals.append(fin)
    return (torch.cat(outs, -1), torch.cat(finals, 0)) if return_final_state else (torch.cat(outs, -1),)


SELECTIVE_SCAN = Case(
    "selective_scan", selective_scan, dict(b=2, d=6, n=5, L=7, g=3), "b", "L", _selective_scan_tensors,
    args=(
        Arg("B", tuple(_BC_FORMS), tensor=True), Arg("C", tuple(_BC_FORMS), tensor=True),
        Arg("D", (None, "given"), tensor=True), Arg("z", (None, "given"), tensor=True),
        Arg("delta_bias", (None, "given"), tensor=True), Arg("delta_softplus", (False, True)),
        Arg("initial_state", (None, "given"), tensor=True), Arg("return_final_state", (False, True)),
        Arg("cu_seqlens", (None, "given"), tensor=True),
        # True with variable B or C runs the atomic-free backward (selective_scan_bwd_tiled) on CUDA
        Arg("deterministic", (False, True)),
    ),
    reference=_selective_scan_reference,
    grads=("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"),
)


# -------------------------------------------------------------------------------- selective_state_update

def _selective_state_update_tensors(s, state="mamba1", B="ungrouped", C="ungrouped", D=None, z=None, dt_bias=None,
                                    state_batch_indices=None):
    """Mamba-1's layout (state (S, d, n)) or Mamba-2's heads (state (S, h, p, n), h = d / p, A, dt, D and
    dt_bias tied per head); S = b, or b + 2 cache rows with state_batch_indices."""
    s["S"] = s["b"] + (2 if state_batch_indices else 0)
    if state == "mamba1":
        bc = {"ungrouped": "b n", "grouped": "b g n"}
        return {
            "state": Input("S d n", dtype="acc"), "x": Input("b d"), "dt": Input("b d", normal(0.1)),
            "A": Input("d n", uniform(-1.5, -0.5), "acc"), "B": Input(bc[B]), "C": Input(bc[C]),
            "D": D and Input("d", dtype="acc"), "z": z and Input("b d"),
            "dt_bias": dt_bias and Input("d", uniform(0.0, 0.3), "acc"),
            "state_batch_indices": state_batch_indices and Input("b", cache_rows, "index"),
        }
    s["h"] = s["d"] // s["p"]
    bc = {"ungrouped": "b 1 n", "grouped": "b g n"}
    return {
        "state": Input("S h p n", dtype="acc"), "x": Input("b h p"), "dt": Input("b h p", normal(0.1), tied="p"),
        "A": Input("h p n", uniform(-1.5, -0.5), "acc", tied="p n"), "B": Input(bc[B]), "C": Input(bc[C]),
        "D": D and Input("h p", dtype="acc", tied="p"), "z": z and Input("b h p"),
        "dt_bias": dt_bias and Input("h p", uniform(0.0, 0.3), "acc", tied="p"),
        "state_batch_indices": state_batch_indices and Input("b", cache_rows, "index"),
    }


SELECTIVE_STATE_UPDATE = Case(
    "selective_state_update", selective_state_update, dict(b=3, d=6, p=2, n=5, g=3), "b", None,
    _selective_state_update_tensors,
    args=(
        Arg("state", ("mamba1", "heads"), tensor=True), Arg("B", ("ungrouped", "grouped"), tensor=True),
        Arg("C", ("ungrouped", "grouped"), tensor=True),
        Arg("D", (None, "given"), tensor=True), Arg("z", (None, "given"), tensor=True),
        Arg("dt_bias", (None, "given"), tensor=True), Arg("dt_softplus", (False, True)),
        Arg("state_batch_indices", (None, "given"), tensor=True),
    ),
    reference=lambda **x: R.selective_state_update_ref(**x),
    grads=(),
    in_place="state",
)


# ----------------------------------------------------------------------------- chunk_gla, fused_recurrent_gla

def _gla_tensors(s, g="given", gk=None, initial_state=None, cu_seqlens=None, cu_seqlens_cpu=None,
                 state_v_first=False):
    """g is the gate (fused_recurrent_gla also takes it as gk, or none at all: no decay); with state_v_first
    the initial state is (N, H, V, K)."""
    packed = cu_seqlens or cu_seqlens_cpu
    if packed:
        s.update(B=1, N=3)
    gate = Input("B T H K", gla_gate)
    return {
        "q": Input("B T H K"), "k": Input("B T H K"), "v": Input("B T H V"),
        "g": gate if g and not gk else None, "gk": gk and gate,
        "initial_state": initial_state and Input(("N" if packed else "B") + (" H V K" if state_v_first else " H K V"),
                                                 dtype="acc"),
        "cu_seqlens": cu_seqlens and Input(str(s["N"] + 1), offsets(s["T"]), "index"),
        "cu_seqlens_cpu": cu_seqlens_cpu and Input(str(s["N"] + 1), offsets(s["T"]), "index", device="cpu"),
    }


def _gla_reference(q, k, v, g=None, scale=None, initial_state=None, output_final_state=False, state_v_first=False,
                   cu_seqlens=None, cu_seqlens_cpu=None, reverse=False, gk=None):
    """Each packed sequence on its own, time-reversed with reverse; no gate at all is g = 0. The op reads
    cu_seqlens_cpu only without cu_seqlens (the table draws the two independently)."""
    g = gk if g is None else g
    g = torch.zeros_like(k) if g is None else g
    if initial_state is not None and state_v_first:
        initial_state = initial_state.transpose(-1, -2)
    packed = cu_seqlens if cu_seqlens is not None else cu_seqlens_cpu
    outs, finals = [], []
    for i, (s, e) in enumerate(_segments(packed, q.shape[1])):
        part = [t[:, s:e].flip(1) if reverse else t[:, s:e] for t in (q, k, v, g)]
        h0 = initial_state if packed is None or initial_state is None else initial_state[i : i + 1]
        o, fin = R.gla_ref(*part, scale, h0, output_final_state=True)
        outs.append(o.flip(1) if reverse else o), finals.append(fin)
    final = torch.cat(finals, 0)
    final = final.transpose(-1, -2) if state_v_first else final
    return (torch.cat(outs, 1), final) if output_final_state else (torch.cat(outs, 1),)


_GLA_ARGS = (
    Arg("scale", (None, 0.3)), Arg("initial_state", (None, "given"), tensor=True),
    Arg("output_final_state", (False, True)), Arg("state_v_first", (False, True)),
    Arg("cu_seqlens", (None, "given"), tensor=True),
)
_GLA_SIZES = dict(B=2, T=7, H=2, K=5, V=3)

CHUNK_GLA = Case(
    "chunk_gla", chunk_gla, _GLA_SIZES, "B", "T", _gla_tensors,
    args=_GLA_ARGS + (Arg("cu_seqlens_cpu", (None, "given"), tensor=True),),
    reference=_gla_reference, grads=("q", "k", "v", "g", "initial_state"),
)

# gv (value gates) is documented as not supported yet: it raises NotImplementedError.
FUSED_RECURRENT_GLA = Case(
    "fused_recurrent_gla", fused_recurrent_gla, _GLA_SIZES, "B", "T", _gla_tensors,
    args=(Arg("g", ("given", None), tensor=True), Arg("gk", (None, "given"), tensor=True)) + _GLA_ARGS
    + (Arg("reverse", (False, True)),),
    reference=_gla_reference, grads=("q", "k", "v", "g", "gk", "initial_state"),
)


# --------------------------------------------------------------------------------------- fixed_point_rnn

def _fixed_point_rnn_tensors(s, initial_state=None, cu_seqlens=None):
    """lam in (0.55, 0.95) and beta in [0, 1.9): (1 - min lam) * min(2, sum beta) < 1, so every token's map is
    a contraction and the iteration converges for any max_iter / tol worth testing."""
    if cu_seqlens:
        s.update(B=1, N=3)
    return {
        "u": Input("B T D"), "lam": Input("B T D", uniform(0.55, 0.95)), "hh_u": Input("B T R D", unit_vectors),
        "hh_beta": Input("B T R", uniform(0.0, 1.9)),
        "initial_state": initial_state and Input("N D" if cu_seqlens else "B D"),
        "cu_seqlens": cu_seqlens and Input(str(s["N"] + 1), offsets(s["T"]), "index"),
    }


def _fixed_point_rnn_reference(u, lam, hh_u, hh_beta, max_iter=32, tol=1e-4, grad_mode="onestep",
                               return_info=False, initial_state=None, output_final_state=False, damping=1.0,
                               stopping="element", quantile=0.9, on_nonconvergence="ignore", cu_seqlens=None):
    """Packed sequences: the dense reference on them padded into a batch (see _pad_sequences)."""
    if cu_seqlens is None:
        return _fixed_point_rnn_dense_reference(u, lam, hh_u, hh_beta, max_iter, tol, grad_mode, return_info,
                                                initial_state, output_final_state, damping, stopping, quantile)
    spans = _segments(cu_seqlens, u.shape[1])
    lengths = [e - s for s, e in spans]
    h0 = initial_state
    if h0 is not None:  # an empty sequence has no token to iterate: its all-pad row starts from 0 (ratio 0)
        h0 = torch.where(torch.tensor(lengths, device=h0.device)[:, None] > 0, h0, torch.zeros_like(h0))
    out = _fixed_point_rnn_dense_reference(*_pad_sequences(u, lam, hh_u, hh_beta, spans), max_iter, tol, grad_mode,
                                           return_info, h0, False, damping, stopping, quantile)
    if return_info and stopping == "causal":  # an empty sequence has no token to stop: one iteration, as a call
        # with no tokens (its pad tokens would keep it iterating to max_iter at tol = 0)
        out = (out[0], torch.where(torch.tensor(lengths) > 0, out[1], torch.ones_like(out[1])), *out[2:])
    result = (torch.cat([out[0][i, :n] for i, n in enumerate(lengths)])[None],)
    if output_final_state:
        first = initial_state.double() if initial_state is not None else u.new_zeros(len(spans), u.shape[2],
                                                                                      dtype=torch.float64)
        result += (torch.stack([out[0][i, n - 1] if n else first[i] for i, n in enumerate(lengths)])
                   if spans else first,)
    return result + out[1:]


def _pad_sequences(u, lam, hh_u, hh_beta, spans):
    """The packed sequences as a batch, each padded to the longest with tokens that leave the iteration's values
    and residuals alone: lam = 1 and beta = 0 make a pad token copy the token before it, so its ratio is that
    token's (and an all-pad row stays at its initial state, ratio 0, like an empty sequence)."""
    T = max([e - s for s, e in spans] + [0])
    rows = []
    for s, e in spans:
        pad = T - (e - s)
        unit = torch.zeros_like(hh_u[0, :1]).expand(pad, -1, -1).clone()
        unit[..., 0] = 1
        rows.append((torch.cat([u[0, s:e], u.new_zeros(pad, u.shape[2])]),
                     torch.cat([lam[0, s:e], lam.new_ones(pad, lam.shape[2])]),
                     torch.cat([hh_u[0, s:e], unit]),
                     torch.cat([hh_beta[0, s:e], hh_beta.new_zeros(pad, hh_beta.shape[2])])))
    return tuple(torch.stack(x) for x in zip(*rows)) if rows else (u[:0], lam[:0], hh_u[:0], hh_beta[:0])


def _fixed_point_rnn_dense_reference(u, lam, hh_u, hh_beta, max_iter, tol, grad_mode, return_info, initial_state,
                                     output_final_state, damping, stopping, quantile):
    """The op's iteration in float64. Its value is one iteration from the last iterate h_prev; its gradient is
    that iteration's with h_prev held fixed ("onestep": the op's gradient exactly) or the dense fixed point's
    ("implicit": what the op's adjoint iteration converges to)."""
    with torch.no_grad():
        _, h_prev, n_iter, residual = R.fixed_point_solve_ref(u, lam, hh_u, hh_beta, max_iter, tol, initial_state,
                                                              damping, stopping, quantile)
    h = R.fixed_point_step_ref(u, lam, hh_u, hh_beta, h_prev, initial_state)
    if grad_mode == "implicit":
        dense = R.fixed_point_dense_ref(u, lam, hh_u, hh_beta, initial_state)
        h = h.detach() + (dense - dense.detach())  # the iteration's value, the fixed point's gradient
    out = (h,)
    if output_final_state:
        B, T, D = u.shape
        first = initial_state.double() if initial_state is not None else u.new_zeros(B, D, dtype=torch.float64)
        out += (h[:, -1] if T else first,)
    return out + ((n_iter, residual) if return_info else ())


FIXED_POINT_RNN = Case(
    "fixed_point_rnn", fixed_point_rnn, dict(B=2, T=7, D=5, R=2), "B", "T", _fixed_point_rnn_tensors,
    args=(
        Arg("max_iter", (32, 1, 4)), Arg("tol", (1e-4, 0.0)), Arg("grad_mode", ("onestep", "implicit")),
        Arg("return_info", (False, True)), Arg("initial_state", (None, "given"), tensor=True),
        Arg("output_final_state", (False, True)), Arg("damping", (1.0, 0.7)),
        Arg("stopping", ("element", "batch", "causal")), Arg("quantile", (0.9, 0.5)),
        Arg("on_nonconvergence", ("ignore", "warn", "raise")),
        Arg("cu_seqlens", (None, "given"), tensor=True),
    ),
    reference=_fixed_point_rnn_reference,
    grads=("u", "lam", "hh_u", "hh_beta", "initial_state"),
)


CASES = {c.name: c for c in (LINEAR_SCAN, SELECTIVE_SCAN, SELECTIVE_STATE_UPDATE, CHUNK_GLA, FUSED_RECURRENT_GLA,
                             FIXED_POINT_RNN)}
