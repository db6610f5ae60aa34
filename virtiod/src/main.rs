//! `virtiod`: serve software-defined virtio devices from user space.

mod cli;
mod logging;
mod serve;

use clap::Parser;

fn main() {
    let cli = cli::Cli::parse();
    if let Err(err) = logging::init(&cli.log) {
        eprintln!("virtiod: {err:#}");
        std::process::exit(2);
    }
    let result = match cli.command {
        cli::Command::Serve(args) => serve::run(args),
    };
    if let Err(err) = result {
        // One line: what failed and what to do.
        eprintln!("virtiod: error: {err:#}");
        std::process::exit(1);
    }
}
