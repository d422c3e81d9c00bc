//! Choosing one option per decoder layer under a size budget, from a measurement file.
//!
//! Rules:
//! - `uniform`: the same option everywhere — the largest that fits.
//! - `lsaq` (LSAQ's rule): layers in descending importance each take the largest option that
//!   still leaves every later layer its cheapest one; the most important layers get the most
//!   precision the budget allows.
//! - `luc` (Edge-LLM's rule, its quantization half): layers whose measured sensitivity (KL of
//!   the cheapest option) is above the mean get the higher of two options, the rest the lower;
//!   of all option pairs whose assignment fits, the one spending the most bits.
//! - `optimal`: minimize the summed measured KL subject to the budget, exactly: a dynamic
//!   program over layers that keeps the Pareto front of (bits, KL) partial assignments (a
//!   partial assignment dominated in both is dropped; nothing is discretized).
//!
//! Predicted KL of an allocation = Σ over layers of the KL measured with only that layer
//! compressed with its option (additivity is the model; `compress` reports the measured KL).

use serde::Serialize;

use crate::error::{Error, Result};

use super::measurement::Measurement;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Rule {
    Uniform,
    Lsaq,
    Luc,
    Optimal,
}

impl Rule {
    pub fn name(self) -> &'static str {
        match self {
            Rule::Uniform => "uniform",
            Rule::Lsaq => "lsaq",
            Rule::Luc => "luc",
            Rule::Optimal => "optimal",
        }
    }
}

/// The chosen option per layer.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Allocation {
    pub rule: Rule,
    /// Option index (into the measurement's options) per layer.
    pub choice: Vec<usize>,
    /// Stored bits of all linear layers.
    pub bits: u64,
    /// Budget the allocation had to meet.
    pub budget_bits: u64,
    /// Σ of the measured per-layer KLs of the chosen options.
    pub predicted_kl: f64,
}

fn bits(m: &Measurement, l: usize, o: usize) -> u64 {
    m.layers[l].sensitivity[o].bits
}

fn kl(m: &Measurement, l: usize, o: usize) -> f64 {
    m.layers[l].sensitivity[o].kl
}

/// The fewest linear bits any allocation needs (every layer at its cheapest option).
pub fn min_bits(m: &Measurement) -> u64 {
    (0..m.layers.len())
        .map(|l| {
            (0..m.options.len())
                .map(|o| bits(m, l, o))
                .min()
                .unwrap_or(0)
        })
        .sum()
}

fn finish(m: &Measurement, rule: Rule, choice: Vec<usize>, budget_bits: u64) -> Allocation {
    let b = choice.iter().enumerate().map(|(l, &o)| bits(m, l, o)).sum();
    let k = choice.iter().enumerate().map(|(l, &o)| kl(m, l, o)).sum();
    Allocation {
        rule,
        choice,
        bits: b,
        budget_bits,
        predicted_kl: k,
    }
}

