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

// Grid parameters of a group from its min and max: returns (scale, zero). See src/quant/grid.rs.
fn grid_params(lo_in: f32, hi_in: f32, maxq: f32, symmetric: bool) -> vec2<f32> {
    var lo = min(lo_in, 0.0);
    var hi = max(hi_in, 0.0);
    if (symmetric) {
        let m = max(hi, -lo);
        lo = -m;
        hi = m;
    }
    if (lo == hi) {
        lo = -1.0;
        hi = 1.0;
    }
    let scale = to_f16((hi - lo) / maxq);
    var zero = maxq * 0.5; // midrise
    if (!symmetric) {
        zero = clamp(round_away(-lo / scale), 0.0, maxq);
    }
    return vec2<f32>(scale, zero);
}

fn code_of(x: f32, sz: vec2<f32>, maxq: f32) -> f32 {
    return clamp(round_away(x / sz.x + sz.y), 0.0, maxq);
}

// The grid of one group of values: min–max, then (when `clip`) the least-squares clip search
// over CLIP_STEPS shrink factors (src/quant/grid.rs). The values are group_value(i) for i in
// [i0, i1): each kernel that includes this file defines group_value for its own storage.
fn choose_grid(i0: u32, i1: u32, maxq: f32, symmetric: bool, clip: bool) -> vec2<f32> {
    var lo = 0.0;
    var hi = 0.0;
    for (var i = i0; i < i1; i = i + 1u) {
        let x = group_value(i);
        lo = min(lo, x);
        hi = max(hi, x);
    }
    var sz = grid_params(lo, hi, maxq, symmetric);
    if (clip) {
        var best = 3.4e38;
        for (var t = 0u; t < CLIP_STEPS; t = t + 1u) {
            let f = clip_factor(t);
            let cand = grid_params(lo * f, hi * f, maxq, symmetric);
            var err = 0.0;
            for (var i = i0; i < i1; i = i + 1u) {
                let x = group_value(i);
                let d = x - cand.x * (code_of(x, cand, maxq) - cand.y);
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
