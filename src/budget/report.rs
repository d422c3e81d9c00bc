//! The allocation report: a per-layer table and a plot (`report.svg`), from a compressed
//! checkpoint's manifest.

use crate::model::compressed::Manifest;

/// One layer's row.
#[derive(Clone, Debug, PartialEq)]
pub struct ReportRow {
    pub layer: usize,
    pub importance: f64,
    pub option: String,
    pub bits_per_parameter: f64,
    pub rank: usize,
    /// Pruned fraction (LUC with --sparsity), 0 when dense.
    pub sparsity: f64,
    pub predicted_kl: f64,
    /// Mean relative weighted error of the layer's matrices, as compressed.
    pub relative_error: f64,
    /// (option, measured KL) for every measured option.
    pub sensitivity: Vec<(String, f64)>,
}

/// Rows of the allocation recorded in `m` (None when it has none).
pub fn rows(m: &Manifest) -> Option<Vec<ReportRow>> {
    let a = m.allocation.as_ref()?;
    let layers = a.get("layers")?.as_array()?;
    let mut out = Vec::new();
    for v in layers {
        let l = v.get("layer")?.as_u64()? as usize;
        let prefix = format!("model.layers.{l}.");
        let in_layer = || m.tensors.iter().filter(|(n, _)| n.starts_with(&prefix));
        let rank = in_layer().map(|(_, e)| e.rank).max().unwrap_or(0);
        let errs: Vec<f64> = in_layer().filter_map(|(_, e)| e.relative_error).collect();
        let sensitivity = v
            .get("sensitivity")?
            .as_object()?
            .iter()
            .filter_map(|(k, x)| Some((k.clone(), x.as_f64()?)))
            .collect();
        out.push(ReportRow {
            layer: l,
            importance: v.get("importance")?.as_f64()?,
            option: v.get("option")?.as_str()?.to_string(),
            bits_per_parameter: v.get("bits_per_parameter")?.as_f64()?,
            rank,
            sparsity: v.get("sparsity").and_then(|x| x.as_f64()).unwrap_or(0.0),
            predicted_kl: v.get("predicted_kl")?.as_f64()?,
            relative_error: errs.iter().sum::<f64>() / errs.len().max(1) as f64,
            sensitivity,
        });
    }
    Some(out)
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// An SVG plot of the allocation: per layer, the chosen bits per parameter (bars, labelled with
/// the option and rank) above, importance (line) and the chosen option's measured KL (bars,
/// relative to the largest) below.
pub fn svg(rows: &[ReportRow], title: &str) -> String {
    let n = rows.len().max(1);
    let (left, step, top) = (70.0, 64.0, 40.0);
    let width = left + step * n as f64 + 30.0;
    let (h1, h2, gap) = (200.0, 150.0, 70.0);
    let height = top + h1 + gap + h2 + 50.0;
    let max_bits = rows
        .iter()
        .map(|r| r.bits_per_parameter)
        .fold(0.0f64, f64::max)
        .max(1.0)
        .ceil();
    let max_kl = rows
        .iter()
        .map(|r| r.predicted_kl)
        .fold(0.0f64, f64::max)
        .max(1e-12);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width:.0}\" height=\"{height:.0}\" font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{left}\" y=\"20\" font-size=\"14\">{}</text>\n",
        esc(title)
    );
    // Panel 1: bits per parameter.
    let y0 = top + h1;
    s += &format!(
        "<line x1=\"{left}\" y1=\"{y0}\" x2=\"{:.0}\" y2=\"{y0}\" stroke=\"black\"/>\n",
        width - 20.0
    );
    s +=
        &format!("<line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{y0}\" stroke=\"black\"/>\n");
    for t in 0..=(max_bits as usize) {
        let y = y0 - h1 * t as f64 / max_bits;
        s += &format!(
            "<text x=\"{:.0}\" y=\"{:.1}\" text-anchor=\"end\">{t}</text>\n",
            left - 6.0,
            y + 4.0
        );
    }
    s += &format!(
        "<text x=\"14\" y=\"{:.0}\" transform=\"rotate(-90 14 {:.0})\" text-anchor=\"middle\">bits / parameter</text>\n",
        top + h1 / 2.0,
        top + h1 / 2.0
    );
    for (i, r) in rows.iter().enumerate() {
        let x = left + step * i as f64 + 10.0;
        let bh = h1 * r.bits_per_parameter / max_bits;
        s += &format!(
            "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{bh:.1}\" fill=\"#4878a8\"/>\n",
            y0 - bh,
            step - 20.0
        );
        s += &format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{:.2}</text>\n",
            x + (step - 20.0) / 2.0,
            y0 - bh - 16.0,
            r.bits_per_parameter
        );
        s += &format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"9\">{}{}</text>\n",
            x + (step - 20.0) / 2.0,
            y0 - bh - 4.0,
            esc(&r.option),
            if r.rank > 0 {
                format!(" r{}", r.rank)
            } else if r.sparsity > 0.0 {
                format!(" s{:.2}", r.sparsity)
            } else {
                String::new()
            }
        );
    }
    // Panel 2: importance and measured KL.
    let p2 = y0 + gap;
    let y1 = p2 + h2;
    s += &format!(
        "<line x1=\"{left}\" y1=\"{y1}\" x2=\"{:.0}\" y2=\"{y1}\" stroke=\"black\"/>\n",
        width - 20.0
    );
    s += &format!("<line x1=\"{left}\" y1=\"{p2}\" x2=\"{left}\" y2=\"{y1}\" stroke=\"black\"/>\n");
    s += &format!(
        "<text x=\"{:.0}\" y=\"{:.1}\" text-anchor=\"end\">1</text>\n",
        left - 6.0,
        p2 + 4.0
    );
    s += &format!(
        "<text x=\"{:.0}\" y=\"{:.1}\" text-anchor=\"end\">0</text>\n",
        left - 6.0,
        y1 + 4.0
    );
    s += &format!(
        "<text x=\"{left}\" y=\"{:.0}\"><tspan fill=\"#c0504d\">■ measured KL of the chosen option (max {max_kl:.2e})</tspan>  <tspan fill=\"#2e7d32\">● importance (1 − top-k Jaccard)</tspan></text>\n",
        p2 - 10.0
    );
    let mut pts = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        let x = left + step * i as f64 + 10.0;
        let bh = h2 * r.predicted_kl / max_kl;
        s += &format!(
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{bh:.1}\" fill=\"#c0504d\" opacity=\"0.7\"/>\n",
            x + 8.0,
            y1 - bh,
            step - 36.0
        );
        let cx = x + (step - 20.0) / 2.0;
        let cy = y1 - h2 * r.importance.clamp(0.0, 1.0);
        pts.push(format!("{cx:.1},{cy:.1}"));
        s += &format!("<circle cx=\"{cx:.1}\" cy=\"{cy:.1}\" r=\"3.5\" fill=\"#2e7d32\"/>\n");
        s += &format!(
            "<text x=\"{cx:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n",
            y1 + 16.0,
            r.layer
        );
    }
    s += &format!(
        "<polyline points=\"{}\" fill=\"none\" stroke=\"#2e7d32\" stroke-width=\"1.5\"/>\n",
        pts.join(" ")
    );
    s += &format!(
        "<text x=\"{:.0}\" y=\"{:.0}\" text-anchor=\"middle\">decoder layer</text>\n</svg>\n",
        left + step * n as f64 / 2.0,
        y1 + 36.0
    );
    s
}
/// Write report.svg (the per-layer allocation) into a budgeted checkpoint `output`, titled
/// after `model`; returns its path and rows (empty when the manifest records no allocation).
pub fn write_allocation_report(
    model: &std::path::Path,
    output: &std::path::Path,
    linear_bits_per_parameter: f64,
) -> crate::Result<(std::path::PathBuf, Vec<ReportRow>)> {
    let m = Manifest::read(output)?;
    let rule = m
        .allocation
        .as_ref()
        .and_then(|v| v["rule"].as_str())
        .unwrap_or("?")
        .to_string();
    let rows = rows(&m).unwrap_or_default();
    let title = format!(
        "{}: {rule} allocation, {linear_bits_per_parameter:.3} bits/parameter in the linear layers",
        model.display(),
    );
    let svg = svg(&rows, &title);
    let path = output.join("report.svg");
    crate::base::atomic::write_atomic(&path, &[svg.as_bytes()])?;
    Ok((path, rows))
}
