//! Uniform quantization grids with per-group scales and zeros, stored in f16.
//!
//! A code q ∈ [0, maxq] (maxq = 2^bits − 1) dequantizes to scale·(q − zero). Three kinds
//! ([`GridKind`]); a group's range always includes 0 (xmin = min(min x, 0), xmax = max(max x, 0)):
//! - *asymmetric*: scale = (xmax − xmin)/maxq and an integer zero = round(−xmin/scale), stored
//!   per group (GPTQ's quantizer: 0 is a level). Exactly compressed-tensors' and GPTQ's
//!   asymmetric grids.
//! - *midrise*: xmax = max(|xmin|, xmax), scale = 2·xmax/maxq and zero = maxq/2, so the levels
//!   are ±scale/2, ±3·scale/2, … (no level at 0, none wasted: for 2 bits
//!   {−1.5, −0.5, 0.5, 1.5}·scale); only the scale is stored. No other format holds it.
//! - *symmetric* (integer zero 2^(bits−1), implied): levels −2^(bits−1)·scale … (2^(bits−1) − 1)·
//!   scale, 0 among them. The scale is signed, as llama.cpp's Q4_0 chooses it: the group's value
//!   of largest magnitude, e, maps exactly to the extra level, scale = e / −2^(bits−1), so the
//!   side that holds e gets 2^(bits−1) levels. Exactly ggml's Q4_0 (4 bits, groups of 32) and
//!   Q8_0 (8 bits, groups of 32) and compressed-tensors' / GPTQ's symmetric grids.
//!
//! - *iq4nl*: ggml's IQ4_NL, a 4-bit non-uniform codebook: a code q dequantizes to
//!   scale·K[q] with K = [`IQ4NL_LEVELS`] (−127 … 113, denser near 0 where weights are). The
//!   scale is signed as the symmetric grid's: the largest-magnitude value e maps exactly to
//!   K[0] = −127, scale = e·(−1/127); a code is the level nearest to x (the first on ties,
//!   compared as |x − scale·K[q]| in f32). No zero is stored (its implied zero, 0, is unused).
//!   In groups of 32 it is exactly IQ4_NL.
//!
//! - *k*: ggml's k-quant super-block grids with a minimum, Q2_K (2 bits) and Q4_K (4 bits):
//!   see [`super::kquant`]. Its groups are the sub-blocks (16 or 32 columns) whose effective
//!   (scale, zero) are (a, b) with value a·q − b; their parameters are fixed a super-block of
//!   256 columns at a time ([`Grid::span`]).
//!
//! The scale is rounded to f16 *before* codes are chosen, so what is stored reproduces exactly
//! what was optimized.
//!
//! With `clip`, the range is not simply min–max: the range is shrunk by each factor
//! 1 − t/20, t = 0..CLIP_STEPS, and the factor with the least squared error over the group is
//! kept (the first on ties), computed in f32 in column order exactly as the WGSL kernels do.
//! For 2-bit Gaussian weights this lowers the group's squared error by about a third.

use serde::{Deserialize, Serialize};

use super::kquant::{KType, SUPER};
use crate::error::{Error, Result};

/// Where a grid's zero point lies (module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Hash)]
#[serde(rename_all = "lowercase")]
pub enum GridKind {
    /// Integer zero point per group, stored.
    Asymmetric,
    /// Zero maxq/2: no level at 0; implied.
    Midrise,
    /// Integer zero 2^(bits−1), signed scale; implied.
    Symmetric,
    /// ggml's IQ4_NL codebook (4 bits), signed scale; no zero.
    Iq4nl,
    /// ggml's k-quant super-blocks with a minimum (Q2_K, Q4_K).
    K,
    /// Affine: value d·q + m with an f16 step d and an f16 minimum m per group, stored (ggml's
    /// Q4_1 and Q5_1 in groups of 32).
    Affine,
}

