//! `pumice devices`: every adapter on every backend.

use std::io::Write;

use pumice::gpu::{list_adapters, AdapterReport, GpuOptions};

pub(crate) fn run(opts: &GpuOptions, json: bool) -> anyhow::Result<()> {
    let reports = list_adapters(opts);
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&reports)?)?;
        return Ok(());
    }
    if reports.is_empty() {
        return Err(pumice::Error::NoAdapter(
            "none found; on Linux without a GPU install Mesa's lavapipe (Debian: mesa-vulkan-drivers libvulkan1)".into(),
        )
        .into());
    }
    for r in &reports {
        print_adapter(&mut out, r)?;
    }
    writeln!(
        out,
        "(* = the adapter pumice uses with these options; choose with --backend / --adapter)"
    )?;
    // What `compress --devices all` would take with these options.
    if let Ok(all) = pumice::gpu::device_options(opts, &pumice::gpu::DeviceSet::All) {
        let ids: Vec<String> = all
            .iter()
            .filter_map(|o| match &o.adapter {
                Some(pumice::gpu::AdapterSelector::Index(i)) => Some(i.to_string()),
                _ => None,
            })
            .collect();
        writeln!(out, "(--devices all = {})", ids.join(","))?;
    }
    Ok(())
}

pub(crate) fn print_adapter(out: &mut impl Write, r: &AdapterReport) -> std::io::Result<()> {
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    let mut feats = Vec::new();
    if r.features.shader_f16 {
        feats.push("shader-f16");
    }
    if r.features.subgroups {
        feats.push("subgroups");
    }
    if r.features.timestamp_query {
        feats.push("timestamps");
    }
    writeln!(
        out,
        "{} [{}] {} — {}, {}, driver: {} {}",
        if r.selected { '*' } else { ' ' },
        r.index,
        r.name,
        r.backend,
        r.device_type,
        r.driver,
        r.driver_info
    )?;
    writeln!(
        out,
        "      max binding {:.0} MiB, max buffer {:.0} MiB, workgroup ≤ {} invocations / {} B shared, subgroup {}–{}, features: {}",
        mib(r.limits.max_storage_buffer_binding_size),
        mib(r.limits.max_buffer_size),
        r.limits.max_compute_invocations_per_workgroup,
        r.limits.max_compute_workgroup_storage_size,
        r.limits.subgroup_min_size,
        r.limits.subgroup_max_size,
        if feats.is_empty() { "none".to_string() } else { feats.join(", ") }
    )
}
