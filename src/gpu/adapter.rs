//! Adapter enumeration and selection (`--backend`, `--adapter`).

use std::str::FromStr;

use serde::Serialize;

use crate::error::{Error, Result};

/// Which graphics API to look for adapters on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendChoice {
    Vulkan,
    Metal,
    Dx12,
    Gl,
    /// Every backend compiled in.
    All,
}

impl BackendChoice {
    pub(crate) fn backends(self) -> wgpu::Backends {
        match self {
            BackendChoice::Vulkan => wgpu::Backends::VULKAN,
            BackendChoice::Metal => wgpu::Backends::METAL,
            BackendChoice::Dx12 => wgpu::Backends::DX12,
            BackendChoice::Gl => wgpu::Backends::GL,
            BackendChoice::All => wgpu::Backends::all(),
        }
    }
}

impl FromStr for BackendChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "vulkan" | "vk" => Ok(BackendChoice::Vulkan),
            "metal" | "mtl" => Ok(BackendChoice::Metal),
            "dx12" | "d3d12" => Ok(BackendChoice::Dx12),
            "gl" | "gles" | "opengl" => Ok(BackendChoice::Gl),
            "all" | "any" => Ok(BackendChoice::All),
            other => Err(Error::InvalidArgument(format!(
                "unknown backend `{other}` (expected vulkan, metal, dx12, gl or all)"
            ))),
        }
    }
}

/// Which adapter to take among those found: a position in `pumice devices`, or a substring of
/// the adapter's name (case-insensitive).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdapterSelector {
    Index(usize),
    Name(String),
}

impl FromStr for AdapterSelector {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        if s.is_empty() {
            return Err(Error::InvalidArgument("empty --adapter".into()));
        }
        Ok(match s.parse::<usize>() {
            Ok(i) => AdapterSelector::Index(i),
            Err(_) => AdapterSelector::Name(s.to_string()),
        })
    }
}

/// Which adapters `--devices` uses at once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceSet {
    /// Every GPU once (a GPU seen on several backends is taken on its native API); CPU
    /// adapters only where there is no GPU, each driver once (lavapipe and llvmpipe-GL).
    All,
    /// These adapters, by index or name as `--adapter` takes them.
    List(Vec<AdapterSelector>),
}

impl FromStr for DeviceSet {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        if s.trim().eq_ignore_ascii_case("all") {
            return Ok(DeviceSet::All);
        }
        let list = s
            .split(',')
            .map(|p| p.parse::<AdapterSelector>())
            .collect::<Result<Vec<_>>>()
            .map_err(|_| {
                Error::InvalidArgument(format!(
                    "--devices `{s}`: expected all, or adapters by index or name separated by commas"
                ))
            })?;
        Ok(DeviceSet::List(list))
    }
}

/// How to open each adapter of `set` (on `base`'s backend, as `pumice devices` numbers them),
/// in order; an adapter named twice is refused.
pub fn device_options(base: &GpuOptions, set: &DeviceSet) -> Result<Vec<GpuOptions>> {
    let backend = base.backend.unwrap_or(BackendChoice::All);
    let (_instance, adapters) = enumerate(backend);
    if adapters.is_empty() {
        return Err(no_adapter(backend));
    }
    let infos: Vec<wgpu::AdapterInfo> = adapters.iter().map(|a| a.get_info()).collect();
    let indices = match set {
        DeviceSet::All => {
            let hardware: Vec<usize> = (0..infos.len())
                .filter(|&i| !matches!(infos[i].device_type, wgpu::DeviceType::Cpu))
                .collect();
            let pool = if hardware.is_empty() {
                (0..infos.len()).collect()
            } else {
                hardware
            };
            // One entry per physical GPU: the best-ranked backend of those that see it.
            let mut chosen: Vec<usize> = Vec::new();
            let mut by_rank = pool.clone();
            by_rank.sort_by_key(|&i| (rank(&infos[i]), i));
            for i in by_rank {
                let same = |j: &usize| {
                    let (a, b) = (&infos[i], &infos[*j]);
                    a.device_type != wgpu::DeviceType::Cpu
                        && a.vendor == b.vendor
                        && a.device == b.device
                        && a.name == b.name
                };
                if !chosen.iter().any(same) {
                    chosen.push(i);
                }
            }
            chosen.sort_unstable();
            chosen
        }
        DeviceSet::List(list) => {
            let mut chosen = Vec::new();
            for sel in list {
                let i = resolve(&infos, backend, Some(sel))?;
                if chosen.contains(&i) {
                    return Err(Error::InvalidArgument(format!(
                        "--devices names adapter {i} ({}, {}) twice",
                        infos[i].name,
                        backend_name(infos[i].backend)
                    )));
                }
                chosen.push(i);
            }
            chosen
        }
    };
    Ok(indices
        .into_iter()
        .map(|i| GpuOptions {
            backend: Some(backend),
            adapter: Some(AdapterSelector::Index(i)),
            ..base.clone()
        })
        .collect())
}

