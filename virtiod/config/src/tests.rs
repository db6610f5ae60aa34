use super::*;

const GOOD: &str = r#"
[[device]]
name = "a"
image = "/var/lib/images/a.img"
vduse = "vd-a"
queues = 2
queue-size = 256
read-only = false
serial = "a"
attach = "vhost"

[[device]]
name = "b"
image = "mem:64M"
vhost-user = "/run/virtiod/b.sock"
"#;

fn errors(text: &str) -> Vec<ConfigError> {
    parse(text).expect_err("must be refused").0
}

fn at(text: &str) -> Vec<(usize, usize)> {
    errors(text).iter().map(|e| (e.line, e.column)).collect()
}

#[test]
fn parses_the_documented_example() {
    let devs = parse(GOOD).unwrap();
    assert_eq!(devs.len(), 2);
    assert_eq!(
        devs[0],
        DeviceSpec {
            name: "a".into(),
            image: "/var/lib/images/a.img".into(),
            kind: DeviceKind::Blk,
            transport: Transport::Vduse {
                name: "vd-a".into(),
                attach: Attach::Vhost
            },
            queues: 2,
            queue_size: 256,
            read_only: false,
            buffered: false,
            serial: "a".into(),
            poll_us: DEFAULT_POLL_US,
            qos: QosLimits::default(),
        }
    );
    assert_eq!(
        devs[1].transport,
        Transport::VhostUser("/run/virtiod/b.sock".into())
    );
    assert_eq!((devs[1].queues, devs[1].queue_size), (1, 256));
    assert_eq!(devs[1].serial, "b", "serial defaults to the name");
}

#[test]
fn unknown_key_has_its_line_and_column() {
    let text = "[[device]]\nname = \"a\"\nimage = \"mem:1M\"\nvhost-user = \"/x.sock\"\n  queue_size = 4\n";
    let e = errors(text);
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!((e[0].line, e[0].column), (5, 3), "{e:?}");
    assert!(e[0].message.contains("queue_size"), "{}", e[0]);
    assert!(e[0].to_string().starts_with("5:3: "), "{}", e[0]);
    // An unknown top-level table, too.
    assert_eq!(at("[devices]\nname = 1\n")[0].0, 1);
}

#[test]
fn both_or_neither_transport() {
    let both = "[[device]]\nname = \"a\"\nimage = \"mem:1M\"\nvduse = \"v\"\nvhost-user = \"/s\"\n";
    let e = errors(both);
    assert_eq!((e[0].line, e[0].column), (5, 14), "{e:?}");
    assert!(e[0].message.contains("both"));
    let neither = "\n[[device]]\nname = \"a\"\nimage = \"mem:1M\"\n";
    let e = errors(neither);
    assert_eq!(e[0].line, 2, "{e:?}");
    assert!(e[0].message.contains("no transport"));
}

#[test]
fn duplicates_point_at_the_second_occurrence() {
    let text = r#"[[device]]
name = "a"
image = "mem:1M"
vhost-user = "/s.sock"

[[device]]
name = "a"
image = "mem:1M"
vhost-user = "/s.sock"

[[device]]
name = "c"
image = "mem:1M"
vduse = "v"

[[device]]
name = "d"
image = "mem:1M"
vduse = "v"
"#;
    let e = errors(text);
    let got: Vec<(usize, &str)> = e
        .iter()
        .map(|e| (e.line, e.message.split(' ').nth(1).unwrap()))
        .collect();
    assert_eq!(
        got,
        vec![(7, "name"), (9, "vhost-user"), (19, "vduse")],
        "{e:?}"
    );
}

#[test]
fn bad_values() {
    let text = r#"[[device]]
name = "a b"
image = "disk:1"
vhost-user = "/s"
queues = 65
queue-size = 100
serial = "012345678901234567890"
attach = "virtio"
"#;
    let e = errors(text);
    let lines: Vec<usize> = e.iter().map(|e| e.line).collect();
    assert_eq!(lines, vec![2, 3, 5, 6, 7, 8], "{e:?}");
    assert!(e[1].message.contains("mem:SIZE"), "{}", e[1]);
    // Out of range for the type: toml's own error, still located.
    assert_eq!(at("[[device]]\nname = \"a\"\nqueues = 70000\n")[0].0, 3);
    // A wrong attach word.
    let e =
        errors("[[device]]\nname = \"a\"\nimage = \"mem:1M\"\nvduse = \"v\"\nattach = \"pci\"\n");
    assert_eq!(e[0].line, 5, "{e:?}");
}

#[test]
fn a_file_without_devices_is_an_empty_list() {
    // `virtiod run` decides: with --control, devices come later through `ctl add`.
    assert_eq!(parse("").unwrap(), vec![]);
    assert_eq!(
        parse("# nothing\n[daemon]\non-stop = \"keep\"\n").unwrap(),
        vec![]
    );
}

#[test]
fn syntax_error_is_located() {
    let e = errors("[[device]]\nname = \"a\nimage = 1\n");
    assert_eq!(e[0].line, 2, "{e:?}");
}

