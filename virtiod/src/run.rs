//! `virtiod run --config devices.toml`: one daemon, many devices.

use std::net::TcpListener;
use std::os::fd::AsFd;
use std::sync::mpsc::channel;
use std::sync::Arc;

use anyhow::Context;
use virtiod_config::OnStop;

use crate::cli::RunArgs;
use crate::control::ControlSocket;
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
    // Validate everything before starting anything. A process taking over serves what the
    // old one served (the devices file may have changed since, `ctl add`ed devices are only
    // known to it), with the old one's devices file (it may not be readable under Landlock).
    let hello = args.takeover_fd.map(crate::upgrade::hello);
    let (specs, config) = match &hello {
        Some(hello) => (hello.specs.clone(), hello.config.clone()),
        None => {
            let text = std::fs::read_to_string(&args.config).unwrap_or_default();
            let specs = load(&args.config)?;
            if specs.is_empty() && args.control.is_none() {
                return Err(Usage(format!(
                    "{}: no devices: add a [[device]] table with name, image (or net) and vduse or vhost-user, or give --control PATH to add devices later with `virtiod ctl add`",
                    args.config.display()
                ))
                .into());
            }
            (specs, text)
        }
    };
    crate::upgrade::remember_config(config.clone());
    // The devices file's [daemon] table is checked by the confinement below.
    let on_stop = args
        .on_stop
        .or_else(|| virtiod_config::parse_daemon(&config).ok()?.on_stop)
        .unwrap_or_default();
    let setup = crate::confine::Setup {
        specs: &specs,
        state_dir: &args.state_dir,
        control: args.control.as_deref(),
        metrics: args.metrics,
    };
    crate::persist::prepare(&args.state_dir)?;
    match &hello {
        None => crate::confine::begin_run(&args.confine, &args.config, &setup)?,
        Some(_) => {
            let daemon = virtiod_config::parse_daemon(&config).map_err(|e| {
                Usage(format!(
                    "{} (the old process's): {e}",
                    args.config.display()
                ))
            })?;
            crate::confine::begin(&args.confine, &daemon, &setup)?
        }
    }
    let (tx, rx) = channel();
    forward_signals(tx.clone())?;
    let registry = Registry::new(&args.state_dir, tx.clone());
    registry.keep_records();
    let (total, endpoints) = match hello {
        Some(hello) => take_over(&args, &registry, hello, tx)?,
        None => start(&args, specs, &registry)?,
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
            Event::Upgrade(req) => upgrade(&registry, &endpoints, req),
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
    match on_stop {
        OnStop::Remove => registry.stop_all()?,
        OnStop::Keep => registry.keep_all()?,
    }
    drop(endpoints);
    tracing::info!("stopped cleanly");
    Ok(())
}

/// Hand every device over to a new process and exit; on failure serve on.
fn upgrade(registry: &Registry, endpoints: &Endpoints, req: crate::upgrade::Request) {
    let listeners = [
        endpoints.0.as_ref().map(|c| c.listener().as_fd()),
        endpoints.1.as_ref().map(|m| m.as_fd()),
    ];
    match crate::upgrade::hand_over(registry, &listeners, &req) {
        Ok(pid) => {
            crate::notify::notify(&format!("MAINPID={pid}"));
            if let Some(reply) = req.reply {
                let _ = reply.send(Ok(pid));
                // Let the control socket's thread write the answer before the process ends.
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
            // Without any clean-up: the devices, sockets and files are the new process's.
            std::process::exit(0);
        }
        Err(err) => {
            if let Some(reply) = req.reply {
                let _ = reply.send(Err(format!("{err:#}")));
            }
        }
    }
}

/// The control socket and a copy of the metrics listener, kept for a hand-over.
type Endpoints = (Option<ControlSocket>, Option<TcpListener>);

/// Start the metrics endpoint, the devices of the devices file, those added with `ctl add`
/// before a restart, and the control socket. Returns how many devices the file has.
fn start(
    args: &RunArgs,
    specs: Vec<virtiod_config::DeviceSpec>,
    registry: &Arc<Registry>,
) -> anyhow::Result<(usize, Endpoints)> {
    let metrics = match args.metrics {
        Some(addr) => Some(crate::metrics::start_on(metrics_listener(addr)?, registry.clone())?.1),
        None => None,
    };
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
    crate::persist::restore(registry);
    if registry.running() == 0 && args.control.is_none() {
        anyhow::bail!("none of the {total} devices could be started: see the errors above");
    }
    let control = match &args.control {
        Some(path) => Some(crate::control::start(path, registry.clone())?),
        None => None,
    };
    Ok((total, (control, metrics)))
}

fn metrics_listener(addr: std::net::SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).with_context(|| {
        format!("cannot listen on {addr} for --metrics: pick a free port or address")
    })
}

/// `--takeover-fd`: serve what the old process served (its devices file may have changed
/// since, and `ctl add`ed devices are only known to it), on its sockets, then confirm.
fn take_over(
    args: &RunArgs,
    registry: &Arc<Registry>,
    hello: crate::upgrade::Hello,
    events: std::sync::mpsc::Sender<Event>,
) -> anyhow::Result<(usize, Endpoints)> {
    let mut pending = hello.take_over(registry, &args.state_dir, events);
    let endpoints = (|| {
        let metrics = match (pending.metrics.take(), args.metrics) {
            (Some(listener), _) => Some(listener),
            (None, Some(addr)) => Some(metrics_listener(addr)?),
            (None, None) => None,
        };
        let metrics = match metrics {
            Some(l) => Some(crate::metrics::start_on(l, registry.clone())?.1),
            None => None,
        };
        let control = match (pending.control.take(), &args.control) {
            (Some(listener), Some(path)) => {
                Some(crate::control::start_on(path, listener, registry.clone())?)
            }
            (None, Some(path)) => Some(crate::control::start(path, registry.clone())?),
            (_, None) => None,
        };
        anyhow::Ok((control, metrics))
    })();
    match endpoints {
        Ok(endpoints) => {
            pending.serving()?;
            Ok((registry.running(), endpoints))
        }
        Err(err) => pending.fail(&err),
    }
}
