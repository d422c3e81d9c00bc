//! Uniform quantization grids with per-group scales and zeros, stored in f16.
//!
//! Conventions: a group's range always includes 0 (xmin = min(min x, 0), xmax = max(max x, 0));
//! asymmetric grids have scale = (xmax − xmin)/maxq and an integer zero = round(−xmin/scale)
//! (GPTQ's quantizer: 0 is a level); symmetric grids are *midrise*: xmax = max(|xmin|, xmax),
//! scale = 2·xmax/maxq and zero = maxq/2, so the levels are ±scale/2, ±3·scale/2, … (no level at
//! 0, none wasted: for 2 bits {−1.5, −0.5, 0.5, 1.5}·scale) and only the scale is stored.
//! A code q ∈ [0, maxq] dequantizes to scale·(q − zero). The scale is rounded to f16 *before*
//! codes are chosen, so what is stored reproduces exactly what was optimized.
//!
//! With `clip`, the range is not simply min–max: the range is shrunk by each factor
//! 1 − t/20, t = 0..CLIP_STEPS, and the factor with the least squared error over the group is
//! kept (the first on ties), computed in f32 in column order exactly as the WGSL kernels do.
//! For 2-bit Gaussian weights this lowers the group's squared error by about a third.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A uniform grid configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grid {
    /// Bits per code: 2, 3, 4 or 8.
    pub bits: u32,
    /// Columns sharing one scale/zero; 0 means one per row (per channel).
    pub group_size: usize,
    pub symmetric: bool,
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
    pub fn new(bits: u32, group_size: usize, symmetric: bool) -> Result<Grid> {
        if !matches!(bits, 2 | 3 | 4 | 8) {
            return Err(Error::InvalidArgument(format!(
                "--bits {bits}: supported are 2, 3, 4 and 8"
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
            symmetric,
            clip: false,
        })
    }

    /// The same grid with the clip search switched on or off.
    pub fn with_clip(self, clip: bool) -> Grid {
        Grid { clip, ..self }
    }

    /// Zero point of symmetric (midrise) grids.
    pub fn symmetric_zero(&self) -> f32 {
        self.maxq() as f32 / 2.0
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
                let d = v - Grid::dequant(self.code(v, s, z), s, z);
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
        if self.symmetric {
            let m = hi.max(-lo);
            lo = -m;
            hi = m;
        }
        if lo == hi {
            lo = -1.0;
            hi = 1.0;
        }
        let scale = round_f16((hi - lo) / maxq).max(f16_min_positive());
        let zero = if self.symmetric {
            self.symmetric_zero()
        } else {
            (-lo / scale).round().clamp(0.0, maxq)
        };
        (scale, zero)
    }

    /// Code of `x` under (scale, zero).
    #[inline]
    pub fn code(&self, x: f32, scale: f32, zero: f32) -> u32 {
        ((x / scale) + zero).round().clamp(0.0, self.maxq() as f32) as u32
    }

    #[inline]
    pub fn dequant(q: u32, scale: f32, zero: f32) -> f32 {
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
        rows as u64 * (words * 32 + groups * 16 * if self.symmetric { 1 } else { 2 })
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
        let g = Grid::new(4, 0, false).unwrap();
        let vals = [-0.3f32, 0.1, 0.7, 0.25];
        let (s, z) = g.params(&vals);
        for &v in &vals {
            let d = Grid::dequant(g.code(v, s, z), s, z);
            // Rounding the zero to an integer can shift the grid by up to s/2.
            assert!((d - v).abs() <= s + 1e-6, "{v} -> {d}");
        }
        let gs = Grid::new(3, 0, true).unwrap();
        let (s, z) = gs.params(&vals);
        assert_eq!(z, 3.5);
        // Midrise: the extreme levels are ±max|x|.
        assert!((Grid::dequant(7, s, z) - 0.7).abs() < 1e-3);
        assert!((Grid::dequant(0, s, z) + 0.7).abs() < 1e-3);
        assert!(s > 0.0);
        assert!(Grid::new(5, 0, false).is_err());
        assert!(Grid::new(4, 100, false).is_err());
    }
}
