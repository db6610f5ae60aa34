//! A throwaway single-node Ceph cluster for RBD tests (`tests/ceph/start-cluster.sh`: one
//! monitor, one memstore OSD, cephx, loopback, a pool `rbd`), stopped and removed at drop.
//!
//! ```no_run
//! use virtiod_testkit::ceph::{TestCluster, NOT_INSTALLED};
//!
//! let Some(cluster) = TestCluster::start(std::env::temp_dir().join("my-test-cluster")) else {
//!     eprintln!("SKIPPED: {NOT_INSTALLED}");
//!     return;
//! };
//! cluster.tool("rbd", &["create", "rbd/disk", "--size", "16M"]);
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;

/// Why [`TestCluster::start`] answered `None`: what a skipped test should say.
pub const NOT_INSTALLED: &str =
    "Ceph is not installed (scripts/setup.sh installs ceph-mon ceph-osd ceph-common)";

/// A running test cluster under one directory.
#[derive(Debug)]
pub struct TestCluster {
    dir: PathBuf,
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/ceph")
        .join(name)
}

impl TestCluster {
    /// Start a cluster under `dir` (removed first if it exists); `None` when Ceph is not
    /// installed. Panics with the script's stderr when it fails.
    pub fn start(dir: PathBuf) -> Option<Self> {
        if Command::new("ceph-osd").arg("--version").output().is_err() {
            return None;
        }
        let _ = std::fs::remove_dir_all(&dir);
        let cluster = Self { dir };
        let out = Command::new("bash")
            .arg(script("start-cluster.sh"))
            .arg(&cluster.dir)
            .output()
            .expect("run tests/ceph/start-cluster.sh");
        assert!(
            out.status.success(),
            "start-cluster.sh failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(cluster)
    }

    /// The cluster's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Its configuration file (monitors, and the admin keyring).
    pub fn conf(&self) -> PathBuf {
        self.dir.join("ceph.conf")
    }

    /// Run a Ceph tool (`ceph`, `rbd`, `rados`) with `-c CONF`; its stdout. Panics when the
    /// tool fails.
    pub fn run(&self, tool: &str, args: &[&str]) -> Vec<u8> {
        let out = Command::new(tool)
            .arg("-c")
            .arg(self.conf())
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run {tool}: {e}"));
        assert!(
            out.status.success(),
            "{tool} {args:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// [`Self::run`], its stdout as trimmed text.
    pub fn tool(&self, tool: &str, args: &[&str]) -> String {
        String::from_utf8_lossy(&self.run(tool, args))
            .trim()
            .to_string()
    }

    /// The monitor address of the configuration (`mon host = …`).
    pub fn mon_host(&self) -> String {
        let conf = std::fs::read_to_string(self.conf()).expect("read the test ceph.conf");
        conf.lines()
            .find_map(|l| l.strip_prefix("mon host = "))
            .expect("mon host in ceph.conf")
            .to_string()
    }

    /// Create (or get) cephx user `client.ID` with the capabilities of an RBD client of pool
    /// `rbd` (what a CSI Secret would carry); its key.
    pub fn rbd_user(&self, id: &str) -> String {
        let client = format!("client.{id}");
        self.tool(
            "ceph",
            &[
                "auth",
                "get-or-create",
                &client,
                "mon",
                "profile rbd",
                "osd",
                "profile rbd pool=rbd",
            ],
        );
        self.tool("ceph", &["auth", "get-key", &client])
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(script("stop-cluster.sh"))
            .arg(&self.dir)
            .status();
    }
}
