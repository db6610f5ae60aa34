//! A CSI conformance suite: the checks of kubernetes-csi's `csi-sanity` (`pkg/sanity`),
//! written anew in Rust and run over a plugin's unix socket with the clients of
//! `virtiod_csi::proto` (CSI v1.3.0).
//!
//! Each check is one call sequence and one expectation from the CSI spec: required fields
//! missing → `INVALID_ARGUMENT`, unknown volumes → `NOT_FOUND`, idempotent creation and
//! deletion, `ALREADY_EXISTS` for a name reused with another capacity, publish before stage
//! → `FAILED_PRECONDITION`, and so on. A check of a capability the plugin does not announce
//! is skipped (with the reason); checks that stage or publish a volume (which needs the node
//! to serve a block device: VDUSE for virtiod) are skipped with [`Config::skip_node_io`].
//!
//! ```no_run
//! # async fn f() {
//! let config = csi_sanity::Config::new("/csi/csi.sock".into(), "/tmp/sanity".into());
//! let report = csi_sanity::run(&config).await.expect("connect");
//! print!("{report}");
//! assert_eq!(report.failed(), 0);
//! # }
//! ```
//!
//! The binary, `csi-sanity`, runs the same checks from a shell, e.g. in the test VM against a
//! plugin serving VDUSE volumes (every check, node I/O included; `tests/vm/suite-csi.sh` runs
//! it so):
//!
//! ```text
//! csi-sanity --endpoint unix:///run/virtiod-csi/csi.sock --work-dir /tmp/sanity
//! csi-sanity --endpoint unix:///csi/csi.sock --test-volume-size 67108864   # 64 MiB volumes
//! csi-sanity --endpoint unix:///csi/csi.sock --skip-node-io      # a host without VDUSE
//! ```
//!
//! `--test-volume-size` (bytes, default 16 MiB; csi-sanity's `-csi.testvolumesize`) is the
//! size of the volumes the checks create ([`Config::volume_size`]); the expansion checks ask
//! for twice that. One check creates a volume with no capacity range, which gets the plugin's
//! own default size (1 GiB for virtiod-csi): its `--local-dir` needs that much free.
//!
//! It prints `PASS`/`FAIL`/`SKIP` and the check's name, one line each, then a count, and
//! exits 1 when a check failed (2 when the plugin cannot be reached). The checks are those of
//! csi-test's `pkg/sanity` that apply to a plugin without ControllerPublish; one more is
//! NodePublishVolume before NodeStageVolume (FAILED_PRECONDITION, as the spec's error table
//! says for a missing or unstaged staging path).
#![deny(missing_docs)]

mod controller;
mod ctx;
mod identity;
mod node;
mod snapshot;

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;

pub use ctx::Ctx;

/// What to test and how.
#[derive(Debug, Clone)]
pub struct Config {
    /// The plugin's socket (Identity and Node services, and Controller unless
    /// [`Config::controller_socket`] names another).
    pub socket: PathBuf,
    /// The socket of a separate controller plugin, if any.
    pub controller_socket: Option<PathBuf>,
    /// Where the staging and target paths of the node checks are made.
    pub work_dir: PathBuf,
    /// The size of the volumes created, in bytes.
    pub volume_size: u64,
    /// CreateVolume's `parameters` (the StorageClass parameters).
    pub parameters: HashMap<String, String>,
    /// The secrets passed to every call that takes them.
    pub secrets: HashMap<String, String>,
    /// The filesystem of the mount volumes asked for.
    pub fs_type: String,
    /// Skip the checks that stage or publish a volume for real.
    pub skip_node_io: bool,
}

impl Config {
    /// A configuration with the defaults: 16 MiB ext4 volumes, no parameters or secrets,
    /// node I/O checks on.
    pub fn new(socket: PathBuf, work_dir: PathBuf) -> Self {
        Self {
            socket,
            controller_socket: None,
            work_dir,
            volume_size: 16 << 20,
            parameters: HashMap::new(),
            secrets: HashMap::new(),
            fs_type: "ext4".into(),
            skip_node_io: false,
        }
    }
}

/// The result of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The plugin behaved as the spec says.
    Passed,
    /// It did not: what was expected and what came.
    Failed(String),
    /// The check does not apply (a capability not announced, node I/O skipped).
    Skipped(String),
}

/// What a check returns: `Err` is a failure or a skip.
pub type CheckResult = Result<(), Outcome>;

/// Fail a check with a message (`Err(Outcome::Failed)`).
pub(crate) fn fail<T>(message: impl Into<String>) -> Result<T, Outcome> {
    Err(Outcome::Failed(message.into()))
}

/// Skip a check with a reason (`Err(Outcome::Skipped)`).
pub(crate) fn skip<T>(reason: impl Into<String>) -> Result<T, Outcome> {
    Err(Outcome::Skipped(reason.into()))
}

/// Every check run, in order, with its outcome.
#[derive(Debug, Default)]
pub struct Report {
    /// `(name, outcome)`; names are `Service/RPC: expectation`.
    pub checks: Vec<(String, Outcome)>,
}

impl Report {
    fn record(&mut self, name: &str, result: CheckResult) {
        let outcome = match result {
            Ok(()) => Outcome::Passed,
            Err(o) => o,
        };
        self.checks.push((name.to_string(), outcome));
    }

    fn count(&self, pred: impl Fn(&Outcome) -> bool) -> usize {
        self.checks.iter().filter(|(_, o)| pred(o)).count()
    }

    /// How many checks passed.
    pub fn passed(&self) -> usize {
        self.count(|o| *o == Outcome::Passed)
    }

    /// How many failed.
    pub fn failed(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Failed(_)))
    }

    /// How many were skipped.
    pub fn skipped(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Skipped(_)))
    }

    /// The outcome of the check called `name`.
    pub fn outcome(&self, name: &str) -> Option<&Outcome> {
        self.checks.iter().find(|(n, _)| n == name).map(|(_, o)| o)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, outcome) in &self.checks {
            match outcome {
                Outcome::Passed => writeln!(f, "PASS {name}")?,
                Outcome::Failed(why) => writeln!(f, "FAIL {name}: {why}")?,
                Outcome::Skipped(why) => writeln!(f, "SKIP {name}: {why}")?,
            }
        }
        writeln!(
            f,
            "csi-sanity: {} passed, {} failed, {} skipped",
            self.passed(),
            self.failed(),
            self.skipped()
        )
    }
}

/// Why the suite could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum SanityError {
    /// The plugin's socket cannot be reached.
    #[error("cannot connect to the plugin: {0}: is it running, and is this its --endpoint?")]
    Connect(String),
    /// The work directory cannot be made.
    #[error("cannot create the work directory {path}: {source}")]
    WorkDir {
        /// The directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// Run every check against the plugin of `config`; the volumes the suite created are deleted
/// at the end (staged or published ones unpublished and unstaged first).
pub async fn run(config: &Config) -> Result<Report, SanityError> {
    std::fs::create_dir_all(&config.work_dir).map_err(|source| SanityError::WorkDir {
        path: config.work_dir.clone(),
        source,
    })?;
    let mut ctx = Ctx::connect(config.clone()).await?;
    let mut report = Report::default();
    identity::run(&mut ctx, &mut report).await;
    controller::run(&mut ctx, &mut report).await;
    node::run(&mut ctx, &mut report).await;
    ctx.cleanup().await;
    Ok(report)
}
