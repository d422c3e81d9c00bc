//! The per-layer options an allocation chooses from, by name:
//! `caldera-B` (CALDERA, Q 2-bit midrise g64, rank from a budget of B bits per weight),
//! `gptq-BITS-gG` and `rtn-BITS-gG` (asymmetric grid, groups of G; `g0` per row), and pruned
//! GPTQ `gptq-BITS-gG-s24` (2:4) or `gptq-BITS-gG-sP` (a fraction P of every row pruned), and
//! GPTQ on a ggml type's own grid, `gptq-TYPE` with TYPE one of q2_k, q3_k, q4_k, q5_k, q6_k
//! (the k grid; its fallback on widths that are not whole super-blocks), iq4_nl, q4_0, q4_1,
//! q5_0, q5_1, q8_0, and CALDERA with Q on such a grid and a fixed rank, `caldera-TYPE-rRANK` — so an
//! allocation over them is a measured per-layer mix of llama.cpp types (what its _S/_M/_L
//! presets choose by hand). Every grid uses the clip search; incoherence processing follows the
//! run's `--rht`.

use serde::{Deserialize, Serialize};

use crate::compress::pipeline::{CalderaSettings, LayerRecipe, Method};
use crate::error::{Error, Result};
use crate::quant::sparsity::Sparsity;
use crate::quant::{Grid, GridKind};

/// One option, as parsed from its name.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Candidate {
    pub name: String,
}

/// The options measured when none are named: CALDERA at three budgets and GPTQ at 3 and 4
/// bits, spanning about 2.25 to 4.3 bits per weight.
pub const DEFAULT_CANDIDATES: &str = "caldera-2.25,caldera-2.5,caldera-3.0,gptq-3-g128,gptq-4-g128";

impl Candidate {
    pub fn parse(name: &str) -> Result<Candidate> {
        let c = Candidate {
            name: name.trim().to_string(),
        };
        c.recipe(&CalderaSettings::default())?;
        Ok(c)
    }

    /// Parse a comma-separated list.
    pub fn parse_list(s: &str) -> Result<Vec<Candidate>> {
        let v: Vec<Candidate> = s
            .split(',')
            .filter(|t| !t.trim().is_empty())
            .map(Candidate::parse)
            .collect::<Result<_>>()?;
        if v.is_empty() {
            return Err(Error::InvalidArgument("no options given".into()));
        }
        Ok(v)
    }

    /// The recipe this option stands for; `base` supplies CALDERA's factor grid and iterations.
    pub fn recipe(&self, base: &CalderaSettings) -> Result<LayerRecipe> {
        let bad = || {
            Error::InvalidArgument(format!(
                "option `{}`: expected caldera-BPW, gptq-BITS-gGROUP, rtn-BITS-gGROUP, \
                 gptq-TYPE or caldera-TYPE-rRANK (TYPE: q2_k, q3_k, q4_k, q5_k, q6_k, iq4_nl, \
                 q4_0, q4_1, q5_0, q5_1, q8_0)",
                self.name
            ))
        };
        let parts: Vec<&str> = self.name.split('-').collect();
        match parts.as_slice() {
            ["caldera", bpw] => {
                let b: f64 = bpw.parse().map_err(|_| bad())?;
                if !(b > 2.0 && b <= 16.0) {
                    return Err(bad());
                }
                Ok(LayerRecipe {
                    method: Method::Caldera,
                    grid: Grid::new(2, 64, GridKind::Midrise)?.with_clip(true),
                    caldera: CalderaSettings {
                        target_bpw: b,
                        rank: None,
                        ..base.clone()
                    },
                    sparsity: Sparsity::Dense,
                })
            }
            // CALDERA with Q on a ggml type's grid and a fixed rank (`caldera-q2_k-r8`).
            ["caldera", ty, r] if ggml_grid(ty).is_some() => {
                let rank: usize = r
                    .strip_prefix('r')
                    .ok_or_else(bad)?
                    .parse()
                    .map_err(|_| bad())?;
                if rank == 0 {
                    return Err(bad());
                }
                Ok(LayerRecipe {
                    method: Method::Caldera,
                    grid: ggml_grid(ty).ok_or_else(bad)??.with_clip(true),
                    caldera: CalderaSettings {
                        rank: Some(rank),
                        ..base.clone()
                    },
                    sparsity: Sparsity::Dense,
                })
            }
            [m @ ("gptq" | "rtn"), ty] if ggml_grid(ty).is_some() => Ok(LayerRecipe {
                method: if *m == "gptq" {
                    Method::Gptq
                } else {
                    Method::Rtn
                },
                grid: ggml_grid(ty).ok_or_else(bad)??.with_clip(true),
                caldera: base.clone(),
                sparsity: Sparsity::Dense,
            }),
            [m @ ("gptq" | "rtn"), bits, g, rest @ ..] if rest.len() <= 1 => {
                let bits: u32 = bits.parse().map_err(|_| bad())?;
                let g: usize = g
                    .strip_prefix('g')
                    .ok_or_else(bad)?
                    .parse()
                    .map_err(|_| bad())?;
                let sparsity = match rest.first() {
                    None => Sparsity::Dense,
                    Some(&"s24") if *m == "gptq" => Sparsity::TwoFour,
                    Some(s) if *m == "gptq" => {
                        Sparsity::parse(s.strip_prefix('s').ok_or_else(bad)?).map_err(|_| bad())?
                    }
                    Some(_) => return Err(bad()),
                };
                Ok(LayerRecipe {
                    method: if *m == "gptq" {
                        Method::Gptq
                    } else {
                        Method::Rtn
                    },
                    grid: Grid::new(bits, g, GridKind::Asymmetric)?.with_clip(true),
                    caldera: base.clone(),
                    sparsity,
                })
            }
            _ => Err(bad()),
        }
    }
}

