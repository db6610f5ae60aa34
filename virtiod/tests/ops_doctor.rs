//! `virtiod doctor` on this very host: the report, its JSON form and the exit status agree
//! with what the host has (the build host has no VDUSE; the VM suite checks the other side).

mod common;

use common::*;

fn doctor(args: &[&str]) -> (i32, String) {
    let dir = Scratch::new(&format!("doctor{}", args.len()));
    let out = virtiod()
        .arg("doctor")
        .arg("--state-dir")
        .arg(dir.path("state"))
        .args(args)
        .output()
        .expect("run virtiod doctor");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).expect("utf-8 report"),
    )
}

fn has_vduse() -> bool {
    std::path::Path::new("/dev/vduse/control").exists()
}

#[test]
fn text_report_has_one_verdict_per_line() {
    let (code, text) = doctor(&[]);
    let lines: Vec<&str> = text.lines().collect();
    let (last, checks) = lines.split_last().expect("a report");
    for line in checks {
        assert!(
            line.starts_with("OK   ") || line.starts_with("WARN ") || line.starts_with("FAIL "),
            "{line}"
        );
    }
    for name in [
        "kernel:",
        "module vduse:",
        "/dev/vduse/control:",
        "io_uring:",
        "O_DIRECT:",
        "memlock:",
        "privileges:",
        "hugepages:",
    ] {
        assert!(
            checks.iter().any(|l| l[5..].starts_with(name)),
            "no {name} line:\n{text}"
        );
    }
    let control = checks
        .iter()
        .find(|l| l.contains("/dev/vduse/control:"))
        .unwrap();
    if has_vduse() {
        assert!(control.starts_with("OK"), "{text}");
    } else {
        assert!(control.starts_with("FAIL"), "{text}");
        assert!(control.contains("fix:"), "{control}");
        assert!(
            checks.iter().any(|l| l.starts_with("FAIL module vduse")),
            "{text}"
        );
        assert!(last.contains("impossible"), "{last}");
        assert_eq!(code, 1, "no VDUSE here: non-zero exit\n{text}");
    }
    // Exactly the FAIL lines decide the exit status.
    let fails = checks.iter().filter(|l| l.starts_with("FAIL")).count();
    assert_eq!(code != 0, fails > 0, "{text}");
}

#[test]
fn json_report_is_an_array_of_checks() {
    let (code, text) = doctor(&["--json"]);
    let v: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let checks = v.as_array().expect("an array");
    assert!(checks.len() >= 12, "{text}");
    for c in checks {
        let keys: Vec<&String> = c.as_object().unwrap().keys().collect();
        assert_eq!(keys.len(), 4, "{c}");
        for k in ["check", "status", "detail", "fix"] {
            assert!(c[k].is_string(), "{k} in {c}");
        }
        assert!(["OK", "WARN", "FAIL"].contains(&c["status"].as_str().unwrap()));
    }
    let fails = checks.iter().filter(|c| c["status"] == "FAIL").count();
    assert_eq!(code != 0, fails > 0);
    if !has_vduse() {
        let control = checks
            .iter()
            .find(|c| c["check"] == "/dev/vduse/control")
            .unwrap();
        assert_eq!(control["status"], "FAIL");
        assert_ne!(code, 0);
    }
}
