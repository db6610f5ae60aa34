//! A device's description as the JSON object `virtiod ctl add` (and
//! [`virtiod_config::parse_device`]) takes: what the old process sends the new one for every
//! device it serves, including those added with `ctl add` and with QoS limits changed since.

use serde_json::{json, Map, Value};
use virtiod_config::{Attach, DeviceKind, DeviceSpec, Transport};

/// `spec` as a JSON object that parses back to the same spec.
pub fn to_text(spec: &DeviceSpec) -> String {
    let mut obj = Map::new();
    let mut put = |k: &str, v: Value| {
        obj.insert(k.to_string(), v);
    };
    put("name", json!(spec.name));
    match &spec.kind {
        DeviceKind::Blk => put("image", json!(spec.image)),
        DeviceKind::Net(net) => {
            put("net", json!(net.backend.to_string()));
            if let Some(mac) = &net.mac {
                put("mac", json!(virtiod_config::format_mac(mac)));
            }
            if let Some(mtu) = net.mtu {
                put("mtu", json!(mtu));
            }
        }
    }
    match &spec.transport {
        Transport::VhostUser(path) => put("vhost-user", json!(path)),
        Transport::Vduse { name, attach } => {
            put("vduse", json!(name));
            let attach = match attach {
                Attach::Virtio => "virtio",
                Attach::Vhost => "vhost",
                Attach::None => "none",
            };
            put("attach", json!(attach));
        }
    }
    put("queues", json!(spec.queues));
    put("queue-size", json!(spec.queue_size));
    put("read-only", json!(spec.read_only));
    put("buffered", json!(spec.buffered));
    if matches!(spec.kind, DeviceKind::Blk) {
        put("serial", json!(spec.serial));
    }
    put("poll-us", json!(spec.poll_us));
    let qos: Map<String, Value> = virtiod_config::qos_pairs(&spec.qos)
        .into_iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    if !qos.is_empty() {
        put("qos", Value::Object(qos));
    }
    Value::Object(obj).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(text: &str) {
        let spec = virtiod_config::parse_device(text).unwrap();
        let back = virtiod_config::parse_device(&to_text(&spec))
            .unwrap_or_else(|e| panic!("{e}: {}", to_text(&spec)));
        assert_eq!(back, spec, "{}", to_text(&spec));
    }

    #[test]
    fn every_kind_of_device_parses_back_to_itself() {
        round_trip("name = \"a\"\nimage = \"/img/a.img\"\nvhost-user = \"/run/a.sock\"");
        round_trip(
            "name = \"b\"\nimage = \"qcow2:/img/b.qcow2\"\nvduse = \"vd-b\"\nattach = \"vhost\"\n\
             queues = 4\nqueue-size = 128\nread-only = true\nserial = \"vol-7\"\npoll-us = 0\n\
             [qos]\niops = 2000\nwrite-bps = \"50M\"\nwrite-bps-burst = \"8M\"",
        );
        round_trip("name = \"c\"\nimage = \"mem:64M\"\nvduse = \"vd-c\"\nbuffered = true");
        round_trip(
            "name = \"n\"\nnet = \"switch:sw0\"\nmac = \"52:54:00:12:34:56\"\nmtu = 9000\n\
             vhost-user = \"/run/n.sock\"\nqueues = 2",
        );
        round_trip("name = \"t\"\nnet = \"tap:tap0\"\nvduse = \"vt\"");
    }
}
