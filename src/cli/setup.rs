//! Process setup around the commands: logging, the stop handler, a quiet headless window
//! system, and the one-line error with its exit code.

use std::io::Write;

use super::progress;

/// SIGINT/SIGTERM (Ctrl-C on Windows): the first asks running work to stop at its next
/// consistent point (between matrices; finished layers in a --work-dir are kept); a second
/// exits at once.
pub(crate) fn install_stop_handler() {
    let _ = ctrlc::set_handler(|| {
        if pumice::interrupt::requested() {
            let _ = writeln!(std::io::stderr(), "second signal: exiting now");
            std::process::exit(130);
        }
        let _ = writeln!(
            std::io::stderr(),
            "signal received: stopping at the next consistent point, after the current matrix (signal again to exit now)"
        );
        pumice::interrupt::request();
    });
}

/// For an interrupted run with a work directory: the command that continues it.
pub(crate) fn resume_hint() -> String {
    let args: Vec<String> = std::env::args().collect();
    if !args
        .iter()
        .any(|a| a == "--work-dir" || a.starts_with("--work-dir="))
    {
        return String::new();
    }
    let mut cmd: Vec<String> = args
        .iter()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect();
    if !args.iter().any(|a| a == "--resume") {
        cmd.push("--resume".into());
    }
    format!("; resume with: {}", cmd.join(" "))
}

/// Mesa's window-system probes print "XDG_RUNTIME_DIR is invalid" on headless machines where it
/// is unset. Point it at a private empty directory so compute-only runs stay quiet.
pub(crate) fn quiet_headless_wsi() {
    #[cfg(unix)]
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        use std::os::unix::fs::PermissionsExt;
        // One directory, reused; if another user owns it, set_permissions fails and we skip.
        let dir = std::env::temp_dir().join("pumice-xdg-runtime");
        if std::fs::create_dir_all(&dir).is_ok()
            && std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).is_ok()
        {
            // Single-threaded at this point: nothing else reads the environment concurrently.
            std::env::set_var("XDG_RUNTIME_DIR", &dir);
        }
    }
}

pub(crate) fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "pumice=debug,warn",
        _ => "pumice=trace,info",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("PUMICE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

/// Print `e` as one line (and as a JSON error event in JSON mode); its exit code.
pub(crate) fn report_failure(e: &anyhow::Error) -> std::process::ExitCode {
    let code = e
        .downcast_ref::<pumice::Error>()
        .map(|p| p.exit_code())
        .unwrap_or(1);
    // The chain, leaving out causes the message above them already quotes (our errors name
    // their source in their own text).
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if !parts.last().is_some_and(|p| p.contains(&s)) {
            parts.push(s);
        }
    }
    let mut msg = pumice::error::one_line(&parts.join(": "));
    if let Some(pumice::Error::Interrupted(_)) = e.downcast_ref::<pumice::Error>() {
        msg.push_str(&resume_hint());
    }
    let _ = writeln!(std::io::stderr(), "error: {msg}");
    if progress::json_mode() {
        progress::emit_json(&serde_json::json!({
            "event": "error", "message": msg, "exit_code": code,
        }));
    }
    std::process::ExitCode::from(code as u8)
}

/// Open the GPU the options select and settle its kernel tuning now, saying so on stderr when
/// it is measured (the first run on an adapter and driver: seconds on a CPU adapter).
pub(crate) fn open_gpu(opts: &pumice::gpu::GpuOptions) -> pumice::Result<pumice::gpu::Gpu> {
    let gpu = pumice::gpu::Gpu::new(opts)?;
    if gpu.tuning_pending() {
        eprintln!(
            "tuning GPU kernels for {} (once per adapter and driver; cached)",
            gpu.report().name
        );
    }
    gpu.tuning();
    Ok(gpu)
}

/// The adapters of `--devices` (every one's options resolved before any is opened), or the
/// one the options select; each opened as [`open_gpu`] does.
pub(crate) fn open_gpus(
    opts: &pumice::gpu::GpuOptions,
    devices: Option<&pumice::gpu::DeviceSet>,
) -> pumice::Result<Vec<pumice::gpu::Gpu>> {
    let each = match devices {
        Some(set) => pumice::gpu::device_options(opts, set)?,
        None => vec![opts.clone()],
    };
    each.iter().map(open_gpu).collect()
}
