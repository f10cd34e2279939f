"""The matrix-mixer view: the token-mixing matrix of any token mixer, alone or inside any model.

A token mixer maps the L = H * W tokens of a (C, H, W) map to L tokens. Its *mixing matrix* at an input ``x`` is the
channel-averaged Jacobian of its output tokens with respect to its input tokens::

    M[i, j] = mean_{c in S} d y[c, i] / d x[c, j]                       (the same-channel Jacobian)

with i the output token, j the input token (row-major: token ``h * W + w``), ``S`` the channels averaged over (all
by default). For a mixer that is linear in its input and applies the same token matrix to every channel (pooling,
RandFormer's random mixing, the identity) ``M`` is exactly that matrix; for per-channel linear mixers (strip
mixing, depthwise convolution) it is the mean of the per-channel matrices; for data-dependent mixers (attention,
selective scans, Hydra) it is the local linearisation at ``x``. The *cross-channel* norm

    N[i, j] = sqrt(mean_{c in S} mean_{c' != c} (d y[c, i] / d x[c', j]) ** 2)

measures how much token j of *other* channels reaches token i (zero for channel-wise mixers).

``mixing_matrix(model_or_mixer, x, stage, block)`` locates ``stages[stage].blocks[block]``'s token mixer
(``find_token_mixer``), captures that mixer's actual input during the model's forward with a hook, then
differentiates the mixer alone at that input (in eval mode: dropout off, BatchNorm on running statistics).
The Jacobian is computed exactly with reverse-mode probes: one vector-Jacobian product per (channel, output token),
batched by replicating the sample along the batch dimension (any op with an autograd formula works: custom kernels,
FFTs, scans). Cost: ``len(S) * L`` probes of the mixer on one sample; pass ``channels=k`` to average over k evenly
spaced channels on wide maps (14 x 14 maps of a 320-channel stage: 16 channels take seconds).
"""
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.models.mambaout import GatedConvBlock

__all__ = ["MixingResult", "mixing_matrix", "mixing_analysis", "find_token_mixer", "capture_input",
           "receptive_field", "TOKEN_MIXER_NAMES", "LAYOUTS"]

# names under which blocks hold their token mixer (zoo MetaFormer blocks, timm's MetaFormer, Strip-MLP)
TOKEN_MIXER_NAMES: Tuple[str, ...] = ("token_mixer", "token_mixing")
# blocks whose token mixer has another name: MambaOut's gated CNN block mixes tokens with its 7x7 depthwise conv
_KNOWN_MIXERS: Tuple[Tuple[type, str], ...] = ((GatedConvBlock, "conv"),)
# layouts of a mixer's input: (B, C, H, W), (B, H, W, C), (B, L, C) tokens (timm's Attention), (B, C, L)
LAYOUTS: Tuple[str, ...] = ("NCHW", "NHWC", "NLC", "NCL")


@dataclass
class MixingResult:
    """The mixing matrix of one mixer at one input.

    ``matrix``: (L, L) same-channel Jacobian, channel- (and batch-) averaged; ``cross_channel``: (L, L) cross-channel
    RMS (see the module docstring); ``grid``: (H, W), L = H * W, tokens row-major; ``channels``: the channel indices
    averaged over; ``path``: the mixer's module path in the model ("" for a mixer given alone); ``mixer``: its class
    name; ``layout``: the layout of its input.
    """
    matrix: torch.Tensor
    cross_channel: torch.Tensor
    grid: Tuple[int, int]
    channels: List[int]
    path: str
    mixer: str
    layout: str


class _Captured(Exception):
    """Raised by the capture hook to stop the model's forward once the mixer's input is known."""


def _index(seq: Any, idx: int, what: str, where: str) -> Any:
    n = len(seq)
    if not -n <= idx < n:
        raise IndexError(f"{where} has {n} {what}{'s' if n != 1 else ''} (indices 0..{n - 1}), got {what} {idx}")
    return seq[idx]


