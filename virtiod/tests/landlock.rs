//! Landlock (`--landlock on`, the default): the daemon serves what its configuration names,
//! cannot open anything else, and `ctl add` takes images only under `--allow-dir`.

mod common;

use std::fs::File;
use std::path::Path;

use common::*;
use virtiod_testkit::process::Served;

/// The kernel's Landlock ABI (0: none).
fn landlock_abi() -> i64 {
    // SAFETY: landlock_create_ruleset(NULL, 0, VERSION) only returns the ABI version.
    let abi = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            1u32,
        )
    };
    abi.max(0)
}

fn have_landlock() -> bool {
    if landlock_abi() < 5 {
        skip_or_fail("this kernel has no Landlock ABI 5 (6.10 or later)");
        return false;
    }
    true
}

/// `virtiod ctl --control PATH ARGS...`: (exit code, stdout, stderr).
fn ctl(control: &Path, args: &[&str]) -> (i32, String, String) {
    let out = virtiod()
        .args(["ctl", "--control"])
        .arg(control)
        .args(args)
        .output()
        .expect("run virtiod ctl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Write a pattern through the socket, read it back.
fn round_trip(socket: &Path, seed: u64) {
    let mut client = Client::connect(socket, 1, 1 << 20).unwrap();
    fill_pattern(&mut client.buf()[..1 << 20], 0, seed);
    assert_eq!(client.write(0, 0, 0, 1 << 20), 0);
    assert_eq!(client.flush(0), 0);
    client.buf().fill(0);
    assert_eq!(client.read(0, 0, 0, 1 << 20), 0);
    check_pattern(&client.buf()[..1 << 20], 0, seed).unwrap();
}

#[test]
fn serves_its_image_and_cannot_open_other_files() {
    if !have_landlock() {
        return;
    }
    let dir = Scratch::new("landlock-serve");
    let img = dir.image("disk.img", 4 << 20);
    let secret = dir.image("secret", 4096);
    let (sock, log) = (dir.path("vu.sock"), dir.path("daemon.log"));
    let mut cmd = virtiod();
    cmd.args(["serve", "--vhost-user"])
        .arg(&sock)
        .arg(&img)
        .env("VIRTIOD_DEBUG_LANDLOCK_OPEN", &secret)
        .stderr(File::create(&log).unwrap());
    let served = Served::start(cmd, &sock);
    round_trip(&sock, 7);
    assert!(served.terminate().success());
    check_pattern(&std::fs::read(&img).unwrap()[..1 << 20], 0, 7).unwrap();
    let log = std::fs::read_to_string(&log).unwrap();
    // The file beside the image is refused: only the image itself is granted.
    let line = format!(
        "virtiod: debug: opening {}: refused: Permission denied",
        secret.display()
    );
    assert!(log.contains(&line), "{log}");
    assert!(log.contains("landlock: enforced"), "{log}");
}

#[test]
fn landlock_off_restricts_nothing() {
    let dir = Scratch::new("landlock-off");
    let secret = dir.image("secret", 4096);
    let (sock, log) = (dir.path("vu.sock"), dir.path("daemon.log"));
    let mut cmd = virtiod();
    cmd.args(["serve", "--landlock", "off", "--vhost-user"])
        .arg(&sock)
        .arg("mem:4M")
        .env("VIRTIOD_DEBUG_LANDLOCK_OPEN", &secret)
        .stderr(File::create(&log).unwrap());
    let served = Served::start(cmd, &sock);
    assert!(served.terminate().success());
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(!log.contains("virtiod: debug: opening"), "{log}");
    assert!(!log.contains("landlock: enforced"), "{log}");
}

#[test]
fn ctl_add_takes_images_only_under_an_allowed_directory() {
    if !have_landlock() {
        return;
    }
    let dir = Scratch::new("landlock-add");
    std::fs::create_dir(dir.path("allowed")).unwrap();
    std::fs::create_dir(dir.path("outside")).unwrap();
    let inside = dir.image("allowed/in.img", 4 << 20);
    let outside = dir.image("outside/out.img", 4 << 20);
    let link = dir.path("allowed/link.img");
    std::os::unix::fs::symlink(&outside, &link).unwrap();
    let (sock, control) = (dir.path("vu.sock"), dir.path("ctl.sock"));
    let mut cmd = virtiod();
    cmd.args(["serve", "--vhost-user"])
        .arg(&sock)
        .arg("--control")
        .arg(&control)
        .arg("--allow-dir")
        .arg(dir.path("allowed"))
        .arg("mem:4M");
    let served = Served::start(cmd, &sock);
    let add = |name: &str, image: &Path| {
        let spec = format!(
            "name = \"{name}\"\nimage = \"{}\"\nvhost-user = \"{}\"\n",
            image.display(),
            dir.path(&format!("{name}.sock")).display()
        );
        ctl(&control, &["add", &spec])
    };

    // Outside: refused before anything is opened, with the option to set.
    let (code, _, err) = add("o", &outside);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("outside the directories this daemon may open") && err.contains("--allow-dir"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    // Also through `..` out of the allowed directory.
    let sneaky = dir.path("allowed/../outside/out.img");
    let (code, _, err) = add("s", &sneaky);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--allow-dir"), "{err}");

    // A symbolic link inside that names a file outside: the path passes the check, the
    // kernel refuses the file it resolves to.
    let (code, _, err) = add("l", &link);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("Permission denied"), "{err}");

    // Inside: served.
    let (code, out, err) = add("i", &inside);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), dir.path("i.sock").to_str().unwrap());
    round_trip(&dir.path("i.sock"), 3);
    let (code, _, err) = ctl(&control, &["remove", "i"]);
    assert_eq!(code, 0, "{err}");
    assert!(served.terminate().success());
    check_pattern(&std::fs::read(&inside).unwrap()[..1 << 20], 0, 3).unwrap();
}

#[test]
fn run_reads_allow_dirs_from_the_daemon_table() {
    if !have_landlock() {
        return;
    }
    let dir = Scratch::new("landlock-run");
    std::fs::create_dir(dir.path("imgs")).unwrap();
    let later = dir.image("imgs/later.img", 4 << 20);
    let (sock, control, config) = (dir.path("a.sock"), dir.path("ctl.sock"), dir.path("d.toml"));
    std::fs::write(
        &config,
        format!(
            "[daemon]\nallow-dirs = [\"{}\"]\n\n[[device]]\nname = \"a\"\nimage = \"mem:4M\"\nvhost-user = \"{}\"\n",
            dir.path("imgs").display(),
            sock.display()
        ),
    )
    .unwrap();
    let mut cmd = virtiod();
    cmd.args(["run", "--config"])
        .arg(&config)
        .arg("--control")
        .arg(&control)
        .arg("--state-dir")
        .arg(dir.path("state"));
    let served = Served::start(cmd, &sock);
    let spec = format!(
        "name = \"b\"\nimage = \"{}\"\nvhost-user = \"{}\"\n",
        later.display(),
        dir.path("b.sock").display()
    );
    let (code, _, err) = ctl(&control, &["add", &spec]);
    assert_eq!(code, 0, "{err}");
    round_trip(&dir.path("b.sock"), 5);
    assert!(served.terminate().success());
}