/// IQ4_NL's 16 levels (ggml's `kvalues_iq4nl`): code q dequantizes to scale·IQ4NL_LEVELS[q].
pub const IQ4NL_LEVELS: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// −1/127 in f32: the iq4nl scale is e·IQ4NL_SCALE (the WGSL kernels take its bits).
pub const IQ4NL_SCALE: f32 = -1.0 / 127.0;

impl GridKind {
    pub const ALL: [GridKind; 6] = [
        GridKind::Asymmetric,
        GridKind::Midrise,
        GridKind::Symmetric,
        GridKind::Iq4nl,
        GridKind::K,
        GridKind::Affine,
    ];

    pub fn name(self) -> &'static str {
        match self {
            GridKind::Asymmetric => "asymmetric",
            GridKind::Midrise => "midrise",
            GridKind::Symmetric => "symmetric",
            GridKind::Iq4nl => "iq4nl",
            GridKind::K => "k",
            GridKind::Affine => "affine",
        }
    }

    pub fn parse(s: &str) -> Result<GridKind> {
        GridKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "--grid {s}: supported are asymmetric, midrise, symmetric, iq4nl, k and affine"
                ))
            })
    }

    /// The number the WGSL kernels take (`grid_params` in shaders/quant/common.wgsl).
    pub fn wgsl(self) -> u32 {
        match self {
            GridKind::Asymmetric => 0,
            GridKind::Midrise => 1,
            GridKind::Symmetric => 2,
            GridKind::Iq4nl => 3,
            GridKind::K => 4,
            GridKind::Affine => 6,
        }
    }
}

/// A uniform grid configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grid {
    /// Bits per code: 2, 3, 4 or 8.
    pub bits: u32,
    /// Columns sharing one scale/zero; 0 means one per row (per channel).
    pub group_size: usize,
    pub kind: GridKind,
    /// Choose each group's range by a least-squares search over shrink factors (see module
    /// docs); does not change what is stored, only which scale/zero.
    #[serde(default)]
    pub clip: bool,
}

/// Shrink factors tried by the clip search: 1 − t/20 for t < CLIP_STEPS (down to 0.55).
pub const CLIP_STEPS: u32 = 10;

/// The t-th shrink factor (t·0.05 computed as one correctly rounded f32 product, as in WGSL).
#[inline]
pub fn clip_factor(t: u32) -> f32 {
    (20 - t) as f32 * 0.05
}