def find_token_mixer(model: nn.Module, stage: int, block: int) -> Tuple[str, nn.Module]:
    """(path, module) of the token mixer of ``model.stages[stage].blocks[block]``.

    The mixer is the block's ``token_mixer`` / ``token_mixing`` attribute, else the first sub-module of the block of
    one of those names (AFFNet's AFF blocks, ViM2's token blocks: the first inner token mixer), else the known mixer
    of timm blocks without one (MambaOut: the depthwise ``conv``). Raises a ``ValueError`` naming the block when it
    holds no token mixer module (e.g. AFFNet's MobileNet stages); ``path=`` of ``mixing_matrix`` then takes any
    sub-module (the whole block: ``path="stages.S.blocks.B"``).
    """
    name = type(model).__name__
    stages = getattr(model, "stages", None)
    if not isinstance(stages, nn.Module):
        raise ValueError(f"{name} has no `stages`: give the token mixer module itself, or path= (a dotted sub-module "
                         f"name of the model, see model.named_modules())")
    st = _index(stages, stage, "stage", name)
    blocks = getattr(st, "blocks", None)
    if blocks is None:
        raise ValueError(f"{name}.stages[{stage}] ({type(st).__name__}) has no `blocks`; use path= to name the "
                         f"mixer module")
    blk = _index(blocks, block, "block", f"{name}.stages[{stage}]")
    prefix = f"stages.{stage % len(stages)}.blocks.{block % len(blocks)}"
    for cls, attr in _KNOWN_MIXERS:
        if isinstance(blk, cls):
            return f"{prefix}.{attr}", getattr(blk, attr)
    for attr in TOKEN_MIXER_NAMES:
        if isinstance(getattr(blk, attr, None), nn.Module):
            return f"{prefix}.{attr}", getattr(blk, attr)
    for sub_name, sub in blk.named_modules():
        if sub_name and sub_name.rsplit(".", 1)[-1] in TOKEN_MIXER_NAMES:
            return f"{prefix}.{sub_name}", sub
    raise ValueError(
        f"{name}.stages[{stage}].blocks[{block}] ({type(blk).__name__}) has no token mixer module (no sub-module "
        f"named {' / '.join(TOKEN_MIXER_NAMES)}): its tokens are mixed inside the block's own layers. Pick another "
        f"stage, or pass path='{prefix}' for the matrix of the whole block (residual and channel MLP included).")


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Put ``module`` and its children in eval mode, restoring each one's own flag afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def capture_input(model: nn.Module, target: nn.Module, x: torch.Tensor) -> Tuple[tuple, Dict[str, Any]]:
    """(args, kwargs) with which ``model(x)`` calls ``target`` (first call; the forward stops there), in eval mode."""
    captured: Dict[str, Any] = {}

    def hook(module, args, kwargs):
        captured["args"] = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        captured["kwargs"] = dict(kwargs)
        raise _Captured

    handle = target.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with _eval_mode(model), torch.no_grad():
            model(x)
    except _Captured:
        pass
    finally:
        handle.remove()
    if "args" not in captured:
        raise ValueError(f"{type(model).__name__}'s forward never called the mixer ({type(target).__name__}); was "
                         f"its stage pruned (prune_intermediate_layers) or is it used outside forward()?")
    return captured["args"], captured["kwargs"]


def _expected_grid(model: nn.Module, stage: Optional[int], image: torch.Tensor) -> Optional[Tuple[int, int]]:
    """The stage's (H, W) from the model's ``feature_info`` reduction and the image size (None if unknown)."""
    info = getattr(model, "feature_info", None)
    if stage is None or not info or image.dim() != 4:
        return None
    info = list(info)
    entry = next((f for f in info if isinstance(f, dict) and f.get("module") == f"stages.{stage}"), None)
    if entry is None and 0 <= stage < len(info) and isinstance(info[stage], dict):
        entry = info[stage]
    red = entry.get("reduction") if entry else None
    if not red:
        return None
    return math.ceil(image.shape[-2] / red), math.ceil(image.shape[-1] / red)


