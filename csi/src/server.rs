//! The plugin process: which CSI services run (by role) on the endpoint socket.

use std::path::PathBuf;

use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::Server;

use std::time::Duration;

use crate::controller::ControllerService;
use crate::daemon::Daemon;
use crate::identity::IdentityService;
use crate::node::NodeService;
use crate::proto::controller_server::ControllerServer;
use crate::proto::identity_server::IdentityServer;
use crate::proto::node_server::NodeServer;
use crate::source::Sources;

/// Which services the plugin offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// Node service (staging and publishing volumes on this node).
    Node,
    /// Controller service (creating and deleting volumes).
    Controller,
    /// Both: one plugin per node doing everything (the usual deployment for `local`).
    Both,
}

/// What the plugin needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// The socket the CO talks to.
    pub socket: PathBuf,
    /// This node's name (the topology segment `topology.virtiod.io/node`).
    pub node_id: String,
    /// Services offered.
    pub role: Role,
    /// The daemon's control socket (required for the node role).
    pub daemon_socket: Option<PathBuf>,
    /// Where the plugin keeps its state (one JSON file per volume).
    pub state_dir: PathBuf,
    /// The sources volumes are made of (`local`, `rbd`).
    pub sources: Sources,
    /// NodeGetInfo's `max_volumes_per_node` (0: no limit).
    pub max_volumes: i64,
}

/// Serve the CSI services of `config.role` until SIGTERM or SIGINT.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    let daemon = config.daemon_socket.as_ref().map(Daemon::new);
    let listener = crate::endpoint::bind(&config.socket)?;
    let identity = IdentityServer::new(IdentityService::new(daemon.clone()));
    let controller = matches!(config.role, Role::Controller | Role::Both).then(|| {
        ControllerServer::new(ControllerService::new(
            config.node_id.clone(),
            config.sources.clone(),
            config.state_dir.clone(),
        ))
    });
    let node = match (config.role, &daemon) {
        (Role::Node | Role::Both, Some(daemon)) => {
            let node = NodeService::new(
                config.node_id.clone(),
                config.max_volumes,
                daemon.clone(),
                config.sources.clone(),
                &config.state_dir,
            );
            tokio::spawn(rediscover(node.clone()));
            Some(NodeServer::new(node))
        }
        (Role::Node | Role::Both, None) => {
            anyhow::bail!("the node service needs --daemon-socket: the control socket of `virtiod run --control PATH`")
        }
        _ => None,
    };
    let router = Server::builder()
        .add_service(identity)
        .add_optional_service(controller)
        .add_optional_service(node);
    tracing::info!(socket = %config.socket.display(), role = ?config.role, node = %config.node_id, "CSI plugin listening");
    router
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown())
        .await?;
    tracing::info!("CSI plugin stopped");
    Ok(())
}

/// Find the volumes staged before this start; retried until the daemon answers.
async fn rediscover(node: NodeService) {
    loop {
        match node.rediscover().await {
            Ok(count) => {
                tracing::info!(volumes = count, "state re-discovered");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot re-discover staged volumes yet; retrying in 2 s");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }
}

async fn shutdown() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
