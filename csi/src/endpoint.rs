//! The plugin's gRPC endpoint: a unix socket named `unix:///path` (or a bare path), served and
//! reached.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// Why an endpoint could not be used.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// Not `unix:///absolute/path`.
    #[error("endpoint {0:?}: give a unix socket as unix:///path/csi.sock")]
    Unsupported(String),
    /// Something other than a socket is at the path.
    #[error(
        "endpoint {0}: a file that is not a socket is in the way; remove it or pick another path"
    )]
    NotASocket(PathBuf),
    /// Creating or binding the socket failed.
    #[error("endpoint {path}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The gRPC channel failed.
    #[error("cannot connect to {path}: {source}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// What failed.
        source: tonic::transport::Error,
    },
}

/// The socket path of `unix:///path` (or `/path`).
pub fn socket_path(endpoint: &str) -> Result<PathBuf, EndpointError> {
    let path = endpoint
        .strip_prefix("unix://")
        .unwrap_or(endpoint)
        .to_string();
    if !path.starts_with('/') {
        return Err(EndpointError::Unsupported(endpoint.to_string()));
    }
    Ok(PathBuf::from(path))
}

/// Listen on `path`, replacing a stale socket left by an earlier run (the plugin is restarted
/// in place: a DaemonSet pod, an upgrade).
pub fn bind(path: &Path) -> Result<tokio::net::UnixListener, EndpointError> {
    let io = |source| EndpointError::Io {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                return Err(EndpointError::NotASocket(path.to_path_buf()));
            }
            std::fs::remove_file(path).map_err(io)?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    tokio::net::UnixListener::bind(path).map_err(io)
}

/// A gRPC channel to the plugin listening on `path`.
pub async fn connect(path: &Path) -> Result<Channel, EndpointError> {
    let socket = path.to_path_buf();
    // The URI is required by the API and unused: every connection goes to the socket.
    Endpoint::from_static("http://[::1]:1")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(socket).await?)) }
        }))
        .await
        .map_err(|source| EndpointError::Connect {
            path: path.to_path_buf(),
            source,
        })
}
