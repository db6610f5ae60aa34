//! `virtiod-csi call RPC JSON`: one CSI call through the plugin's socket, the request and the
//! answer as JSON (the protobuf field names; enums as numbers; a oneof as `{"Variant":{...}}`).
//! For tests and for poking at a node by hand.

use std::path::Path;

use anyhow::Context;
use tonic::transport::Channel;

use crate::proto::controller_client::ControllerClient;
use crate::proto::identity_client::IdentityClient;
use crate::proto::node_client::NodeClient;

macro_rules! rpcs {
    ($channel:ident, $rpc:ident, $json:ident; $($name:literal => $client:ident :: $method:ident ($req:ident)),* $(,)?) => {
        match $rpc {
            $($name => {
                let request: crate::proto::$req = serde_json::from_str($json)
                    .with_context(|| format!("{}: the request is not valid JSON for it", $name))?;
                let answer = $client::new($channel)
                    .$method(request)
                    .await
                    .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?;
                Ok(serde_json::to_value(answer.into_inner())?)
            })*
            other => anyhow::bail!(
                "unknown RPC {other:?}: one of {}",
                [$($name),*].join(", ")
            ),
        }
    };
}

/// Call `rpc` (e.g. `NodeStageVolume`) with `json` on the plugin at `socket`; the answer as
/// JSON. A gRPC error is returned as `code: message`.
pub async fn call(socket: &Path, rpc: &str, json: &str) -> anyhow::Result<serde_json::Value> {
    let channel: Channel = crate::endpoint::connect(socket).await?;
    let json = if json.trim().is_empty() { "{}" } else { json };
    rpcs!(channel, rpc, json;
        "GetPluginInfo" => IdentityClient::get_plugin_info(GetPluginInfoRequest),
        "GetPluginCapabilities" => IdentityClient::get_plugin_capabilities(GetPluginCapabilitiesRequest),
        "Probe" => IdentityClient::probe(ProbeRequest),
        "CreateVolume" => ControllerClient::create_volume(CreateVolumeRequest),
        "DeleteVolume" => ControllerClient::delete_volume(DeleteVolumeRequest),
        "ValidateVolumeCapabilities" => ControllerClient::validate_volume_capabilities(ValidateVolumeCapabilitiesRequest),
        "ControllerGetCapabilities" => ControllerClient::controller_get_capabilities(ControllerGetCapabilitiesRequest),
        "ControllerExpandVolume" => ControllerClient::controller_expand_volume(ControllerExpandVolumeRequest),
        "GetCapacity" => ControllerClient::get_capacity(GetCapacityRequest),
        "CreateSnapshot" => ControllerClient::create_snapshot(CreateSnapshotRequest),
        "DeleteSnapshot" => ControllerClient::delete_snapshot(DeleteSnapshotRequest),
        "NodeStageVolume" => NodeClient::node_stage_volume(NodeStageVolumeRequest),
        "NodeUnstageVolume" => NodeClient::node_unstage_volume(NodeUnstageVolumeRequest),
        "NodePublishVolume" => NodeClient::node_publish_volume(NodePublishVolumeRequest),
        "NodeUnpublishVolume" => NodeClient::node_unpublish_volume(NodeUnpublishVolumeRequest),
        "NodeGetVolumeStats" => NodeClient::node_get_volume_stats(NodeGetVolumeStatsRequest),
        "NodeExpandVolume" => NodeClient::node_expand_volume(NodeExpandVolumeRequest),
        "NodeGetCapabilities" => NodeClient::node_get_capabilities(NodeGetCapabilitiesRequest),
        "NodeGetInfo" => NodeClient::node_get_info(NodeGetInfoRequest),
    )
}
