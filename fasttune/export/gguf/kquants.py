"""GGUF K-quants (Q2_K .. Q6_K) in vectorised numpy, following llama.cpp's reference quantizers.

`gguf` ships numpy dequantizers for every K type but quantizers only for the 32-block types, so this module fills
the gap and no compiler is needed. Each function reproduces the *reference* (imatrix-free) quantizer of ggml
(`quantize_row_qN_K_ref`), which is also what `llama_model_quantize` runs when no importance matrix is given: the same
scale searches, the same round-half-to-even `nearest_int`, fp16 super-block scales and the same requantisation with
the decoded scales. Everything runs on all blocks at once in float32; the only Python loops are over the candidate
scales of a search (~20) and, for Q3_K, over the 16 positions of its coordinate descent.

Super-block layouts (QK_K = 256 values; bytes in file order):

- Q2_K (84 B):  scales[16] (low nibble scale, high nibble min) | qs[64] (2 bits) | d (f16) | dmin (f16)
- Q3_K (110 B): hmask[32] (3rd bit) | qs[64] (low 2 bits) | scales[12] (16 x 6 bits, offset 32) | d (f16)
- Q4_K (144 B): d | dmin | scales[12] (8 scales + 8 mins, 6 bits each) | qs[128] (4 bits)
- Q5_K (176 B): d | dmin | scales[12] | qh[32] (5th bit) | qs[128]
- Q6_K (210 B): ql[128] (low 4 bits) | qh[64] (high 2 bits) | scales[16] (int8) | d (f16)

Dequantisation (for reference): Q2/Q4/Q5_K: ``y = d*sc*q - dmin*m``; Q3_K: ``y = d*(sc-32)*(q-4)``;
Q6_K: ``y = d*sc*(q-32)``.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from gguf import GGML_QUANT_SIZES, QK_K, GGMLQuantizationType

__all__ = ["K_QUANT_TYPES", "quantize_k"]

_F32 = np.float32
_GROUP_MAX_EPS = _F32(1e-15)
# super-blocks handled per numpy pass: big enough to amortise Python overhead, small enough to stay in cache-ish memory
_CHUNK_BLOCKS = 1024


def _f16_round(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Round float32 values to fp16 (round-to-nearest-even, as GGML_FP32_TO_FP16). Returns (fp16, fp16 as float32)."""
    h = v.astype(np.float16)
    return h, h.astype(_F32)