/// How to open the GPU. `Default` takes the best adapter on every backend with its real limits.
#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    pub backend: Option<BackendChoice>,
    pub adapter: Option<AdapterSelector>,
    /// Pretend the device allows at most this many bytes per storage binding (and per buffer).
    /// Used by tests to exercise chunking without allocating hundreds of MiB.
    pub max_binding_bytes: Option<u64>,
    /// Pretend invocations may run at most this many loop iterations (as Mesa's CPU drivers
    /// allow 65,535), so tests exercise the split dispatches on small shapes.
    pub max_loop_iterations: Option<u64>,
    /// Whether kernel configurations are tuned and cached (`PUMICE_TUNE`, `--tune`).
    pub tune: super::tune::TuneMode,
    /// Time every dispatch with GPU timestamps (`PUMICE_PROFILE=1`); see [`super::profile`].
    pub profile: bool,
}

impl GpuOptions {
    /// Options from `PUMICE_BACKEND`, `PUMICE_ADAPTER`, `PUMICE_MAX_BINDING` (bytes),
    /// `PUMICE_MAX_LOOP`, `PUMICE_TUNE` and `PUMICE_PROFILE`.
    pub fn from_env() -> Result<Self> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        Ok(GpuOptions {
            backend: var("PUMICE_BACKEND").map(|v| v.parse()).transpose()?,
            adapter: var("PUMICE_ADAPTER").map(|v| v.parse()).transpose()?,
            max_binding_bytes: var("PUMICE_MAX_BINDING")
                .map(|v| {
                    v.parse::<u64>().map_err(|_| {
                        Error::InvalidArgument(format!(
                            "PUMICE_MAX_BINDING=`{v}` is not a byte count"
                        ))
                    })
                })
                .transpose()?,
            max_loop_iterations: var("PUMICE_MAX_LOOP")
                .map(|v| {
                    v.parse::<u64>().map_err(|_| {
                        Error::InvalidArgument(format!(
                            "PUMICE_MAX_LOOP=`{v}` is not an iteration count"
                        ))
                    })
                })
                .transpose()?,
            tune: var("PUMICE_TUNE")
                .map(|v| v.parse())
                .transpose()?
                .unwrap_or_default(),
            profile: var("PUMICE_PROFILE").is_some_and(|v| v != "0"),
        })
    }
}

/// What `pumice devices` reports about one adapter.
#[derive(Clone, Debug, Serialize)]
pub struct AdapterReport {
    pub index: usize,
    /// Whether `Gpu::new` with the same options would open this adapter.
    pub selected: bool,
    pub name: String,
    pub backend: String,
    pub device_type: String,
    pub driver: String,
    pub driver_info: String,
    pub vendor_id: u32,
    pub device_id: u32,
    pub limits: LimitsReport,
    pub features: FeaturesReport,
}

