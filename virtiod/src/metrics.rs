//! `--metrics ADDR`: Prometheus text exposition on `http://ADDR/metrics`.
//!
//! Series (all labelled `device`): `virtiod_requests_total` and `virtiod_bytes_total` by `op`,
//! `virtiod_errors_total`, `virtiod_in_flight`, `virtiod_queues`, `virtiod_device_up`, and the
//! `virtiod_request_latency_seconds` histogram (backend submit to completion),
//! `virtiod_throttled_requests_total` and `virtiod_throttled_seconds_total` (requests that
//! waited for a QoS limit, and how long they waited in all); for net
//! devices `virtiod_net_{rx,tx}_{packets,bytes}_total` and `virtiod_net_drops_total` by
//! `direction` and `reason`. Values are read from the devices' own counters at each scrape;
//! nothing is kept here.
//!
//! Served by [`crate::door`] within [`LIMITS`]: scrapes are answered concurrently with any
//! number of idle or slow connections (none of them holds a thread), a request head is at most
//! 8 KiB, a connection has 5 s to send it, 64 connections are kept.
//!
//! Why `httparse` and not an HTTP server crate: the request head, the part a hostile client
//! controls, is parsed by `httparse` (hyper's parser: no dependencies, fuzzed, maintained), and
//! the door's loop bounds everything else. `tiny_http` 0.12, the small server crate, spawns a
//! thread per connection without limit, reads header lines without a length limit or a
//! timeout, and stops accepting for good on the first accept error (EMFILE) — each a way to
//! take the daemon down; `hyper` needs an async runtime this daemon does not otherwise have.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry as PromRegistry;
use virtiod_blk::{OpKind, LATENCY_BOUNDS_US};
use virtiod_net::PortCounters;

use crate::door::{Framing, Limits, Notice, Reply};
use crate::registry::{net_drops, Registry};

/// The metrics endpoint's bounds.
pub const LIMITS: Limits = Limits {
    max_request: 8 * 1024,
    max_clients: 64,
    idle_timeout: Duration::from_secs(5),
    workers: 2,
};

struct DeviceCollector(Arc<Registry>);

impl std::fmt::Debug for DeviceCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeviceCollector")
    }
}

impl Collector for DeviceCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let devices = self.0.metrics_view();
        let live: Vec<_> = devices
            .iter()
            .filter_map(|d| d.stats.as_ref().map(|s| (d.name.as_str(), s)))
            .collect();

        let mut e = encoder.encode_descriptor(
            "requests",
            "Completed requests",
            None,
            MetricType::Counter,
        )?;
        for (name, stats) in &live {
            for op in OpKind::ALL {
                let labels = [("device", *name), ("op", op.name())];
                ConstCounter::new(stats.requests(op)).encode(e.encode_family(&labels)?)?;
            }
        }
        let mut e = encoder.encode_descriptor(
            "bytes",
            "Data bytes of completed requests",
            None,
            MetricType::Counter,
        )?;
        for (name, stats) in &live {
            for op in OpKind::ALL {
                let labels = [("device", *name), ("op", op.name())];
                ConstCounter::new(stats.bytes(op)).encode(e.encode_family(&labels)?)?;
            }
        }
        let mut e = encoder.encode_descriptor(
            "errors",
            "Requests completed with an error status",
            None,
            MetricType::Counter,
        )?;
        for (name, stats) in &live {
            ConstCounter::new(stats.errors()).encode(e.encode_family(&[("device", *name)])?)?;
        }
        let mut e = encoder.encode_descriptor(
            "in_flight",
            "Requests in flight",
            None,
            MetricType::Gauge,
        )?;
        for (name, stats) in &live {
            let v = i64::try_from(stats.in_flight()).unwrap_or(i64::MAX);
            ConstGauge::new(v).encode(e.encode_family(&[("device", *name)])?)?;
        }
        let mut e = encoder.encode_descriptor(
            "throttled_requests",
            "Requests that waited for a QoS limit",
            None,
            MetricType::Counter,
        )?;
        let limited: Vec<_> = devices
            .iter()
            .filter_map(|d| d.qos.as_ref().map(|q| (d.name.as_str(), q)))
            .collect();
        for (name, qos) in &limited {
            ConstCounter::new(qos.throttled_requests())
                .encode(e.encode_family(&[("device", *name)])?)?;
        }
        let mut e = encoder.encode_descriptor(
            "throttled_seconds",
            "Time requests waited for a QoS limit, summed over requests",
            None,
            MetricType::Counter,
        )?;
        for (name, qos) in &limited {
            ConstCounter::new(qos.throttled_time().as_secs_f64())
                .encode(e.encode_family(&[("device", *name)])?)?;
        }
        let mut e =
            encoder.encode_descriptor("queues", "Request queues", None, MetricType::Gauge)?;
        for d in &devices {
            ConstGauge::new(i64::from(d.queues))
                .encode(e.encode_family(&[("device", d.name.as_str())])?)?;
        }
        let mut e = encoder.encode_descriptor(
            "device_up",
            "1 while the device serves, 0 when it failed",
            None,
            MetricType::Gauge,
        )?;
        for d in &devices {
            ConstGauge::new(i64::from(d.up))
                .encode(e.encode_family(&[("device", d.name.as_str())])?)?;
        }
        let mut e = encoder.encode_descriptor(
            "request_latency_seconds",
            "Backend request latency, submit to completion",
            None,
            MetricType::Histogram,
        )?;
        for (name, stats) in &live {
            let (counts, sum_ns) = stats.latency();
            let buckets: Vec<(f64, u64)> = LATENCY_BOUNDS_US
                .iter()
                .zip(&counts)
                .map(|(us, n)| (*us as f64 / 1e6, *n))
                .collect();
            e.encode_family(&[("device", *name)])?
                .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                    sum_ns as f64 / 1e9,
                    counts.iter().sum(),
                    &buckets,
                    None,
                )?;
        }
        encode_net(&devices, &mut encoder)
    }
}

