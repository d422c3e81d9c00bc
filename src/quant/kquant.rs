//! ggml's k-quant super-block grids as a pumice grid (`GridKind::K`, the type chosen by the
//! code bits): rows are cut into super-blocks of [`SUPER`] = 256 columns with an f16 scale d,
//! and into sub-blocks (16 columns; 32 for Q4_K and Q5_K) with integer scales sc of `sbits` bits.
//!
//! *With a minimum* (Q2_K: 2 bits, 4-bit sc and m; Q4_K: 4 bits and Q5_K: 5 bits, 6-bit sc and
//! m): each super-block also
//! has an f16 minimum scale dmin and each sub-block an integer minimum m; a code q of sub-block
//! j dequantizes to a·q − b with a = f32(d·sc_j), b = f32(dmin·m_j), in that order of f32
//! operations — ggml's own (`dequantize_row_q4_K`) and gguf-py's.
//!
//! *Symmetric* (Q3_K: 3 bits, 6-bit signed sc ∈ [−32, 31]; Q6_K: 6 bits, 8-bit signed sc ∈
//! [−128, 127]): a code q dequantizes to a·(q − z) with a = f32(d·sc_j) and z = 2^(bits−1).
//! Per sub-block the signed scale maps the largest-magnitude value to code 0 (s_j = e·(−1/z),
//! with the clip search over shrink factors), then d = f16(S·(−1/|sc_min|)) for the s_j of
//! largest magnitude S (so it becomes sc = sc_min) and sc_j = round(s_j/d) clamped (±1 at least
//! where s_j ≠ 0); a code is clamp(round(x/a + z), 0, maxq), z where a = 0.
//!
//! The super-block's parameters are fixed when GPTQ reaches it, from its (error-updated)
//! columns ([`KType::choose`]): per sub-block a continuous range (lo = min(min x, 0), hi =
//! max(max x, 0); with `clip`, the shrink factor 1 − t/20 with the least squared error, the first
//! on ties), s_j = (hi − lo)/maxq and m_j = −lo; then d = f16(max s_j / smax), dmin =
//! f16(max m_j / smax) (smax = 2^sbits − 1) and sc_j = round(s_j/d), m_j' = round(m_j/dmin)
//! clamped to [0, smax] (a sub-block whose range is not zero keeps sc ≥ 1). A code is
//! clamp(round((x + b)/a), 0, maxq), 0 where a = 0. shaders/quant/common.wgsl computes the same
//! in the same f32 operations.

use super::grid::{clip_factor, round_f16, CLIP_STEPS};

/// Columns per super-block.
pub const SUPER: usize = 256;

/// One of the k-quant types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KType {
    /// Bits per code.
    pub bits: u32,
    /// Columns per sub-block.
    pub sub: usize,
    /// Bits of each sub-block scale (and minimum).
    pub sbits: u32,
    /// With a minimum (value a·q − b) or symmetric (value a·(q − 2^(bits−1))).
    pub min: bool,
}

/// The parameters of one row's super-block.
#[derive(Clone, Debug, PartialEq)]
pub struct SuperParams {
    pub d: f32,
    pub dmin: f32,
    /// Per sub-block: integer scale and minimum.
    pub sc: Vec<u32>,
    pub m: Vec<u32>,
}

impl SuperParams {
    /// Effective (a, b) of sub-block j for type k: (d·sc, dmin·m), or the symmetric family's
    /// (d·(sc + sc_min), zero).
    pub fn effective_for(&self, k: KType, j: usize) -> (f32, f32) {
        if k.min {
            self.effective(j)
        } else {
            (self.d * (self.sc[j] as f32 + k.sc_min()), k.zero())
        }
    }

    /// As [`KType::params_len`] f32 values: d, dmin, every sc, every m.
    pub fn flatten(&self) -> Vec<f32> {
        let mut v = vec![self.d, self.dmin];
        v.extend(self.sc.iter().map(|&s| s as f32));
        v.extend(self.m.iter().map(|&m| m as f32));
        v
    }

    /// From the values [`SuperParams::flatten`] wrote.
    pub fn unflatten(v: &[f32]) -> SuperParams {
        let s = (v.len() - 2) / 2;
        SuperParams {
            d: v[0],
            dmin: v[1],
            sc: v[2..2 + s].iter().map(|&x| x as u32).collect(),
            m: v[2 + s..2 + 2 * s].iter().map(|&x| x as u32).collect(),
        }
    }

