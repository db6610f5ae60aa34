//! The token buckets on an injected clock: a base instant plus offsets (no real time).

use super::*;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// How many requests of `class`/`bytes` pass when asked every `step` for `total`,
/// sending each as soon as it may (as a queue does).
fn passed(
    qos: &Qos,
    t0: Instant,
    class: Class,
    bytes: u64,
    step: Duration,
    total: Duration,
) -> u64 {
    let mut n = 0;
    let mut at = Duration::ZERO;
    while at < total {
        while qos.admit(class, bytes, t0 + at) == Admit::Go {
            n += 1;
        }
        at += step;
    }
    n
}

#[test]
fn an_unlimited_device_lets_everything_go() {
    let qos = Qos::unlimited();
    assert!(!qos.is_active());
    let t0 = Instant::now();
    for _ in 0..10_000 {
        assert_eq!(qos.admit(Class::Write, 1 << 20, t0), Admit::Go);
    }
}

#[test]
fn iops_limit_passes_the_burst_then_the_rate() {
    let t0 = Instant::now();
    let limits = QosLimits {
        iops: Some(Rate {
            per_sec: 2000,
            burst: Some(50),
        }),
        ..QosLimits::default()
    };
    let qos = Qos::new(limits, t0);
    let burst = passed(&qos, t0, Class::Read, 4096, ms(1), ms(1));
    assert_eq!(burst, 50, "a full bucket lets the burst go at once");
    // Then 2 per millisecond, for reads and writes alike.
    let later = t0 + ms(1);
    let n = passed(&qos, later, Class::Write, 4096, ms(1), ms(1000));
    assert!((1998..=2001).contains(&n), "{n} in one second at 2000 IOPS");
}

#[test]
fn waiting_time_is_when_a_token_is_back() {
    let t0 = Instant::now();
    let qos = Qos::new(
        QosLimits {
            iops: Some(Rate {
                per_sec: 100,
                burst: Some(1),
            }),
            ..QosLimits::default()
        },
        t0,
    );
    assert_eq!(qos.admit(Class::Read, 512, t0), Admit::Go);
    let Admit::Wait(wait) = qos.admit(Class::Read, 512, t0) else {
        panic!("the bucket is empty");
    };
    assert!(
        wait > ms(9) && wait <= ms(10) + Duration::from_micros(1),
        "{wait:?}"
    );
    assert!(matches!(
        qos.admit(Class::Read, 512, t0 + ms(9)),
        Admit::Wait(_)
    ));
    assert_eq!(qos.admit(Class::Read, 512, t0 + ms(10) + ms(1)), Admit::Go);
}

#[test]
fn bandwidth_limit_lets_a_large_request_go_into_debt_and_the_next_one_waits() {
    let t0 = Instant::now();
    let qos = Qos::new(
        QosLimits {
            bps: Some(Rate {
                per_sec: 1 << 20,
                burst: Some(64 << 10),
            }),
            ..QosLimits::default()
        },
        t0,
    );
    // 1 MiB under a 64 KiB burst: goes, and leaves ~960 KiB of debt.
    assert_eq!(qos.admit(Class::Write, 1 << 20, t0), Admit::Go);
    let Admit::Wait(wait) = qos.admit(Class::Write, 4096, t0) else {
        panic!("in debt");
    };
    // The debt, then the next request's own 4 KiB.
    let debt = (1 << 20) - (64 << 10);
    let expect = Duration::from_secs_f64(f64::from(debt + 4096) / f64::from(1 << 20));
    assert!(
        wait >= expect && wait < expect + ms(1),
        "{wait:?} vs {expect:?}"
    );
    // Requests without data (a discard) cost no bytes: not held by the byte bucket.
    assert_eq!(qos.admit(Class::Write, 0, t0), Admit::Go);
    // Over a long run the bytes are the rate: 4 KiB requests, asked every millisecond.
    let later = t0 + wait;
    let n = passed(&qos, later, Class::Read, 4096, ms(1), ms(2000));
    let bytes = n * 4096;
    assert!(
        ((2 << 20) - 8192..=(2 << 20) + (64 << 10) + 4096).contains(&bytes),
        "{bytes} bytes in 2 s at 1 MiB/s"
    );
}

#[test]
fn read_and_write_limits_are_separate_and_the_total_applies_to_both() {
    let t0 = Instant::now();
    let qos = Qos::new(
        QosLimits {
            read_iops: Some(Rate {
                per_sec: 1000,
                burst: Some(1),
            }),
            write_iops: Some(Rate {
                per_sec: 1000,
                burst: Some(3),
            }),
            ..QosLimits::default()
        },
        t0,
    );
    assert_eq!(qos.admit(Class::Read, 512, t0), Admit::Go);
    assert!(matches!(qos.admit(Class::Read, 512, t0), Admit::Wait(_)));
    for _ in 0..3 {
        assert_eq!(
            qos.admit(Class::Write, 512, t0),
            Admit::Go,
            "writes are not held by reads"
        );
    }
    assert!(matches!(qos.admit(Class::Write, 512, t0), Admit::Wait(_)));
    // A total limit holds both directions.
    let total = Qos::new(
        QosLimits {
            iops: Some(Rate {
                per_sec: 1000,
                burst: Some(2),
            }),
            ..QosLimits::default()
        },
        t0,
    );
    assert_eq!(total.admit(Class::Read, 512, t0), Admit::Go);
    assert_eq!(total.admit(Class::Write, 512, t0), Admit::Go);
    assert!(matches!(total.admit(Class::Read, 512, t0), Admit::Wait(_)));
    assert!(matches!(total.admit(Class::Write, 512, t0), Admit::Wait(_)));
}

#[test]
fn a_live_change_applies_to_the_next_request() {
    let t0 = Instant::now();
    let slow = QosLimits {
        iops: Some(Rate {
            per_sec: 10,
            burst: Some(1),
        }),
        ..QosLimits::default()
    };
    let qos = Qos::new(slow, t0);
    assert_eq!(qos.admit(Class::Read, 512, t0), Admit::Go);
    assert!(matches!(
        qos.admit(Class::Read, 512, t0 + ms(1)),
        Admit::Wait(_)
    ));
    // Raised: the debt stays, then tokens come at the new rate.
    let fast = QosLimits {
        iops: Some(Rate::new(10_000)),
        ..QosLimits::default()
    };
    qos.set(fast, t0 + ms(1));
    assert_eq!(qos.limits(), fast);
    let n = passed(&qos, t0 + ms(1), Class::Read, 512, ms(1), ms(1000));
    assert!((9_990..=10_001).contains(&n), "{n}");
    // Removed: everything goes.
    qos.set(QosLimits::default(), t0 + ms(2000));
    assert!(!qos.is_active());
    for _ in 0..1000 {
        assert_eq!(qos.admit(Class::Read, 512, t0 + ms(2000)), Admit::Go);
    }
}

#[test]
fn the_default_burst_is_a_tenth_of_a_second() {
    assert_eq!(Rate::new(2000).effective_burst(), 200);
    assert_eq!(Rate::new(5).effective_burst(), 1);
    assert_eq!(Class::of(OpKind::Flush), None);
    assert_eq!(Class::of(OpKind::Discard), Some(Class::Write));
}

#[test]
fn throttled_time_and_requests_add_up() {
    let qos = Qos::unlimited();
    qos.record_throttled(ms(3));
    qos.record_throttled(ms(4));
    assert_eq!(qos.throttled_requests(), 2);
    assert_eq!(qos.throttled_time(), ms(7));
}
