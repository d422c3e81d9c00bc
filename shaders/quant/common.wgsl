// Shared by the quantization kernels (prepended by the host).

// Round half away from zero, as Rust's f32::round (WGSL's round() is half-to-even).
fn round_away(v: f32) -> f32 {
    return sign(v) * floor(abs(v) + 0.5);
}

// Round to the nearest f16 value (scales are stored in f16), kept positive and finite.
fn to_f16(v: f32) -> f32 {
    let r = unpack2x16float(pack2x16float(vec2<f32>(min(v, 65504.0), 0.0))).x;
    return max(r, 5.9604645e-8);
}

// Shrink factors of the clip search: 1 − t/20 for t < CLIP_STEPS (src/quant/grid.rs).
const CLIP_STEPS: u32 = 10u;

fn clip_factor(t: u32) -> f32 {
    return f32(20u - t) * 0.05;
}

// Round to the nearest f16 keeping the sign, magnitude clamped as to_f16 (signed scales).
fn to_f16_signed(v: f32) -> f32 {
    let m = to_f16(abs(v));
    return select(m, -m, v < 0.0);
}

// Grid kinds (GridKind::wgsl in src/quant/grid.rs).
const GRID_ASYMMETRIC: u32 = 0u;
const GRID_MIDRISE: u32 = 1u;
const GRID_SYMMETRIC: u32 = 2u;
const GRID_IQ4NL: u32 = 3u;
const GRID_K: u32 = 4u;   // k-quant with a minimum (Q2_K, Q4_K)
const GRID_KS: u32 = 5u;  // symmetric k-quant (Q3_K, Q6_K)
const GRID_AFFINE: u32 = 6u; // f16 step and f16 minimum (Q4_1, Q5_1)

// Round to the nearest f16 value without clamping away 0 (a k grid's d, dmin).
fn f16_round(v: f32) -> f32 {
    return unpack2x16float(pack2x16float(vec2<f32>(min(v, 65504.0), 0.0))).x;
}

// IQ4_NL's levels and -1/127 as f32 bits, generated from src/quant/grid.rs (gpu::quant).
{{LEVELS}}

// The value code q dequantizes to (Grid::value).
fn level_value(q: f32, sz: vec2<f32>, kind: u32) -> f32 {
    if (kind == GRID_K) {
        return sz.x * q - sz.y;
    }
    if (kind == GRID_IQ4NL) {
        return sz.x * IQ4NL_LEVELS[u32(q) & 15u];
    }
    if (kind == GRID_AFFINE) {
        return sz.x * q + sz.y;
    }
    return sz.x * (q - sz.y);
}

// Grid parameters of a group from its min and max: returns (scale, zero). See src/quant/grid.rs.
fn grid_params(lo_in: f32, hi_in: f32, maxq: f32, kind: u32) -> vec2<f32> {
    var lo = min(lo_in, 0.0);
    var hi = max(hi_in, 0.0);
    if (kind == GRID_SYMMETRIC) {
        // The value of largest magnitude (the negative one on ties) maps to code 0; scaling by
        // the power of two -1/half is exact.
        let half = (maxq + 1.0) * 0.5;
        var e = select(hi, lo, -lo >= hi);
        if (e == 0.0) {
            e = -1.0;
        }
        return vec2<f32>(to_f16_signed(e * (-1.0 / half)), half);
    }
    if (kind == GRID_IQ4NL) {
        var e = select(hi, lo, -lo >= hi);
        if (e == 0.0) {
            e = -1.0;
        }
        return vec2<f32>(to_f16_signed(e * bitcast<f32>(IQ4NL_SCALE_BITS)), 0.0);
    }
    if (kind == GRID_MIDRISE) {
        let m = max(hi, -lo);
        lo = -m;
        hi = m;
    }
    if (lo == hi) {
        lo = -1.0;
        hi = 1.0;
    }
    let scale = to_f16((hi - lo) / maxq);
    if (kind == GRID_AFFINE) {
        return vec2<f32>(scale, f16_round(lo));
    }
    var zero = maxq * 0.5; // midrise
    if (kind == GRID_ASYMMETRIC) {
        zero = clamp(round_away(-lo / scale), 0.0, maxq);
    }
    return vec2<f32>(scale, zero);
}

