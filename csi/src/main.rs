//! `virtiod-csi`: the CSI plugin, and `virtiod-csi call`, a one-shot client of it.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use virtiod_csi::server::{Config, Role};
use virtiod_csi::source::local::LocalSource;
use virtiod_csi::source::rbd::RbdSource;
use virtiod_csi::source::{Sources, VolumeSource};

/// A Kubernetes CSI plugin serving virtiod volumes to pods over VDUSE.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// The CSI socket: unix:///csi/csi.sock.
    #[arg(
        long,
        env = "CSI_ENDPOINT",
        default_value = "unix:///csi/csi.sock",
        global = true
    )]
    endpoint: String,
    /// This node's name (Kubernetes: the node name, from the downward API).
    #[arg(long, env = "NODE_ID")]
    node_id: Option<String>,
    /// Which CSI services to offer.
    #[arg(long, value_enum, default_value = "both")]
    role: Role,
    /// The control socket of the node's `virtiod run --control PATH`.
    #[arg(long)]
    daemon_socket: Option<PathBuf>,
    /// The plugin's state: one JSON file per volume, kept across restarts.
    #[arg(long, default_value = "/var/lib/virtiod-csi")]
    state_dir: PathBuf,
    /// The directory holding `local` volumes' images.
    #[arg(long, default_value = "/var/lib/virtiod-csi/local")]
    local_dir: PathBuf,
    /// `rbd` volumes: the directory with one file per Ceph cluster, named by the StorageClass
    /// parameter `clusterID` and holding its monitors (`host:port,...`), e.g. a ConfigMap
    /// mounted there. Read at each call.
    #[arg(long, default_value = "/etc/virtiod-csi/clusters")]
    rbd_clusters: PathBuf,
    /// The most volumes this node takes (0: no limit).
    #[arg(long, default_value_t = 0)]
    max_volumes: i64,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Make one CSI call on the plugin at --endpoint and print the answer as JSON.
    Call {
        /// The RPC, e.g. NodeGetInfo.
        rpc: String,
        /// The request as JSON (protobuf field names).
        #[arg(default_value = "{}")]
        request: String,
    },
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VIRTIOD_CSI_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("virtiod-csi: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(run(cli)) {
        eprintln!("virtiod-csi: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let socket = virtiod_csi::endpoint::socket_path(&cli.endpoint)?;
    if let Some(Command::Call { rpc, request }) = cli.command {
        let answer = virtiod_csi::call::call(&socket, &rpc, &request).await?;
        println!("{}", serde_json::to_string(&answer)?);
        return Ok(());
    }
    let node_id = cli
        .node_id
        .context("--node-id is required: give this node's name (NODE_ID)")?;
    if cli.role != Role::Controller && cli.daemon_socket.is_none() {
        anyhow::bail!("--daemon-socket is required for --role {:?}: give the control socket of `virtiod run --control PATH`", cli.role);
    }
    virtiod_csi::server::serve(Config {
        socket,
        node_id,
        role: cli.role,
        daemon_socket: cli.daemon_socket,
        // Staged rbd volumes' configuration and keyring files (the daemon reads them: give
        // it --allow-dir STATE_DIR/ceph).
        sources: Sources::new([
            Arc::new(LocalSource::new(cli.local_dir)) as Arc<dyn VolumeSource>,
            Arc::new(RbdSource::new(cli.rbd_clusters, cli.state_dir.join("ceph"))),
        ]),
        state_dir: cli.state_dir,
        max_volumes: cli.max_volumes,
    })
    .await
}