def _close(grid: Sequence[int], ref: Sequence[int]) -> bool:
    return all(abs(int(a) - int(b)) <= 1 for a, b in zip(grid, ref))


def _resolve_layout(shape: Sequence[int], layout: str, grid: Optional[Tuple[int, int]],
                    expected: Optional[Tuple[int, int]]) -> Tuple[str, Tuple[int, int]]:
    """(layout, grid) of a mixer input of ``shape`` (batch first)."""
    if layout not in ("auto",) + LAYOUTS:
        raise ValueError(f"layout must be 'auto' or one of {', '.join(LAYOUTS)}, got {layout!r}")
    shape = tuple(int(s) for s in shape)
    hint = ("; pass layout= (one of " + ", ".join(LAYOUTS) + ") and, for token sequences, grid=(H, W)")
    if len(shape) not in (3, 4):
        raise ValueError(f"the mixer's input has shape {list(shape)}: expected a (B, C, H, W) map or (B, L, C) "
                         f"tokens{hint}")
    if layout == "auto":
        ref = grid or expected
        if len(shape) == 4:
            layout = "NCHW"
            if ref is not None and not _close(shape[2:], ref) and _close(shape[1:3], ref):
                layout = "NHWC"
        else:
            if ref is not None and shape[2] == ref[0] * ref[1] and shape[1] != ref[0] * ref[1]:
                layout = "NCL"
            else:
                layout = "NLC"
    if (len(shape) == 4) != (layout in ("NCHW", "NHWC")):
        raise ValueError(f"layout {layout!r} does not fit the mixer's {len(shape)}-D input {list(shape)}{hint}")
    if layout == "NCHW":
        return layout, (shape[2], shape[3])
    if layout == "NHWC":
        return layout, (shape[1], shape[2])
    n = shape[1] if layout == "NLC" else shape[2]
    if grid is None:
        if expected is not None and expected[0] * expected[1] == n:
            grid = expected
        else:
            side = math.isqrt(n)
            if side * side != n:
                raise ValueError(f"the mixer's input holds {n} tokens ({list(shape)}, {layout}), not a square grid: "
                                 f"pass grid=(H, W)")
            grid = (side, side)
    if grid[0] * grid[1] != n:
        raise ValueError(f"grid {tuple(grid)} has {grid[0] * grid[1]} tokens but the mixer's input holds {n} "
                         f"({list(shape)}, {layout})")
    return layout, (int(grid[0]), int(grid[1]))


def _to_tokens(x: torch.Tensor, layout: str) -> torch.Tensor:
    """(B, C, L) view of a mixer input / output in ``layout``."""
    if layout == "NCHW":
        return x.flatten(2)
    if layout == "NHWC":
        return x.flatten(1, 2).transpose(1, 2)
    if layout == "NLC":
        return x.transpose(1, 2)
    return x


def _from_tokens(t: torch.Tensor, layout: str, grid: Tuple[int, int]) -> torch.Tensor:
    B, C, _ = t.shape
    if layout == "NCHW":
        return t.reshape(B, C, grid[0], grid[1])
    if layout == "NHWC":
        return t.transpose(1, 2).reshape(B, grid[0], grid[1], C)
    if layout == "NLC":
        return t.transpose(1, 2)
    return t


def _channel_indices(channels: Union[None, int, Sequence[int]], C: int) -> List[int]:
    if channels is None:
        return list(range(C))
    if isinstance(channels, int):
        if channels < 1:
            raise ValueError(f"channels must be >= 1 (the number of channels to average over), got {channels}")
        if channels >= C:
            return list(range(C))
        return sorted(set(torch.linspace(0, C - 1, channels).round().long().tolist()))
    idx = [int(c) for c in channels]
    bad = [c for c in idx if not 0 <= c < C]
    if bad or not idx:
        raise ValueError(f"channel indices {bad or idx} are not in 0..{C - 1} (the mixer has {C} channels)")
    return sorted(set(idx))