impl Grid {
    pub fn new(bits: u32, group_size: usize, kind: GridKind) -> Result<Grid> {
        if kind == GridKind::K {
            let k = KType::of_bits(bits).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "--grid k: --bits 2 (Q2_K), 3 (Q3_K), 4 (Q4_K), 5 (Q5_K) or 6 (Q6_K), not {bits}"
                ))
            })?;
            if group_size != k.sub {
                return Err(Error::InvalidArgument(format!(
                    "--grid k --bits {bits}: its sub-blocks are {} columns (--group-size {})",
                    k.sub, k.sub
                )));
            }
            return Ok(Grid {
                bits,
                group_size,
                kind,
                clip: false,
            });
        }
        if !(2..=8).contains(&bits) {
            return Err(Error::InvalidArgument(format!(
                "--bits {bits}: supported are 2 to 8"
            )));
        }
        if kind == GridKind::Iq4nl && bits != 4 {
            return Err(Error::InvalidArgument(format!(
                "--grid iq4nl is a 4-bit codebook; --bits {bits} does not apply"
            )));
        }
        if group_size != 0 && !matches!(group_size, 32 | 64 | 128 | 256) {
            return Err(Error::InvalidArgument(format!(
                "--group-size {group_size}: supported are 32, 64, 128, 256 and 0 (per channel)"
            )));
        }
        Ok(Grid {
            bits,
            group_size,
            kind,
            clip: false,
        })
    }

    /// The same grid with the clip search switched on or off.
    pub fn with_clip(self, clip: bool) -> Grid {
        Grid { clip, ..self }
    }

    /// The zero point when the grid implies it (midrise, symmetric); None when each group
    /// stores its own (asymmetric).
    pub fn implied_zero(&self) -> Option<f32> {
        match self.kind {
            GridKind::Asymmetric | GridKind::Affine => None,
            GridKind::Midrise => Some(self.maxq() as f32 / 2.0),
            GridKind::Symmetric => Some((1u32 << (self.bits - 1)) as f32),
            GridKind::Iq4nl => Some(0.0),
            GridKind::K => None,
        }
    }

    /// The grid kind as the WGSL kernels number it (`GRID_*` in shaders/quant/common.wgsl):
    /// [`GridKind::wgsl`], with the symmetric k-quant family (Q3_K, Q6_K) as its own kind.
    pub fn wgsl_kind(&self) -> u32 {
        match self.ktype() {
            Some(k) if !k.min => 5,
            _ => self.kind.wgsl(),
        }
    }

    /// The k-quant type of a k grid.
    pub fn ktype(&self) -> Option<KType> {
        (self.kind == GridKind::K)
            .then(|| KType::of_bits(self.bits))
            .flatten()
    }

    /// The grid a matrix of `n` columns gets: a k grid falls back, on widths that are not
    /// whole super-blocks, to the iq4nl grid in groups of 32 (4.5 bits per weight, IQ4_NL in
    /// GGUF — what llama.cpp falls back to for Q2_K and Q3_K), Q5_K to the symmetric 5-bit grid
    /// in groups of 32 (Q5_0, 5.5 bits; llama.cpp takes Q5_1, 6), Q6_K to the symmetric 8-bit
    /// grid in groups of 32 (Q8_0, as llama.cpp); any other grid is itself.
    pub fn for_cols(&self, n: usize) -> Grid {
        if self.kind != GridKind::K || n.is_multiple_of(SUPER) {
            return *self;
        }
        let (bits, kind) = match self.bits {
            6 => (8, GridKind::Symmetric),
            5 => (5, GridKind::Symmetric),
            _ => (4, GridKind::Iq4nl),
        };
        Grid {
            bits,
            group_size: 32,
            kind,
            clip: self.clip,
        }
    }

    /// Columns whose group parameters are fixed together: a k grid's super-block, otherwise
    /// one group.
    pub fn span(&self, n: usize) -> usize {
        if self.kind == GridKind::K {
            SUPER
        } else {
            self.group_len(n)
        }
    }

    /// Whether zero points are stored per group (a k grid stores its minimums otherwise).
    pub fn stores_zeros(&self) -> bool {
        self.implied_zero().is_none() && self.kind != GridKind::K
    }

    pub fn maxq(&self) -> u32 {
        (1u32 << self.bits) - 1
    }

    /// Effective group length for rows of `n` columns.
    pub fn group_len(&self, n: usize) -> usize {
        if self.group_size == 0 {
            n.max(1)
        } else {
            self.group_size
        }
    }

    pub fn groups(&self, n: usize) -> usize {
        n.div_ceil(self.group_len(n))
    }

    /// Scale and zero for a group of values: min–max, or the clip search when `clip` is set.
    pub fn params(&self, values: &[f32]) -> (f32, f32) {
        let (mut lo, mut hi) = (0.0f32, 0.0f32);
        for &v in values {
            lo = lo.min(v);
            hi = hi.max(v);
        }
        if !self.clip {
            return self.range_params(lo, hi);
        }
        let mut best = (f32::INFINITY, (0.0, 0.0));
        for t in 0..CLIP_STEPS {
            let f = clip_factor(t);
            let (s, z) = self.range_params(lo * f, hi * f);
            let mut err = 0.0f32;
            for &v in values {
                let d = v - self.value(self.code(v, s, z), s, z);
                err += d * d;
            }
            if err < best.0 {
                best = (err, (s, z));
            }
        }
        best.1
    }

    /// Scale and zero for the range [lo, hi] (widened to include 0).
    pub fn range_params(&self, lo: f32, hi: f32) -> (f32, f32) {
        let (mut lo, mut hi) = (lo.min(0.0), hi.max(0.0));
        let maxq = self.maxq() as f32;
        if self.kind == GridKind::Symmetric {
            // The value of largest magnitude (the negative one on ties) maps to code 0.
            let half = (1u32 << (self.bits - 1)) as f32;
            let mut e = if -lo >= hi { lo } else { hi };
            if e == 0.0 {
                e = -1.0;
            }
            // Multiplying by the power of two −1/half is exact (WGSL's division need not be).
            return (round_f16_signed(e * (-1.0 / half)), half);
        }
        if self.kind == GridKind::Iq4nl {
            let mut e = if -lo >= hi { lo } else { hi };
            if e == 0.0 {
                e = -1.0;
            }
            return (round_f16_signed(e * IQ4NL_SCALE), 0.0);
        }
        if self.kind == GridKind::Midrise {
            let m = hi.max(-lo);
            lo = -m;
            hi = m;
        }
        if lo == hi {
            lo = -1.0;
            hi = 1.0;
        }
        let scale = round_f16((hi - lo) / maxq).max(f16_min_positive());
        if self.kind == GridKind::Affine {
            // The minimum itself, in f16 (ggml's Q4_1/Q5_1 m).
            return (scale, round_f16(lo));
        }
        let zero = if let Some(z) = self.implied_zero() {
            z
        } else {
            (-lo / scale).round().clamp(0.0, maxq)
        };
        (scale, zero)
    }

    /// Code of `x` under (scale, zero).
    #[inline]
    pub fn code(&self, x: f32, scale: f32, zero: f32) -> u32 {
        if let Some(k) = self.ktype() {
            return k.code(x, scale, zero);
        }
        if self.kind == GridKind::Iq4nl {
            let mut best = (f32::INFINITY, 0);
            for (q, &k) in IQ4NL_LEVELS.iter().enumerate() {
                let d = (x - scale * k as f32).abs();
                if d < best.0 {
                    best = (d, q as u32);
                }
            }
            return best.1;
        }
        if self.kind == GridKind::Affine {
            return ((x - zero) / scale).round().clamp(0.0, self.maxq() as f32) as u32;
        }
        ((x / scale) + zero).round().clamp(0.0, self.maxq() as f32) as u32
    }

    /// The value code `q` dequantizes to under (scale, zero).
    #[inline]
    pub fn value(&self, q: u32, scale: f32, zero: f32) -> f32 {
        if self.kind == GridKind::K {
            return KType::of_bits(self.bits).map_or(0.0, |k| k.value(q, scale, zero));
        }
        if self.kind == GridKind::Iq4nl {
            return scale * IQ4NL_LEVELS[q as usize & 15] as f32;
        }
        if self.kind == GridKind::Affine {
            return scale * q as f32 + zero;
        }
        scale * (q as f32 - zero)
    }
}

