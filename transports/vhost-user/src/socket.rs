//! Creating the listening socket without hurting anyone else's files.

use std::io::ErrorKind;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use crate::Error;

/// Bind a listening unix socket at `path`.
///
/// - a socket where another process is listening: refused;
/// - a stale socket file (nobody listening): replaced;
/// - any other file: refused, never deleted.
pub fn bind_socket(path: &Path) -> Result<UnixListener, Error> {
    let shown = path.display();
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            match UnixStream::connect(path) {
                Ok(_) => {
                    return Err(Error::Socket(format!(
                        "socket {shown} is in use by another running process: stop it or choose another path"
                    )))
                }
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                    tracing::info!(path = %shown, "replacing stale socket");
                    std::fs::remove_file(path).map_err(|e| {
                        Error::Socket(format!("cannot remove stale socket {shown}: {e}"))
                    })?;
                }
                Err(e) => {
                    return Err(Error::Socket(format!(
                        "socket {shown} exists and cannot be checked ({e}): remove it or choose another path"
                    )))
                }
            }
        }
        Ok(_) => {
            return Err(Error::Socket(format!(
                "{shown} exists and is not a socket: choose another path (it will not be overwritten)"
            )))
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(Error::Socket(format!("cannot inspect {shown}: {e}"))),
    }
    UnixListener::bind(path).map_err(|e| {
        let hint = match e.kind() {
            ErrorKind::NotFound => ": the directory does not exist; create it first",
            ErrorKind::PermissionDenied => ": no permission to create a file in that directory",
            _ => "",
        };
        Error::Socket(format!("cannot create socket {shown}: {e}{hint}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_live_and_foreign_files() {
        let dir = std::env::temp_dir().join(format!("virtiod-sock-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("a.sock");
        let live = bind_socket(&sock).unwrap();
        let e = bind_socket(&sock).unwrap_err().to_string();
        assert!(e.contains("in use"), "{e}");
        drop(live); // the file stays behind: stale
        assert!(sock.exists());
        let _again = bind_socket(&sock).expect("stale socket is replaced");
        let file = dir.join("plain");
        std::fs::write(&file, b"precious").unwrap();
        let e = bind_socket(&file).unwrap_err().to_string();
        assert!(e.contains("not a socket"), "{e}");
        assert_eq!(std::fs::read(&file).unwrap(), b"precious");
        let e = bind_socket(&dir.join("no/such/dir.sock"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not exist"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
