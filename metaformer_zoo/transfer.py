"""Mixer transfer: initialise a student MetaFormer from a trained teacher of the same skeleton.

Teacher and student share the skeleton (same stem, dims, depths, norms, MLPs, scales, head) and differ in their token
mixers. :func:`transfer_mixers` copies every tensor outside the token mixers strictly (the two models must agree on
those keys and shapes, otherwise nothing is copied and a ``TransferError`` says what differs), then handles each
block's mixer:

* same mixer on both sides (same class, same keys and shapes): copied;
* attention (``Attention2d``, keys ``qkv`` / ``proj``) -> an SSM mixer: the attention-to-SSM initialisation of the
  attention-to-Mamba distillation recipe (Wang et al. 2024, "The Mamba in the Llama"; Bick et al. 2024, MOHAWK):
  query -> C, key -> B, value -> x, output projection -> output projection, each only where the shapes agree:

  - ``hydra``: ``in_proj`` rows ``x`` <- v, ``B_fw`` and ``B_bw`` <- k, ``C_fw`` and ``C_bw`` <- q (the attention
    rows are ``[q, k, v]``, Hydra's ``[z, x, B_fw, C_fw, B_bw, C_bw, dt]``); ``out_proj`` <- ``proj``. Needs
    ``expand * dim == attention dim`` for x / out_proj and ``ngroups * d_state == attention dim`` for B / C
    (e.g. ``mixer_kwargs=dict(expand=1, d_state=dim)`` on a ``head_dim * num_heads == dim`` attention);
  - ``ss2d``: the x half of ``in_proj`` <- v and ``out_proj`` <- ``proj`` when ``d_inner == attention dim``; B / C
    are projections of the scanned sequence (``x_proj_weight`` rows ``[dt, B, C]`` per route, on ``d_inner``
    channels), set from k / q for every route when ``d_state == attention dim`` and ``d_inner == dim``;
* anything else: the student's mixer keeps its own initialisation (reported as skipped).

The returned :class:`TransferReport` lists what was copied, mapped and skipped.
"""
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from timm.utils.model import unwrap_model

from .mixers.basic import Attention2d
from .mixers.hydra import Hydra
from .mixers.vim2 import SS2D
from .skeleton import MetaFormerBlock

__all__ = ["TransferError", "TransferReport", "transfer_mixers", "token_mixer_prefixes"]


class TransferError(ValueError):
    """Teacher and student do not share the skeleton outside their token mixers; nothing was copied."""


@dataclass
class TransferReport:
    """What :func:`transfer_mixers` did: ``copied`` non-mixer keys, ``mixers_copied`` (same mixer on both sides),
    ``mapped`` (student key <- teacher source, e.g. ``'...in_proj.weight[x]' <- '...qkv.weight[v]'``) and ``skipped``
    (student mixer prefix -> reason it keeps its own initialisation)."""
    copied: List[str] = field(default_factory=list)
    mixers_copied: List[str] = field(default_factory=list)
    mapped: List[Tuple[str, str]] = field(default_factory=list)
    skipped: Dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"transfer: {len(self.copied)} non-mixer tensors copied, {len(self.mixers_copied)} mixers copied "
                 f"(same mixer), {len(self.mapped)} attention slices mapped, {len(self.skipped)} mixers skipped"]
        lines += [f"  mapped {dst} <- {src}" for dst, src in self.mapped]
        lines += [f"  skipped {prefix}: {why}" for prefix, why in self.skipped.items()]
        return "\n".join(lines)


def token_mixer_prefixes(model: nn.Module) -> List[str]:
    """State-dict prefixes (``'stages.2.blocks.0.token_mixer.'``) of every MetaFormer block's token mixer."""
    return [f"{name}.token_mixer." for name, m in unwrap_model(model).named_modules() if isinstance(m, MetaFormerBlock)]


def _owner(key: str, prefixes: List[str]) -> Optional[str]:
    return next((p for p in prefixes if key.startswith(p)), None)


# a mapping returns the assignments it can make and the reasons for those it cannot
_Assign = Tuple[str, Any, torch.Tensor, str, str]  # (param, index or None, value, part, source)


def _qkv(attn: Attention2d) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(attn.qkv.weight.detach().chunk(3, dim=0))


def _map_hydra(attn: Attention2d, ssm: Hydra) -> Tuple[List[_Assign], List[str]]:
    q, k, v = _qkv(attn)
    A, out, why = attn.attention_dim, [], []
    d, gn = ssm.d_inner, ssm.ngroups * ssm.d_state
    if attn.qkv.bias is None and ssm.in_proj.bias is not None:
        why.append("hydra in_proj has a bias the attention lacks (bias=False)")
    if d == A:
        out.append(("in_proj.weight", slice(d, 2 * d), v, "x", "qkv.weight[v]"))
    else:
        why.append(f"x: expand * dim = {d} != attention dim {A}")
    if gn == A:
        off = 2 * d
        out += [("in_proj.weight", slice(off, off + gn), k, "B_fw", "qkv.weight[k]"),
                ("in_proj.weight", slice(off + gn, off + 2 * gn), q, "C_fw", "qkv.weight[q]"),
                ("in_proj.weight", slice(off + 2 * gn, off + 3 * gn), k, "B_bw", "qkv.weight[k]"),
                ("in_proj.weight", slice(off + 3 * gn, off + 4 * gn), q, "C_bw", "qkv.weight[q]")]
    else:
        why.append(f"B/C: ngroups * d_state = {gn} != attention dim {A}")
    if d == A and ssm.out_proj.weight.shape == attn.proj.weight.shape:
        out.append(("out_proj.weight", None, attn.proj.weight.detach(), "", "proj.weight"))
    return out, why