/// The limits that matter for compute.
#[derive(Clone, Debug, Serialize)]
pub struct LimitsReport {
    pub max_storage_buffer_binding_size: u64,
    pub max_buffer_size: u64,
    pub max_storage_buffers_per_shader_stage: u32,
    pub max_compute_workgroup_storage_size: u32,
    pub max_compute_invocations_per_workgroup: u32,
    pub max_compute_workgroups_per_dimension: u32,
    pub min_uniform_buffer_offset_alignment: u32,
    pub subgroup_min_size: u32,
    pub subgroup_max_size: u32,
}

/// The optional features pumice uses when present.
#[derive(Clone, Debug, Serialize)]
pub struct FeaturesReport {
    pub shader_f16: bool,
    pub subgroups: bool,
    pub timestamp_query: bool,
}

pub(crate) fn device_type_name(t: wgpu::DeviceType) -> &'static str {
    match t {
        wgpu::DeviceType::DiscreteGpu => "discrete",
        wgpu::DeviceType::IntegratedGpu => "integrated",
        wgpu::DeviceType::VirtualGpu => "virtual",
        wgpu::DeviceType::Cpu => "cpu",
        wgpu::DeviceType::Other => "other",
    }
}

pub(crate) fn backend_name(b: wgpu::Backend) -> String {
    match b {
        wgpu::Backend::Vulkan => "vulkan".into(),
        wgpu::Backend::Metal => "metal".into(),
        wgpu::Backend::Dx12 => "dx12".into(),
        wgpu::Backend::Gl => "gl".into(),
        wgpu::Backend::BrowserWebGpu => "webgpu".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

pub(crate) fn report(index: usize, adapter: &wgpu::Adapter) -> AdapterReport {
    let info = adapter.get_info();
    let l = adapter.limits();
    let f = adapter.features();
    AdapterReport {
        index,
        selected: false,
        name: info.name.clone(),
        backend: backend_name(info.backend),
        device_type: device_type_name(info.device_type).into(),
        driver: info.driver.clone(),
        driver_info: info.driver_info.clone(),
        vendor_id: info.vendor,
        device_id: info.device,
        limits: LimitsReport {
            max_storage_buffer_binding_size: l.max_storage_buffer_binding_size,
            max_buffer_size: l.max_buffer_size,
            max_storage_buffers_per_shader_stage: l.max_storage_buffers_per_shader_stage,
            max_compute_workgroup_storage_size: l.max_compute_workgroup_storage_size,
            max_compute_invocations_per_workgroup: l.max_compute_invocations_per_workgroup,
            max_compute_workgroups_per_dimension: l.max_compute_workgroups_per_dimension,
            min_uniform_buffer_offset_alignment: l.min_uniform_buffer_offset_alignment,
            subgroup_min_size: info.subgroup_min_size,
            subgroup_max_size: info.subgroup_max_size,
        },
        features: FeaturesReport {
            shader_f16: f.contains(wgpu::Features::SHADER_F16),
            subgroups: f.contains(wgpu::Features::SUBGROUP),
            timestamp_query: f.contains(wgpu::Features::TIMESTAMP_QUERY),
        },
    }
}

pub(crate) fn new_instance(backends: wgpu::Backends) -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = backends;
    // Validation layers are for development of wgpu itself; keep release runs quiet and fast.
    desc.flags = wgpu::InstanceFlags::empty();
    wgpu::Instance::new(desc)
}

/// All adapters on the requested backends, in a stable order (the indices `--adapter` takes).
pub(crate) fn enumerate(backend: BackendChoice) -> (wgpu::Instance, Vec<wgpu::Adapter>) {
    let instance = new_instance(backend.backends());
    let adapters = pollster::block_on(instance.enumerate_adapters(backend.backends()));
    (instance, adapters)
}

/// Reports for `pumice devices`; the adapter `Gpu::new(opts)` would open is marked `selected`.
pub fn list_adapters(opts: &GpuOptions) -> Vec<AdapterReport> {
    let backend = opts.backend.unwrap_or(BackendChoice::All);
    let (_instance, adapters) = enumerate(backend);
    let mut reports: Vec<AdapterReport> = adapters
        .iter()
        .enumerate()
        .map(|(i, a)| report(i, a))
        .collect();
    if let Ok((chosen, _)) = select(adapters, backend, opts.adapter.as_ref()) {
        reports[chosen].selected = true;
    }
    reports
}

/// Preference order for the default choice: discrete, integrated, virtual, CPU; native APIs
/// before GL.
fn rank(info: &wgpu::AdapterInfo) -> (u8, u8) {
    let t = match info.device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    };
    let b = match info.backend {
        wgpu::Backend::Vulkan | wgpu::Backend::Metal | wgpu::Backend::Dx12 => 0,
        _ => 1,
    };
    (t, b)
}

