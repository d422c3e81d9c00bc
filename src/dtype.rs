//! Element types of stored tensors.

use std::fmt;

/// Floating-point storage types pumice reads and uploads. Compute is always f32 (or wider on the
/// host); 16-bit types are converted on the fly inside kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// The safetensors spelling (`F32`, `F16`, `BF16`).
    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
        }
    }

    /// Parse a safetensors dtype string. Returns `None` for types pumice cannot use as weights.
    pub fn from_safetensors(s: &str) -> Option<DType> {
        match s {
            "F32" => Some(DType::F32),
            "F16" => Some(DType::F16),
            "BF16" => Some(DType::BF16),
            _ => None,
        }
    }

    /// Parse the torch spelling used by config.json (`float32`, `bfloat16`, ...).
    pub fn from_torch(s: &str) -> Option<DType> {
        match s.trim_start_matches("torch.") {
            "float32" | "float" | "fp32" => Some(DType::F32),
            "float16" | "half" | "fp16" => Some(DType::F16),
            "bfloat16" | "bf16" => Some(DType::BF16),
            _ => None,
        }
    }

    /// Decode little-endian raw bytes of this type into f32 values.
    ///
    /// `bytes.len()` must be a multiple of [`DType::size`]; a trailing partial element is ignored.
    pub fn decode_f32(self, bytes: &[u8], out: &mut Vec<f32>) {
        out.reserve(bytes.len() / self.size());
        match self {
            DType::F32 => out.extend(
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            ),
            DType::F16 => out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()),
            ),
            DType::BF16 => out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()),
            ),
        }
    }

    /// Encode f32 values as little-endian bytes of this type (round to nearest even).
    pub fn encode_f32(self, values: &[f32]) -> Vec<u8> {
        let mut out = Vec::with_capacity(values.len() * self.size());
        match self {
            DType::F32 => values
                .iter()
                .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            DType::F16 => values
                .iter()
                .for_each(|v| out.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes())),
            DType::BF16 => values
                .iter()
                .for_each(|v| out.extend_from_slice(&half::bf16::from_f32(*v).to_le_bytes())),
        }
        out
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_each_dtype() {
        let vals = [0.0f32, 1.0, -2.5, 65504.0, 1.0e-3];
        for dt in [DType::F32, DType::F16, DType::BF16] {
            let bytes = dt.encode_f32(&vals);
            assert_eq!(bytes.len(), vals.len() * dt.size());
            let mut back = Vec::new();
            dt.decode_f32(&bytes, &mut back);
            for (a, b) in vals.iter().zip(&back) {
                let tol = match dt {
                    DType::F32 => 0.0,
                    DType::F16 => 1e-3 * a.abs(),
                    DType::BF16 => 8e-3 * a.abs(),
                };
                assert!((a - b).abs() <= tol, "{dt}: {a} vs {b}");
            }
        }
        assert_eq!(DType::from_torch("torch.bfloat16"), Some(DType::BF16));
        assert_eq!(DType::from_safetensors("I64"), None);
    }
}
