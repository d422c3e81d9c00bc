//! The ggml block types that hold pumice's grids exactly, and their encoders (the codes and
//! grid parameters are written as stored, never re-rounded).
//!
//! A symmetric grid's value s·(q − 2^(b−1)) is ggml's own d·q' with d = s, q' = q − 2^(b−1) ∈ [−2^(b−1), 2^(b−1) − 1]
//! (4 bits: Q4_0 exactly, 5 bits: Q5_0, 8 bits: Q8_0 exactly); an asymmetric grid's s·(q − z) is d·q' with
//! d = s, q' = q − z ∈ [−maxq, maxq]; a midrise grid's s·(q − maxq/2) is d·q' with d = s/2,
//! q' = 2q − maxq ∈ [−maxq, maxq]. Q4_0 stores q' + 8 ∈ [0, 15] and so holds symmetric grids of
//! up to 4 bits and the others of up to 3; Q5_0 stores q' + 16 ∈ [0, 31] (symmetric grids of up
//! to 5 bits, the others of up to 4); Q8_0 holds q' ∈ [−128, 127]. Groups of 32 or more
//! repeat their scale in every 32-block. A pruned weight is q' = 0.
//! Not representable (refused by tensor): randomized-Hadamard rotations, act-order (GGUF has
//! no column permutation). Widths that are not whole 32-blocks are stored as f32 (exact).
//! The affine grid's d·q + m (f16 step and minimum) is ggml's Q4_1 (codes of up to 4 bits) and
//! Q5_1 (up to 5) exactly, groups of 32 or more repeating (d, m) in every 32-block.
//! k grids are ggml's own Q2_K/Q3_K/Q4_K/Q5_K/Q6_K: their stored d, dmin and sub-block scales and
//! minimums are laid out in ggml's blocks, the codes as they are; the iq4nl grid's codes are
//! IQ4_NL's indices.

use half::f16;

use crate::error::{Error, Result};
use crate::model::compressed::QuantEntry;
use crate::quant::GridKind;

use super::file::GgmlType;
use super::CompressedMatrix;

/// The ggml types that hold `e`'s values exactly, smallest first, or why none does.
pub(crate) fn exact_types(e: &QuantEntry) -> std::result::Result<Vec<GgmlType>, String> {
    if e.rht.is_some() {
        return Err(
            "its codes are of a randomized-Hadamard-rotated weight, which no ggml type \
                    reproduces (compress without --rht, or export --format dense)"
                .into(),
        );
    }
    if e.act_order {
        return Err(
            "act-order stores columns permuted and GGUF has no permutation (compress \
                    without --act-order, or export --format dense)"
                .into(),
        );
    }
    if e.bits > 8 {
        return Err(format!("{} bits", e.bits));
    }
    let mut t = Vec::new();
    if e.kind == GridKind::K {
        if e.cols.is_multiple_of(crate::quant::kquant::SUPER) && e.sparsity.is_none() {
            match e.bits {
                2 => t.push(GgmlType::Q2K),
                3 => t.push(GgmlType::Q3K),
                4 => t.push(GgmlType::Q4K),
                5 => t.push(GgmlType::Q5K),
                6 => t.push(GgmlType::Q6K),
                _ => {}
            }
        }
    } else if e.kind == GridKind::Iq4nl {
        // IQ4_NL has no level at 0 for a pruned weight.
        if e.cols.is_multiple_of(32) && e.sparsity.is_none() {
            t.push(GgmlType::Iq4Nl);
        }
    } else if e.kind == GridKind::Affine {
        // d·q + m: Q4_1/Q5_1 store the step, the minimum and the codes as they are, one (d, m)
        // per 32-block (a group of 64 or more repeats it); a pruned weight has no code for 0.
        let whole = e.group_size == 0 || e.group_size.is_multiple_of(32);
        if e.cols.is_multiple_of(32) && whole && e.sparsity.is_none() {
            match e.bits {
                ..=4 => t.extend([GgmlType::Q4_1, GgmlType::Q5_1]),
                5 => t.push(GgmlType::Q5_1),
                _ => {}
            }
        }
    } else if e.cols.is_multiple_of(32) {
        let (lo, hi) = level_range(e.kind, e.bits);
        for ty in [GgmlType::Q4_0, GgmlType::Q5_0, GgmlType::Q8_0] {
            let (tlo, thi) = match ty {
                GgmlType::Q4_0 => (-8, 7),
                GgmlType::Q5_0 => (-16, 15),
                _ => (-128, 127),
            };
            if tlo <= lo && hi <= thi {
                t.push(ty);
            }
        }
    }
    t.push(GgmlType::F32);
    Ok(t)
}