/// Choose options for every layer of `m` within `budget_bits` (stored bits of the linears).
pub fn allocate(m: &Measurement, rule: Rule, budget_bits: u64) -> Result<Allocation> {
    let (nl, no) = (m.layers.len(), m.options.len());
    if no == 0 || nl == 0 {
        return Err(Error::InvalidArgument(
            "the measurement has no measured options (run `pumice importance` without --no-sensitivity)".into(),
        ));
    }
    let need = min_bits(m);
    if need > budget_bits {
        return Err(Error::InvalidArgument(format!(
            "the budget allows {budget_bits} bits of linear weights, but the cheapest measured option needs {need} ({:.3} bits per parameter)",
            need as f64 / (m.layer_params.max(1) * nl as u64) as f64
        )));
    }
    let cheapest: Vec<usize> = (0..nl)
        .map(|l| {
            (0..no)
                .min_by_key(|&o| (bits(m, l, o), o))
                .expect("options")
        })
        .collect();
    let choice = match rule {
        Rule::Uniform => {
            let fits = |o: usize| (0..nl).map(|l| bits(m, l, o)).sum::<u64>() <= budget_bits;
            let best = (0..no).filter(|&o| fits(o)).max_by_key(|&o| {
                (
                    (0..nl).map(|l| bits(m, l, o)).sum::<u64>(),
                    std::cmp::Reverse(o),
                )
            });
            match best {
                Some(o) => vec![o; nl],
                None => {
                    return Err(Error::InvalidArgument(format!(
                        "no single option fits every layer within {budget_bits} bits; use --allocate optimal"
                    )))
                }
            }
        }
        Rule::Lsaq => {
            let mut order: Vec<usize> = (0..nl).collect();
            order.sort_by(|&a, &b| {
                m.layers[b]
                    .importance
                    .total_cmp(&m.layers[a].importance)
                    .then(a.cmp(&b))
            });
            let mut choice = cheapest.clone();
            let mut spent: u64 = cheapest
                .iter()
                .enumerate()
                .map(|(l, &o)| bits(m, l, o))
                .sum();
            for &l in &order {
                let base = bits(m, l, choice[l]);
                let best = (0..no)
                    .filter(|&o| spent - base + bits(m, l, o) <= budget_bits)
                    .max_by_key(|&o| (bits(m, l, o), std::cmp::Reverse(o)))
                    .expect("the current option fits");
                spent = spent - base + bits(m, l, best);
                choice[l] = best;
            }
            choice
        }
        Rule::Luc => {
            let sens: Vec<f64> = (0..nl).map(|l| kl(m, l, cheapest[l])).collect();
            let mean = sens.iter().sum::<f64>() / nl as f64;
            let mut best: Option<(u64, Vec<usize>)> = None;
            for lo in 0..no {
                for hi in 0..no {
                    let c: Vec<usize> = (0..nl)
                        .map(|l| if sens[l] > mean { hi } else { lo })
                        .collect();
                    if (0..nl).any(|l| bits(m, l, hi) < bits(m, l, lo)) {
                        continue;
                    }
                    let b: u64 = c.iter().enumerate().map(|(l, &o)| bits(m, l, o)).sum();
                    if b <= budget_bits && best.as_ref().is_none_or(|(bb, _)| b > *bb) {
                        best = Some((b, c));
                    }
                }
            }
            best.map(|(_, c)| c).unwrap_or(cheapest)
        }
        Rule::Optimal => optimal(m, budget_bits),
    };
    Ok(finish(m, rule, choice, budget_bits))
}

/// Edge-LLM's per-layer pruning sparsity around a mean `mean`: with ns_l the min–max
/// normalized sensitivity (KL of the layer's cheapest option), s_l ∝ 1 − ns_l, scaled so the
/// mean is `mean`, clamped to [0, 0.9]. The least sensitive layers are pruned the most.
pub fn luc_sparsities(m: &Measurement, mean: f64) -> Vec<f64> {
    let nl = m.layers.len();
    let no = m.options.len();
    let sens: Vec<f64> = (0..nl)
        .map(|l| {
            let o = (0..no).min_by_key(|&o| (bits(m, l, o), o)).unwrap_or(0);
            if no == 0 {
                0.0
            } else {
                kl(m, l, o)
            }
        })
        .collect();
    let (lo, hi) = sens
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
            (a.min(x), b.max(x))
        });
    let keep: Vec<f64> = sens
        .iter()
        .map(|&x| {
            if hi > lo {
                1.0 - (x - lo) / (hi - lo)
            } else {
                1.0
            }
        })
        .collect();
    let avg = keep.iter().sum::<f64>() / nl.max(1) as f64;
    keep.iter()
        .map(|&k| {
            if avg > 0.0 {
                (mean * k / avg).clamp(0.0, 0.9)
            } else {
                mean
            }
        })
        .collect()
}

