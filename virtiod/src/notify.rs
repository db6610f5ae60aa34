//! systemd readiness (`Type=notify`): `READY=1` once every device serves, `STOPPING=1` when
//! a stop begins. A datagram to `$NOTIFY_SOCKET` (a path, or `@name` in the abstract
//! namespace); nothing happens without it.

use std::os::unix::net::UnixDatagram;

/// Send `state` (e.g. "READY=1") to the service manager, if there is one.
pub fn notify(state: &str) {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = UnixDatagram::unbound() else {
        return;
    };
    let target = target.to_string_lossy().into_owned();
    let sent = match target.strip_prefix('@') {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
                .and_then(|addr| sock.send_to_addr(state.as_bytes(), &addr))
        }
        None => sock.send_to(state.as_bytes(), &target),
    };
    if let Err(err) = sent {
        tracing::warn!(%err, socket = %target, "cannot notify the service manager");
    }
}