/// The range of the integer q' (value = d·q') a grid's codes become (module docs).
fn level_range(kind: GridKind, bits: u32) -> (i32, i32) {
    let maxq = (1i32 << bits) - 1;
    match kind {
        GridKind::Symmetric => (-(1 << (bits - 1)), (1 << (bits - 1)) - 1),
        GridKind::Asymmetric | GridKind::Midrise => (-maxq, maxq),
        // The codebook's indices are stored as they are; k and affine grids have their own
        // blocks.
        GridKind::Iq4nl | GridKind::K | GridKind::Affine => (0, 15),
    }
}

/// A code's integer q' and the block scale d for scale s (module docs).
fn ggml_level(kind: GridKind, code: u32, s: f32, z: f32, maxq: i32) -> (i32, f32) {
    match kind {
        GridKind::Midrise => (2 * code as i32 - maxq, s / 2.0),
        GridKind::Asymmetric | GridKind::Symmetric => (code as i32 - z as i32, s),
        GridKind::Iq4nl | GridKind::K | GridKind::Affine => (code as i32, s),
    }
}

/// Encode a k grid's backbone as its k-quant type (ggml's block layouts), rows in `order`: the
/// stored d, dmin and sub-block scales and minimums, the codes as they are.
fn encode_k(m: &CompressedMatrix, ty: GgmlType, order: &[usize]) -> Result<Vec<u8>> {
    use crate::quant::kquant::{unpack_stored, SUPER};
    let e = &m.entry;
    let (rows, cols) = (e.rows, e.cols);
    let grid = e.grid()?;
    let bad = |msg: &str| Error::Shape(format!("{}: {msg}", m.weight));
    let k = grid.ktype().ok_or_else(|| bad("not a k grid"))?;
    let want = match ty {
        GgmlType::Q4K => 4,
        GgmlType::Q5K => 5,
        GgmlType::Q2K => 2,
        GgmlType::Q3K => 3,
        GgmlType::Q6K => 6,
        _ => return Err(bad("not a k-quant type")),
    };
    if k.bits != want {
        return Err(bad("its k grid is not this type's"));
    }
    let codes = m.data.codes(rows, cols, e.bits);
    let mut dd = Vec::new();
    crate::DType::F16.decode_f32(&m.data.scales, &mut dd);
    let words: Vec<u32> = bytemuck::pod_collect_to_vec(
        m.data
            .subscales
            .as_deref()
            .ok_or_else(|| bad("no sub-block scales"))?,
    );
    let supers = unpack_stored(k, &dd, &words, rows, cols);
    let nsb = cols / SUPER;
    let mut out = Vec::with_capacity(rows * ty.row_bytes(cols).unwrap_or(0));
    for &r in order {
        for sb in 0..nsb {
            let p = &supers[r * nsb + sb];
            let q = |j: usize| -> Result<u8> {
                codes[r * cols + sb * SUPER + j]
                    .map(|c| c as u8)
                    .ok_or_else(|| bad("a pruned weight has no k-quant level"))
            };
            let d = f16::from_f32(p.d).to_le_bytes();
            let dmin = f16::from_f32(p.dmin).to_le_bytes();
            if ty == GgmlType::Q3K {
                // hmask: byte l bit s holds the high bit of value s·32 + l.
                for l in 0..32 {
                    let mut b = 0u8;
                    for s in 0..8 {
                        b |= (q(s * 32 + l)? >> 2) << s;
                    }
                    out.push(b);
                }
                // qs: as Q2_K's, the low two bits.
                for c in 0..2 {
                    for l in 0..32 {
                        let mut b = 0u8;
                        for s in 0..4 {
                            b |= (q(c * 128 + s * 32 + l)? & 3) << (2 * s);
                        }
                        out.push(b);
                    }
                }
                // scales: the 16 6-bit (sc + 32) as low nibbles (8 bytes, j and j + 8) and
                // high two bits (4 bytes, 2·s bits of byte i for j = 4·s + i).
                let s6 = &p.sc;
                for i in 0..8 {
                    out.push(((s6[i] & 15) | ((s6[i + 8] & 15) << 4)) as u8);
                }
                for i in 0..4 {
                    let mut b = 0u32;
                    for s in 0..4 {
                        b |= (s6[4 * s + i] >> 4) << (2 * s);
                    }
                    out.push(b as u8);
                }
                out.extend(d);
                continue;
            }
            if ty == GgmlType::Q6K {
                // ql: byte c·64 + l, nibble h holds the low four bits of value c·128 + h·64 + l.
                for c in 0..2 {
                    for l in 0..64 {
                        out.push((q(c * 128 + l)? & 15) | ((q(c * 128 + 64 + l)? & 15) << 4));
                    }
                }
                // qh: byte c·32 + l, bits 2·s hold the high two bits of value c·128 + s·32 + l.
                for c in 0..2 {
                    for l in 0..32 {
                        let mut b = 0u8;
                        for s in 0..4 {
                            b |= (q(c * 128 + s * 32 + l)? >> 4) << (2 * s);
                        }
                        out.push(b);
                    }
                }
                // scales: int8 (stored offset by 128).
                for j in 0..16 {
                    out.push((p.sc[j] as i32 - 128) as i8 as u8);
                }
                out.extend(d);
                continue;
            }
            if matches!(ty, GgmlType::Q4K | GgmlType::Q5K) {
                out.extend(d);
                out.extend(dmin);
                let (sc, mn) = (&p.sc, &p.m);
                for i in 0..4 {
                    out.push((sc[i] | ((sc[4 + i] >> 4) << 6)) as u8);
                }
                for i in 0..4 {
                    out.push((mn[i] | ((mn[4 + i] >> 4) << 6)) as u8);
                }
                for i in 0..4 {
                    out.push(((sc[4 + i] & 15) | ((mn[4 + i] & 15) << 4)) as u8);
                }
                if ty == GgmlType::Q5K {
                    // qh: byte l, bits 2c and 2c + 1 hold the fifth bits of values c·64 + l
                    // and c·64 + 32 + l.
                    for l in 0..32 {
                        let mut b = 0u8;
                        for c in 0..4 {
                            b |= ((q(c * 64 + l)? >> 4) & 1) << (2 * c);
                            b |= ((q(c * 64 + 32 + l)? >> 4) & 1) << (2 * c + 1);
                        }
                        out.push(b);
                    }
                }
                // Four chunks of 64 values: low nibbles the first 32, high nibbles the rest.
                for c in 0..4 {
                    for l in 0..32 {
                        out.push((q(c * 64 + l)? & 15) | ((q(c * 64 + 32 + l)? & 15) << 4));
                    }
                }
            } else {
                for j in 0..16 {
                    out.push((p.sc[j] | (p.m[j] << 4)) as u8);
                }
                // Two chunks of 128 values: byte l holds values s·32 + l at bits 2s.
                for c in 0..2 {
                    for l in 0..32 {
                        let mut b = 0u8;
                        for s in 0..4 {
                            b |= q(c * 128 + s * 32 + l)? << (2 * s);
                        }
                        out.push(b);
                    }
                }
                out.extend(d);
                out.extend(dmin);
            }
        }
    }
    Ok(out)
}