/// The grid of a ggml type's name.
fn ggml_grid(ty: &str) -> Option<Result<Grid>> {
    let (bits, g, kind) = match ty {
        "q2_k" => (2, 16, GridKind::K),
        "q3_k" => (3, 16, GridKind::K),
        "q4_k" => (4, 32, GridKind::K),
        "q5_k" => (5, 32, GridKind::K),
        "q6_k" => (6, 16, GridKind::K),
        "iq4_nl" => (4, 32, GridKind::Iq4nl),
        "q4_0" => (4, 32, GridKind::Symmetric),
        "q5_0" => (5, 32, GridKind::Symmetric),
        "q4_1" => (4, 32, GridKind::Affine),
        "q5_1" => (5, 32, GridKind::Affine),
        "q8_0" => (8, 32, GridKind::Symmetric),
        _ => return None,
    };
    Some(Grid::new(bits, g, kind))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse() {
        let v = Candidate::parse_list(DEFAULT_CANDIDATES).unwrap();
        assert_eq!(v.len(), 5);
        let r = v[1].recipe(&CalderaSettings::default()).unwrap();
        assert_eq!(r.method, Method::Caldera);
        assert_eq!(r.caldera.target_bpw, 2.5);
        let r = v[3].recipe(&CalderaSettings::default()).unwrap();
        assert_eq!(
            (r.method, r.grid.bits, r.grid.group_size),
            (Method::Gptq, 3, 128)
        );
        let r = Candidate::parse("gptq-q4_k")
            .unwrap()
            .recipe(&CalderaSettings::default())
            .unwrap();
        assert_eq!(
            (r.grid.kind, r.grid.bits, r.grid.group_size),
            (GridKind::K, 4, 32)
        );
        let r = Candidate::parse("caldera-q2_k-r8")
            .unwrap()
            .recipe(&CalderaSettings::default())
            .unwrap();
        assert_eq!(
            (r.method, r.grid.kind, r.grid.bits, r.caldera.rank),
            (Method::Caldera, GridKind::K, 2, Some(8))
        );
        let r = Candidate::parse("gptq-q8_0")
            .unwrap()
            .recipe(&CalderaSettings::default())
            .unwrap();
        assert_eq!(r.grid.kind, GridKind::Symmetric);
        let r = Candidate::parse("gptq-4-g128-s24")
            .unwrap()
            .recipe(&CalderaSettings::default())
            .unwrap();
        assert_eq!(r.sparsity, Sparsity::TwoFour);
        let r = Candidate::parse("gptq-4-g128-s0.5")
            .unwrap()
            .recipe(&CalderaSettings::default())
            .unwrap();
        assert_eq!(r.sparsity, Sparsity::Unstructured(0.5));
        for bad in [
            "rtn-4-g128-s24",
            "gptq-4-g128-s2",
            "gptq-4-g128-s24-x",
            "caldera",
            "caldera-x",
            "caldera-q2_k-r0",
            "caldera-q2_k-8",
            "caldera-q9_k-r8",
            "caldera-1.5",
            "gptq-3",
            "gptq-9-g128",
            "gptq-3-128",
            "awq-4-g128",
            "",
        ] {
            assert!(Candidate::parse_list(bad).is_err(), "{bad}");
        }
    }
}