// The code of x (Grid::code): the nearest IQ4_NL level (the first on ties), or the rounded
// uniform one.
fn code_of(x: f32, sz: vec2<f32>, maxq: f32, kind: u32) -> f32 {
    if (kind == GRID_K) {
        return k_code(x, sz.x, sz.y, maxq);
    }
    if (kind == GRID_KS) {
        return ks_code(x, sz.x, sz.y, maxq);
    }
    if (kind == GRID_IQ4NL) {
        var best = 0u;
        var bd = 3.4e38;
        for (var q = 0u; q < 16u; q = q + 1u) {
            let d = abs(x - sz.x * IQ4NL_LEVELS[q]);
            if (d < bd) {
                bd = d;
                best = q;
            }
        }
        return f32(best);
    }
    if (kind == GRID_AFFINE) {
        return clamp(round_away((x - sz.y) / sz.x), 0.0, maxq);
    }
    return clamp(round_away(x / sz.x + sz.y), 0.0, maxq);
}

// The range of group_value(i), i in [i0, i1), widened to include 0: (lo, hi).
fn group_range(i0: u32, i1: u32) -> vec2<f32> {
    var lo = 0.0;
    var hi = 0.0;
    for (var i = i0; i < i1; i = i + 1u) {
        let x = group_value(i);
        lo = min(lo, x);
        hi = max(hi, x);
    }
    return vec2<f32>(lo, hi);
}

// The grid of one group of values: min–max, then (when `clip`) the least-squares clip search
// over CLIP_STEPS shrink factors (src/quant/grid.rs). The values are group_value(i) for i in
// [i0, i1): each kernel that includes this file defines group_value for its own storage.
fn choose_grid(i0: u32, i1: u32, maxq: f32, kind: u32, clip: bool) -> vec2<f32> {
    let range = group_range(i0, i1);
    let lo = range.x;
    let hi = range.y;
    var sz = grid_params(lo, hi, maxq, kind);
    if (clip) {
        var best = 3.4e38;
        for (var t = 0u; t < CLIP_STEPS; t = t + 1u) {
            let f = clip_factor(t);
            let cand = grid_params(lo * f, hi * f, maxq, kind);
            var err = 0.0;
            for (var i = i0; i < i1; i = i + 1u) {
                let x = group_value(i);
                let d = x - level_value(code_of(x, cand, maxq, kind), cand, kind);
                err = err + d * d;
            }
            if (err < best) {
                best = err;
                sz = cand;
            }
        }
    }
    return sz;
}

// ---- k grids (src/quant/kquant.rs): super-blocks of 256 columns ----

// The code of x in a sub-block with effective (a, b): value a·q − b.
fn k_code(x: f32, a: f32, b: f32, maxq: f32) -> f32 {
    if (a == 0.0) {
        return 0.0;
    }
    return clamp(round_away((x + b) / a), 0.0, maxq);
}

// A sub-block's continuous (s, m) from group_value(i), i in [i0, i1) (KType::sub_range).
fn k_sub_range(i0: u32, i1: u32, maxq: f32, clip: bool) -> vec2<f32> {
    let range = group_range(i0, i1);
    let lo = range.x;
    let hi = range.y;
    var steps = 1u;
    if (clip) {
        steps = CLIP_STEPS;
    }
    var best = 3.4e38;
    var res = vec2<f32>(0.0, 0.0);
    for (var t = 0u; t < steps; t = t + 1u) {
        let f = clip_factor(t);
        let l = lo * f;
        let h = hi * f;
        let s = (h - l) / maxq;
        let m = -l;
        var err = 0.0;
        for (var i = i0; i < i1; i = i + 1u) {
            let x = group_value(i);
            let d = x - (s * k_code(x, s, m, maxq) - m);
            err = err + d * d;
        }
        if (err < best) {
            best = err;
            res = vec2<f32>(s, m);
        }
    }
    return res;
}

