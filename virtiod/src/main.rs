//! `virtiod`: serve software-defined virtio devices from user space.

mod cli;
mod confine;
mod control;
mod device;
mod doctor;
mod door;
mod logging;
mod metrics;
mod notify;
mod persist;
mod registry;
mod run;
mod seccomp;
mod serve;
mod signals;
mod upgrade;
mod usage;

use clap::Parser;

fn main() {
    let cli = cli::Cli::parse();
    upgrade::remember_start();
    raise_open_files_limit();
    if let Err(err) = logging::init(&cli.log) {
        eprintln!("virtiod: {err:#}");
        std::process::exit(2);
    }
    if matches!(cli.command, cli::Command::Serve(_) | cli::Command::Run(_)) {
        if let Err(err) = seccomp::install(cli.seccomp) {
            eprintln!("virtiod: error: {}", one_line(&err));
            std::process::exit(1);
        }
    }
    let result = match cli.command {
        cli::Command::Serve(args) => serve::run(args),
        cli::Command::Run(args) => run::run(args),
        cli::Command::Ctl(args) => control::ctl(args),
        cli::Command::Doctor(args) => match doctor::run(args) {
            Ok(true) => Ok(()),
            Ok(false) => std::process::exit(1),
            Err(e) => Err(e),
        },
    };
    if let Err(err) = result {
        eprintln!("virtiod: error: {}", one_line(&err));
        let usage = err.downcast_ref::<usage::Usage>().is_some();
        std::process::exit(if usage { 2 } else { 1 });
    }
}

/// Raise the soft limit on open files to the hard one, as servers do: every connection to a
/// door and every device holds descriptors, and the default soft limit (1024) is low.
fn raise_open_files_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let raised = Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        // Not fatal: the daemon works with the lower limit.
        let _ = setrlimit(Resource::Nofile, raised);
    }
}

/// One line: what failed and what to do, each cause once (libraries often repeat their
/// source's text in their own message).
fn one_line(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line.replace('\n', " ")
}