def _jacobian(fn, tokens: torch.Tensor, chans: List[int], chunk_size: Optional[int]
              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Same-channel mean and cross-channel RMS of d fn(t)[c, i] / d t[c', j] over the batch of ``tokens``."""
    B, C, L = tokens.shape
    probes = [(c, i) for c in chans for i in range(L)]
    chunk = chunk_size or max(1, min(len(probes), (1 << 22) // max(1, C * L)))
    same = tokens.new_zeros(L, L)
    cross = tokens.new_zeros(L, L)
    for b in range(B):
        xb = tokens[b:b + 1]
        for start in range(0, len(probes), chunk):
            part = probes[start:start + chunk]
            k = len(part)
            cs = torch.tensor([p[0] for p in part], device=tokens.device)
            rows = torch.tensor([p[1] for p in part], device=tokens.device)
            X = xb.expand(k, C, L).clone().requires_grad_(True)
            with torch.enable_grad():
                Y = fn(X)
            if Y.shape != X.shape:
                raise ValueError(f"the mixer maps {C} channels x {L} tokens to {list(Y.shape[1:])}: a token mixer "
                                 f"keeps the channels and tokens of its input (the same-channel Jacobian needs it)")
            if start == 0 and b == 0 and k > 1:
                with torch.no_grad():
                    ref = fn(xb)
                if not torch.allclose(Y[-1:].detach(), ref, rtol=1e-4, atol=1e-5):
                    raise ValueError("the mixer's output for one sample depends on the other samples of the batch "
                                     "(even in eval mode), so its Jacobian cannot be probed in batches; pass "
                                     "chunk_size=1")
            G = torch.zeros_like(Y)
            ar = torch.arange(k, device=tokens.device)
            G[ar, cs, rows] = 1
            (g,) = torch.autograd.grad(Y, X, G, allow_unused=True, materialize_grads=True)
            g = g.detach()
            own = g[ar, cs]  # (k, L): d y[c, i] / d x[c, :]
            same.index_add_(0, rows, own)
            cross.index_add_(0, rows, g.square().sum(1) - own.square())
    n = B * len(chans)
    same /= n
    cross = (cross.clamp_min(0) / (n * max(1, C - 1))).sqrt()
    return same, cross


def mixing_analysis(
        model_or_mixer: nn.Module,
        input: torch.Tensor,
        stage: Optional[int] = None,
        block: Optional[int] = None,
        path: Optional[str] = None,
        channels: Union[None, int, Sequence[int]] = None,
        layout: str = "auto",
        grid: Optional[Tuple[int, int]] = None,
        chunk_size: Optional[int] = None,
) -> MixingResult:
    """``mixing_matrix`` with its context: the cross-channel norm, grid, channels, module path and layout.

    See ``mixing_matrix`` for the arguments.
    """
    if not isinstance(model_or_mixer, nn.Module):
        raise TypeError(f"model_or_mixer must be an nn.Module (a model or a token mixer), got "
                        f"{type(model_or_mixer).__name__}")
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a tensor (an image batch for a model, the mixer's input map for a mixer), got "
                        f"{type(input).__name__}")
    located = stage is not None or block is not None or path is not None
    if located:
        if path is not None:
            if stage is not None or block is not None:
                raise ValueError("give either stage= and block= or path=, not both")
            try:
                target = model_or_mixer.get_submodule(path)
            except AttributeError:
                raise ValueError(f"{type(model_or_mixer).__name__} has no sub-module {path!r} (see "
                                 f"model.named_modules())") from None
        else:
            if stage is None or block is None:
                raise ValueError("give both stage= and block= (the mixer of model.stages[stage].blocks[block])")
            path, target = find_token_mixer(model_or_mixer, stage, block)
        args, kwargs = capture_input(model_or_mixer, target, input)
        if not args or not isinstance(args[0], torch.Tensor):
            raise ValueError(f"{path} ({type(target).__name__}) is not called with a tensor as its first argument")
        x, rest = args[0], args[1:]
        expected = _expected_grid(model_or_mixer, stage, input) if path.startswith("stages.") else None
        if expected is None and path.startswith("stages."):
            expected = _expected_grid(model_or_mixer, int(path.split(".")[1]), input)
    else:
        if isinstance(getattr(model_or_mixer, "stages", None), nn.Module):
            raise ValueError(f"{type(model_or_mixer).__name__} is a model (it has stages): give stage= and block= "
                             f"(or path=) to choose the token mixer")
        target, path, x, rest, kwargs, expected = model_or_mixer, "", input.detach(), (), {}, None
    layout, grid = _resolve_layout(x.shape, layout, grid, expected)
    tokens = _to_tokens(x, layout)
    chans = _channel_indices(channels, tokens.shape[1])

    def fn(t: torch.Tensor) -> torch.Tensor:
        B = t.shape[0]
        extra = tuple(a.expand(B, *a.shape[1:]) if isinstance(a, torch.Tensor) and a.shape[:1] == (1,) and B > 1
                      else a for a in rest)
        return _to_tokens(target(_from_tokens(t, layout, grid), *extra, **kwargs), layout)

    with _eval_mode(target):
        same, cross = _jacobian(fn, tokens, chans, chunk_size)
    return MixingResult(same, cross, grid, chans, path, type(target).__name__, layout)


def mixing_matrix(
        model_or_mixer: nn.Module,
        input: torch.Tensor,
        stage: Optional[int] = None,
        block: Optional[int] = None,
        path: Optional[str] = None,
        channels: Union[None, int, Sequence[int]] = None,
        layout: str = "auto",
        grid: Optional[Tuple[int, int]] = None,
        chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """The (L, L) token-mixing matrix ``M[i, j] = mean_c d y[c, i] / d x[c, j]`` of a token mixer (module docstring).

    Args:
        model_or_mixer: a token mixer (then ``input`` is its input: a (B, C, H, W) map, or another layout, see
            ``layout``), or a model (then ``input`` is an image batch and ``stage`` / ``block`` or ``path`` name the
            mixer: ``find_token_mixer`` finds the token mixer of ``model.stages[stage].blocks[block]`` in zoo, timm
            and bespoke blocks; ``path`` is any sub-module, e.g. ``"stages.2.blocks.0"`` for a whole block).
        input: batch; with B > 1 the matrices of the B samples are averaged.
        channels: the channels averaged over: None = all, an int k = k evenly spaced ones, or a list of indices.
        layout: of the mixer's input: "auto" (inside a model: NCHW, NHWC or (B, L, C) tokens, told apart by the
            stage's grid from ``feature_info``; alone: NCHW for 4-D, (B, L, C) for 3-D), or one of ``LAYOUTS``.
        grid: (H, W) of token-sequence inputs (default: the stage's grid, else square).
        chunk_size: probes per batched backward (default: about 4M elements per batch).

    Tokens are row-major (``h * W + w``). The mixer runs in eval mode; the model is unchanged.
    """
    return mixing_analysis(model_or_mixer, input, stage, block, path, channels, layout, grid, chunk_size).matrix


def receptive_field(matrix: torch.Tensor, grid: Tuple[int, int], query: Tuple[int, int]) -> torch.Tensor:
    """(H, W) weights with which the output token at ``query`` = (row, col) reads every input token."""
    H, W = grid
    r, c = query
    if not (0 <= r < H and 0 <= c < W):
        raise ValueError(f"query {tuple(query)} is outside the {H}x{W} token grid")
    return matrix[r * W + c].reshape(H, W)