// Choose one row's super-block from group_value(i0 ..< i0 + 256) (KType::choose): writes the
// effective (a, b) of its sub-blocks to scales/zeros[g0 ..] and d, dmin, every sc, every m to
// kparams[k0 ..]. The including kernel declares scales, zeros and kparams.
fn k_super(i0: u32, g0: u32, k0: u32, sub: u32, maxq: f32, smax: f32, clip: bool) {
    let subs = 256u / sub;
    var ranges: array<vec2<f32>, 16>;
    var smx = 0.0;
    var mmx = 0.0;
    for (var j = 0u; j < subs; j = j + 1u) {
        let r = k_sub_range(i0 + j * sub, i0 + (j + 1u) * sub, maxq, clip);
        ranges[j] = r;
        smx = max(smx, r.x);
        mmx = max(mmx, r.y);
    }
    let d = f16_round(smx / smax);
    let dmin = f16_round(mmx / smax);
    kparams[k0] = d;
    kparams[k0 + 1u] = dmin;
    for (var j = 0u; j < subs; j = j + 1u) {
        var q = 0.0;
        if (d > 0.0) {
            q = clamp(round_away(ranges[j].x / d), 0.0, smax);
            if (q == 0.0 && ranges[j].x > 0.0) {
                q = 1.0;
            }
        }
        var mq = 0.0;
        if (dmin > 0.0) {
            mq = clamp(round_away(ranges[j].y / dmin), 0.0, smax);
        }
        kparams[k0 + 2u + j] = q;
        kparams[k0 + 2u + subs + j] = mq;
        scales[g0 + j] = d * q;
        zeros[g0 + j] = dmin * mq;
    }
}

// ---- symmetric k grids (Q3_K, Q6_K): value a·(q − z), z = 2^(bits−1) ----

fn ks_code(x: f32, a: f32, z: f32, maxq: f32) -> f32 {
    if (a == 0.0) {
        return z;
    }
    return clamp(round_away(x / a + z), 0.0, maxq);
}

// A sub-block's signed continuous scale (KType::sub_range, symmetric family).
fn ks_sub_scale(i0: u32, i1: u32, maxq: f32, clip: bool) -> f32 {
    let range = group_range(i0, i1);
    let lo = range.x;
    let hi = range.y;
    let z = (maxq + 1.0) * 0.5;
    let e = select(hi, lo, -lo >= hi);
    var steps = 1u;
    if (clip) {
        steps = CLIP_STEPS;
    }
    var best = 3.4e38;
    var res = 0.0;
    for (var t = 0u; t < steps; t = t + 1u) {
        let s = e * clip_factor(t) * (-1.0 / z);
        var err = 0.0;
        for (var i = i0; i < i1; i = i + 1u) {
            let x = group_value(i);
            let d = x - s * (ks_code(x, s, z, maxq) - z);
            err = err + d * d;
        }
        if (err < best) {
            best = err;
            res = s;
        }
    }
    return res;
}

// KType::choose for the symmetric family; `half_sc` = −sc_min (32 or 128). kparams gets d, 0,
// every sc offset by half_sc, zeros.
fn ks_super(i0: u32, g0: u32, k0: u32, sub: u32, maxq: f32, half_sc: f32, clip: bool) {
    let subs = 256u / sub;
    var sc: array<f32, 16>;
    var big = 0.0;
    for (var j = 0u; j < subs; j = j + 1u) {
        let s = ks_sub_scale(i0 + j * sub, i0 + (j + 1u) * sub, maxq, clip);
        sc[j] = s;
        if (abs(s) > abs(big)) {
            big = s;
        }
    }
    let lo = -half_sc;
    let d = f16_round(clamp(big * (1.0 / lo), -65504.0, 65504.0));
    let z = (maxq + 1.0) * 0.5;
    kparams[k0] = d;
    kparams[k0 + 1u] = 0.0;
    for (var j = 0u; j < subs; j = j + 1u) {
        let s = sc[j];
        var q = 0.0;
        if (d != 0.0) {
            q = clamp(round_away(s / d), lo, -lo - 1.0);
            if (q == 0.0 && s != 0.0) {
                q = select(-1.0, 1.0, (s < 0.0) == (d < 0.0));
            }
        }
        kparams[k0 + 2u + j] = q - lo;
        kparams[k0 + 2u + subs + j] = 0.0;
        scales[g0 + j] = d * q;
        zeros[g0 + j] = z;
    }
}