    /// Effective (a, b) of sub-block j: value = a·q − b.
    pub fn effective(&self, j: usize) -> (f32, f32) {
        (self.d * self.sc[j] as f32, self.dmin * self.m[j] as f32)
    }
}

impl KType {
    /// The k-quant type of `bits`-bit codes (2: Q2_K, 3: Q3_K, 4: Q4_K, 5: Q5_K, 6: Q6_K).
    pub fn of_bits(bits: u32) -> Option<KType> {
        let (sub, sbits, min) = match bits {
            2 => (16, 4, true),
            3 => (16, 6, false),
            4 | 5 => (32, 6, true),
            6 => (16, 8, false),
            _ => return None,
        };
        Some(KType {
            bits,
            sub,
            sbits,
            min,
        })
    }

    /// The symmetric family's implied zero 2^(bits−1) (0 with a minimum).
    pub fn zero(&self) -> f32 {
        if self.min {
            0.0
        } else {
            (1u32 << (self.bits - 1)) as f32
        }
    }

    /// The symmetric family's most negative sub-block scale (−32 or −128), as f32.
    fn sc_min(&self) -> f32 {
        -((1u32 << (self.sbits - 1)) as f32)
    }

    /// The f32 values the GPU takes for this type: kind flags in the order of
    /// shaders/quant/common.wgsl's k_super (min, zero, smax or −sc_min).
    pub fn smax_f32(&self) -> f32 {
        if self.min {
            self.smax() as f32
        } else {
            -self.sc_min()
        }
    }

    pub fn maxq(&self) -> u32 {
        (1 << self.bits) - 1
    }

    pub fn smax(&self) -> u32 {
        (1 << self.sbits) - 1
    }

    /// f32 values recording one super-block's parameters (d, dmin, sc and m per sub-block).
    pub fn params_len(&self) -> usize {
        2 + 2 * self.subs()
    }

    /// Sub-blocks per super-block.
    pub fn subs(&self) -> usize {
        SUPER / self.sub
    }

    /// f16 super-scales per super-block: d and dmin, or d.
    pub fn supers_f16(&self) -> usize {
        if self.min {
            2
        } else {
            1
        }
    }

    /// Integer fields per sub-block: sc and m, or sc.
    pub fn fields(&self) -> usize {
        self.supers_f16()
    }

    /// Stored bits per super-block of one row: codes, the f16 super-scales, the sub-block
    /// fields (Q4_K: 1024 + 32 + 96 = 1152, 4.5 bits per weight; Q5_K 1408; Q3_K 880; Q6_K 1680; Q2_K
    /// 672 — ggml's block sizes).
    pub fn bits_per_super(&self) -> u64 {
        SUPER as u64 * self.bits as u64
            + 16 * self.supers_f16() as u64
            + (self.fields() * self.subs()) as u64 * self.sbits as u64
    }

    /// The code of x in a sub-block with effective (a, b) (b: the minimum, or the zero).
    #[inline]
    pub fn code(&self, x: f32, a: f32, b: f32) -> u32 {
        if !self.min {
            if a == 0.0 {
                return b as u32;
            }
            return (x / a + b).round().clamp(0.0, self.maxq() as f32) as u32;
        }
        if a == 0.0 {
            return 0;
        }
        ((x + b) / a).round().clamp(0.0, self.maxq() as f32) as u32
    }

    /// The value of code q in a sub-block with effective (a, b).
    #[inline]
    pub fn value(&self, q: u32, a: f32, b: f32) -> f32 {
        if self.min {
            a * q as f32 - b
        } else {
            a * (q as f32 - b)
        }
    }

    /// The continuous (s, m) of one sub-block's values (module docs); the symmetric family's
    /// signed s and its zero.
    fn sub_range(&self, x: &[f32], clip: bool) -> (f32, f32) {
        let (mut lo, mut hi) = (0.0f32, 0.0f32);
        for &v in x {
            lo = lo.min(v);
            hi = hi.max(v);
        }
        let maxq = self.maxq() as f32;
        let steps = if clip { CLIP_STEPS } else { 1 };
        let mut best = (f32::INFINITY, (0.0, 0.0));
        let e = if -lo >= hi { lo } else { hi };
        for t in 0..steps {
            let f = clip_factor(t);
            let (s, m) = if self.min {
                let (l, h) = (lo * f, hi * f);
                ((h - l) / maxq, -l)
            } else {
                // −1/z is a power of two: exact.
                (e * f * (-1.0 / self.zero()), self.zero())
            };
            let mut err = 0.0f32;
            for &v in x {
                let d = v - self.value(self.code(v, s, m), s, m);
                err += d * d;
            }
            if err < best.0 {
                best = (err, (s, m));
            }
        }
        best.1
    }

