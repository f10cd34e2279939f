"""Triton forward and backward kernels for the selective scan (Mamba-1 / S6) and its fused 4-route 2D form.

One kernel pair serves both public ops (see ``README.md`` in this folder for the algorithm):

* ``selective_scan2d``: ``R = 4`` routes over an (H, W) map. The cross-scan is an index map computed in the kernel
  (route 0 row-major, 1 column-major, 2 / 3 their reverses), the merge is a read-modify-write of an fp32 buffer by the
  program that owns the (batch, channel-block): no CrossScan / CrossMerge copies, no atomics.
* ``selective_scan``: the 1D op, ``R = 1`` over the same machinery with H = 1, W = L and B / C grouped over channels.

Per program: a (batch, channel-block[, group]) tile of ``BLOCK_D`` channels and ``BLOCK_N`` states. Along the sequence
the kernel walks chunks of ``BLOCK_L`` steps; inside a chunk the recurrence h_t = a_t * h_{t-1} + b_t is a
``tl.associative_scan`` over the (a, b) pairs, seeded with the carried state of the previous chunk. The forward
stores every chunk-end state (``states``: (B, slots, Cg, n_chunks, N) fp32); the backward walks the chunks in reverse,
recomputes h from the saved state of the previous chunk and runs the adjoint recurrence with a reverse associative
scan plus a carried adjoint. Nothing of size (B, D, L, N) is ever written.

Reductions are deterministic by default: dA / dD / d(delta_bias) go to per-batch partial buffers; for dB / dC a
backward program walks its ``D_PER_PROG`` channel blocks innermost (inside the reverse chunk loop), sums them in
registers and writes one per-split partial slice per chunk; partials are summed with ``torch.sum`` afterwards.
``METAFORMER_ZOO_SS2D_ATOMIC=1`` switches dB / dC to fp32 atomics into one buffer (no partial-buffer memory, more
splits possible; run-to-run rounding differences).

Runs on CUDA and under ``TRITON_INTERPRET=1`` (CPU, tests); no autotune on the interpreter path.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------------------------------------------------
# block sizes: fixed constexprs (no autotune; untuned on GPU, see README "GPU tuning"). On CUDA they can be overridden
# with environment variables so a GPU session can sweep them without code edits:
#   METAFORMER_ZOO_SS2D_CHUNK        BLOCK_L, the chunk length = stride of the saved states (power of 2, default 64)
#   METAFORMER_ZOO_SS2D_TILE_FWD     BLOCK_L * BLOCK_D * BLOCK_N budget of the forward tile (default 4096)
#   METAFORMER_ZOO_SS2D_TILE_BWD     same for the backward (default 4096)
# Defaults from an sm_90 ahead-of-time compile (no GPU here; cuobjdump -res-usage): forward BL=64 BD=4 8 warps
# 106 registers, no spill (BD=8: 178); backward BL=64 BD=4 8 warps 255 registers, 16-byte stack (BD=8: 664-byte
# spill). See README "GPU tuning".
#   METAFORMER_ZOO_SS2D_WARPS_FWD / _BWD   num_warps (default 8 / 8)
#   METAFORMER_ZOO_SS2D_ATOMIC=1     backward dB / dC with fp32 atomics (faster, run-to-run nondeterministic) instead
#                                    of the deterministic per-split partial buffers
# ----------------------------------------------------------------------------------------------------------------------
def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    return int(v) if v else default


def chunk_size(L: int, device_type: str = "cuda") -> int:
    """Chunk length along the sequence; also the stride of the states saved for backward."""
    if interpreting() or device_type != "cuda":
        return 16
    c = _env_int("METAFORMER_ZOO_SS2D_CHUNK", 64)
    if c < 16 or c & (c - 1):
        raise ValueError(f"METAFORMER_ZOO_SS2D_CHUNK must be a power of two >= 16, got {c}")
    return min(c, max(16, triton.next_power_of_2(L)))


def n_chunks(L: int, device_type: str = "cuda") -> int:
    return triton.cdiv(L, chunk_size(L, device_type))


def _block_d(Cg: int, block_l: int, block_n: int, device_type: str, bwd: bool) -> int:
    if interpreting() or device_type != "cuda":
        return max(1, min(triton.next_power_of_2(Cg), 8))
    budget = _env_int("METAFORMER_ZOO_SS2D_TILE_BWD" if bwd else "METAFORMER_ZOO_SS2D_TILE_FWD", 4096)
    bd = max(1, budget // (block_l * block_n))
    return max(1, min(triton.next_power_of_2(Cg), triton.next_power_of_2(bd), 64))


def _launch_opts(bwd: bool) -> dict:
    if interpreting():
        return {}
    return {"num_warps": _env_int("METAFORMER_ZOO_SS2D_WARPS_BWD" if bwd else "METAFORMER_ZOO_SS2D_WARPS_FWD", 8)}


def use_atomics() -> bool:
    return os.environ.get("METAFORMER_ZOO_SS2D_ATOMIC", "0") == "1"


@triton.jit
def _combine(a1, b1, a2, b2):
    # (a1, b1) is the earlier element: h = a2 * (a1 * h0 + b1) + b2
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _softplus(x):
    # torch.nn.functional.softplus with beta=1, threshold=20; exp(x) below -15 where log(1 + e^x) loses digits
    e = tl.exp(tl.minimum(x, 20.0))
    return tl.where(x > 20.0, x, tl.where(x < -15.0, e, tl.log(1.0 + e)))


@triton.jit
def _load_channel_param(ptr, pc, mc, PRESENT: tl.constexpr):
    """A per-parameter-channel vector (D, delta_bias) in fp32; zeros when the op has none (the kernel then never uses
    it: every use sits under the same constexpr flag)."""
    if PRESENT:
        v = tl.load(ptr + pc, mask=mc, other=0.0).to(tl.float32)
    else:
        v = tl.zeros(pc.shape, dtype=tl.float32)
    return v


@triton.jit
def _load_delta(ptrs, mask, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """delta of a (steps, channels) block in fp32: (raw, dt) with raw = the input (+ delta_bias) and dt = softplus(raw)
    if SOFTPLUS else raw, zero where masked (padded steps are identity steps of the recurrence: a = 1, b = 0)."""
    raw = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw = raw + bias[None, :]
    if SOFTPLUS:
        dt = _softplus(raw)
    else:
        dt = raw
    return raw, tl.where(mask, dt, 0.0)


@triton.jit
def _route_pos(t, r, H, W, L):
    """(h, w) of route step t: route 0 row-major, 1 column-major, 2 / 3 their reverses."""
    rev = r >= 2
    trans = (r % 2) == 1
    q = tl.where(rev, L - 1 - t, t)
    q = tl.maximum(tl.minimum(q, L - 1), 0)  # padded steps stay in range (they are masked anyway)
    hh = tl.where(trans, q % H, q // W)
    ww = tl.where(trans, q // H, q % W)
    return hh, ww


@triton.jit
def _scan_fwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, acc_ptr, out_ptr, st_ptr,
    H, W, L, Cg, N, NC,
    s_ub, s_uc, s_uh, s_uw,
    s_db, s_dk, s_dc, s_dt,
    s_Bb, s_Bk, s_Bn, s_Bt,
    s_Cb, s_Ck, s_Cn, s_Ct,
    s_zb, s_zc, s_zh, s_zw,
    s_ob, s_oc, s_oh, s_ow,
    R: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    pid_g = tl.program_id(2)
    G = tl.num_programs(2)

    rows = tl.arange(0, BLOCK_L)
    c = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mc = c < Cg
    n = tl.arange(0, BLOCK_N)
    mn = n < N
    uc = (pid_g * Cg + c).to(tl.int64)  # input / output channel

    for r in range(R):
        slot = pid_g * R + r
        pc = slot * Cg + c  # parameter channel (A, D, delta_bias rows)
        A2 = tl.load(A_ptr + pc[:, None] * N + n[None, :], mask=mc[:, None] & mn[None, :], other=0.0).to(tl.float32)
        A2 = A2 * 1.4426950408889634
        Dv = _load_channel_param(D_ptr, pc, mc, HAS_D)
        bias = _load_channel_param(bias_ptr, pc, mc, HAS_BIAS)
        carry = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
        for ci in range(NC):
            t = ci * BLOCK_L + rows
            mt = t < L
            m2 = mt[:, None] & mc[None, :]
            hh, ww = _route_pos(t, r, H, W, L)
            u = tl.load(u_ptr + pid_b * s_ub + uc[None, :] * s_uc + hh[:, None] * s_uh + ww[:, None] * s_uw,
                        mask=m2, other=0.0).to(tl.float32)
            _raw, dt = _load_delta(dt_ptr + pid_b * s_db + slot * s_dk + c[None, :] * s_dc + t[:, None] * s_dt, m2,
                                   bias, HAS_BIAS, SOFTPLUS)
            mtn = mt[:, None] & mn[None, :]
            Bt = tl.load(B_ptr + pid_b * s_Bb + slot * s_Bk + n[None, :] * s_Bn + t[:, None] * s_Bt,
                         mask=mtn, other=0.0).to(tl.float32)
            Ct = tl.load(C_ptr + pid_b * s_Cb + slot * s_Ck + n[None, :] * s_Cn + t[:, None] * s_Ct,
                         mask=mtn, other=0.0).to(tl.float32)
            a = tl.exp2(dt[:, :, None] * A2[None, :, :])
            b = (dt * u)[:, :, None] * Bt[:, None, :]
            pa, pb = tl.associative_scan((a, b), 0, _combine)
            h = pa * carry[None, :, :] + pb
            y = tl.sum(h * Ct[:, None, :], axis=2)
            if HAS_D:
                y += Dv[None, :] * u
            if HAS_Z:
                z = tl.load(z_ptr + pid_b * s_zb + uc[None, :] * s_zc + hh[:, None] * s_zh + ww[:, None] * s_zw,
                            mask=m2, other=0.0).to(tl.float32)
                y = y * z * tl.sigmoid(z)
            # routes 0..R-2 accumulate in fp32 (acc, same layout as out), the last route writes out's dtype
            o_off = pid_b * s_ob + uc[None, :] * s_oc + hh[:, None] * s_oh + ww[:, None] * s_ow
            rr = rows[:, None] * 0 + r
            prev = tl.load(acc_ptr + o_off, mask=m2 & (rr > 0), other=0.0)
            tl.store(acc_ptr + o_off, prev + y, mask=m2 & (rr < R - 1))
            tl.store(out_ptr + o_off, prev + y, mask=m2 & (rr == R - 1))
            # padded rows are identity steps, so the last row holds the chunk-end state
            carry = tl.sum(tl.where(rows[:, None, None] == BLOCK_L - 1, h, 0.0), axis=0)
            st_off = (((pid_b * (G * R) + slot) * Cg + c[:, None]) * NC + ci) * N + n[None, :]
            tl.store(st_ptr + st_off, carry, mask=mc[:, None] & mn[None, :])
        # the next route reads-modifies-writes output positions another thread of this program wrote
        tl.debug_barrier()


@triton.jit
def _scan_bwd_kernel(
    g_ptr, u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, st_ptr,
    du_ptr, ddt_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dz_ptr, dbias_ptr, mu_ptr, duacc_ptr, dzacc_ptr,
    H, W, L, Cg, N, NC, NDB, D_PER_PROG,
    s_gb, s_gc, s_gh, s_gw,
    s_ub, s_uc, s_uh, s_uw,
    s_db, s_dk, s_dc, s_dt,
    s_eb, s_ek, s_ec, s_et,  # ddt buffer
    s_Bb, s_Bk, s_Bn, s_Bt,
    s_Cb, s_Ck, s_Cn, s_Ct,
    s_zb, s_zc, s_zh, s_zw,
    s_xb, s_xc, s_xh, s_xw,  # du / dz buffers (same layout)
    R: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    ATOMIC: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program (batch, split, group): routes outer, chunks in reverse, the split's channel blocks inner.

    The channel-block loop is innermost so that dB / dC of a chunk (sums over channels) are reduced in registers and
    written once per chunk; the per-channel carries (the adjoint mu, and dA / dD / d(delta_bias) accumulators) live
    in small per-(batch, slot, channel) buffers that only this program touches.
    """
    pid_b = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1)  # split: a range of D_PER_PROG channel blocks
    pid_g = tl.program_id(2)
    G = tl.num_programs(2)
    NB = tl.num_programs(0)
    NSLOT = G * R

    rows = tl.arange(0, BLOCK_L)
    n = tl.arange(0, BLOCK_N)
    mn = n < N
    dcol = tl.arange(0, BLOCK_D)

    db_lo = pid_s * D_PER_PROG
    db_hi = tl.minimum(db_lo + D_PER_PROG, NDB)
    for r in range(R):
        slot = pid_g * R + r
        for i in range(NC):
            ci = NC - 1 - i
            t = ci * BLOCK_L + rows
            mt = t < L
            mtn = mt[:, None] & mn[None, :]
            hh, ww = _route_pos(t, r, H, W, L)
            Bt = tl.load(B_ptr + pid_b * s_Bb + slot * s_Bk + n[None, :] * s_Bn + t[:, None] * s_Bt,
                         mask=mtn, other=0.0).to(tl.float32)
            Ct = tl.load(C_ptr + pid_b * s_Cb + slot * s_Ck + n[None, :] * s_Cn + t[:, None] * s_Ct,
                         mask=mtn, other=0.0).to(tl.float32)
            tn = t + 1
            has_next = (rows < BLOCK_L - 1) & (tn < L)
            not_last = (n[None, :] * 0 + ci) < NC - 1  # a later chunk exists: carried buffers are valid
            dB_acc = tl.zeros((BLOCK_L, BLOCK_N), dtype=tl.float32)
            dC_acc = tl.zeros((BLOCK_L, BLOCK_N), dtype=tl.float32)
            for db in range(db_lo, db_hi):
                c = db * BLOCK_D + dcol
                mc = c < Cg
                uc = (pid_g * Cg + c).to(tl.int64)
                pc = slot * Cg + c
                mcn = mc[:, None] & mn[None, :]
                m2 = mt[:, None] & mc[None, :]
                A = tl.load(A_ptr + pc[:, None] * N + n[None, :], mask=mcn, other=0.0).to(tl.float32)
                A2 = A * 1.4426950408889634
                Dv = _load_channel_param(D_ptr, pc, mc, HAS_D)
                bias = _load_channel_param(bias_ptr, pc, mc, HAS_BIAS)
                u = tl.load(u_ptr + pid_b * s_ub + uc[None, :] * s_uc + hh[:, None] * s_uh + ww[:, None] * s_uw,
                            mask=m2, other=0.0).to(tl.float32)
                dt_base = dt_ptr + pid_b * s_db + slot * s_dk + c[None, :] * s_dc
                raw, dt = _load_delta(dt_base + t[:, None] * s_dt, m2, bias, HAS_BIAS, SOFTPLUS)
                # delta of the next step inside the chunk (the last row uses a = 1, the carried mu covers it)
                mnext = has_next[:, None] & mc[None, :]
                _rawn, dtn = _load_delta(dt_base + tn[:, None] * s_dt, mnext, bias, HAS_BIAS, SOFTPLUS)
                g = tl.load(g_ptr + pid_b * s_gb + uc[None, :] * s_gc + hh[:, None] * s_gh + ww[:, None] * s_gw,
                            mask=m2, other=0.0).to(tl.float32)
                # recompute the forward states of this chunk from the saved state of the previous chunk
                st_row = ((pid_b * NSLOT + slot) * Cg + c[:, None]) * NC
                carry = tl.load(st_ptr + (st_row + ci - 1) * N + n[None, :],
                                mask=mcn & ((n[None, :] * 0 + ci) > 0), other=0.0)
                a = tl.exp2(dt[:, :, None] * A2[None, :, :])
                dtu = dt * u
                b = dtu[:, :, None] * Bt[:, None, :]
                pa, pb = tl.associative_scan((a, b), 0, _combine)
                h = pa * carry[None, :, :] + pb
                x_off = pid_b * s_xb + uc[None, :] * s_xc + hh[:, None] * s_xh + ww[:, None] * s_xw
                rr = rows[:, None] * 0 + r
                if HAS_Z:
                    z = tl.load(z_ptr + pid_b * s_zb + uc[None, :] * s_zc + hh[:, None] * s_zh + ww[:, None] * s_zw,
                                mask=m2, other=0.0).to(tl.float32)
                    sz = tl.sigmoid(z)
                    y = tl.sum(h * Ct[:, None, :], axis=2)
                    if HAS_D:
                        y += Dv[None, :] * u
                    dz = g * y * sz * (1.0 + z * (1.0 - sz))
                    prevz = tl.load(dzacc_ptr + x_off, mask=m2 & (rr > 0), other=0.0)
                    tl.store(dzacc_ptr + x_off, prevz + dz, mask=m2 & (rr < R - 1))
                    tl.store(dz_ptr + x_off, prevz + dz, mask=m2 & (rr == R - 1))
                    gy = g * z * sz
                else:
                    gy = g
                # adjoint: lambda_t = gy_t C_t + a_{t+1} lambda_{t+1}: reverse scan + mu = a_{end+1} lambda_{end+1}
                pcn = (pid_b * NSLOT * Cg + pc)[:, None] * N + n[None, :]  # (batch, parameter channel, n) index
                mu = tl.load(mu_ptr + pcn, mask=mcn & not_last, other=0.0)
                an = tl.exp2(dtn[:, :, None] * A2[None, :, :])
                bq = gy[:, :, None] * Ct[:, None, :]
                ln, lam = tl.associative_scan((an, bq), 0, _combine, reverse=True)
                lam = lam + ln * mu[None, :, :]
                hm = h - b  # a_t * h_{t-1}
                ddt = tl.sum(lam * (Bt[:, None, :] * u[:, :, None] + A[None, :, :] * hm), axis=2)
                du = dt * tl.sum(lam * Bt[:, None, :], axis=2)
                if SOFTPLUS:
                    ddt = tl.where(raw <= 20.0, ddt * tl.sigmoid(raw), ddt)
                ddt = tl.where(m2, ddt, 0.0)
                tl.store(ddt_ptr + pid_b * s_eb + slot * s_ek + c[None, :] * s_ec + t[:, None] * s_et, ddt, mask=m2)
                # per-channel accumulators, carried across chunks in this program's slice of the buffers
                dA_prev = tl.load(dA_ptr + pcn, mask=mcn & not_last, other=0.0)
                tl.store(dA_ptr + pcn, dA_prev + tl.sum(lam * dt[:, :, None] * hm, axis=0), mask=mcn)
                pc1 = pid_b * NSLOT * Cg + pc
                nl1 = (dcol * 0 + ci) < NC - 1
                if HAS_D:
                    du += Dv[None, :] * gy
                    dD_prev = tl.load(dD_ptr + pc1, mask=mc & nl1, other=0.0)
                    tl.store(dD_ptr + pc1, dD_prev + tl.sum(tl.where(m2, gy * u, 0.0), axis=0), mask=mc)
                dbias_prev = tl.load(dbias_ptr + pc1, mask=mc & nl1, other=0.0)
                tl.store(dbias_ptr + pc1, dbias_prev + tl.sum(ddt, axis=0), mask=mc)
                prevx = tl.load(duacc_ptr + x_off, mask=m2 & (rr > 0), other=0.0)
                tl.store(duacc_ptr + x_off, prevx + du, mask=m2 & (rr < R - 1))
                tl.store(du_ptr + x_off, prevx + du, mask=m2 & (rr == R - 1))
                # carry for the previous chunk: a_start * lambda_start
                tl.store(mu_ptr + pcn, tl.sum(tl.where(rows[:, None, None] == 0, a * lam, 0.0), axis=0), mask=mcn)
                dB_acc += tl.sum(lam * dtu[:, :, None], axis=1)
                dC_acc += tl.sum(gy[:, :, None] * h, axis=1)
            # dB / dC of this chunk, summed over the split's channels in registers
            if ATOMIC:
                a_off = ((pid_b * NSLOT + slot) * N + n[None, :]) * L + t[:, None]
                tl.atomic_add(dB_ptr + a_off, dB_acc, mask=mtn)
                tl.atomic_add(dC_ptr + a_off, dC_acc, mask=mtn)
            else:
                p_off = (((pid_s * NB + pid_b) * NSLOT + slot) * N + n[None, :]) * L + t[:, None]
                tl.store(dB_ptr + p_off, dB_acc, mask=mtn)
                tl.store(dC_ptr + p_off, dC_acc, mask=mtn)
            tl.debug_barrier()
        # the next route reads-modifies-writes du / dz positions other threads of this program wrote
        tl.debug_barrier()


