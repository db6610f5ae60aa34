//! The `[daemon]` table of devices.toml: settings of the daemon rather than of one device.
//!
//! ```toml
//! [daemon]
//! allow-dirs = ["/var/lib/images"]   # where `ctl add` may find images (Landlock)
//! control-group = "virtiod"          # control socket mode 0660, this group admitted
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
}

/// Validated `[daemon]` settings (all empty when the table is absent).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DaemonSettings {
    /// Directories under which devices added later (`ctl add`) may have their images and
    /// sockets: the daemon's Landlock rules grant them read and write access.
    pub allow_dirs: Vec<PathBuf>,
    /// The group admitted to the control socket (created mode 0660 with this group).
    pub control_group: Option<String>,
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
    if errors.is_empty() {
        Ok(DaemonSettings {
            allow_dirs,
            control_group,
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
}