    /// The parameters of one row's super-block from its values (module docs). The symmetric
    /// family's sc are stored offset by −sc_min (unsigned), dmin and m are 0.
    pub fn choose(&self, x: &[f32], clip: bool) -> SuperParams {
        let ranges: Vec<(f32, f32)> = x
            .chunks(self.sub)
            .map(|c| self.sub_range(c, clip))
            .collect();
        if !self.min {
            let mut big = 0.0f32;
            for &(s, _) in &ranges {
                if s.abs() > big.abs() {
                    big = s;
                }
            }
            let lo = self.sc_min();
            // −1/|sc_min| is a power of two: exact.
            let d = round_f16((big * (1.0 / lo)).clamp(-65504.0, 65504.0));
            let sc = ranges
                .iter()
                .map(|&(s, _)| {
                    let mut q = if d != 0.0 {
                        (s / d).round().clamp(lo, -lo - 1.0)
                    } else {
                        0.0
                    };
                    if q == 0.0 && s != 0.0 && d != 0.0 {
                        q = if (s < 0.0) == (d < 0.0) { 1.0 } else { -1.0 };
                    }
                    (q - lo) as u32
                })
                .collect();
            return SuperParams {
                d,
                dmin: 0.0,
                sc,
                m: vec![0; ranges.len()],
            };
        }
        let smax = self.smax() as f32;
        let (mut smx, mut mmx) = (0.0f32, 0.0f32);
        for &(s, m) in &ranges {
            smx = smx.max(s);
            mmx = mmx.max(m);
        }
        let d = round_f16(smx / smax);
        let dmin = round_f16(mmx / smax);
        let mut sc = Vec::with_capacity(ranges.len());
        let mut mm = Vec::with_capacity(ranges.len());
        for &(s, m) in &ranges {
            let mut q = if d > 0.0 {
                (s / d).round().clamp(0.0, smax)
            } else {
                0.0
            };
            if q == 0.0 && s > 0.0 && d > 0.0 {
                q = 1.0;
            }
            sc.push(q as u32);
            mm.push(if dmin > 0.0 {
                (m / dmin).round().clamp(0.0, smax) as u32
            } else {
                0
            });
        }
        SuperParams { d, dmin, sc, m: mm }
    }
}

/// The stored form of a rows × cols matrix's parameters (`kparams` as [`SuperParams::flatten`]
/// per row and super-block): (d, dmin) per row and super-block, and per row the bit stream of
/// (sc, m) per sub-block in `sbits`-bit fields.
pub fn pack_stored(k: KType, kparams: &[f32], rows: usize, cols: usize) -> (Vec<f32>, Vec<u32>) {
    let nsb = cols / SUPER;
    let mut dd = Vec::with_capacity(rows * nsb * 2);
    let mut words = Vec::new();
    let mut fields = Vec::with_capacity(2 * nsb * k.subs());
    for r in 0..rows {
        fields.clear();
        for sb in 0..nsb {
            let base = (r * nsb + sb) * k.params_len();
            let p = SuperParams::unflatten(&kparams[base..base + k.params_len()]);
            dd.push(p.d);
            if k.min {
                dd.push(p.dmin);
            }
            for j in 0..k.subs() {
                fields.push(p.sc[j]);
                if k.min {
                    fields.push(p.m[j]);
                }
            }
        }
        super::grid::pack_row(&fields, k.sbits, &mut words);
    }
    (dd, words)
}

