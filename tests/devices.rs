//! Several adapters at once (`compress --devices`): layers from saved Hessians spread over
//! lavapipe (Vulkan) and llvmpipe (GL) side by side, each layer equal byte for byte to the
//! run of the adapter that computed it; without saved Hessians a group's matrices spread; a
//! layer that fails on one adapter goes to another; refusals before any GPU work.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::{asset, json_summary, run, stderr};
use pumice::compress::calib::CalibOptions;
use pumice::compress::pipeline::{compress, compress_on, CalibSource, CompressOptions, Method};
use pumice::gpu::{Gpu, GpuOptions};
use pumice::quant::{GptqOptions, Grid, GridKind};

/// Saved Hessians of the asset model from a small calibration text (`shape`: samples and
/// length), with `extra` arguments; `name` is the output's name in `dir`.
fn save_hessians_with(
    dir: &Path,
    name: &str,
    shape: [&str; 2],
    extra: &[&str],
) -> (PathBuf, serde_json::Value) {
    let calib = dir.join("calib.txt");
    let text = "It was a bright cold day in April, and the clocks were striking thirteen. \
                Call me Ishmael. Some years ago, never mind how long precisely, having little \
                or no money in my purse, I thought I would sail about a little. ";
    std::fs::write(&calib, text.repeat(60)).unwrap();
    let h = dir.join(name);
    let shape = ["--calib-samples", shape[0], "--calib-len", shape[1]];
    let o = run(&[
        &[
            "hessians",
            asset().to_str().unwrap(),
            "-o",
            h.to_str().unwrap(),
            "--calib",
            calib.to_str().unwrap(),
        ][..],
        &shape,
        extra,
    ]
    .concat());
    assert!(o.status.success(), "{}", stderr(&o));
    (h, json_summary(&o.stdout))
}

fn save_hessians(dir: &Path) -> PathBuf {
    save_hessians_with(dir, "hessians", ["16", "128"], &[]).0
}

/// Every tensor of a safetensors file, as (dtype, shape, bytes), by name.
fn tensors(path: &Path) -> BTreeMap<String, (String, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| {
            (
                n,
                (
                    format!("{:?}", v.dtype()),
                    v.shape().to_vec(),
                    v.data().to_vec(),
                ),
            )
        })
        .collect()
}