def _map_ss2d(attn: Attention2d, ssm: SS2D) -> Tuple[List[_Assign], List[str]]:
    q, k, v = _qkv(attn)
    A, out, why = attn.attention_dim, [], []
    d, n, r = ssm.d_inner, ssm.d_state, ssm.dt_rank
    dim = ssm.in_proj.weight.shape[1]
    if d == A:
        out.append(("in_proj.weight", slice(0, d), v, "x", "qkv.weight[v]"))
        out.append(("out_proj.weight", None, attn.proj.weight.detach(), "", "proj.weight"))
    else:
        why.append(f"x: d_inner = {d} != attention dim {A}")
    if n == A and d == dim:
        for route in range(ssm.K):
            out += [("x_proj_weight", (route, slice(r, r + n)), k, f"{route},B", "qkv.weight[k]"),
                    ("x_proj_weight", (route, slice(r + n, r + 2 * n)), q, f"{route},C", "qkv.weight[q]")]
    else:
        why.append(f"B/C: need d_state == attention dim ({n} vs {A}) and d_inner == dim ({d} vs {dim})")
    return out, why


_ATTENTION_MAPS: Dict[type, Callable[[Attention2d, nn.Module], Tuple[List[_Assign], List[str]]]] = {
    Hydra: _map_hydra,
    SS2D: _map_ss2d,
}


def _same_mixer(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return type(a) is type(b) and sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape for k in sa)


@torch.no_grad()
def transfer_mixers(teacher: nn.Module, student: nn.Module, map_attention: bool = True) -> TransferReport:
    """Initialise ``student`` from ``teacher`` (same skeleton, other token mixers) in place; see the module doc.

    Every state-dict entry outside the token mixers must exist in both models with the same shape (a classifier with
    another number of classes included): otherwise ``TransferError`` lists the differences and nothing is changed.
    ``map_attention=False`` leaves attention -> SSM blocks at the student's initialisation.
    """
    teacher, student = unwrap_model(teacher), unwrap_model(student)
    t_prefixes, s_prefixes = token_mixer_prefixes(teacher), token_mixer_prefixes(student)
    if not s_prefixes:
        raise TransferError(f"{type(student).__name__} has no MetaFormer blocks (metaformer_zoo.MetaFormerBlock); "
                            f"transfer_mixers needs two models built on the zoo's MetaFormer skeleton")
    if [p for p in t_prefixes] != s_prefixes:
        raise TransferError(f"teacher and student have different blocks (depths): teacher {len(t_prefixes)} "
                            f"token mixers, student {len(s_prefixes)}; transfer needs the same depths and dims")
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    t_rest = {k: v for k, v in t_sd.items() if _owner(k, t_prefixes) is None}
    s_rest = {k: v for k, v in s_sd.items() if _owner(k, s_prefixes) is None}
    missing, unexpected = sorted(set(s_rest) - set(t_rest)), sorted(set(t_rest) - set(s_rest))
    shapes = sorted(f"{k}: teacher {tuple(t_rest[k].shape)} vs student {tuple(v.shape)}"
                    for k, v in s_rest.items() if k in t_rest and t_rest[k].shape != v.shape)
    if missing or unexpected or shapes:
        parts = [f"only in the student: {missing[:8]}" if missing else "",
                 f"only in the teacher: {unexpected[:8]}" if unexpected else "",
                 f"different shapes: {shapes[:8]}" if shapes else ""]
        raise TransferError("teacher and student differ outside their token mixers (" + "; ".join(filter(None, parts))
                            + "); give both the same dims, depths, norms, MLP ratio and num_classes. Nothing copied.")

    report = TransferReport()
    for k, v in s_rest.items():
        v.copy_(t_rest[k])
        report.copied.append(k)
    for t_prefix, s_prefix in zip(t_prefixes, s_prefixes):
        t_mixer = teacher.get_submodule(t_prefix[:-1])
        s_mixer = student.get_submodule(s_prefix[:-1])
        if _same_mixer(t_mixer, s_mixer):
            s_mixer.load_state_dict(t_mixer.state_dict(), strict=True)
            report.mixers_copied.append(s_prefix)
            continue
        mapper = _ATTENTION_MAPS.get(type(s_mixer)) if isinstance(t_mixer, Attention2d) and map_attention else None
        if mapper is None:
            report.skipped[s_prefix] = (f"{type(t_mixer).__name__} -> {type(s_mixer).__name__}: no mapping, keeps "
                                        f"its initialisation")
            continue
        assigns, why = mapper(t_mixer, s_mixer)
        for name, index, value, part, src in assigns:
            param = s_mixer.get_parameter(name)
            target = param if index is None else param[index]
            target.copy_(value.to(param.dtype))
            report.mapped.append((f"{s_prefix}{name}" + (f"[{part}]" if part else ""), f"{t_prefix}{src}"))
        if why:
            report.skipped[s_prefix] = "partly mapped; " + "; ".join(why) if assigns else "; ".join(why)
    return report
