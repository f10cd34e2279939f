"""The CPU kernel of the selective scan: ``scan_cpu.c``, compiled on first use, called through ctypes.

Why a C loop: on CPU the scan is a (batch, channel, L, N) recurrence bound by its exponentials. Any tensor-op form
(the chunked reference) has to write and re-read the (T, batch, dim, N) terms of every chunk; the C loop updates the
states of 16 channels per vector instruction (one exponential per state update) and reads each input row once.
ViM2-T inference on 2 cores: the scans take ~42 ms instead of ~0.5 s (numbers in ``kernels/README.md``).

* Build: ``$CC`` (else ``gcc``, else ``cc``) with ``-O3 -march=native -mprefer-vector-width=512`` (retried with
  less if the compiler refuses it), ``-fopenmp-simd``, and ``-fopenmp`` when torch's threads are GNU OpenMP's (see
  Threads), else ``-pthread``.
  The shared object is cached in ``$METAFORMER_ZOO_CACHE`` (default ``~/.cache/metaformer_zoo``) under a name that
  hashes the source, the flags, the compiler version and the CPU model / flags, so a cache shared between machines
  never hands one CPU another's binary. Written atomically (parallel test workers may build at once).
* Ops: ``metaformer_zoo::selective_scan_cpu_fwd`` / ``_bwd`` (``torch.library`` custom ops with fake
  implementations and ``register_autograd``: one node for torch.compile / make_fx). They take the scan in the
  layout of the C file (channels last, map order: u (Bsz, L, Ch), delta (Bsz, R, L, Ch), B / C (Bsz, R*G, L, N),
  any strides with a unit innermost one); ``scan_tokens`` calls them in that layout (``selective_scan2d_tokens``,
  ViM2's SS2D), ``scan`` brings the channels-first, route-order layout of the public ops to it, so casts,
  transposes and the group refinement stay ordinary autograd ops. The forward also writes the backward's state
  checkpoints when a gradient will be needed.
* Threads: ``torch.get_num_threads()`` of them. With torch's OpenMP runtime (the pip wheels: libgomp) the kernel is
  an OpenMP region on torch's own pool; with pthreads beside it, torch's worker threads would spin-wait next to
  the kernel's after every parallel aten op (measured: the stage-3 ViM2-T scan took 4.2 ms instead of 2.2 ms on 2
  cores). Work units never write the same memory (the C file's header), so results are reproducible run to run at
  a given thread count.

If no compiler is found or the build fails, ``available()`` is False and ``build_error()`` says why; the dispatch
(``resolve_backend``) then uses the PyTorch reference with one warning.
"""
from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import reference

__all__ = ["available", "build_error", "library_path", "scan"]

