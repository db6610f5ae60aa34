//! Net devices: `net = "switch:NAME"` or `net = "tap:NAME"` with optional `mac` and `mtu` (in
//! place of `image`), and the `net:switch=NAME` / `net:tap=NAME` forms `virtiod serve` takes.

use std::fmt;

/// Smallest MTU (IPv4's minimum datagram).
pub const MIN_MTU: u16 = 68;

/// A MAC address.
pub type Mac = [u8; 6];

/// Where a net device's frames go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetBackendSpec {
    /// A port on the in-process switch of that name.
    Switch(String),
    /// The Linux tap interface of that name (created, or an existing one attached to).
    Tap(String),
}

impl fmt::Display for NetBackendSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Switch(name) => write!(f, "switch:{name}"),
            Self::Tap(name) => write!(f, "tap:{name}"),
        }
    }
}

/// A virtio-net device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetSpec {
    /// Where its frames go.
    pub backend: NetBackendSpec,
    /// Its MAC address (derived from the VDUSE name or socket path when `None`).
    pub mac: Option<Mac>,
    /// Its MTU (the device's default when `None`).
    pub mtu: Option<u16>,
}

/// What a device is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceKind {
    /// virtio-blk serving `DeviceSpec::image`.
    Blk,
    /// virtio-net (`DeviceSpec::image` is empty).
    Net(NetSpec),
}

/// A switch name: letters, digits, '.', '_' or '-', not empty.
fn check_switch_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
    {
        return Err(format!(
            "switch name {name:?}: use letters, digits, '.', '_' or '-'"
        ));
    }
    Ok(())
}

/// An interface name as the kernel takes it: 1 to 15 bytes (IFNAMSIZ), not `.` or `..`,
/// without '/', ':' or white space.
fn check_tap_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 15
        || name == "."
        || name == ".."
        || name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "tap name {name:?}: give 1 to 15 bytes (IFNAMSIZ) without '/', ':' or spaces"
        ));
    }
    Ok(())
}

/// `switch:NAME` or `tap:NAME` (the `net` key of devices.toml).
pub fn parse_net_backend(text: &str) -> Result<NetBackendSpec, String> {
    match text.split_once(':') {
        Some(("switch", name)) => {
            check_switch_name(name)?;
            Ok(NetBackendSpec::Switch(name.to_string()))
        }
        Some(("tap", name)) => {
            check_tap_name(name)?;
            Ok(NetBackendSpec::Tap(name.to_string()))
        }
        _ => Err(format!(
            "net {text:?}: give switch:NAME (a port on the in-process switch NAME) or tap:NAME (the tap interface NAME)"
        )),
    }
}

/// `net:switch=NAME` or `net:tap=NAME` (the IMAGE argument of `virtiod serve`); `None` when `text` is not a net
/// spec at all (it is then an image).
pub fn parse_cli_net(text: &str) -> Option<Result<NetBackendSpec, String>> {
    let rest = text.strip_prefix("net:")?;
    Some(match rest.split_once('=') {
        Some(("switch", name)) => {
            check_switch_name(name).map(|()| NetBackendSpec::Switch(name.into()))
        }
        Some(("tap", name)) => check_tap_name(name).map(|()| NetBackendSpec::Tap(name.into())),
        _ => Err(format!(
            "{text:?}: give net:switch=NAME (a port on the in-process switch NAME) or net:tap=NAME (the tap interface NAME)"
        )),
    })
}

/// `52:54:00:12:34:56` (or with '-'); a multicast address is refused.
pub fn parse_mac(text: &str) -> Result<Mac, String> {
    let bad = || format!("MAC {text:?}: give six hex bytes like 52:54:00:12:34:56");
    let parts: Vec<&str> = text.split([':', '-']).collect();
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(&parts) {
        if part.len() != 2 {
            return Err(bad());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    if mac[0] & 1 != 0 {
        return Err(format!(
            "MAC {text:?} is a multicast address: clear the lowest bit of the first byte (e.g. 52:54:00:12:34:56)"
        ));
    }
    Ok(mac)
}

/// `mtu`: [`MIN_MTU`] to 65535.
pub fn check_mtu(mtu: u16) -> Result<u16, String> {
    if mtu < MIN_MTU {
        return Err(format!("MTU {mtu}: give {MIN_MTU} to 65535"));
    }
    Ok(mtu)
}

/// `52:54:00:12:34:56`.
pub fn format_mac(mac: &Mac) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_macs_backends_and_cli_specs() {
        assert_eq!(
            parse_mac("52:54:00:12:34:56"),
            Ok([0x52, 0x54, 0, 0x12, 0x34, 0x56])
        );
        assert_eq!(parse_mac("02-00-00-00-00-0A"), Ok([2, 0, 0, 0, 0, 10]));
        for bad in [
            "",
            "52:54:00:12:34",
            "52:54:00:12:34:5g",
            "525:4:00:12:34:56",
            "01:00:5e:00:00:01",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
        assert_eq!(
            format_mac(&[0x52, 0x54, 0, 0x12, 0x34, 0x56]),
            "52:54:00:12:34:56"
        );
        assert_eq!(
            parse_net_backend("switch:sw0"),
            Ok(NetBackendSpec::Switch("sw0".into()))
        );
        assert!(parse_net_backend("switch:").is_err());
        assert_eq!(
            parse_net_backend("tap:tap0"),
            Ok(NetBackendSpec::Tap("tap0".into()))
        );
        assert_eq!(NetBackendSpec::Tap("tap0".into()).to_string(), "tap:tap0");
        for bad in [
            "tap:",
            "tap:a/b",
            "tap:a b",
            "tap:1234567890123456",
            "tap:..",
        ] {
            assert!(parse_net_backend(bad).is_err(), "{bad}");
        }
        assert!(parse_net_backend("tap:123456789012345").is_ok());
        assert!(parse_net_backend("vde:x").is_err());
        assert_eq!(
            parse_cli_net("net:switch=sw0"),
            Some(Ok(NetBackendSpec::Switch("sw0".into())))
        );
        assert!(matches!(parse_cli_net("net:switch="), Some(Err(_))));
        assert_eq!(
            parse_cli_net("net:tap=vtt1"),
            Some(Ok(NetBackendSpec::Tap("vtt1".into())))
        );
        let long = parse_cli_net("net:tap=1234567890123456")
            .unwrap()
            .unwrap_err();
        assert!(long.contains("15 bytes"), "{long}");
        assert!(matches!(parse_cli_net("net:vde=x"), Some(Err(_))));
        assert_eq!(parse_cli_net("mem:1M"), None);
        assert!(check_mtu(67).is_err() && check_mtu(9000).is_ok());
    }
}
