//! `virtiod run --config devices.toml`: one daemon, many devices.

use std::sync::mpsc::channel;

use anyhow::Context;

use crate::cli::RunArgs;
use crate::device::Event;
use crate::registry::Registry;
use crate::signals::forward_signals;
use crate::usage::Usage;

/// Read and validate a devices file: every error as `FILE:LINE:COLUMN: what`.
pub fn load(path: &std::path::Path) -> anyhow::Result<Vec<virtiod_config::DeviceSpec>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Usage(format!("cannot read {}: {e}", path.display())))?;
    virtiod_config::parse(&text).map_err(|errors| {
        let shown = path.display();
        let all: Vec<String> = errors.0.iter().map(|e| format!("{shown}:{e}")).collect();
        Usage(all.join("; ")).into()
    })
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    // Validate everything before starting anything.
    let specs = load(&args.config)?;
    let setup = crate::confine::Setup {
        specs: &specs,
        state_dir: &args.state_dir,
        control: args.control.as_deref(),
        metrics: args.metrics,
    };
    crate::confine::begin_run(&args.confine, &args.config, &setup)?;
    let (tx, rx) = channel();
    forward_signals(tx.clone())?;
    let registry = Registry::new(&args.state_dir, tx);
    if let Some(addr) = args.metrics {
        crate::metrics::start(addr, registry.clone())?;
    }
    let total = specs.len();
    for spec in specs {
        let name = spec.name.clone();
        match registry.add(spec) {
            // One line per device on stdout: NAME ENDPOINT.
            Ok(endpoint) => println!("{name} {}", endpoint.display()),
            Err(err) => {
                tracing::error!(device = %name, "cannot start: {err:#}; serving the others")
            }
        }
    }
    // Then those added with `ctl add` before a restart.
    crate::persist::restore(&registry);
    if registry.running() == 0 && args.control.is_none() {
        anyhow::bail!("none of the {total} devices could be started: see the errors above");
    }
    let _control = match &args.control {
        Some(path) => Some(crate::control::start(path, registry.clone())?),
        None => None,
    };
    crate::confine::started();
    tracing::info!(running = registry.running(), of = total, "serving");
    crate::notify::notify(&format!(
        "READY=1\nSTATUS=serving {} of {total} devices",
        registry.running()
    ));
    loop {
        match rx.recv().context("event channel closed")? {
            Event::Signal(sig) => {
                crate::notify::notify("STOPPING=1");
                tracing::info!(signal = sig, "stopping every device");
                break;
            }
            Event::Exited { name, result } => {
                let reason = match result {
                    Ok(()) => "its server stopped".to_string(),
                    Err(e) => e,
                };
                tracing::error!(device = %name, %reason, "device stopped; serving the others");
                registry.failed(&name, reason);
            }
        }
    }
    registry.stop_all()?;
    tracing::info!("stopped cleanly");
    Ok(())
}
