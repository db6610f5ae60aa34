//! virtiod's Kubernetes CSI plugin: pods get virtiod volumes as VDUSE block devices served by
//! a running `virtiod run`, which the plugin drives through its control socket.
//!
//! The gRPC types, servers and clients of the CSI spec (v1.3.0) are in [`proto`].
#![deny(missing_docs)]

pub mod call;
pub mod capability;
pub mod controller;
pub mod daemon;
pub mod endpoint;
pub mod identity;
pub mod locks;
pub mod mounts;
pub mod node;
pub mod server;
pub mod snapshot;
pub mod source;
pub mod state;
pub mod status;
pub mod volume;

/// The CSI spec's messages, servers and clients (`csi.v1`), generated from its `api.proto`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto {
    tonic::include_proto!("csi.v1");
}