def _first_absmax(x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Along ``axis``: the signed value of largest magnitude (the first one on ties) and that magnitude."""
    idx = np.expand_dims(np.argmax(np.abs(x), axis=axis), axis)
    val = np.squeeze(np.take_along_axis(x, idx, axis=axis), axis)
    return val, np.abs(val)


def _to_columns(x: np.ndarray, n: int) -> np.ndarray:
    """Super-blocks (nb, 256) -> sub-blocks as columns (n, nb*256/n): position-major, so sums over axis 0 add the
    values of a sub-block in order (as ggml's loops do) and per-sub-block scalars broadcast along rows."""
    return np.ascontiguousarray(x.reshape(-1, n).T)


def _from_columns(levels: np.ndarray, nb: int) -> np.ndarray:
    """Inverse of `_to_columns` for the levels: (n, sub-blocks) float -> (nb, 256) uint8."""
    return levels.T.reshape(nb, QK_K).astype(np.uint8)


# ----------------------------------------------------------------------------------------------- scale searches
# All searches take sub-blocks as columns: x is (n, S) for S sub-blocks of n values; results are per column.


def _weighted_error(
    scale: np.ndarray, levels: np.ndarray, vmin: np.ndarray, x: np.ndarray, w: np.ndarray, use_mad: bool,
    tmp: np.ndarray,
) -> np.ndarray:
    """Per column: sum_i w_i * |scale*L_i + min - x_i| (use_mad) or the same with squares; ``tmp`` is scratch."""
    np.multiply(levels, scale, out=tmp)
    tmp += vmin
    tmp -= x
    if use_mad:
        np.abs(tmp, out=tmp)
    else:
        np.square(tmp, out=tmp)
    tmp *= w
    return tmp.sum(axis=0)


def _make_qkx2_quants(
    x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric search (ggml make_qkx2_quants) per column of ``x`` (n, S) with weights ``w`` (n, S).

    Minimises ``sum w * err(scale*L + min - x)`` over integer ``L`` in [0, nmax]: starts from the min/max grid, then
    tries ``nstep+1`` candidate inverse scales ``(nmax + rmin + rdelta*is) / (max - min)`` around the current best fit
    and keeps the weighted least-squares (scale, min) of each candidate when it lowers the error.
    Returns (scale (S,), -min (S,) >= 0, L (n, S) float32 levels).
    """
    nmax_f = _F32(nmax)
    xmin = np.minimum(x.min(axis=0), _F32(0))
    xmax = x.max(axis=0)
    flat = xmax == xmin
    sum_w = w.sum(axis=0)
    sum_x = (w * x).sum(axis=0)

    iscale = nmax_f / np.where(flat, _F32(1), xmax - xmin)
    scale = _F32(1) / iscale
    levels = np.clip(np.rint(iscale * (x - xmin)), 0, nmax_f)
    aux, tmp, wl = np.empty_like(x), np.empty_like(x), np.empty_like(x)
    best = _weighted_error(scale, levels, xmin, x, w, use_mad, tmp)
    cur_min = xmin.copy()
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for step in range(nstep + 1):
            cand = (_F32(rmin) + _F32(rdelta) * _F32(step) + nmax_f) / (xmax - cur_min)
            np.subtract(x, cur_min, out=aux)
            np.multiply(aux, cand, out=aux)
            np.rint(aux, out=aux)
            np.clip(aux, 0, nmax_f, out=aux)
            np.multiply(w, aux, out=wl)
            sum_l = wl.sum(axis=0)
            sum_l2 = np.multiply(wl, aux, out=tmp).sum(axis=0)
            sum_xl = np.multiply(wl, x, out=tmp).sum(axis=0)
            det = sum_w * sum_l2 - sum_l * sum_l
            ok = (det > 0) & ~flat
            det = np.where(ok, det, _F32(1))
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            clamp = this_min > 0
            this_min = np.where(clamp, _F32(0), this_min)
            this_scale = np.where(clamp, sum_xl / np.where(ok, sum_l2, _F32(1)), this_scale)
            err = _weighted_error(this_scale, aux, this_min, x, w, use_mad, tmp)
            better = ok & (err < best)
            if better.any():
                levels = np.where(better, aux, levels)
                best = np.where(better, err, best)
                scale = np.where(better, this_scale, scale)
                cur_min = np.where(better, this_min, cur_min)
    scale = np.where(flat, _F32(0), scale).astype(_F32)
    levels = np.where(flat, _F32(0), levels)
    return scale, (-cur_min).astype(_F32), levels


def _make_qx_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric search (ggml make_qx_quants, rmse_type 1, weights x^2) per column of ``x`` (n, S).

    Levels ``L`` in [-nmax, nmax-1]; tries inverse scales ``-(nmax + 0.1*is)/max`` for is in -9..9 and keeps the one
    maximising ``(sum w x L)^2 / sum w L^2`` (the least-squares fit). Returns (scale (S,), L + nmax (n, S) float32).
    """
    nmax_f = _F32(nmax)
    vmax, amax = _first_absmax(x, axis=0)
    zero = amax < _GROUP_MAX_EPS
    vmax = np.where(zero, _F32(1), vmax)
    w = x * x
    wx = w * x  # C accumulates (w*x)*l and (w*l)*l
    lv = np.empty_like(x)

    def fit(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        np.multiply(x, iscale, out=lv)
        np.rint(lv, out=lv)
        np.clip(lv, -nmax_f, nmax_f - 1, out=lv)
        return (wx * lv).sum(axis=0), (w * lv * lv).sum(axis=0)

    sumlx, suml2 = fit(-nmax_f / vmax)
    levels = lv.copy()
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 != 0, sumlx / np.where(suml2 != 0, suml2, _F32(1)), _F32(0))
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            slx, sl2 = fit(-(nmax_f + _F32(0.1) * _F32(step)) / vmax)
            better = (sl2 > 0) & (slx * slx > best * sl2)
            if better.any():
                levels = np.where(better, lv, levels)
                scale = np.where(better, slx / np.where(better, sl2, _F32(1)), scale)
                best = np.where(better, scale * slx, best)
    levels = np.where(zero, _F32(0), levels + nmax_f)
    return np.where(zero, _F32(0), scale).astype(_F32), levels


def _make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric fit with coordinate descent (ggml make_q3_quants, do_rmse) per column of ``x`` (n, S).

    Start from ``L = round(-nmax/max * x)`` in [-nmax, nmax-1], then up to 5 sweeps: for each position, try the level
    that is optimal for the other positions' fit and keep it if ``(sum w x L)^2 / sum w L^2`` grows (w = x^2).
    Returns (scale = sum w x L / sum w L^2 (S,), L + nmax (n, S) float32).
    """
    nmax_f = _F32(nmax)
    vmax, amax = _first_absmax(x, axis=0)
    zero = amax < _GROUP_MAX_EPS
    vmax = np.where(zero, _F32(1), vmax)
    w = x * x
    levels = np.clip(np.rint((-nmax_f / vmax) * x), -nmax_f, nmax_f - 1)
    sumlx = (w * x * levels).sum(axis=0)
    suml2 = (w * levels * levels).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for _ in range(5):
            changed = False
            for i in range(x.shape[0]):
                xi, wi, li = x[i], w[i], levels[i]
                slx = sumlx - wi * xi * li
                sl2 = suml2 - wi * li * li
                pos = slx > 0
                new_l = np.clip(np.rint(xi * sl2 / np.where(pos, slx, _F32(1))), -nmax_f, nmax_f - 1)
                slx_n = slx + wi * xi * new_l
                sl2_n = sl2 + wi * new_l * new_l
                accept = pos & (new_l != li) & (sl2_n > 0) & (slx_n * slx_n * suml2 > sumlx * sumlx * sl2_n)
                if accept.any():
                    changed = True
                    levels[i] = np.where(accept, new_l, li)
                    sumlx = np.where(accept, slx_n, sumlx)
                    suml2 = np.where(accept, sl2_n, suml2)
            if not changed:  # a sweep without change leaves the state as it was: further sweeps change nothing
                break
        scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, _F32(1)), _F32(0))
    levels = np.where(zero, _F32(0), levels + nmax_f)
    return np.where(zero, _F32(0), scale).astype(_F32), levels


def _requantize(x: np.ndarray, d: np.ndarray, m: np.ndarray | None, lo: int, hi: int, keep: np.ndarray) -> np.ndarray:
    """Levels ``clip(round((x + m) / d), lo, hi) - lo`` per column (n, S); columns whose ``d == 0`` keep ``keep``."""
    nz = d != 0
    num = x if m is None else x + m
    q = np.clip(np.rint(num / np.where(nz, d, _F32(1))), lo, hi) - lo
    return np.where(nz, q, keep)


# ------------------------------------------------------------------------------------------------ bit packing


def _pack_2bit(levels: np.ndarray) -> np.ndarray:
    """(nb, 256) levels in [0, 3] -> (nb, 64): byte 32h+l holds levels 128h+32k+l at bits 2k (k = 0..3)."""
    lv = levels.reshape(-1, 2, 4, 32)
    out = lv[:, :, 0] | (lv[:, :, 1] << 2) | (lv[:, :, 2] << 4) | (lv[:, :, 3] << 6)
    return out.reshape(-1, 64)


def _pack_nibbles_64(levels: np.ndarray) -> np.ndarray:
    """(nb, 256) values in [0, 15] -> (nb, 128): byte 32c+l = v[64c+l] | v[64c+32+l] << 4."""
    lv = levels.reshape(-1, 4, 2, 32)
    return (lv[:, :, 0] | (lv[:, :, 1] << 4)).reshape(-1, 128)


def _pack_scales_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """8 six-bit scales and 8 six-bit mins (nb, 8) -> the 12-byte Q4_K/Q5_K field (see get_scale_min_k4)."""
    out = np.empty((ls.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    out[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    return out


def _pack_scales_q3(lv: np.ndarray) -> np.ndarray:
    """16 six-bit scales (nb, 16) -> 12 bytes: low nibbles in bytes 0..7, high 2 bits of scale 4g+m in byte 8+m."""
    out = np.empty((lv.shape[0], 12), dtype=np.uint8)
    out[:, 0:8] = (lv[:, 0:8] & 0xF) | ((lv[:, 8:16] & 0xF) << 4)
    hv = (lv >> 4).reshape(-1, 4, 4)
    out[:, 8:12] = hv[:, 0] | (hv[:, 1] << 2) | (hv[:, 2] << 4) | (hv[:, 3] << 6)
    return out


def _u8(v: np.ndarray) -> np.ndarray:
    """C conversion of an int to uint8_t (modulo 256)."""
    return (v.astype(np.int64) & 0xFF).astype(np.uint8)


def _f16_bytes(h: np.ndarray) -> np.ndarray:
    return h.astype("<f2").view(np.uint8).reshape(-1, 2)


# ------------------------------------------------------------------------------------------- block quantizers


def _quantize_q2_k(x: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    sub = _to_columns(x, 16)
    scales, mins, levels = _make_qkx2_quants(sub, np.abs(sub), 3, -0.5, 0.1, 15, True)
    scales, mins = scales.reshape(nb, 16), mins.reshape(nb, 16)
    max_scale = np.maximum(scales.max(axis=1), _F32(0))
    max_min = np.maximum(mins.max(axis=1), _F32(0))
    q4scale = _F32(15)
    with np.errstate(divide="ignore", invalid="ignore"):
        ls = np.where(max_scale[:, None] > 0, np.rint((q4scale / max_scale)[:, None] * scales), 0)
        lm = np.where(max_min[:, None] > 0, np.rint((q4scale / max_min)[:, None] * mins), 0)
    sc = _u8(_u8(ls).astype(np.int64) | (lm.astype(np.int64) << 4))
    d_h, d = _f16_round(np.where(max_scale > 0, max_scale / q4scale, _F32(0)))
    m_h, dmin = _f16_round(np.where(max_min > 0, max_min / q4scale, _F32(0)))
    dl = (d[:, None] * (sc & 0xF).astype(_F32)).reshape(-1)
    ml = (dmin[:, None] * (sc >> 4).astype(_F32)).reshape(-1)
    levels = _from_columns(_requantize(sub, dl, ml, 0, 3, levels), nb)
    return np.concatenate([sc, _pack_2bit(levels), _f16_bytes(d_h), _f16_bytes(m_h)], axis=1)


def _quantize_q3_k(x: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    sub = _to_columns(x, 16)
    scales, levels = _make_q3_quants(sub, 4)
    scales = scales.reshape(nb, 16)
    max_scale, _ = _first_absmax(scales, axis=1)
    nz = max_scale != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.where(nz, _F32(-32) / np.where(nz, max_scale, _F32(1)), _F32(0))
        d_h, d = _f16_round(np.where(nz, _F32(1) / np.where(nz, iscale, _F32(1)), _F32(0)))
    lv = np.clip(np.rint(iscale[:, None] * scales), -32, 31) + 32
    lv = np.where(nz[:, None], lv, 0).astype(np.uint8)  # all-zero scale bytes when the block is empty
    dl = (d[:, None] * (lv.astype(_F32) - _F32(32))).reshape(-1)
    levels = _from_columns(_requantize(sub, dl, None, -4, 3, levels), nb)
    high = (levels > 3).reshape(nb, 8, 32).astype(np.uint8)  # bit b of hmask[m] <- level 32b+m >= 4
    hmask = np.zeros((nb, 32), dtype=np.uint8)
    for b in range(8):
        hmask |= high[:, b] << b
    return np.concatenate([hmask, _pack_2bit(levels & 3), _pack_scales_q3(lv), _f16_bytes(d_h)], axis=1)


def _quantize_q45_k(x: np.ndarray, nmax: int, rmin: float, nstep: int) -> tuple[np.ndarray, ...]:
    """Shared Q4_K/Q5_K body: returns (d f16, dmin f16, 12 scale bytes, levels (nb, 256) uint8)."""
    nb = x.shape[0]
    sub = _to_columns(x, 32)
    av_x = np.sqrt((sub * sub).sum(axis=0) / _F32(32))
    scales, mins, levels = _make_qkx2_quants(sub, av_x + np.abs(sub), nmax, rmin, 0.1, nstep, False)
    scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
    max_scale = np.maximum(scales.max(axis=1), _F32(0))
    max_min = np.maximum(mins.max(axis=1), _F32(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, _F32(63) / max_scale, _F32(0))
        inv_min = np.where(max_min > 0, _F32(63) / max_min, _F32(0))
    ls = np.minimum(_u8(np.rint(inv_scale[:, None] * scales)), 63)
    lm = np.minimum(_u8(np.rint(inv_min[:, None] * mins)), 63)
    d_h, d = _f16_round(max_scale / _F32(63))
    m_h, dmin = _f16_round(max_min / _F32(63))
    dl = (d[:, None] * ls.astype(_F32)).reshape(-1)
    ml = (dmin[:, None] * lm.astype(_F32)).reshape(-1)
    levels = _from_columns(_requantize(sub, dl, ml, 0, nmax, levels), nb)
    return d_h, m_h, _pack_scales_k4(ls, lm), levels


def _quantize_q4_k(x: np.ndarray) -> np.ndarray:
    d_h, m_h, sc, levels = _quantize_q45_k(x, 15, -1.0, 20)
    return np.concatenate([_f16_bytes(d_h), _f16_bytes(m_h), sc, _pack_nibbles_64(levels)], axis=1)


def _quantize_q5_k(x: np.ndarray) -> np.ndarray:
    d_h, m_h, sc, levels = _quantize_q45_k(x, 31, -0.5, 15)
    nb = x.shape[0]
    high = (levels >> 4).reshape(nb, 8, 32)  # bit s of qh[j] <- 5th bit of level 32s+j
    qh = np.zeros((nb, 32), dtype=np.uint8)
    for s in range(8):
        qh |= high[:, s] << s
    return np.concatenate([_f16_bytes(d_h), _f16_bytes(m_h), sc, qh, _pack_nibbles_64(levels & 0xF)], axis=1)


def _quantize_q6_k(x: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    sub = _to_columns(x, 16)
    scales, levels = _make_qx_quants(sub, 32)
    scales = scales.reshape(nb, 16)
    max_scale, max_abs = _first_absmax(scales, axis=1)
    empty = max_abs < _GROUP_MAX_EPS
    iscale = _F32(-128) / np.where(empty, _F32(1), max_scale)
    d_h, d = _f16_round(np.where(empty, _F32(0), _F32(1) / iscale))
    sc = np.clip(np.rint(iscale[:, None] * scales), -128, 127).astype(np.int8)
    sc = np.where(empty[:, None], np.int8(0), sc)
    dl = (d[:, None] * sc.astype(_F32)).reshape(-1)
    levels = _from_columns(_requantize(sub, dl, None, -32, 31, levels), nb)
    levels[empty] = 0  # llama.cpp writes an all-zero block when every sub-block scale is ~0
    lv = levels.reshape(nb, 2, 4, 32)
    low = lv & 0xF
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2)
    hi = lv >> 4
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
    return np.concatenate([ql.reshape(nb, 128), qh.reshape(nb, 64), sc.view(np.uint8), _f16_bytes(d_h)], axis=1)


_QUANTIZERS = {
    GGMLQuantizationType.Q2_K: _quantize_q2_k,
    GGMLQuantizationType.Q3_K: _quantize_q3_k,
    GGMLQuantizationType.Q4_K: _quantize_q4_k,
    GGMLQuantizationType.Q5_K: _quantize_q5_k,
    GGMLQuantizationType.Q6_K: _quantize_q6_k,
}
K_QUANT_TYPES: tuple[GGMLQuantizationType, ...] = tuple(_QUANTIZERS)


# ------------------------------------------------------------------------------------------------- public API


def quantize_k(data: np.ndarray, qtype: GGMLQuantizationType, n_threads: int | None = None) -> np.ndarray:
    """Quantize ``data`` (..., cols) with cols % 256 == 0 to a K type, in GGUF's exact block layout.

    Returns uint8 ``(..., cols // 256 * type_size)`` (a 2-D ``(rows, cols)`` input gives ``(rows, bytes_per_row)``),
    which ``gguf.quants.dequantize(out, qtype)`` turns back into an approximation of ``data``. The input is read as
    float32 (f16/bf16/f64 are converted); it must be finite. ``n_threads`` (default: the CPU count, at most 8)
    quantizes chunks of super-blocks in parallel; numpy releases the GIL inside its loops. The result does not depend
    on it.
    """
    qtype = GGMLQuantizationType(qtype)
    if qtype not in _QUANTIZERS:
        allowed = ", ".join(t.name for t in K_QUANT_TYPES)
        raise ValueError(f"qtype: {qtype.name} is not a K-quant type handled here; allowed: {allowed}")
    if n_threads is not None and n_threads < 1:
        raise ValueError(f"n_threads: {n_threads} must be >= 1 (or None for the CPU count)")
    arr = np.asarray(data)
    if arr.ndim < 1 or arr.shape[-1] % QK_K != 0:
        raise ValueError(
            f"data: shape {arr.shape} has a row length that is not a multiple of {QK_K}, which {qtype.name} needs; "
            "choose a 32-block type for this tensor (see mixes.tensor_qtype, which applies llama.cpp's fallbacks)"
        )
    arr = arr.astype(_F32, copy=False)
    if not np.isfinite(arr).all():
        raise ValueError("data: contains NaN or inf; K-quants need finite values")
    _, type_size = GGML_QUANT_SIZES[qtype]
    blocks = arr.reshape(-1, QK_K)
    out = np.empty((blocks.shape[0], type_size), dtype=np.uint8)
    quantize = _QUANTIZERS[qtype]

    def run(start: int) -> None:
        out[start : start + _CHUNK_BLOCKS] = quantize(np.ascontiguousarray(blocks[start : start + _CHUNK_BLOCKS]))

    starts = range(0, blocks.shape[0], _CHUNK_BLOCKS)
    workers = min(n_threads or min(os.cpu_count() or 1, 8), len(starts))
    if workers <= 1:
        for start in starts:
            run(start)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for future in [pool.submit(run, start) for start in starts]:
                future.result()  # re-raises a worker's exception here
    return out.reshape(*arr.shape[:-1], arr.shape[-1] // QK_K * type_size)
