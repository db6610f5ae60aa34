//! `--metrics ADDR`: Prometheus text exposition on `http://ADDR/metrics`.
//!
//! Series (all labelled `device`): `virtiod_requests_total` and `virtiod_bytes_total` by `op`,
//! `virtiod_errors_total`, `virtiod_in_flight`, `virtiod_queues`, `virtiod_device_up`, and the
//! `virtiod_request_latency_seconds` histogram (backend submit to completion). Values are read
//! from the devices' own counters at each scrape; nothing is kept here.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
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

use crate::registry::Registry;

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
        Ok(())
    }
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
    let bound = listener.local_addr().context("metrics listener address")?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                if let Err(err) = answer(stream, &registry) {
                    tracing::debug!(%err, "metrics request failed");
                }
            }
        })
        .context("cannot start the metrics thread")?;
    tracing::info!(address = %bound, "metrics on http://{bound}/metrics");
    Ok(bound)
}

fn answer(stream: TcpStream, registry: &Arc<Registry>) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    // Skip the headers.
    let mut header = String::new();
    while reader.read_line(&mut header)? > 2 {
        header.clear();
    }
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            render(registry),
        ),
        ("GET", _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "metrics are at /metrics\n".to_string(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "GET /metrics\n".to_string(),
        ),
    };
    let mut stream = stream;
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}