fn no_adapter(backend: BackendChoice) -> Error {
    Error::NoAdapter(format!(
        "none found on backend {backend:?}; on Linux without a GPU install Mesa's lavapipe \
         (Debian: mesa-vulkan-drivers libvulkan1)"
    ))
}

/// The index the selector picks among `infos`, or the best adapter's.
fn resolve(
    infos: &[wgpu::AdapterInfo],
    backend: BackendChoice,
    selector: Option<&AdapterSelector>,
) -> Result<usize> {
    if infos.is_empty() {
        return Err(no_adapter(backend));
    }
    let names = || {
        infos
            .iter()
            .enumerate()
            .map(|(i, a)| format!("{i}: {} ({})", a.name, backend_name(a.backend)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    match selector {
        Some(AdapterSelector::Index(i)) => {
            if *i >= infos.len() {
                return Err(Error::NoAdapter(format!(
                    "adapter {i} is out of range; available: {}",
                    names()
                )));
            }
            Ok(*i)
        }
        Some(AdapterSelector::Name(sub)) => {
            let needle = sub.to_lowercase();
            infos
                .iter()
                .position(|a| a.name.to_lowercase().contains(&needle))
                .ok_or_else(|| {
                    Error::NoAdapter(format!(
                        "no adapter name contains `{sub}`; available: {}",
                        names()
                    ))
                })
        }
        None => Ok((0..infos.len())
            .min_by_key(|&i| (rank(&infos[i]), i))
            .expect("non-empty")),
    }
}

/// Pick one adapter by the selector, or the best one.
pub(crate) fn select(
    adapters: Vec<wgpu::Adapter>,
    backend: BackendChoice,
    selector: Option<&AdapterSelector>,
) -> Result<(usize, wgpu::Adapter)> {
    let infos: Vec<wgpu::AdapterInfo> = adapters.iter().map(|a| a.get_info()).collect();
    let index = resolve(&infos, backend, selector)?;
    let adapter = adapters
        .into_iter()
        .nth(index)
        .expect("index checked above");
    Ok((index, adapter))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_choices() {
        assert_eq!(
            "Vulkan".parse::<BackendChoice>().unwrap(),
            BackendChoice::Vulkan
        );
        assert_eq!("gles".parse::<BackendChoice>().unwrap(), BackendChoice::Gl);
        assert!("glide".parse::<BackendChoice>().is_err());
        assert_eq!(
            "1".parse::<AdapterSelector>().unwrap(),
            AdapterSelector::Index(1)
        );
        assert_eq!(
            "llvmpipe".parse::<AdapterSelector>().unwrap(),
            AdapterSelector::Name("llvmpipe".into())
        );
        assert_eq!("ALL".parse::<DeviceSet>().unwrap(), DeviceSet::All);
        assert_eq!(
            "0,gl".parse::<DeviceSet>().unwrap(),
            DeviceSet::List(vec![
                AdapterSelector::Index(0),
                AdapterSelector::Name("gl".into())
            ])
        );
        assert!("0,,1".parse::<DeviceSet>().is_err());
    }
}
