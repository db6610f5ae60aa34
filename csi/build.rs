//! Generates the CSI types and gRPC services from the spec's `api.proto` (v1.3.0), read from
//! the `k8s-csi` crate package (a never-compiled build-dependency, see Cargo.toml), with the
//! `protoc` of `protoc-bin-vendored`.

use std::path::{Path, PathBuf};
use std::process::Command;

const PACKAGE: &str = "k8s-csi";
const PROTO: &str = "proto/csi/v1.3.0/api.proto";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=VIRTIOD_CSI_PROTO");
    let proto = match std::env::var_os("VIRTIOD_CSI_PROTO") {
        Some(path) => PathBuf::from(path),
        None => locate_proto().unwrap_or_else(|e| panic!("{e}")),
    };
    let proto_dir = proto.parent().expect("the proto file is in a directory");
    let protoc = protoc_bin_vendored::protoc_bin_path()
        .expect("protoc-bin-vendored has no protoc for this host: set PROTOC to a protoc binary");
    if std::env::var_os("PROTOC").is_none() {
        // Edition 2021: a single-threaded build script may set its own environment.
        std::env::set_var("PROTOC", protoc);
    }
    let well_known = protoc_bin_vendored::include_path().expect("protoc-bin-vendored include path");
    // serde on every message (JSON in `virtiod-csi call` and in tests); a missing field
    // takes its protobuf default, as in the protobuf JSON mapping.
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .message_attribute(
            ".",
            "#[derive(serde::Serialize, serde::Deserialize)] #[serde(default)]",
        )
        .enum_attribute(".", "#[derive(serde::Serialize, serde::Deserialize)]")
        .field_attribute("csi.v1.Snapshot.creation_time", "#[serde(skip)]")
        .compile_protos(&[proto.as_path()], &[proto_dir, well_known.as_path()])
        .unwrap_or_else(|e| panic!("cannot compile {}: {e}", proto.display()));
}

/// The `api.proto` inside the `k8s-csi` package, found through `cargo metadata` (which
/// downloads the package if it is not in the local registry yet).
fn locate_proto() -> Result<PathBuf, String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = Path::new(&std::env::var("CARGO_MANIFEST_DIR").map_err(|e| e.to_string())?)
        .join("Cargo.toml");
    let output = Command::new(&cargo)
        .args(["metadata", "--format-version", "1", "--manifest-path"])
        .arg(&manifest)
        .output()
        .map_err(|e| format!("cannot run `{cargo} metadata` to find the {PACKAGE} package: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "`cargo metadata` failed while looking for the {PACKAGE} package (set \
             VIRTIOD_CSI_PROTO to the CSI api.proto to skip this): {}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout)
        .map_err(|e| format!("cannot parse `cargo metadata` output: {e}"))?;
    let package = metadata["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == PACKAGE)
        .ok_or_else(|| format!("`cargo metadata` lists no {PACKAGE} package"))?;
    let manifest_path = package["manifest_path"]
        .as_str()
        .ok_or_else(|| format!("{PACKAGE} has no manifest_path"))?;
    let proto = Path::new(manifest_path)
        .parent()
        .ok_or("manifest_path has no directory")?
        .join(PROTO);
    if !proto.is_file() {
        return Err(format!("{} is missing", proto.display()));
    }
    println!("cargo:rerun-if-changed={}", proto.display());
    Ok(proto)
}
