//! The Identity service through the plugin's socket, as a CO sees it.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use virtiod_csi::proto::identity_client::IdentityClient;
use virtiod_csi::proto::plugin_capability::{self, service, volume_expansion};
use virtiod_csi::proto::{GetPluginCapabilitiesRequest, GetPluginInfoRequest, ProbeRequest};

struct Plugin(Child);

impl Drop for Plugin {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(dir: &Path, daemon: &Path) -> Plugin {
    let socket = dir.join("csi.sock");
    let child = Command::new(env!("CARGO_BIN_EXE_virtiod-csi"))
        .arg("--endpoint")
        .arg(format!("unix://{}", socket.display()))
        .args(["--node-id", "node-a", "--role", "node"])
        .arg("--daemon-socket")
        .arg(daemon)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .spawn()
        .expect("start virtiod-csi");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "virtiod-csi did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    Plugin(child)
}

/// A daemon control socket answering every request with an empty list.
fn fake_daemon(path: &Path) {
    let listener = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut line = String::new();
            if BufReader::new(&stream).read_line(&mut line).is_ok() {
                let _ = (&stream).write_all(b"{\"ok\":true,\"result\":[]}\n");
            }
        }
    });
}

#[tokio::test]
async fn identity_answers_and_probe_follows_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = dir.path().join("control.sock");
    let _plugin = start(dir.path(), &daemon);
    let channel = virtiod_csi::endpoint::connect(&dir.path().join("csi.sock"))
        .await
        .unwrap();
    let mut client = IdentityClient::new(channel);

    let info = client
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "csi.virtiod.io");
    assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));

    let caps = client
        .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    let types: Vec<_> = caps.into_iter().filter_map(|c| c.r#type).collect();
    let has_service = |t: service::Type| {
        types
            .iter()
            .any(|c| matches!(c, plugin_capability::Type::Service(s) if s.r#type == t as i32))
    };
    assert!(has_service(service::Type::ControllerService));
    assert!(has_service(service::Type::VolumeAccessibilityConstraints));
    assert!(types.iter().any(|c| matches!(c,
        plugin_capability::Type::VolumeExpansion(e) if e.r#type == volume_expansion::Type::Online as i32)));

    // No daemon yet: not ready. Once it answers `list`: ready.
    let probe = client.probe(ProbeRequest {}).await.unwrap().into_inner();
    assert_eq!(probe.ready, Some(false));
    fake_daemon(&daemon);
    let probe = client.probe(ProbeRequest {}).await.unwrap().into_inner();
    assert_eq!(probe.ready, Some(true));
}