SOURCE = Path(__file__).with_name("scan_cpu.c")
ABI = 3
_BASE_FLAGS = ["-O3", "-fPIC", "-shared", "-pthread", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math"]

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_lib_path: Optional[Path] = None
_error: Optional[str] = None
_BLK, _TCH = 16, 64  # channels per block, checkpoint interval of the C kernel (read from it at load)


class _Args(ctypes.Structure):
    _fields_ = ([(n, ctypes.c_int64) for n in ("Bsz", "R", "Ch", "G", "L", "N", "H", "W", "nblk", "softplus",
                                               "nthreads", "su0", "su1", "sd0", "sd1", "sd2", "sb0", "sb1", "sb2",
                                               "sc0", "sc1", "sc2", "sg0", "sg1", "Rdt")]
                + [(n, ctypes.c_void_p) for n in ("u", "delta", "A", "Bm", "Cm", "D", "bias", "dtw", "y", "hlast", "gy",
                                                  "gh", "du", "ddelta", "dA", "dD", "dbias", "dB", "dC", "ck")])


def _cache_dir() -> Path:
    base = os.environ.get("METAFORMER_ZOO_CACHE")
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        base = os.path.join(xdg, "metaformer_zoo")
    path = Path(base) / "cpu_kernels"
    try:
        path.mkdir(parents=True, exist_ok=True)
        if os.access(path, os.W_OK):
            return path
    except OSError:
        pass
    path = Path(tempfile.gettempdir()) / f"metaformer_zoo-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _cpu_id() -> str:
    """CPU model and feature flags (so that an ``-march=native`` binary is only reused on the same kind of CPU)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        keep = [ln for ln in lines if ln.split(":")[0].strip() in ("model name", "flags", "Features", "CPU part")]
        return "\n".join(dict.fromkeys(keep))
    except OSError:
        return platform.processor()


def _compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not cc:
        raise RuntimeError("no C compiler found (gcc or cc on PATH, or set CC)")
    return cc


def _torch_uses_libgomp() -> bool:
    """Whether torch's intra-op threads are GNU OpenMP's (libgomp mapped in this process, ATen's OpenMP backend): then
    the kernel is built with ``-fopenmp`` and, its libgomp being the one already loaded (same soname), runs on
    torch's own thread pool."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    return "libgomp" in maps and "OpenMP" in torch.__config__.parallel_info()


def _candidates() -> List[List[str]]:
    """Flag sets to try, best first: OpenMP on torch's runtime (else pthreads), then the widest -march=native."""
    threads = [["-fopenmp"], []] if _torch_uses_libgomp() else [[]]
    arches = [["-march=native", "-mprefer-vector-width=512"], ["-march=native"], []]
    return [_BASE_FLAGS + t + a for t in threads for a in arches]


def _build(flags: List[str]) -> Path:
    cc = _compiler()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout.split("\n")[0]
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), " ".join(flags).encode(), version.encode(),
                                     platform.machine().encode(), _cpu_id().encode()])).hexdigest()[:20]
    out = _cache_dir() / f"scan_cpu-{key}.so"
    if out.exists():
        return out
    tmp = out.with_name(f"{out.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    proc = subprocess.run([cc, *flags, str(SOURCE), "-o", str(tmp), "-lm"], capture_output=True, text=True,
                          timeout=300)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"{cc} {' '.join(flags)}: {proc.stderr.strip()[-400:]}")
    os.replace(tmp, out)
    return out