/// The decoder layer a tensor belongs to (`model.layers.N.…`).
fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("model.layers.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

#[test]
fn two_adapters_split_the_layers_and_each_equals_its_adapters_own_run() {
    let d = tempfile::tempdir().unwrap();
    let h = save_hessians(d.path());
    let m = asset();
    let m = m.to_str().unwrap();
    // CALDERA with its low-rank products on the GPU: the result depends on the adapter (each
    // tunes its own GEMM blocks, so sums run in another order), which makes "computed by which
    // adapter" visible in the bytes. (On CPU adapters `auto` computes them on the host, the
    // same on both.)
    let common = [
        "--hessians",
        h.to_str().unwrap(),
        "--method",
        "caldera",
        "--lowrank-on",
        "gpu",
        "--outer-iters",
        "2",
        "--eval-samples",
        "0",
        "--backend",
        "all",
    ];
    let out = |name: &str| d.path().join(name);
    let both = out("both");
    let o = run(&[
        &[
            "compress",
            m,
            "-o",
            both.to_str().unwrap(),
            "--devices",
            "all",
        ][..],
        &common,
    ]
    .concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let summary = json_summary(&o.stdout);
    let devices = summary["devices"].as_array().unwrap();
    assert_eq!(
        devices.len(),
        2,
        "--devices all on a machine without a GPU takes lavapipe and llvmpipe-GL (install \
         mesa-vulkan-drivers and libegl-mesa0): {summary}"
    );
    // Every layer once, by one adapter; the manifest records the same assignment.
    let mut by_layer: BTreeMap<usize, String> = BTreeMap::new();
    for dev in devices {
        let name = dev["adapter"].as_str().unwrap().to_string();
        for l in dev["layers"].as_array().unwrap() {
            let prev = by_layer.insert(l.as_u64().unwrap() as usize, name.clone());
            assert!(prev.is_none(), "layer {l} computed twice: {summary}");
        }
    }
    assert_eq!(
        by_layer.keys().copied().collect::<Vec<_>>(),
        (0..6).collect::<Vec<_>>()
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(both.join("pumice.json")).unwrap()).unwrap();
    for rep in manifest["layers"].as_array().unwrap() {
        let l = rep["layer"].as_u64().unwrap() as usize;
        assert_eq!(rep["device"].as_str(), Some(by_layer[&l].as_str()), "{rep}");
    }

    // One run per adapter, alone.
    let mut alone = BTreeMap::new();
    for (i, dev) in devices.iter().enumerate() {
        let dir = out(&format!("alone{i}"));
        let o = run(&[
            &[
                "compress",
                m,
                "-o",
                dir.to_str().unwrap(),
                "--adapter",
                &i.to_string(),
            ][..],
            &common,
        ]
        .concat());
        assert!(o.status.success(), "{}", stderr(&o));
        let s = json_summary(&o.stdout);
        assert_eq!(s["devices"][0]["adapter"], dev["adapter"], "{s}");
        alone.insert(
            dev["adapter"].as_str().unwrap().to_string(),
            tensors(&dir.join("model.safetensors")),
        );
    }
    let got = tensors(&both.join("model.safetensors"));
    let first = alone.values().next().unwrap();
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        first.keys().collect::<Vec<_>>()
    );
    for (name, t) in &got {
        let want = match layer_of(name) {
            Some(l) => &alone[&by_layer[&l]][name],
            None => &first[name],
        };
        assert!(
            t == want,
            "{name} differs from the run of {} alone",
            layer_of(name).map_or("the first adapter", |l| by_layer[&l].as_str())
        );
    }
}

fn gptq_opts(out: &Path, hessians: &Path) -> CompressOptions {
    CompressOptions {
        layers: Vec::new(),
        allocation: None,
        sparsity: Default::default(),
        method: Method::Gptq,
        grid: Grid::new(4, 64, GridKind::Asymmetric).unwrap(),
        gptq: GptqOptions::default(),
        calib_source: CalibSource::SelfGenerated,
        calib: CalibOptions {
            samples: 16,
            len: 128,
            seed: 0,
            newlines: Default::default(),
            hessians_on: Default::default(),
        },
        caldera: Default::default(),
        output: out.to_path_buf(),
        force: false,
        rht: false,
        hessians: Some(hessians.to_path_buf()),
        work_dir: None,
        resume: false,
        shard: None,
        format: pumice::format::FormatKind::Native,
        dtype: None,
    }
}

#[test]
fn a_layer_that_fails_on_one_adapter_goes_to_another() {
    let d = tempfile::tempdir().unwrap();
    let h = save_hessians(d.path());
    let ck = pumice::model::Checkpoint::open(asset()).unwrap();
    let opts = GpuOptions::from_env().unwrap();
    let good = common::gpu_with(&opts);
    let lost = Gpu::new(&opts).unwrap();
    lost.simulate_device_loss();

    let single = d.path().join("single");
    compress(&good, &ck, &gptq_opts(&single, &h), &mut |_| {}).unwrap();
    let spread = d.path().join("spread");
    let mut notes = Vec::new();
    let s = compress_on(&[&good, &lost], &ck, &gptq_opts(&spread, &h), &mut |e| {
        if let pumice::compress::pipeline::Event::Note(n) = e {
            notes.push(n.clone());
        }
    })
    .unwrap();
    assert!(
        notes.iter().any(|n| n.contains("goes to another adapter")),
        "{notes:?}"
    );
    // The lost adapter took a layer (two are handed out at once), failed, and retired.
    assert!(s.devices[1].layers.is_empty(), "{:?}", s.devices);
    assert_eq!(s.devices[0].layers.len(), 6, "{:?}", s.devices);
    assert_eq!(
        std::fs::read(single.join("model.safetensors")).unwrap(),
        std::fs::read(spread.join("model.safetensors")).unwrap()
    );

    // With no adapter left the run fails, naming the GPU error, and writes nothing.
    let nothing = d.path().join("nothing");
    let e = compress_on(&[&lost], &ck, &gptq_opts(&nothing, &h), &mut |_| {});
    assert!(e.is_err());
    assert!(!nothing.exists());
}

/// Without saved Hessians the first adapter calibrates and propagates, and each input
/// group's matrices are quantized on both adapters at once. GPTQ's results do not depend on
/// which of the two CPU drivers computes them (the same Mesa and LLVM build both), so the
/// spread run must give the single run's tensors exactly: anything lost or misplaced on the
/// way between adapters shows.
#[test]
fn without_saved_hessians_a_groups_matrices_spread_and_the_result_is_unchanged() {
    let d = tempfile::tempdir().unwrap();
    let calib = d.path().join("calib.txt");
    std::fs::write(
        &calib,
        "The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. "
            .repeat(80),
    )
    .unwrap();
    let m = asset();
    let common = [
        "--method",
        "gptq",
        "--bits",
        "4",
        "--group-size",
        "64",
        "--calib",
        calib.to_str().unwrap(),
        "--calib-samples",
        "8",
        "--calib-len",
        "128",
        "--eval-samples",
        "0",
        "--backend",
        "all",
    ];
    let compress = |name: &str, which: &[&str]| {
        let out = d.path().join(name);
        let o = run(&[
            &["compress", m.to_str().unwrap(), "-o", out.to_str().unwrap()][..],
            which,
            &common,
        ]
        .concat());
        assert!(o.status.success(), "{}", stderr(&o));
        (out, json_summary(&o.stdout))
    };
    let (single, _) = compress("single", &["--adapter", "0"]);
    let (both, summary) = compress("both", &["--devices", "all"]);
    let devices = summary["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 2, "{summary}");
    // The first adapter ran every layer; of each layer's 7 matrices it quantized 4 (q, o,
    // gate, down), the second 3 (k, v, up).
    assert_eq!(
        devices[0]["layers"].as_array().unwrap().len(),
        6,
        "{summary}"
    );
    assert_eq!(devices[0]["matrices"], 24, "{summary}");
    assert_eq!(devices[1]["matrices"], 18, "{summary}");
    // Every matrix names its adapter; both adapters computed some (q and gate on the first,
    // k, v and up on the second).
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(both.join("pumice.json")).unwrap()).unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for rep in manifest["layers"].as_array().unwrap() {
        for mat in rep["matrices"].as_array().unwrap() {
            seen.insert(
                mat["device"]
                    .as_str()
                    .expect("a matrix's adapter")
                    .to_string(),
            );
        }
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
    let (a, b) = (
        tensors(&single.join("model.safetensors")),
        tensors(&both.join("model.safetensors")),
    );
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (name, t) in &a {
        assert!(t == &b[name], "{name} differs from the single run's");
    }
}

/// `hessians --devices all`: the sequences split between the adapters, their Hessians summed;
/// equal to one adapter's up to the order of the sums.
#[test]
fn hessians_from_two_adapters_are_the_sums_of_their_shares() {
    let d = tempfile::tempdir().unwrap();
    // 7 sequences of 64 tokens, so the shares are uneven.
    let collect = |name: &str, which: &str, value: &str| {
        save_hessians_with(
            d.path(),
            name,
            ["7", "64"],
            &["--backend", "all", which, value],
        )
    };
    let (one, _) = collect("one", "--adapter", "0");
    let (two, summary) = collect("two", "--devices", "all");
    let shares: Vec<u64> = summary["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["sequences"].as_u64().unwrap())
        .collect();
    assert_eq!(shares, vec![3, 4], "{summary}");
    for (l, g, diff, scale) in hessian_differences(&one, &two) {
        assert!(
            diff <= 1e-5 * scale,
            "layer {l} {g}: max difference {diff:e} of {scale:e}"
        );
    }
}

/// Per layer and input group of two Hessian directories of the asset model: the largest
/// difference between them and the largest entry of the first.
fn hessian_differences(one: &Path, two: &Path) -> Vec<(usize, String, f64, f64)> {
    use pumice::compress::hessdir::{HessiansInfo, LayerHessians};
    let (info, _) = HessiansInfo::read(one).unwrap();
    let sha = &info.source.sha256;
    let mut out = Vec::new();
    for l in 0..6 {
        let a = LayerHessians::read(one, l, sha).unwrap();
        let b = LayerHessians::read(two, l, sha).unwrap();
        assert_eq!(a.groups.len(), 4);
        assert_eq!(a.groups.len(), b.groups.len());
        for ((ga, na, ha), (gb, nb, hb)) in a.groups.iter().zip(&b.groups) {
            assert_eq!((ga, na), (gb, nb));
            let scale = ha.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            let diff = ha
                .iter()
                .zip(hb)
                .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
            out.push((l, format!("{ga:?}"), diff, scale));
        }
    }
    out
}

/// `--hessians-on host` (faer in f64; the default on a CPU adapter) and `gpu` (the
/// compensated f32 kernel) accumulate the same Hessians up to rounding, 7 sequences of 300
/// tokens (rows over one host block and one GPU dispatch); `compress` says where its Hessians
/// were computed.
#[test]
fn hessians_on_the_host_equal_the_gpus_up_to_rounding() {
    let d = tempfile::tempdir().unwrap();
    let shape = ["7", "300"];
    let (host, _) = save_hessians_with(d.path(), "host", shape, &["--hessians-on", "host"]);
    let (gpu, _) = save_hessians_with(d.path(), "gpu", shape, &["--hessians-on", "gpu"]);
    for (l, g, diff, scale) in hessian_differences(&host, &gpu) {
        assert!(
            diff <= 1e-6 * scale && diff > 0.0,
            "layer {l} {g}: max difference {diff:e} of {scale:e}"
        );
    }
    let out = d.path().join("q");
    let auto = if common::gpu().caps().is_cpu {
        "host"
    } else {
        "gpu"
    };
    for (on, want) in [("auto", auto), ("gpu", "gpu"), ("host", "host")] {
        let o = run(&[
            "compress",
            asset().to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--force",
            "--json",
            "--method",
            "gptq",
            "--calib-samples",
            "2",
            "--calib-len",
            "32",
            "--eval-samples",
            "0",
            "--hessians-on",
            on,
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let s = json_summary(&o.stdout);
        assert_eq!(s["stages"]["hessians_on"], want, "{s}");
    }
}

/// `pumice devices` says what `--devices all` takes: here both CPU drivers.
#[test]
fn the_device_listing_names_what_all_takes() {
    let o = run(&["devices", "--backend", "all"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("(--devices all = 0,1)"), "{out}");
}

#[test]
fn bad_device_lists_are_refused_before_gpu_work() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    let m = asset();
    // A missing adapter is the machine's matter (exit 1, as for --adapter); the rest are
    // the arguments' (exit 2).
    for (list, says, code) in [
        ("0,0", "twice", 2),
        ("0,,1", "--devices", 2),
        ("0,99", "out of range", 1),
    ] {
        let o = run(&[
            "compress",
            m.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--backend",
            "all",
            "--devices",
            list,
        ]);
        assert_eq!(o.status.code(), Some(code), "{list}: {}", stderr(&o));
        assert!(stderr(&o).contains(says), "{list}: {}", stderr(&o));
        // (clap's own parse errors add a "--help" hint line)
        assert_eq!(
            stderr(&o).lines().filter(|l| !l.trim().is_empty()).count()
                - usize::from(stderr(&o).contains("--help")),
            1,
            "{}",
            stderr(&o)
        );
        assert!(!out.exists());
    }
}