/// Round to the nearest f16 value (what the checkpoint stores).
pub fn round_f16(x: f32) -> f32 {
    half::f16::from_f32(x).to_f32()
}

fn f16_min_positive() -> f32 {
    half::f16::MIN_POSITIVE_SUBNORMAL.to_f32()
}

/// Round to the nearest f16, keeping the sign and at least the smallest subnormal magnitude
/// and at most f16's largest (a symmetric grid's signed scale).
pub fn round_f16_signed(x: f32) -> f32 {
    let m = round_f16(x.abs().min(65504.0)).max(f16_min_positive());
    if x < 0.0 {
        -m
    } else {
        m
    }
}

/// Pack `codes` (each < 2^bits) of one row into a little-endian bit stream of u32 words.
pub fn pack_row(codes: &[u32], bits: u32, out: &mut Vec<u32>) {
    let words = (codes.len() * bits as usize).div_ceil(32);
    let start = out.len();
    out.resize(start + words, 0);
    let dst = &mut out[start..];
    for (i, &c) in codes.iter().enumerate() {
        let bit = i * bits as usize;
        let (w, o) = (bit / 32, (bit % 32) as u32);
        dst[w] |= c << o;
        if o + bits > 32 {
            dst[w + 1] |= c >> (32 - o);
        }
    }
}