#[test]
fn one_device_as_toml_or_json() {
    let bare =
        parse_device("name = \"c\"\nimage = \"mem:16M\"\nvhost-user = \"/tmp/c.sock\"\n").unwrap();
    assert_eq!(bare.name, "c");
    let table =
        parse_device("[device]\nname = \"c\"\nimage = \"mem:16M\"\nvhost-user = \"/tmp/c.sock\"\n")
            .unwrap();
    assert_eq!(table, bare);
    let json = parse_device(
        r#"{"name": "c", "image": "mem:16M", "vhost-user": "/tmp/c.sock", "queues": 1}"#,
    )
    .unwrap();
    assert_eq!(json, bare);
    let e = parse_device(r#"{"name": "c", "image": "mem:16M", "bogus": 1}"#).unwrap_err();
    assert_eq!(e.0[0].line, 0);
    assert!(e.to_string().contains("bogus"), "{e}");
    let e = parse_device("name = \"c\"\nimage = \"mem:16M\"\nvhost-user = \"/s\"\nx = 1\n")
        .unwrap_err();
    assert_eq!(e.0[0].line, 4, "{e}");
}

#[test]
fn net_devices() {
    let text = "[[device]]\nname = \"n\"\nnet = \"switch:sw0\"\nvhost-user = \"/n.sock\"\nmac = \"52:54:00:12:34:56\"\nmtu = 9000\n\n[[device]]\nname = \"m\"\nnet = \"switch:sw0\"\nvduse = \"vnet0\"\n";
    let devs = parse(text).unwrap();
    assert_eq!(
        devs[0].kind,
        DeviceKind::Net(NetSpec {
            backend: NetBackendSpec::Switch("sw0".into()),
            mac: Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
            mtu: Some(9000),
        })
    );
    assert_eq!(devs[0].image, "");
    assert_eq!(
        devs[1].kind,
        DeviceKind::Net(NetSpec {
            backend: NetBackendSpec::Switch("sw0".into()),
            mac: None,
            mtu: None,
        })
    );
    let one = parse_device(r#"{"name": "c", "net": "switch:x", "vhost-user": "/c.sock"}"#).unwrap();
    assert!(matches!(one.kind, DeviceKind::Net(_)));
}

#[test]
fn net_errors_are_located() {
    let both =
        "[[device]]\nname = \"a\"\nimage = \"mem:1M\"\nnet = \"switch:sw0\"\nvhost-user = \"/s\"\n";
    let e = errors(both);
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!((e[0].line, e[0].column), (4, 7), "{e:?}");
    assert!(e[0].message.contains("both image and net"), "{}", e[0]);

    let neither = "\n[[device]]\nname = \"a\"\nvhost-user = \"/s\"\n";
    let e = errors(neither);
    assert_eq!(e[0].line, 2, "{e:?}");
    assert!(e[0].message.contains("neither image nor net"), "{}", e[0]);

    let bad_mac = "[[device]]\nname = \"a\"\nnet = \"switch:sw0\"\nvhost-user = \"/s\"\nmac = \"52:54:00:12:34\"\n";
    let e = errors(bad_mac);
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!((e[0].line, e[0].column), (5, 7), "{e:?}");
    assert!(e[0].message.contains("six hex bytes"), "{}", e[0]);
    let multicast = bad_mac.replace("52:54:00:12:34", "01:00:5e:00:00:01");
    assert!(errors(&multicast)[0].message.contains("multicast"));

    let bad = "[[device]]\nname = \"a\"\nnet = \"tap:a/b\"\nvduse = \"v\"\nmtu = 20\nqueues = 2\n";
    assert_eq!(at(bad), [(3, 7), (5, 7), (6, 10)]);
    let mq = "[[device]]\nname = \"a\"\nnet = \"tap:a\"\nvhost-user = \"/s\"\nqueues = 2\n";
    assert_eq!(
        parse(mq).unwrap()[0].queues,
        2,
        "queue pairs over vhost-user"
    );

    let blk_with_mac = "[[device]]\nname = \"a\"\nimage = \"mem:1M\"\nvhost-user = \"/s\"\nmac = \"52:54:00:12:34:56\"\n";
    let e = errors(blk_with_mac);
    assert_eq!((e[0].line, e[0].column), (5, 7), "{e:?}");
    assert!(e[0].message.contains("net devices only"), "{}", e[0]);
}

#[test]
fn qos_table_sets_limits_and_its_mistakes_are_placed() {
    let text = "[[device]]\nname = \"a\"\nimage = \"null:1G\"\nvhost-user = \"/a.sock\"\n[device.qos]\niops = 2000\nread-bps = \"100M\"\niops-burst = 20\n";
    let devs = parse(text).unwrap();
    assert_eq!(
        devs[0].qos.iops,
        Some(Rate {
            per_sec: 2000,
            burst: Some(20)
        })
    );
    assert_eq!(devs[0].qos.read_bps, Some(Rate::new(100 << 20)));
    let bad = text.replace("iops-burst", "iops-brust");
    let e = errors(&bad);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].message.contains("iops-brust"), "{}", e[0].message);
    assert_eq!(e[0].line, 5, "{:?}", e[0]);
    let one = parse_device(
        r#"{"name":"c","image":"mem:1M","vhost-user":"/c.sock","qos":{"write-iops":50}}"#,
    )
    .unwrap();
    assert_eq!(one.qos.write_iops, Some(Rate::new(50)));
}