/// Each row's super-block parameters from the stored form ([`pack_stored`]).
pub fn unpack_stored(
    k: KType,
    dd: &[f32],
    words: &[u32],
    rows: usize,
    cols: usize,
) -> Vec<SuperParams> {
    let nsb = cols / SUPER;
    let (nf, nd) = (k.fields(), k.supers_f16());
    let per_row = super::grid::packed_words(nf * nsb * k.subs(), k.sbits);
    let mut out = Vec::with_capacity(rows * nsb);
    for r in 0..rows {
        let row = &words[r * per_row..(r + 1) * per_row];
        for sb in 0..nsb {
            let f = |i: usize| super::grid::unpack(row, i, k.sbits);
            let first = sb * nf * k.subs();
            let at = (r * nsb + sb) * nd;
            out.push(SuperParams {
                d: dd[at],
                dmin: if k.min { dd[at + 1] } else { 0.0 },
                sc: (0..k.subs()).map(|j| f(first + nf * j)).collect(),
                m: (0..k.subs())
                    .map(|j| if k.min { f(first + nf * j + 1) } else { 0 })
                    .collect(),
            });
        }
    }
    out
}

/// Effective (a, b) per row and sub-block (rows × cols/sub each) from the stored form.
pub fn effective_stored(
    k: KType,
    dd: &[f32],
    words: &[u32],
    rows: usize,
    cols: usize,
) -> (Vec<f32>, Vec<f32>) {
    let mut a = Vec::with_capacity(rows * cols / k.sub);
    let mut b = Vec::with_capacity(rows * cols / k.sub);
    for p in unpack_stored(k, dd, words, rows, cols) {
        for j in 0..k.subs() {
            let (x, y) = p.effective_for(k, j);
            a.push(x);
            b.push(y);
        }
    }
    (a, b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_k_parameters_reproduce_a_super_block() {
        let k = KType::of_bits(4).unwrap();
        assert_eq!(k.bits_per_super(), 1152);
        let x = crate::quant::test_values(SUPER, 3);
        let p = k.choose(&x, true);
        assert_eq!(p.sc.len(), 8);
        assert!(p.sc.iter().chain(&p.m).all(|&v| v <= 63));
        assert_eq!(p.d, round_f16(p.d));
        let mut err = 0.0f64;
        let mut norm = 0.0f64;
        for (j, c) in x.chunks(32).enumerate() {
            let (a, b) = p.effective_for(k, j);
            for &v in c {
                let q = k.code(v, a, b);
                err += ((v - k.value(q, a, b)) as f64).powi(2);
                norm += (v as f64).powi(2);
            }
        }
        // 4 bits on uniform values: close to the step²/12 of 16 levels.
        assert!(err / norm < 0.01, "{}", err / norm);
        // The stored form round-trips.
        let flat = p.flatten();
        let (dd, words) = pack_stored(k, &flat, 1, SUPER);
        assert_eq!(unpack_stored(k, &dd, &words, 1, SUPER), vec![p.clone()]);
        // The symmetric family: Q3_K and Q6_K.
        for bits in [3, 6] {
            let k = KType::of_bits(bits).unwrap();
            let p = k.choose(&x, true);
            let lo = -k.sc_min() as u32;
            // The sub-block of largest scale is at the most negative integer scale.
            assert!(p.sc.contains(&0), "{bits}: {:?}", p.sc);
            assert!(p.sc.iter().all(|&s| s < 2 * lo));
            let (mut err, mut norm) = (0.0f64, 0.0f64);
            for (j, c) in x.chunks(16).enumerate() {
                let (a, z) = p.effective_for(k, j);
                assert_eq!(z, k.zero());
                for &v in c {
                    err += ((v - k.value(k.code(v, a, z), a, z)) as f64).powi(2);
                    norm += (v as f64).powi(2);
                }
            }
            let bound = if bits == 3 { 0.05 } else { 0.002 };
            assert!(err / norm < bound, "{bits}: {}", err / norm);
            let (dd, words) = pack_stored(k, &p.flatten(), 1, SUPER);
            assert_eq!(dd.len(), 1);
            assert_eq!(unpack_stored(k, &dd, &words, 1, SUPER), vec![p]);
        }
        assert_eq!(KType::of_bits(3).unwrap().bits_per_super(), 880);
        assert_eq!(KType::of_bits(6).unwrap().bits_per_super(), 1680);
        assert_eq!(KType::of_bits(2).unwrap().bits_per_super(), 672);
        // All zeros: every value is exactly 0.
        let p = k.choose(&[0.0; SUPER], true);
        let (a, b) = p.effective_for(k, 0);
        assert_eq!(k.value(k.code(0.0, a, b), a, b), 0.0);
    }
}
