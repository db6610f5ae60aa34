//! `csi-sanity`: run the CSI conformance checks against a plugin's socket and print one line
//! per check; exit 1 when any fails.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

/// Check a CSI plugin against the CSI spec (the checks of kubernetes-csi's csi-sanity).
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "Examples:
  csi-sanity --endpoint unix:///csi/csi.sock
  csi-sanity --endpoint unix:///csi/csi.sock --skip-node-io --param source=local
  csi-sanity --endpoint unix:///csi/csi.sock --test-volume-size 335544320 --fs-type xfs   # mkfs.xfs: 300 MiB at least
  csi-sanity --endpoint unix:///run/csi/node.sock --controller-endpoint unix:///run/csi/ctl.sock \\
      --param source=rbd --param pool=rbd --param monitors=10.0.0.1 --secret userID=csi --secret userKey=AQ..."
)]
struct Cli {
    /// The plugin's CSI socket (Identity, Node, and Controller unless --controller-endpoint).
    #[arg(long)]
    endpoint: String,
    /// A separate controller plugin's socket.
    #[arg(long)]
    controller_endpoint: Option<String>,
    /// Where staging and target paths are made.
    #[arg(long, default_value = "/tmp/csi-sanity")]
    work_dir: PathBuf,
    /// The size of the volumes created, in bytes (as csi-sanity's -csi.testvolumesize). With
    /// virtiod-csi's local source each volume is a file under its --local-dir, refused when
    /// bigger than the free space there: the checks hold a few volumes at once, one of them
    /// grown to twice this size.
    #[arg(long, alias = "volume-size", default_value_t = 16 << 20, value_parser = volume_size)]
    test_volume_size: u64,
    /// The filesystem of the mount volumes.
    #[arg(long, default_value = "ext4")]
    fs_type: String,
    /// A CreateVolume parameter, KEY=VALUE (repeatable).
    #[arg(long = "param", value_parser = key_value)]
    params: Vec<(String, String)>,
    /// A secret passed to every call that takes secrets, KEY=VALUE (repeatable).
    #[arg(long = "secret", value_parser = key_value)]
    secrets: Vec<(String, String)>,
    /// Skip the checks that really stage and publish a volume (no block device here).
    #[arg(long)]
    skip_node_io: bool,
}

fn key_value(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{text:?}: expected KEY=VALUE"))
}

fn volume_size(text: &str) -> Result<u64, String> {
    match text.parse::<u64>() {
        Ok(0) => Err("0: a volume needs at least one byte".into()),
        Ok(bytes) if bytes > i64::MAX as u64 / 2 => Err(format!(
            "{bytes}: too large (the expansion check asks for twice this in an int64)"
        )),
        Ok(bytes) => Ok(bytes),
        Err(e) => Err(format!(
            "{text:?}: {e}: expected a size in bytes, e.g. 16777216"
        )),
    }
}

fn socket(endpoint: &str) -> anyhow::Result<PathBuf> {
    virtiod_csi::endpoint::socket_path(endpoint).with_context(|| format!("--endpoint {endpoint}"))
}

fn main() {
    match run() {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("csi-sanity: {e:#}");
            std::process::exit(2);
        }
    }
}

fn run() -> anyhow::Result<bool> {
    let cli = Cli::parse();
    let mut config = csi_sanity::Config::new(socket(&cli.endpoint)?, cli.work_dir);
    config.controller_socket = cli.controller_endpoint.as_deref().map(socket).transpose()?;
    config.volume_size = cli.test_volume_size;
    config.fs_type = cli.fs_type;
    config.parameters = cli.params.into_iter().collect::<HashMap<_, _>>();
    config.secrets = cli.secrets.into_iter().collect::<HashMap<_, _>>();
    config.skip_node_io = cli.skip_node_io;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let report = runtime.block_on(csi_sanity::run(&config))?;
    print!("{report}");
    Ok(report.failed() == 0)
}