# ----------------------------------------------------------------------------------------------------------------------
# launchers: tensors already validated and laid out by the caller (``__init__``)
# u4 / z4 / out4: 4-d (B, Cu, H, W) views or stride tuples; dt4: (B, slots, Cg, L); B4 / C4: (B, slots, N, L)
# ----------------------------------------------------------------------------------------------------------------------
def _s4(t):
    return tuple(t.stride())


def scan_fwd(u4, dt4, A, B4, C4, D, z4, bias, softplus: bool, R: int, G: int, out_dtype):
    """Returns (out (B, Cu, H, W) in out_dtype, same memory format as u4; states (B, slots, Cg, NC, N) fp32)."""
    Bsz, Cu, H, W = u4.shape
    L = H * W
    Cg = Cu // G
    N = A.shape[1]
    dev = u4.device.type
    BL = chunk_size(L, dev)
    NC = triton.cdiv(L, BL)
    BN = triton.next_power_of_2(N)
    BD = _block_d(Cg, BL, BN, dev, bwd=False)
    out = torch.empty_like(u4, dtype=out_dtype)
    acc = torch.empty_like(u4, dtype=torch.float32) if R > 1 else out  # fp32 sum of routes 0..R-2
    assert acc.stride() == out.stride()
    states = torch.empty((Bsz, G * R, Cg, NC, N), device=u4.device, dtype=torch.float32)
    A = A.contiguous()
    dummy = A
    zz = z4 if z4 is not None else u4
    grid = (Bsz, triton.cdiv(Cg, BD), G)
    _scan_fwd_kernel[grid](
        u4, dt4, A, B4, C4, D.contiguous() if D is not None else dummy, zz,
        bias.contiguous() if bias is not None else dummy, acc, out, states,
        H, W, L, Cg, N, NC,
        *_s4(u4), *_s4(dt4), *_s4(B4), *_s4(C4), *_s4(zz), *_s4(out),
        R=R, HAS_D=D is not None, HAS_Z=z4 is not None, HAS_BIAS=bias is not None, SOFTPLUS=softplus,
        BLOCK_L=BL, BLOCK_D=BD, BLOCK_N=BN, **_launch_opts(bwd=False),
    )
    return out, states