/// f32 values (whole 32-blocks) as Q8_0 by ggml's own rounding (`quantize_row_q8_0_ref`:
/// d = max|x|/127, q = round(x/d)) — an adapter's factors, not a grid's codes.
pub(super) fn q8_0_of_f32(v: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() / 32 * 34);
    for b in v.chunks_exact(32) {
        let amax = b.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend(f16::from_f32(d).to_le_bytes());
        out.extend(b.iter().map(|&x| (x * id).round() as i8 as u8));
    }
    out
}

/// A 32-block's qs: byte j holds the low four bits of value j (low nibble) and of value j + 16
/// (high nibble) — Q4_0, Q4_1, Q5_0, Q5_1 and IQ4_NL alike.
fn nibbles(u: &[u32; 32]) -> impl Iterator<Item = u8> + '_ {
    (0..16).map(|j| ((u[j] & 15) | ((u[j + 16] & 15) << 4)) as u8)
}

/// A 32-block's qh (Q5_0, Q5_1): bit j holds the fifth bit of value j.
fn fifth_bits(u: &[u32; 32]) -> u32 {
    (0..32).fold(0u32, |h, j| h | ((u[j] >> 4) & 1) << j)
}

/// Encode `m`'s backbone as `ty`, rows in `order`.
pub(super) fn encode(m: &CompressedMatrix, ty: GgmlType, order: &[usize]) -> Result<Vec<u8>> {
    let e = &m.entry;
    let (rows, cols) = (e.rows, e.cols);
    if matches!(
        ty,
        GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q2K | GgmlType::Q3K | GgmlType::Q6K
    ) {
        return encode_k(m, ty, order);
    }
    if ty == GgmlType::F32 {
        let v = m.backbone()?;
        let mut out = Vec::with_capacity(rows * cols * 4);
        for &r in order {
            out.extend(bytemuck::cast_slice(&v[r * cols..(r + 1) * cols]));
        }
        return Ok(out);
    }
    let grid = e.grid()?;
    let codes = m.data.codes(rows, cols, e.bits);
    let (scales, zeros) = m.data.scales_zeros(&grid, rows, cols);
    let groups = grid.groups(cols);
    let g = grid.group_len(cols);
    let maxq = grid.maxq() as i32;
    let bad = |msg: String| Error::Shape(format!("{}: {msg}", m.weight));
    if matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1) {
        if grid.kind != GridKind::Affine {
            return Err(bad(format!("{} holds only affine grids", ty.name())));
        }
        let mut out = Vec::with_capacity(rows * ty.row_bytes(cols).unwrap_or(0));
        for &r in order {
            for b in 0..cols / 32 {
                let gi = r * groups + (b * 32) / g;
                let mut u = [0u32; 32];
                for (k, x) in u.iter_mut().enumerate() {
                    *x = codes[r * cols + b * 32 + k]
                        .ok_or_else(|| bad("a pruned weight has no affine level".into()))?;
                }
                // The stored f16 step and minimum, bits unchanged.
                out.extend(f16::from_f32(scales[gi]).to_le_bytes());
                out.extend(f16::from_f32(zeros[gi]).to_le_bytes());
                if ty == GgmlType::Q5_1 {
                    out.extend(fifth_bits(&u).to_le_bytes());
                } else if let Some(x) = u.iter().find(|&&x| x > 15) {
                    return Err(bad(format!("code {x} does not fit Q4_1")));
                }
                out.extend(nibbles(&u));
            }
        }
        return Ok(out);
    }
    let mut out = Vec::with_capacity(rows * ty.row_bytes(cols).unwrap_or(0));
    let mut q = [0i32; 32];
    for &r in order {
        for b in 0..cols / 32 {
            let gi = r * groups + (b * 32) / g;
            let (s, z) = (scales[gi], zeros[gi]);
            let d = ggml_level(grid.kind, 0, s, z, maxq).1;
            let dh = f16::from_f32(d);
            if dh.to_f32() != d {
                return Err(bad(format!("scale {s} has no exact f16 block scale")));
            }
            for (k, x) in q.iter_mut().enumerate() {
                *x = match codes[r * cols + b * 32 + k] {
                    None => 0,
                    Some(c) => ggml_level(grid.kind, c, s, z, maxq).0,
                };
            }
            out.extend(dh.to_le_bytes());
            match ty {
                GgmlType::Q8_0 => out.extend(q.iter().map(|&x| x as i8 as u8)),
                GgmlType::Q4_0 => {
                    if let Some(x) = q.iter().find(|&&x| !(-8..=7).contains(&x)) {
                        return Err(bad(format!("value {x} does not fit Q4_0")));
                    }
                    out.extend(nibbles(&q.map(|x| (x + 8) as u32)));
                }
                // qh bit j: the fifth bit of value j; qs as Q4_0's nibbles of the low four.
                GgmlType::Q5_0 => {
                    if let Some(x) = q.iter().find(|&&x| !(-16..=15).contains(&x)) {
                        return Err(bad(format!("value {x} does not fit Q5_0")));
                    }
                    let u = q.map(|x| (x + 16) as u32);
                    out.extend(fifth_bits(&u).to_le_bytes());
                    out.extend(nibbles(&u));
                }
                // Codebook indices, packed as Q4_0's nibbles (a pruned weight has none: the
                // grid never prunes).
                GgmlType::Iq4Nl => {
                    if grid.kind != GridKind::Iq4nl
                        || codes[r * cols + b * 32..][..32].contains(&None)
                    {
                        return Err(bad("IQ4_NL holds only iq4nl codes".into()));
                    }
                    out.extend(nibbles(&q.map(|x| x as u32)));
                }
                _ => unreachable!("float types return above"),
            }
        }
    }
    Ok(out)
}
