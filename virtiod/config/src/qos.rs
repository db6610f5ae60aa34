//! QoS limits of a blk device, by name: the same names in `devices.toml` (`[device.qos]`),
//! on `virtiod serve` (`--iops N`) and in `virtiod ctl qos NAME --iops N`.
//!
//! | name | value |
//! |---|---|
//! | `iops`, `read-iops`, `write-iops` | requests per second (all, reads, writes) |
//! | `bps`, `read-bps`, `write-bps` | bytes per second: a size, `100M`, `1G`, `4096` |
//! | the same with `-burst` (`iops-burst`, `read-bps-burst`, ...) | what may pass at once after an idle time (default: a tenth of a second at the limit) |
//!
//! A limit of 0 is no limit; a burst needs its limit.

use serde::Deserialize;
use toml::Spanned;
use virtiod_blk::{QosLimits, Rate};

use crate::{DeviceKind, Problems};

/// A QoS value: a number, or a size in a string (`"100M"`).
#[derive(Deserialize)]
#[serde(untagged)]
pub(crate) enum QosValue {
    Number(u64),
    Text(String),
}

/// Every QoS name, limits first, then their bursts.
pub const QOS_KEYS: [&str; 12] = [
    "iops",
    "read-iops",
    "write-iops",
    "bps",
    "read-bps",
    "write-bps",
    "iops-burst",
    "read-iops-burst",
    "write-iops-burst",
    "bps-burst",
    "read-bps-burst",
    "write-bps-burst",
];

/// The limit a QoS name is about (a limit or its burst).
fn slot<'a>(limits: &'a mut QosLimits, base: &str) -> Option<&'a mut Option<Rate>> {
    Some(match base {
        "iops" => &mut limits.iops,
        "read-iops" => &mut limits.read_iops,
        "write-iops" => &mut limits.write_iops,
        "bps" => &mut limits.bps,
        "read-bps" => &mut limits.read_bps,
        "write-bps" => &mut limits.write_bps,
        _ => return None,
    })
}

fn number(key: &str, value: &str) -> Result<u64, String> {
    if key.contains("bps") {
        virtiod_backend::parse_size(value).map_err(|e| format!("{key}: {e}"))
    } else {
        value
            .trim()
            .parse()
            .map_err(|_| format!("{key}: {value:?} is not a number of requests per second"))
    }
}

/// Build limits from `(name, value)` pairs (values as text: `2000`, `100M`). Every limit not
/// named is unlimited. Errors name the key and what to write instead.
pub fn qos_from_pairs<'a>(
    pairs: impl IntoIterator<Item = (&'a str, String)>,
) -> Result<QosLimits, String> {
    let mut limits = QosLimits::default();
    let mut bursts = Vec::new();
    for (key, value) in pairs {
        let n = number(key, &value)?;
        if let Some(base) = key.strip_suffix("-burst") {
            if slot(&mut limits, base).is_none() {
                return Err(unknown(key));
            }
            bursts.push((key, base, n));
        } else {
            let slot = slot(&mut limits, key).ok_or_else(|| unknown(key))?;
            *slot = (n > 0).then(|| Rate::new(n));
        }
    }
    for (key, base, n) in bursts {
        match slot(&mut limits, base).and_then(Option::as_mut) {
            Some(rate) if n > 0 => rate.burst = Some(n),
            Some(_) => return Err(format!("{key} = 0: a burst is at least 1")),
            None => {
                return Err(format!(
                    "{key} without {base}: a burst needs its limit (e.g. {base} = 1000)"
                ))
            }
        }
    }
    Ok(limits)
}

fn unknown(key: &str) -> String {
    format!("unknown QoS setting {key:?}: use {}", QOS_KEYS.join(", "))
}

/// The limits as `(name, value)` pairs (only those set; bursts only when given).
pub fn qos_pairs(limits: &QosLimits) -> Vec<(&'static str, u64)> {
    let mut copy = *limits;
    let mut out = Vec::new();
    for key in &QOS_KEYS[..6] {
        if let Some(rate) = slot(&mut copy, key).and_then(|r| *r) {
            out.push((*key, rate.per_sec));
        }
    }
    for key in &QOS_KEYS[6..] {
        let base = key.trim_end_matches("-burst");
        if let Some(burst) = slot(&mut copy, base).and_then(|r| r.and_then(|r| r.burst)) {
            out.push((*key, burst));
        }
    }
    out
}

/// The `[device.qos]` table (blk devices only).
pub(crate) fn validate(
    raw: Option<&Spanned<std::collections::BTreeMap<String, QosValue>>>,
    kind: Option<&DeviceKind>,
    problems: &mut Problems<'_>,
) -> QosLimits {
    let Some(raw) = raw else {
        return QosLimits::default();
    };
    if matches!(kind, Some(DeviceKind::Net(_))) {
        problems.bad(
            raw.span(),
            "qos limits are for blk devices: remove [device.qos] from this net device".into(),
        );
        return QosLimits::default();
    }
    let pairs = raw.get_ref().iter().map(|(k, v)| {
        let text = match v {
            QosValue::Number(n) => n.to_string(),
            QosValue::Text(t) => t.clone(),
        };
        (k.as_str(), text)
    });
    qos_from_pairs(pairs).unwrap_or_else(|e| {
        problems.bad(raw.span(), format!("qos: {e}"));
        QosLimits::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(text: &[(&'static str, &str)]) -> Result<QosLimits, String> {
        qos_from_pairs(text.iter().map(|(k, v)| (*k, v.to_string())))
    }

    #[test]
    fn every_name_sets_its_limit_and_round_trips() {
        let limits = pairs(&[
            ("iops", "2000"),
            ("read-iops", "100"),
            ("write-iops", "50"),
            ("bps", "100M"),
            ("read-bps", "1G"),
            ("write-bps", "4096"),
            ("iops-burst", "20"),
            ("write-bps-burst", "64K"),
        ])
        .unwrap();
        assert_eq!(
            limits.iops,
            Some(Rate {
                per_sec: 2000,
                burst: Some(20)
            })
        );
        assert_eq!(limits.read_bps, Some(Rate::new(1 << 30)));
        assert_eq!(
            limits.write_bps,
            Some(Rate {
                per_sec: 4096,
                burst: Some(64 << 10)
            })
        );
        let back = qos_pairs(&limits);
        let again = qos_from_pairs(back.iter().map(|(k, v)| (*k, v.to_string()))).unwrap();
        assert_eq!(again, limits);
    }

    #[test]
    fn zero_is_no_limit_and_mistakes_say_what_to_do() {
        assert!(pairs(&[("iops", "0")]).unwrap().is_unlimited());
        let e = pairs(&[("iops-limit", "5")]).unwrap_err();
        assert!(
            e.contains("unknown QoS setting") && e.contains("read-iops"),
            "{e}"
        );
        let e = pairs(&[("bps-burst", "1M")]).unwrap_err();
        assert!(e.contains("needs its limit"), "{e}");
        let e = pairs(&[("iops", "fast")]).unwrap_err();
        assert!(e.contains("iops") && e.contains("not a number"), "{e}");
        let e = pairs(&[("bps", "10X")]).unwrap_err();
        assert!(e.contains("bps") && e.contains("unit"), "{e}");
        let e = pairs(&[("iops", "10"), ("iops-burst", "0")]).unwrap_err();
        assert!(e.contains("at least 1"), "{e}");
    }
}