def _num_sms(device) -> int:
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def scan_bwd(g4, u4, dt4, A, B4, C4, D, z4, bias, states, softplus: bool, R: int, G: int, d_per_prog: int = 0,
             atomic=None):
    """Returns (du4 in u's dtype, ddt (B, slots, Cg, L) in delta's dtype, then fp32 dA, dB (B, slots, N, L), dC,
    dD or None, dz4 (z's dtype) or None, dbias).

    d_per_prog: channel blocks per program (0 = choose); atomic: dB / dC via atomics (None = env
    METAFORMER_ZOO_SS2D_ATOMIC, default off = deterministic partial buffers)."""
    Bsz, Cu, H, W = u4.shape
    L = H * W
    Cg = Cu // G
    N = A.shape[1]
    NSLOT = G * R
    dev = u4.device.type
    BL = chunk_size(L, dev)
    NC = triton.cdiv(L, BL)
    assert states.shape == (Bsz, NSLOT, Cg, NC, N), (states.shape, (Bsz, NSLOT, Cg, NC, N))
    BN = triton.next_power_of_2(N)
    BD = _block_d(Cg, BL, BN, dev, bwd=True)
    NDB = triton.cdiv(Cg, BD)
    atomic = use_atomics() if atomic is None else bool(atomic)
    if d_per_prog <= 0:
        # enough programs to fill the device (~4 per SM); without atomics also bounded partial-buffer memory
        n_split = max(1, min(NDB, math.ceil(4 * _num_sms(u4.device) / max(1, Bsz * G))))
        if not atomic:
            n_split = min(n_split, max(1, (1 << 29) // max(1, Bsz * NSLOT * N * L * 4 * 2)))  # <= 512 MiB
        d_per_prog = triton.cdiv(NDB, n_split)
    n_split = triton.cdiv(NDB, d_per_prog)
    f32 = dict(device=u4.device, dtype=torch.float32)
    du = torch.empty_like(u4)
    duacc = torch.empty_like(u4, dtype=torch.float32) if R > 1 else du  # fp32 sum of routes 0..R-2
    dz = torch.empty_like(u4, dtype=z4.dtype) if z4 is not None else None
    dzacc = (torch.empty_like(u4, dtype=torch.float32) if R > 1 else dz) if z4 is not None else du
    assert duacc.stride() == du.stride() and (dz is None or dz.stride() == du.stride() == dzacc.stride())
    ddt = torch.empty((Bsz, NSLOT, Cg, L), device=u4.device, dtype=dt4.dtype)
    dA_p = torch.empty((Bsz, NSLOT * Cg, N), **f32)
    dD_p = torch.empty((Bsz, NSLOT * Cg), **f32) if D is not None else None
    dbias_p = torch.empty((Bsz, NSLOT * Cg), **f32)
    mu = torch.empty((Bsz, NSLOT * Cg, N), **f32)  # adjoint carried across chunks (scratch)
    if atomic:
        dB_p = torch.zeros((1, Bsz, NSLOT, N, L), **f32)
        dC_p = torch.zeros((1, Bsz, NSLOT, N, L), **f32)
    else:
        dB_p = torch.empty((n_split, Bsz, NSLOT, N, L), **f32)
        dC_p = torch.empty((n_split, Bsz, NSLOT, N, L), **f32)
    A = A.contiguous()
    dummy = A
    zz = z4 if z4 is not None else u4
    grid = (Bsz, n_split, G)
    _scan_bwd_kernel[grid](
        g4, u4, dt4, A, B4, C4, D.contiguous() if D is not None else dummy, zz,
        bias.contiguous() if bias is not None else dummy, states,
        du, ddt, dA_p, dB_p, dC_p, dD_p if dD_p is not None else dummy, dz if dz is not None else du, dbias_p, mu,
        duacc, dzacc,
        H, W, L, Cg, N, NC, NDB, d_per_prog,
        *_s4(g4), *_s4(u4), *_s4(dt4), *_s4(ddt), *_s4(B4), *_s4(C4), *_s4(zz), *_s4(du),
        R=R, HAS_D=D is not None, HAS_Z=z4 is not None, HAS_BIAS=bias is not None, SOFTPLUS=softplus,
        ATOMIC=atomic, BLOCK_L=BL, BLOCK_D=BD, BLOCK_N=BN, **_launch_opts(bwd=True),
    )
    dA = dA_p.sum(0)
    dD = dD_p.sum(0) if dD_p is not None else None
    dbias = dbias_p.sum(0)
    dB = dB_p[0] if dB_p.shape[0] == 1 else dB_p.sum(0)
    dC = dC_p[0] if dC_p.shape[0] == 1 else dC_p.sum(0)
    return du, ddt, dA, dB, dC, dD, dz, dbias