def _open(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    if lib.mfz_abi() != ABI:
        raise RuntimeError(f"{path} has ABI {lib.mfz_abi()}, expected {ABI}")
    for fn in (lib.mfz_scan_fwd, lib.mfz_scan_bwd):
        fn.argtypes = [ctypes.POINTER(_Args), ctypes.c_int]
        fn.restype = ctypes.c_int
    return lib


def _load() -> Optional[ctypes.CDLL]:
    global _lib, _lib_path, _error, _BLK, _TCH
    if _lib is not None or _error is not None:
        return _lib
    with _lock:
        if _lib is None and _error is None:
            errors = []
            try:
                cands = _candidates()
                _compiler()
            except Exception as e:  # noqa: BLE001 - no compiler: the reference is used
                cands, errors = [], [f"{type(e).__name__}: {e}"]
            for flags in cands:
                try:
                    path = _build(flags)
                    lib = _open(path)
                except Exception as e:  # noqa: BLE001 - a failed build or load: try the next flag set
                    errors.append(str(e))
                    continue
                _BLK, _TCH = int(lib.mfz_blk()), int(lib.mfz_tch())
                _lib, _lib_path = lib, path
                break
            if _lib is None:
                _error = "RuntimeError: building the CPU scan kernel failed: " + " | ".join(errors)
    return _lib


def available() -> bool:
    """Whether the CPU kernel is built (building it on the first call) and loads."""
    return _load() is not None


def build_error() -> Optional[str]:
    """Why the CPU kernel is unavailable (None when it is available or not tried yet)."""
    return _error


def library_path() -> Optional[Path]:
    """The loaded shared object (None before the first successful build)."""
    _load()
    return _lib_path


def _ptr(t: Optional[Tensor]) -> Optional[int]:
    return None if t is None or t.numel() == 0 else t.data_ptr()


def _call(name: str, args: _Args, dtype: torch.dtype) -> None:
    lib = _load()
    if lib is None:
        raise RuntimeError(f"the CPU scan kernel is unavailable ({_error})")
    rc = getattr(lib, name)(ctypes.byref(args), int(dtype == torch.float64))
    if rc != 0:
        raise MemoryError(f"selective_scan CPU kernel: could not allocate its per-thread buffers ({name})")


def _lanes(t: Tensor) -> Tensor:
    """t with a unit stride in its last dimension (the C kernel's lanes); a view when it already has one."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _args(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], bias: Optional[Tensor],
          dt_w: Optional[Tensor], softplus: bool, R: int, G: int, H: int, W: int, **extra) -> _Args:
    """u (Bsz, L, Ch), delta (Bsz, R, L, Ch) (or its low-rank input (Bsz, R, L, Rdt) with dt_w (R, Rdt, Ch)), A (R,
    N, Ch), B / C (Bsz, R*G, L, N), D / bias (R, Ch): strides of the (already lane-contiguous) inputs into the C
    struct."""
    Bsz, L, Ch = u.shape
    su, sd, sb, sc = u.stride(), delta.stride(), B.stride(), C.stride()
    return _Args(Bsz=Bsz, R=R, Ch=Ch, G=G, L=L, N=A.shape[1], H=H, W=W, softplus=int(softplus),
                 Rdt=0 if dt_w is None else dt_w.shape[1], dtw=_ptr(dt_w),
                 nthreads=max(1, torch.get_num_threads()), su0=su[0], su1=su[1], sd0=sd[0], sd1=sd[1], sd2=sd[2],
                 sb0=sb[0], sb1=sb[1], sb2=sb[2], sc0=sc[0], sc1=sc[1], sc2=sc[2], u=_ptr(u), delta=_ptr(delta),
                 A=_ptr(A), Bm=_ptr(B), Cm=_ptr(C), D=_ptr(D), bias=_ptr(bias), **extra)


def _n_runs(Bsz: int, Ch: int, G: int) -> int:
    """Runs of channel blocks per batch row in backward (each holds its own dB / dC partial): enough units for the
    threads, at most the number of blocks."""
    blocks = G * math.ceil(Ch // G / _BLK)
    return max(1, min(blocks, math.ceil(max(1, torch.get_num_threads()) / max(1, Bsz))))


def _inputs(u, delta, A, B, C, D, delta_bias, dt_w):
    return (_lanes(u), _lanes(delta), A.contiguous(), _lanes(B), _lanes(C), None if D is None else D.contiguous(),
            None if delta_bias is None else delta_bias.contiguous(), None if dt_w is None else dt_w.contiguous())


def _ck_shape(u: Tensor, A: Tensor, R: int) -> Tuple[int, ...]:
    Bsz, L, Ch = u.shape
    return (Bsz, R, -(-L // _TCH), A.shape[1], Ch)


@torch.library.custom_op("metaformer_zoo::selective_scan_cpu_fwd", mutates_args=())
def _fwd_op(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
            delta_bias: Optional[Tensor], dt_w: Optional[Tensor], delta_softplus: bool, R: int, G: int, H: int,
            W: int, save_ck: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """The forward in the C layout (channels last, map order): u (Bsz, L, Ch), delta (Bsz, R, L, Ch), A (R, N, Ch),
    B / C (Bsz, R*G, L, N), D / delta_bias (R, Ch). With ``dt_w`` (R, Rdt, Ch), ``delta`` is the low-rank input
    (Bsz, R, L, Rdt) and the kernel takes delta = its per-route projection by dt_w at each step (never stored).
    Returns (y (Bsz, L, Ch), last states (Bsz, R, N, Ch), the backward's checkpoints (Bsz, R, ceil(L / TCH), N, Ch)
    when ``save_ck``, else an empty tensor)."""
    u, delta, A, B, C, D, delta_bias, dt_w = _inputs(u, delta, A, B, C, D, delta_bias, dt_w)
    Bsz, L, Ch = u.shape
    y = u.new_empty(Bsz, L, Ch)
    hlast = u.new_empty(Bsz, R, A.shape[1], Ch)
    ck = u.new_empty(_ck_shape(u, A, R)) if save_ck else u.new_empty((0,))
    args = _args(u, delta, A, B, C, D, delta_bias, dt_w, delta_softplus, R, G, H, W, nblk=1, y=_ptr(y),
                 hlast=_ptr(hlast), ck=_ptr(ck))
    _call("mfz_scan_fwd", args, u.dtype)
    return y, hlast, ck


@_fwd_op.register_fake
def _(u, delta, A, B, C, D, delta_bias, dt_w, delta_softplus, R, G, H, W, save_ck):
    Bsz, L, Ch = u.shape
    return (u.new_empty(Bsz, L, Ch), u.new_empty(Bsz, R, A.shape[1], Ch),
            u.new_empty(_ck_shape(u, A, R)) if save_ck else u.new_empty((0,)))


@torch.library.custom_op("metaformer_zoo::selective_scan_cpu_bwd", mutates_args=())
def _bwd_op(g: Tensor, gh: Optional[Tensor], u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
            D: Optional[Tensor], delta_bias: Optional[Tensor], dt_w: Optional[Tensor], ck: Optional[Tensor],
            delta_softplus: bool, R: int, G: int, H: int, W: int) -> List[Tensor]:
    """[du, ddelta, dA, dB, dC, dD, ddelta_bias] in the C layout; dD / ddelta_bias are (0,) when absent; ddelta is
    the gradient of the raw (Bsz, R, L, Ch) delta, also when ``dt_w`` gives it in low rank. ``ck``: the forward's
    checkpoints (or None: the kernel takes them itself)."""
    u, delta, A, B, C, D, delta_bias, dt_w = _inputs(u, delta, A, B, C, D, delta_bias, dt_w)
    g = _lanes(g)
    gh = None if gh is None else gh.contiguous()
    ck = None if ck is None or ck.numel() == 0 else ck.contiguous()
    Bsz, L, Ch = u.shape
    N = A.shape[1]
    nblk = _n_runs(Bsz, Ch, G)
    du = u.new_empty(Bsz, L, Ch)
    ddelta = u.new_empty(Bsz, R, L, Ch)  # the raw delta's gradient (also with dt_w)
    dA = u.new_empty(Bsz, R, N, Ch)
    dD = u.new_empty(Bsz, R, Ch) if D is not None else None
    dbias = u.new_empty(Bsz, R, Ch) if delta_bias is not None else None
    dB = u.new_empty(nblk, Bsz, R * G, L, N)  # partials, zero-filled by the kernel
    dC = u.new_empty(nblk, Bsz, R * G, L, N)
    sg = g.stride()
    args = _args(u, delta, A, B, C, D, delta_bias, dt_w, delta_softplus, R, G, H, W, nblk=nblk, sg0=sg[0], sg1=sg[1],
                 gy=_ptr(g), gh=_ptr(gh), du=_ptr(du), ddelta=_ptr(ddelta), dA=_ptr(dA), dD=_ptr(dD),
                 dbias=_ptr(dbias), dB=_ptr(dB), dC=_ptr(dC), ck=_ptr(ck))
    _call("mfz_scan_bwd", args, u.dtype)
    return [du, ddelta, dA.sum(0), dB.sum(0) if nblk > 1 else dB[0], dC.sum(0) if nblk > 1 else dC[0],
            u.new_empty((0,)) if dD is None else dD.sum(0),
            u.new_empty((0,)) if dbias is None else dbias.sum(0)]  # two distinct empties: returns may not alias


@_bwd_op.register_fake
def _(g, gh, u, delta, A, B, C, D, delta_bias, dt_w, ck, delta_softplus, R, G, H, W):
    Bsz, L, Ch = u.shape
    N = A.shape[1]
    return [u.new_empty(Bsz, L, Ch), u.new_empty(Bsz, R, L, Ch), u.new_empty(R, N, Ch), u.new_empty(Bsz, R * G, L, N),
            u.new_empty(Bsz, R * G, L, N), u.new_empty((0,)) if D is None else u.new_empty(R, Ch),
            u.new_empty((0,)) if delta_bias is None else u.new_empty(R, Ch)]


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, delta_bias, dt_w, delta_softplus, R, G, H, W, save_ck = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, delta_bias, dt_w, output[2])
    ctx.meta = (delta_softplus, R, G, H, W)
    ctx.mark_non_differentiable(output[2])


def _backward(ctx, gy, gh, gck):
    u, delta, A, B, C, D, delta_bias, dt_w, ck = ctx.saved_tensors
    softplus, R, G, H, W = ctx.meta
    gy = torch.zeros_like(u) if gy is None else gy
    du, ddelta, dA, dB, dC, dD, dbias = _bwd_op(gy, gh, u, delta, A, B, C, D, delta_bias, dt_w, ck, softplus, R, G,
                                                H, W)
    ddt_w = None
    if dt_w is not None:  # delta = dt_w^T (per route) applied to the low-rank input: the chain rule through it
        ddt_w = torch.einsum("brlc,brlj->rjc", ddelta, delta) if ctx.needs_input_grad[7] else None
        ddelta = torch.einsum("brlc,rjc->brlj", ddelta, dt_w)
    return (du, ddelta, dA, dB, dC, dD if D is not None else None, dbias if delta_bias is not None else None, ddt_w,
            None, None, None, None, None, None)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def scan_tokens(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                delta_bias: Optional[Tensor], delta_softplus: bool, R: int, G: int, H: int, W: int,
                dt_proj: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """The kernel in its own layout, any input dtypes: u (Bsz, L, Ch), delta (Bsz, R, L, Ch) in map order, A
    (R*Ch, N), B / C (Bsz, R*G, L, N) in map order, D / delta_bias (R*Ch,). With ``dt_proj`` (R, Ch, Rdt) (a
    per-route dt projection, Mamba's ``dt_proj`` weights), ``delta`` is its low-rank input (Bsz, R, L, Rdt) and the
    kernel forms delta[..., c] = delta_in @ dt_proj[r, c] itself. Returns (y (Bsz, L, Ch) in the accumulation dtype,
    last states (Bsz, R, N, Ch)). Casts and the small A / D / dt_proj transposes are autograd ops."""
    f = torch.float64 if u.dtype == torch.float64 else torch.float32
    Ch = u.shape[-1]
    At = A.to(f).view(R, Ch, A.shape[-1]).transpose(1, 2)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (u, delta, A, B, C, D, delta_bias, dt_proj))
    y, hlast, _ = torch.ops.metaformer_zoo.selective_scan_cpu_fwd(
        u.to(f), delta.to(f), At, B.to(f), C.to(f), None if D is None else D.to(f).view(R, Ch),
        None if delta_bias is None else delta_bias.to(f).view(R, Ch),
        None if dt_proj is None else dt_proj.to(f).transpose(1, 2), bool(delta_softplus), R, G, H, W, grad)
    return y, hlast


def scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
         delta_bias: Optional[Tensor], delta_softplus: bool, return_last_state: bool, mode2d: bool):
    """The selective scan on the C kernel, same contract as ``reference.selective_scan`` (1D, ``mode2d=False``: u
    (batch, dim, L), B / C (batch, N, L) or (batch, G, N, L)) or ``reference.selective_scan2d`` (``mode2d=True``: x
    (B, C, H, W), delta (B, 4, C, H*W), B / C (B, 4, N, H*W) in route order). Arguments are checked by the caller.
    The channels-first, route-order inputs are brought to the kernel's layout here (``scan_tokens`` takes it
    directly)."""
    if mode2d:
        Bsz, Ch, H, W = u.shape
        L, R = H * W, 4
        ut = u.permute(0, 2, 3, 1).reshape(Bsz, L, Ch)
        dt = reference.routes_to_map(delta, H, W).transpose(-1, -2)
        Bs = reference.routes_to_map(B, H, W).transpose(-1, -2)
        Cs = reference.routes_to_map(C, H, W).transpose(-1, -2)
    else:
        Bsz, Ch, L = u.shape
        H, W, R = 1, L, 1
        ut = u.transpose(1, 2)
        dt = delta.transpose(1, 2).unsqueeze(1)
        Bs = B.unsqueeze(1) if B.dim() == 3 else B
        Cs = C.unsqueeze(1) if C.dim() == 3 else C
        if Bs.shape[1] != Cs.shape[1]:  # different group counts: run at the common refinement
            Gc = math.lcm(Bs.shape[1], Cs.shape[1])
            Bs = Bs.repeat_interleave(Gc // Bs.shape[1], 1)
            Cs = Cs.repeat_interleave(Gc // Cs.shape[1], 1)
        Bs, Cs = Bs.transpose(-1, -2), Cs.transpose(-1, -2)
    G = Bs.shape[1] // R
    y, hlast = scan_tokens(ut, dt, A, Bs, Cs, D, delta_bias, delta_softplus, R, G, H, W)
    y = y.transpose(1, 2)  # (Bsz, Ch, L)
    if z is not None:
        zf = z.to(y.dtype)
        y = y * zf * torch.sigmoid(zf)
    out = (y.view(Bsz, Ch, H, W) if mode2d else y).to(u.dtype)
    return (out, hlast[:, 0].transpose(1, 2)) if return_last_state else out
