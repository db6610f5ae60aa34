//! The `[daemon]` table of devices.toml: settings of the daemon rather than of one device.
//!
//! ```toml
//! [daemon]
//! allow-dirs = ["/var/lib/images"]   # where `ctl add` may find images (Landlock)
//! control-group = "virtiod"          # control socket mode 0660, this group admitted
//! on-stop = "keep"                   # SIGTERM leaves VDUSE devices for the next start
//! ```

use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

use crate::{ConfigErrors, Positions};

/// The `[daemon]` table as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct RawDaemon {
    #[serde(default)]
    allow_dirs: Vec<Spanned<PathBuf>>,
    control_group: Option<Spanned<String>>,
    on_stop: Option<Spanned<String>>,
}

/// What `virtiod run` does with its VDUSE devices when it is stopped (SIGTERM, SIGINT).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OnStop {
    /// Remove them: requests in flight complete, the image is flushed, the device leaves the
    /// vDPA bus and is destroyed (`/dev/vdX` disappears).
    #[default]
    Remove,
    /// Keep them: requests in flight complete and the image is flushed, then the process
    /// exits leaving the devices in the kernel, which queues the driver's requests until the
    /// next `virtiod run` with the same state directory re-opens them (a restart or an
    /// upgrade by a service manager that stops and starts the daemon).
    Keep,
}

impl std::str::FromStr for OnStop {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "remove" => Ok(Self::Remove),
            "keep" => Ok(Self::Keep),
            other => Err(format!(
                "on-stop {other:?}: use \"remove\" (destroy VDUSE devices on stop) or \"keep\" (leave them for the next start)"
            )),
        }
    }
}

impl std::fmt::Display for OnStop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Remove => "remove",
            Self::Keep => "keep",
        })
    }
}

/// Validated `[daemon]` settings (all empty when the table is absent).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DaemonSettings {
    /// Directories under which devices added later (`ctl add`) may have their images and
    /// sockets: the daemon's Landlock rules grant them read and write access.
    pub allow_dirs: Vec<PathBuf>,
    /// The group admitted to the control socket (created mode 0660 with this group).
    pub control_group: Option<String>,
    /// What a stop does with VDUSE devices (`on-stop`), if the table says.
    pub on_stop: Option<OnStop>,
}

#[derive(Deserialize)]
struct RawDaemonOnly {
    #[serde(default)]
    daemon: Option<Spanned<RawDaemon>>,
}

/// The `[daemon]` table of a devices file (defaults when absent). Only that table is
/// checked here; [`crate::parse`] checks the devices.
pub fn parse_daemon(text: &str) -> Result<DaemonSettings, ConfigErrors> {
    let pos = Positions { text };
    let raw: RawDaemonOnly = toml::from_str(text).map_err(|e| ConfigErrors(vec![pos.toml(&e)]))?;
    let Some(raw) = raw.daemon.map(Spanned::into_inner) else {
        return Ok(DaemonSettings::default());
    };
    let mut errors = Vec::new();
    let mut allow_dirs = Vec::new();
    for dir in raw.allow_dirs {
        let span = dir.span();
        let dir = dir.into_inner();
        if dir.is_absolute() {
            allow_dirs.push(dir);
        } else {
            errors.push(pos.error(
                span,
                format!(
                    "allow-dirs: {} is not an absolute path: give the full path (e.g. /var/lib/images)",
                    dir.display()
                ),
            ));
        }
    }
    let control_group = match raw.control_group {
        Some(group) if group.get_ref().trim().is_empty() => {
            errors.push(pos.error(
                group.span(),
                "control-group is empty: give a group name (or leave the key out)",
            ));
            None
        }
        other => other.map(Spanned::into_inner),
    };
    let on_stop = match raw.on_stop {
        Some(value) => match value.get_ref().parse::<OnStop>() {
            Ok(v) => Some(v),
            Err(e) => {
                errors.push(pos.error(value.span(), e));
                None
            }
        },
        None => None,
    };
    if errors.is_empty() {
        Ok(DaemonSettings {
            allow_dirs,
            control_group,
            on_stop,
        })
    } else {
        Err(ConfigErrors(errors))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_daemon_table_and_defaults_without_it() {
        let text = "[daemon]\nallow-dirs = [\"/srv/img\"]\ncontrol-group = \"disk\"\n\n[[device]]\nname = \"a\"\nimage = \"mem:1M\"\nvhost-user = \"/tmp/a.sock\"\n";
        let d = parse_daemon(text).unwrap();
        assert_eq!(d.allow_dirs, vec![PathBuf::from("/srv/img")]);
        assert_eq!(d.control_group.as_deref(), Some("disk"));
        assert_eq!(crate::parse(text).unwrap().len(), 1);
        let plain = "[[device]]\nname = \"a\"\nimage = \"mem:1M\"\nvhost-user = \"/tmp/a.sock\"\n";
        assert_eq!(parse_daemon(plain).unwrap(), DaemonSettings::default());
    }

    #[test]
    fn refuses_relative_dirs_and_unknown_keys() {
        let e = parse_daemon("[daemon]\nallow-dirs = [\"img\"]\n").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("2:15: allow-dirs: img is not an absolute path"),
            "{e}"
        );
        let e = parse_daemon("[daemon]\nallow-dir = [\"/img\"]\n").unwrap_err();
        assert!(e.to_string().contains("unknown field `allow-dir`"), "{e}");
        let e = parse_daemon("[daemon]\ncontrol-group = \" \"\n").unwrap_err();
        assert!(e.to_string().contains("control-group is empty"), "{e}");
    }

    #[test]
    fn reads_on_stop_and_refuses_other_values() {
        let d = parse_daemon("[daemon]\non-stop = \"keep\"\n").unwrap();
        assert_eq!(d.on_stop, Some(OnStop::Keep));
        let d = parse_daemon("[daemon]\non-stop = \"remove\"\n").unwrap();
        assert_eq!(d.on_stop, Some(OnStop::Remove));
        assert_eq!(parse_daemon("").unwrap().on_stop, None);
        let e = parse_daemon("[daemon]\non-stop = \"detach\"\n").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("2:11: on-stop \"detach\": use \"remove\""),
            "{e}"
        );
    }
}