impl Grid {
    /// Bits stored for a rows × cols matrix on this grid: codes in whole u32 words per row,
    /// an f16 scale per group and, for asymmetric grids, an f16 zero per group.
    pub fn stored_bits(&self, rows: usize, cols: usize) -> u64 {
        if rows == 0 {
            return 0;
        }
        let words = packed_words(cols, self.bits) as u64;
        let groups = self.groups(cols) as u64;
        if let Some(k) = self.ktype() {
            // Codes, (d, dmin) or d f16 per super-block, (sc, m) or sc packed per sub-block.
            let supers = cols.div_ceil(SUPER) as u64;
            let sub = packed_words(k.fields() * self.groups(cols), k.sbits) as u64;
            return rows as u64 * (words * 32 + supers * 16 * k.supers_f16() as u64 + sub * 32);
        }
        rows as u64 * (words * 32 + groups * 16 * if self.stores_zeros() { 2 } else { 1 })
    }
}

/// Words per packed row of `n` codes.
pub fn packed_words(n: usize, bits: u32) -> usize {
    (n * bits as usize).div_ceil(32)
}

/// Unpack code `i` of a packed row.
#[inline]
pub fn unpack(row: &[u32], i: usize, bits: u32) -> u32 {
    let bit = i * bits as usize;
    let (w, o) = (bit / 32, (bit % 32) as u32);
    let mask = (1u32 << bits) - 1;
    let mut v = row[w] >> o;
    if o + bits > 32 {
        v |= row[w + 1] << (32 - o);
    }
    v & mask
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_roundtrip_all_widths() {
        for bits in [2u32, 3, 4, 8] {
            let codes: Vec<u32> = (0..77u32)
                .map(|i| ((i * 2654435761u32) >> 7) & ((1 << bits) - 1))
                .collect();
            let mut packed = Vec::new();
            pack_row(&codes, bits, &mut packed);
            assert_eq!(packed.len(), packed_words(77, bits));
            for (i, &c) in codes.iter().enumerate() {
                assert_eq!(unpack(&packed, i, bits), c, "bits {bits} i {i}");
            }
        }
    }

    #[test]
    fn grid_params_cover_the_range() {
        let g = Grid::new(4, 0, GridKind::Asymmetric).unwrap();
        let vals = [-0.3f32, 0.1, 0.7, 0.25];
        let (s, z) = g.params(&vals);
        for &v in &vals {
            let d = g.value(g.code(v, s, z), s, z);
            // Rounding the zero to an integer can shift the grid by up to s/2.
            assert!((d - v).abs() <= s + 1e-6, "{v} -> {d}");
        }
        let gs = Grid::new(3, 0, GridKind::Midrise).unwrap();
        let (s, z) = gs.params(&vals);
        assert_eq!(z, 3.5);
        // Midrise: the extreme levels are ±max|x|.
        assert!((gs.value(7, s, z) - 0.7).abs() < 1e-3);
        assert!((gs.value(0, s, z) + 0.7).abs() < 1e-3);
        assert!(s > 0.0);
        assert!(Grid::new(9, 0, GridKind::Asymmetric).is_err());
        assert!(Grid::new(1, 0, GridKind::Asymmetric).is_err());
        assert!(Grid::new(5, 0, GridKind::Asymmetric).is_ok());
        assert!(Grid::new(4, 100, GridKind::Asymmetric).is_err());
    }

    #[test]
    fn symmetric_grid_is_q4_0s() {
        let g = Grid::new(4, 0, GridKind::Symmetric).unwrap();
        // The largest magnitude is negative: positive scale, −0.8 is the extra level (code 0).
        let vals = [-0.8f32, 0.1, 0.7, 0.25];
        let (s, z) = g.params(&vals);
        assert_eq!(z, 8.0);
        assert_eq!(s, round_f16(0.1));
        assert_eq!(g.code(-0.8, s, z), 0);
        assert_eq!(g.code(0.7, s, z), 15);
        assert_eq!(g.value(8, s, z), 0.0);
        // Largest magnitude positive: the scale is negative and 0.9 is code 0.
        let (s, z) = g.params(&[0.9f32, -0.3, 0.0]);
        assert_eq!(s, round_f16(-0.9 / 8.0));
        assert_eq!(g.code(0.9, s, z), 0);
        assert!((g.value(0, s, z) - 0.9).abs() < 1e-3);
        // All zeros: a finite scale, every code the zero level.
        let (s, z) = g.params(&[0.0f32; 5]);
        assert!(s.is_finite() && s != 0.0);
        assert_eq!(g.code(0.0, s, z), 8);
        assert!(!g.stores_zeros());
        assert_eq!(g.stored_bits(3, 64), 3 * (8 * 32 + 16));
    }

    #[test]
    fn iq4nl_grid_is_ggmls_codebook() {
        let g = Grid::new(4, 32, GridKind::Iq4nl).unwrap();
        assert!(Grid::new(3, 32, GridKind::Iq4nl).is_err());
        // −1/127 as the nearest f32.
        assert_eq!(IQ4NL_SCALE, (-1.0f64 / 127.0) as f32);
        let vals = [-0.5f32, 0.02, 0.3, -0.1];
        let (s, z) = g.params(&vals);
        assert_eq!(s, round_f16(0.5 * (1.0 / 127.0)));
        assert_eq!(g.code(-0.5, s, z), 0);
        assert!((g.value(0, s, z) + 0.5).abs() < 1e-3);
        // Every code's level is its own nearest.
        for q in 0..16 {
            assert_eq!(g.code(g.value(q, s, z), s, z), q);
        }
        // Between two levels, the nearer; a positive extreme gives a negative scale.
        let (s, z) = g.params(&[0.9f32, -0.2]);
        assert!(s < 0.0);
        assert_eq!(g.code(0.9, s, z), 0);
        let mid = 0.5 * (g.value(8, s, z) + g.value(9, s, z));
        assert_eq!(g.code(mid * 0.99 + g.value(8, s, z) * 0.01, s, z), 8);
        assert!(!g.stores_zeros());
    }

    #[test]
    fn affine_grid_is_q4_1s() {
        let g = Grid::new(4, 32, GridKind::Affine).unwrap();
        // Step (hi − lo)/15 and the minimum itself, both f16.
        let vals = [-0.3f32, 0.1, 0.9, 0.25];
        let (d, m) = g.params(&vals);
        assert_eq!(d, round_f16(1.2 / 15.0));
        assert_eq!(m, round_f16(-0.3));
        assert_eq!(g.code(-0.3, d, m), 0);
        assert_eq!(g.code(0.9, d, m), 15);
        // value d·q + m, the code the nearest level.
        for q in 0..16 {
            assert_eq!(g.value(q, d, m), d * q as f32 + m);
            assert_eq!(g.code(g.value(q, d, m), d, m), q);
        }
        for &v in &vals {
            assert!((g.value(g.code(v, d, m), d, m) - v).abs() <= 0.5 * d + 1e-3);
        }
        // A minimum that no integer zero point reproduces: −0.3 is not a multiple of d.
        assert!((m / d).fract().abs() > 1e-3);
        // Stored: codes, an f16 step and an f16 minimum per group (Q4_1's 5 bits per weight).
        assert!(g.stores_zeros());
        assert_eq!(g.stored_bits(2, 64), 2 * (8 * 32 + 2 * 2 * 16));
        assert_eq!(GridKind::parse("affine").unwrap(), GridKind::Affine);
    }
}