/// Exact minimum of Σ KL under Σ bits ≤ budget: Pareto-front dynamic programming.
fn optimal(m: &Measurement, budget_bits: u64) -> Vec<usize> {
    let (nl, no) = (m.layers.len(), m.options.len());
    // Each state: (bits, kl, choices so far).
    let mut front: Vec<(u64, f64, Vec<usize>)> = vec![(0, 0.0, Vec::new())];
    for l in 0..nl {
        let mut next: Vec<(u64, f64, Vec<usize>)> = Vec::with_capacity(front.len() * no);
        for (b, k, c) in &front {
            for o in 0..no {
                let nb = b + bits(m, l, o);
                if nb <= budget_bits {
                    let mut nc = c.clone();
                    nc.push(o);
                    next.push((nb, k + kl(m, l, o), nc));
                }
            }
        }
        // Keep the Pareto front: sorted by bits, each kept state strictly lowers the KL.
        next.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)));
        let mut kept: Vec<(u64, f64, Vec<usize>)> = Vec::new();
        for s in next {
            if kept.last().is_none_or(|k| s.1 < k.1) {
                kept.push(s);
            }
        }
        front = kept;
    }
    front
        .into_iter()
        .min_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)))
        .map(|s| s.2)
        .expect("the cheapest assignment fits")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::measurement::{LayerImportanceRecord, MEASUREMENT_FORMAT};
    use crate::budget::sensitivity::OptionResult;
    use crate::model::compressed::CalibInfo;

    fn measurement(kls: &[[f64; 3]], importance: &[f64]) -> Measurement {
        let opts = ["a", "b", "c"];
        let bits = [200u64, 250, 300];
        Measurement {
            format: MEASUREMENT_FORMAT.into(),
            format_version: 1,
            model: "m".into(),
            top_k: 10,
            calibration: CalibInfo {
                kind: "self".into(),
                files: vec![],
                samples: 1,
                len: 1,
                seed: 0,
                tokens: 1,
            },
            options: opts.iter().map(|s| s.to_string()).collect(),
            rht: true,
            layer_params: 100,
            layers: kls
                .iter()
                .zip(importance)
                .enumerate()
                .map(|(l, (k, &imp))| LayerImportanceRecord {
                    layer: l,
                    jaccard: 1.0 - imp,
                    importance: imp,
                    sensitivity: (0..3)
                        .map(|o| OptionResult {
                            option: opts[o].into(),
                            bits: bits[o],
                            kl: k[o],
                            relative_error: 0.0,
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    /// Brute force over every assignment.
    fn brute(m: &Measurement, budget: u64) -> f64 {
        let nl = m.layers.len();
        let mut best = f64::INFINITY;
        for code in 0..3usize.pow(nl as u32) {
            let c: Vec<usize> = (0..nl).map(|l| code / 3usize.pow(l as u32) % 3).collect();
            let a = finish(m, Rule::Optimal, c, budget);
            if a.bits <= budget {
                best = best.min(a.predicted_kl);
            }
        }
        best
    }

    #[test]
    fn optimal_is_exact_and_no_worse_than_the_rules() {
        let mut seed = 7u64;
        let mut rnd = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 11) as f64 / (1u64 << 53) as f64
        };
        for _ in 0..50 {
            let nl = 6;
            let kls: Vec<[f64; 3]> = (0..nl)
                .map(|_| {
                    let s = rnd();
                    [s, s * (0.2 + 0.5 * rnd()), s * 0.1 * rnd()]
                })
                .collect();
            let imp: Vec<f64> = (0..nl).map(|_| rnd()).collect();
            let m = measurement(&kls, &imp);
            for budget in [1200u64, 1300, 1500, 1650, 1800, 5000] {
                let opt = allocate(&m, Rule::Optimal, budget).unwrap();
                assert!(opt.bits <= budget);
                assert!((opt.predicted_kl - brute(&m, budget)).abs() < 1e-12);
                for rule in [Rule::Lsaq, Rule::Luc] {
                    let a = allocate(&m, rule, budget).unwrap();
                    assert!(a.bits <= budget, "{rule:?}");
                    assert!(opt.predicted_kl <= a.predicted_kl + 1e-12, "{rule:?}");
                }
                if let Ok(u) = allocate(&m, Rule::Uniform, budget) {
                    assert!(u.bits <= budget);
                    assert!(opt.predicted_kl <= u.predicted_kl + 1e-12);
                }
            }
        }
    }

    #[test]
    fn rules_follow_their_definitions() {
        // Layer 2 most important, layer 0 most sensitive.
        let m = measurement(
            &[[0.9, 0.5, 0.1], [0.1, 0.05, 0.01], [0.2, 0.1, 0.02]],
            &[0.1, 0.2, 0.9],
        );
        // Budget for one upgrade to the top option.
        let l = allocate(&m, Rule::Lsaq, 700).unwrap();
        assert_eq!(l.choice, vec![0, 0, 2]);
        let u = allocate(&m, Rule::Uniform, 800).unwrap();
        assert_eq!(u.choice, vec![1, 1, 1]);
        let c = allocate(&m, Rule::Luc, 700).unwrap();
        assert_eq!(c.choice, vec![2, 0, 0]);
        let o = allocate(&m, Rule::Optimal, 700).unwrap();
        assert_eq!(o.choice, vec![2, 0, 0]);
        let e = allocate(&m, Rule::Optimal, 500).unwrap_err().to_string();
        assert!(e.contains("600"), "{e}");
        // LUC pruning: the most sensitive layer (0) is pruned least, the mean is kept.
        let s = luc_sparsities(&m, 0.3);
        assert!(s[0] < s[2] && s[2] <= s[1], "{s:?}");
        assert!((s.iter().sum::<f64>() / 3.0 - 0.3).abs() < 1e-12);
        assert_eq!(s[0], 0.0);
    }
}

/// What the allocation must fit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Budget {
    /// Bits per parameter of the compressed linear layers (everything stored counted).
    Bpw(f64),
    /// Bytes of the compressed weights file (model.safetensors, header included).
    MaxSize(u64),
    /// Bytes of weights (the weights file) plus the KV cache for `context` tokens at batch 1
    /// (keys and values of every layer, f32 as pumice keeps them).
    Memory { bytes: u64, context: usize },
}

/// KV cache bytes for `context` tokens at batch 1.
pub fn kv_cache_bytes(ck: &crate::model::Checkpoint, context: usize) -> u64 {
    let c = ck.config();
    2 * c.num_layers as u64 * context as u64 * (c.num_kv_heads * c.head_dim) as u64 * 4
}

/// Bytes of the weights file that are not linear-layer codes: the tensors stored as in the
/// source (embeddings, norms, LM head, biases) plus a bound on the safetensors header
/// (≤ 256 bytes per stored tensor name and shape, ≤ 7 stored tensors per linear layer).
pub fn fixed_bytes(ck: &crate::model::Checkpoint) -> Result<u64> {
    let arch = ck.arch();
    let linear: std::collections::HashSet<&str> = arch
        .layers
        .iter()
        .flat_map(|l| &l.linears)
        .map(|l| l.weight.name.as_str())
        .collect();
    let mut plain = 0u64;
    let mut entries = 0u64;
    for t in arch.tensors() {
        if linear.contains(t.name.as_str()) {
            entries += 7;
        } else {
            plain += ck.tensor(&t.name)?.bytes.len() as u64;
            entries += 1;
        }
    }
    Ok(plain + 256 * entries + 4096)
}

/// The budget in stored bits of the linear layers; an impossible one is an error naming the
/// smallest feasible budget, given the fewest bits any allocation needs (`need_bits`).
pub fn linear_budget_bits(
    ck: &crate::model::Checkpoint,
    budget: Budget,
    need_bits: u64,
) -> Result<u64> {
    let linear_params: u64 = ck
        .arch()
        .layers
        .iter()
        .flat_map(|l| &l.linears)
        .map(|l| (l.in_features * l.out_features) as u64)
        .sum();
    let fixed = fixed_bytes(ck)?;
    let need_bytes = need_bits.div_ceil(8) + fixed;
    let bits = match budget {
        Budget::Bpw(b) => {
            let bits = (b * linear_params as f64).floor() as u64;
            if bits < need_bits {
                return Err(Error::InvalidArgument(format!(
                    "--target-bpw {b}: the smallest feasible target is {:.3} bits per parameter",
                    need_bits as f64 / linear_params as f64
                )));
            }
            bits
        }
        Budget::MaxSize(bytes) => {
            if bytes < need_bytes {
                return Err(Error::InvalidArgument(format!(
                    "--max-size {bytes}: the smallest feasible size is {need_bytes} bytes"
                )));
            }
            (bytes - fixed) * 8
        }
        Budget::Memory { bytes, context } => {
            let kv = kv_cache_bytes(ck, context);
            if bytes < need_bytes + kv {
                return Err(Error::InvalidArgument(format!(
                    "--memory-budget {bytes}: the smallest feasible budget is {} bytes (weights {need_bytes} + KV cache {kv} for {context} tokens)",
                    need_bytes + kv
                )));
            }
            (bytes - kv - fixed) * 8
        }
    };
    Ok(bits)
}