/// A net counter series: name (without prefix and `_total`), help, and its value.
type NetSeries = (&'static str, &'static str, fn(&PortCounters) -> u64);

/// The net devices' packet and byte counters.
const NET_FRAMES: [NetSeries; 4] = [
    (
        "net_rx_packets",
        "Frames written into the driver's receive buffers",
        |c| c.rx_packets,
    ),
    (
        "net_rx_bytes",
        "Bytes of received frames, without the virtio-net header",
        |c| c.rx_bytes,
    ),
    ("net_tx_packets", "Frames the driver sent", |c| c.tx_packets),
    (
        "net_tx_bytes",
        "Bytes of sent frames, without the virtio-net header",
        |c| c.tx_bytes,
    ),
];

/// The net devices' frame counters.
fn encode_net(
    devices: &[crate::registry::MetricsView],
    encoder: &mut DescriptorEncoder,
) -> Result<(), std::fmt::Error> {
    let net: Vec<_> = devices
        .iter()
        .filter_map(|d| d.net.as_ref().map(|c| (d.name.as_str(), c)))
        .collect();
    for (metric, help, value) in NET_FRAMES {
        let mut e = encoder.encode_descriptor(metric, help, None, MetricType::Counter)?;
        for (name, counters) in &net {
            ConstCounter::new(value(counters)).encode(e.encode_family(&[("device", *name)])?)?;
        }
    }
    let mut e = encoder.encode_descriptor(
        "net_drops",
        "Frames dropped, by direction (rx: to the driver, tx: from it) and reason",
        None,
        MetricType::Counter,
    )?;
    for (name, counters) in &net {
        for (direction, reason, n) in net_drops(counters) {
            let labels = [
                ("device", *name),
                ("direction", direction),
                ("reason", reason),
            ];
            ConstCounter::new(n).encode(e.encode_family(&labels)?)?;
        }
    }
    Ok(())
}

/// The exposition text of every device in `registry`.
pub fn render(registry: &Arc<Registry>) -> String {
    let mut prom = PromRegistry::with_prefix("virtiod");
    prom.register_collector(Box::new(DeviceCollector(registry.clone())));
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &prom);
    out
}

/// Bind `addr` now (so a bad address fails before any device starts); serve from a thread.
pub fn start(addr: SocketAddr, registry: Arc<Registry>) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).with_context(|| {
        format!("cannot listen on {addr} for --metrics: pick a free port or address")
    })?;
    Ok(start_on(listener, registry)?.0)
}

/// Serve metrics on a listener already bound (by this process, or by the one it replaced:
/// `virtiod upgrade`). Returns its address and a copy of it (to hand over in turn).
pub fn start_on(
    listener: TcpListener,
    registry: Arc<Registry>,
) -> anyhow::Result<(SocketAddr, TcpListener)> {
    let bound = listener.local_addr().context("metrics listener address")?;
    let copy = listener
        .try_clone()
        .context("cannot keep a copy of the metrics listener")?;
    crate::door::spawn("metrics", listener, MetricsHttp(registry), LIMITS)
        .context("cannot start the metrics thread")?;
    tracing::info!(address = %bound, "metrics on http://{bound}/metrics");
    Ok((bound, copy))
}

/// `GET /metrics` over HTTP/1.x, one request per connection.
struct MetricsHttp(Arc<Registry>);

impl crate::door::Protocol for MetricsHttp {
    fn frame(&self, buf: &[u8], max: usize) -> Framing {
        crate::door::frame_http_head(buf, max)
    }

    fn handle(&self, request: &[u8]) -> Reply {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut parsed = httparse::Request::new(&mut headers);
        let text = |s: &str| ("text/plain; charset=utf-8", s.to_string());
        let (status, (content_type, body)) = match parsed.parse(request) {
            Ok(httparse::Status::Complete(_)) => {
                let path = parsed.path.unwrap_or("");
                let path = path.split('?').next().unwrap_or("");
                match (parsed.method.unwrap_or(""), path) {
                    ("GET", "/metrics") => (
                        "200 OK",
                        ("text/plain; version=0.0.4; charset=utf-8", render(&self.0)),
                    ),
                    ("GET", _) => ("404 Not Found", text("metrics are at /metrics\n")),
                    _ => ("405 Method Not Allowed", text("GET /metrics\n")),
                }
            }
            Ok(httparse::Status::Partial) | Err(_) => {
                ("400 Bad Request", text("GET /metrics HTTP/1.1\n"))
            }
        };
        Reply {
            bytes: http_response(status, content_type, &body),
            close: true,
        }
    }

    fn notice(&self, notice: Notice, limits: &Limits) -> Vec<u8> {
        let (status, body) = match notice {
            Notice::TooLong => (
                "431 Request Header Fields Too Large",
                format!("request head over {} KiB\n", limits.max_request / 1024),
            ),
            Notice::TimedOut | Notice::Evicted => (
                "408 Request Timeout",
                format!(
                    "send the request within {} s\n",
                    limits.idle_timeout.as_secs()
                ),
            ),
            Notice::Busy => ("503 Service Unavailable", "try again\n".to_string()),
        };
        http_response(status, "text/plain; charset=utf-8", &body)
    }
}

fn http_response(status: &str, content_type: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}
