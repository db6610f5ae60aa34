//! End-to-end smoke test of the VDUSE UAPI layer (needs a kernel with vduse + vdpa).
//!
//! Creates a RAM-backed virtio-blk VDUSE device, attaches it with vdpa netlink, waits for
//! its /dev/vdX, runs the given command with `VDUSE_DEV=/dev/vdX` in the environment,
//! then detaches and destroys the device. Exit code: the command's. `--reopen` closes and
//! re-opens /dev/vduse/NAME between two runs of the command (a daemon restart);
//! `--vhost` binds the device to vhost_vdpa and waits for /dev/vhost-vdpa-N instead.
//!
//! ```text
//! vduse_smoke [--name NAME] [--mib N] [--vhost] [--reopen] -- sh -c 'dd if=/dev/urandom of=$VDUSE_DEV ...'
//! ```
//!
//! The virtqueue handling is deliberately crude (split ring, no indirect descriptors, no
//! event index): it exists to exercise the UAPI, not to be the engine.

use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use vduse::vdpa::{self, Driver, VdpaClient};
use vduse::{DeviceConfig, IotlbMemory, Request, Response, VduseControl, VduseDevice, VqState};
use virtio_bindings::virtio_blk::{
    self, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::{virtio_config, virtio_ring};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const SECTOR: u64 = 512;
const QUEUE_SIZE: u16 = 256;
// The virtio values, in the widths of the fields they go into.
const STATUS_DRIVER_OK: u8 = virtio_config::VIRTIO_CONFIG_S_DRIVER_OK as u8;
const VRING_DESC_F_NEXT: u16 = virtio_ring::VRING_DESC_F_NEXT as u16;
const VRING_DESC_F_WRITE: u16 = virtio_ring::VRING_DESC_F_WRITE as u16;
const BLK_S_OK: u8 = virtio_blk::VIRTIO_BLK_S_OK as u8;
const BLK_S_IOERR: u8 = virtio_blk::VIRTIO_BLK_S_IOERR as u8;
const BLK_S_UNSUPP: u8 = virtio_blk::VIRTIO_BLK_S_UNSUPP as u8;

fn log(msg: impl AsRef<str>) {
    eprintln!("vduse_smoke: {}", msg.as_ref());
}

struct Args {
    name: String,
    mib: u64,
    vhost: bool,
    reopen: bool,
    command: Vec<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        name: "vduse-smoke".into(),
        mib: 1,
        vhost: false,
        reopen: false,
        command: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--name" => args.name = it.next().ok_or("--name needs a value")?,
            "--mib" => {
                args.mib = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or("--mib needs a number")?
            }
            "--vhost" => args.vhost = true,
            "--reopen" => args.reopen = true,
            "--" => {
                args.command = it.collect();
                break;
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}

/// The one virtqueue's ring addresses (IOVAs) and our progress in it.
struct Ring {
    num: u16,
    desc: u64,
    avail: u64,
    used: u64,
    last_avail: u16,
    used_idx: u16,
}

/// The device side: RAM disk, IOTLB and ring state, driven by one thread.
struct Server {
    dev: Arc<VduseDevice>,
    kick: EventFd,
    stop: EventFd,
    disk: Vec<u8>,
    iotlb: IotlbMemory,
    ring: Option<Ring>,
    requests: u64,
}

impl Server {
    fn run(mut self) -> Result<Server, String> {
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: std::os::fd::AsRawFd::as_raw_fd(&*self.dev),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: std::os::fd::AsRawFd::as_raw_fd(&self.kick),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: std::os::fd::AsRawFd::as_raw_fd(&self.stop),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: `fds` is a valid array of 3 pollfd structs for the duration of the call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(format!("poll: {e}"));
            }
            if fds[2].revents != 0 {
                let _ = self.stop.read();
                return Ok(self);
            }
            if fds[0].revents != 0 {
                self.handle_message()?;
            }
            if fds[1].revents != 0 {
                let _ = self.kick.read();
                self.process_queue()?;
            }
        }
    }

    fn handle_message(&mut self) -> Result<(), String> {
        let msg = self.dev.read_request().map_err(|e| e.to_string())?;
        let response = match msg.request {
            Request::SetStatus { status } => {
                log(format!("SET_STATUS {status:#x}"));
                if status == 0 {
                    self.ring = None;
                    self.iotlb.clear();
                } else if status & STATUS_DRIVER_OK != 0 && self.ring.is_none() {
                    self.start_queue()?;
                }
                Response::ok(msg.request_id)
            }
            Request::GetVqState { index } => {
                let avail_index = self.ring.as_ref().map_or(0, |r| r.last_avail);
                log(format!("GET_VQ_STATE {index} -> {avail_index}"));
                Response::vq_state(msg.request_id, index, VqState::Split { avail_index })
            }
            Request::UpdateIotlb { start, last } => {
                let n = self.iotlb.invalidate(start, last);
                log(format!("UPDATE_IOTLB {start:#x}..={last:#x}: dropped {n}"));
                Response::ok(msg.request_id)
            }
            Request::Unknown(kind) => {
                log(format!("unknown request type {kind}"));
                Response::failed(msg.request_id)
            }
        };
        self.dev
            .write_response(&response)
            .map_err(|e| e.to_string())?;
        // Work the driver queued before DRIVER_OK's kick fd existed.
        if self.ring.is_some() {
            self.process_queue()?;
        }
        Ok(())
    }

    fn start_queue(&mut self) -> Result<(), String> {
        let features = self.dev.get_features().map_err(|e| e.to_string())?;
        let info = self.dev.vq_info(0).map_err(|e| e.to_string())?;
        log(format!("DRIVER_OK: features {features:#x}, vq0 {info:x?}"));
        if !info.ready {
            return Err("queue 0 not ready at DRIVER_OK".into());
        }
        self.dev
            .set_vq_kickfd(0, Some(&self.kick))
            .map_err(|e| e.to_string())?;
        let mem = self.memory()?;
        let used_idx: u16 = mem
            .read_obj(GuestAddress(info.device_addr + 2))
            .map_err(|e| format!("read used idx: {e}"))?;
        log(format!("IOTLB: {:x?}", self.iotlb.entries()));
        self.ring = Some(Ring {
            num: info.num as u16,
            desc: info.desc_addr,
            avail: info.driver_addr,
            used: info.device_addr,
            last_avail: info.avail_index,
            used_idx,
        });
        Ok(())
    }

    /// The current IOTLB snapshot, after picking up entries added since the last call.
    fn memory(&mut self) -> Result<Arc<GuestMemoryMmap<()>>, String> {
        self.iotlb
            .map_range(&*self.dev, 0, u64::MAX)
            .map_err(|e| e.to_string())?;
        self.iotlb.memory().map_err(|e| e.to_string())
    }

    fn process_queue(&mut self) -> Result<(), String> {
        if self.ring.is_none() {
            return Ok(());
        }
        let mem = self.memory()?;
        let ring = self.ring.as_mut().unwrap();
        let avail_idx: u16 = mem
            .read_obj(GuestAddress(ring.avail + 2))
            .map_err(|e| format!("read avail idx: {e}"))?;
        fence(Ordering::Acquire);
        let mut done = 0;
        while ring.last_avail != avail_idx {
            let slot = ring.avail + 4 + 2 * u64::from(ring.last_avail % ring.num);
            let head: u16 = mem
                .read_obj(GuestAddress(slot))
                .map_err(|e| e.to_string())?;
            let written = serve_request(&mem, ring, head, &mut self.disk)?;
            let elem = ring.used + 4 + 8 * u64::from(ring.used_idx % ring.num);
            mem.write_obj(u32::from(head), GuestAddress(elem))
                .map_err(|e| e.to_string())?;
            mem.write_obj(written, GuestAddress(elem + 4))
                .map_err(|e| e.to_string())?;
            ring.used_idx = ring.used_idx.wrapping_add(1);
            ring.last_avail = ring.last_avail.wrapping_add(1);
            fence(Ordering::Release);
            mem.write_obj(ring.used_idx, GuestAddress(ring.used + 2))
                .map_err(|e| e.to_string())?;
            done += 1;
        }
        if done > 0 {
            self.requests += done;
            self.dev.inject_vq_irq(0).map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

/// Executes one virtio-blk request; returns the bytes written into driver buffers.
fn serve_request(
    mem: &GuestMemoryMmap<()>,
    ring: &Ring,
    head: u16,
    disk: &mut [u8],
) -> Result<u32, String> {
    // Collect the chain: (addr, len, device-writable).
    let mut chain = Vec::new();
    let mut index = head;
    loop {
        if index >= ring.num || chain.len() > usize::from(ring.num) {
            return Err(format!("bad descriptor chain at head {head}"));
        }
        let d = ring.desc + 16 * u64::from(index);
        let addr: u64 = mem.read_obj(GuestAddress(d)).map_err(|e| e.to_string())?;
        let len: u32 = mem
            .read_obj(GuestAddress(d + 8))
            .map_err(|e| e.to_string())?;
        let flags: u16 = mem
            .read_obj(GuestAddress(d + 12))
            .map_err(|e| e.to_string())?;
        let next: u16 = mem
            .read_obj(GuestAddress(d + 14))
            .map_err(|e| e.to_string())?;
        chain.push((addr, len, flags & VRING_DESC_F_WRITE != 0));
        if flags & VRING_DESC_F_NEXT == 0 {
            break;
        }
        index = next;
    }
    if chain.len() < 2 || chain[0].1 < 16 {
        return Err(format!("request {head}: too few descriptors"));
    }
    let kind: u32 = mem
        .read_obj(GuestAddress(chain[0].0))
        .map_err(|e| e.to_string())?;
    let sector: u64 = mem
        .read_obj(GuestAddress(chain[0].0 + 8))
        .map_err(|e| e.to_string())?;
    let (status_addr, _, _) = *chain.last().unwrap();
    let data = &chain[1..chain.len() - 1];
    let mut offset = sector.saturating_mul(SECTOR);
    let mut written = 0u32;
    let mut status = BLK_S_OK;
    for &(addr, len, writable) in data {
        let start = offset as usize;
        let end = start.saturating_add(len as usize);
        let result = match kind {
            VIRTIO_BLK_T_IN if writable && end <= disk.len() => {
                written += len;
                mem.write_slice(&disk[start..end], GuestAddress(addr))
            }
            VIRTIO_BLK_T_OUT if !writable && end <= disk.len() => {
                mem.read_slice(&mut disk[start..end], GuestAddress(addr))
            }
            VIRTIO_BLK_T_GET_ID if writable => {
                let mut id = [0u8; 20];
                id[..11].copy_from_slice(b"vduse-smoke");
                let n = (len as usize).min(id.len());
                written += n as u32;
                mem.write_slice(&id[..n], GuestAddress(addr))
            }
            VIRTIO_BLK_T_FLUSH => Ok(()),
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
                status = BLK_S_IOERR;
                break;
            }
            _ => {
                status = BLK_S_UNSUPP;
                break;
            }
        };
        if let Err(e) = result {
            log(format!("request {head}: memory access failed: {e}"));
            status = BLK_S_IOERR;
            break;
        }
        offset += u64::from(len);
    }
    if data.is_empty() && !matches!(kind, VIRTIO_BLK_T_FLUSH) {
        status = BLK_S_UNSUPP;
    }
    mem.write_obj(status, GuestAddress(status_addr))
        .map_err(|e| e.to_string())?;
    Ok(written + 1)
}

/// `struct virtio_blk_config` with only `capacity` set (no optional features offered).
fn blk_config(bytes: u64) -> Vec<u8> {
    let mut config = vec![0u8; 60];
    config[..8].copy_from_slice(&(bytes / SECTOR).to_le_bytes());
    config
}

fn wait_for_node(name: &str, timeout: Duration) -> Result<PathBuf, String> {
    let deadline = Instant::now() + timeout;
    loop {
        match vdpa::find_device_node(name) {
            Ok(Some(node)) if node.exists() => return Ok(node),
            Ok(_) => {}
            Err(e) => return Err(e.to_string()),
        }
        if Instant::now() > deadline {
            return Err(format!("no device node for {name} after {timeout:?}"));
        }
        thread::sleep(Duration::from_millis(50));
    }
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            log(e);
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            log(format!("FAILED: {e}"));
            ExitCode::from(1)
        }
    }
}

/// The server thread and the eventfd that stops it.
struct Worker {
    stop: EventFd,
    handle: thread::JoinHandle<Result<Server, String>>,
}

impl Worker {
    fn spawn(server: Server) -> Result<Worker, String> {
        let stop = server.stop.try_clone().map_err(|e| e.to_string())?;
        Ok(Worker {
            stop,
            handle: thread::spawn(move || server.run()),
        })
    }

    /// Stops the thread and hands back the server (and with it the device fd).
    fn finish(self) -> Result<Server, String> {
        self.stop.write(1).map_err(|e| e.to_string())?;
        self.handle
            .join()
            .map_err(|_| "server thread panicked".to_string())?
    }
}

impl Server {
    fn new(dev: VduseDevice, disk: Vec<u8>) -> Result<Self, String> {
        Ok(Server {
            dev: Arc::new(dev),
            kick: EventFd::new(EFD_NONBLOCK).map_err(|e| e.to_string())?,
            stop: EventFd::new(EFD_NONBLOCK).map_err(|e| e.to_string())?,
            disk,
            iotlb: IotlbMemory::new(),
            ring: None,
            requests: 0,
        })
    }

    /// After a re-open: take over a queue the driver already runs. Every request the
    /// previous server took was completed, so the used index is where to resume.
    fn resume(&mut self) -> Result<(), String> {
        let info = self.dev.vq_info(0).map_err(|e| e.to_string())?;
        if !info.ready {
            return Ok(()); // the driver will send DRIVER_OK later
        }
        self.start_queue()?;
        let ring = self.ring.as_mut().unwrap();
        ring.last_avail = ring.used_idx;
        log(format!(
            "resumed queue 0 at avail/used index {}",
            ring.used_idx
        ));
        self.process_queue()
    }
}

fn run(args: &Args) -> Result<u8, String> {
    let ctl = VduseControl::open().map_err(|e| e.to_string())?;
    log(format!(
        "API version {} (kernel offers {})",
        ctl.api_version(),
        ctl.kernel_api_version()
    ));
    let disk_bytes = args.mib * 1024 * 1024;
    let config = DeviceConfig::block(args.name.clone(), 1, blk_config(disk_bytes));
    ctl.create_device(&config).map_err(|e| e.to_string())?;
    log(format!("created /dev/vduse/{}", args.name));

    let dev = VduseDevice::open(&args.name).map_err(|e| e.to_string())?;
    dev.setup_vq(0, QUEUE_SIZE).map_err(|e| e.to_string())?;
    let mut worker = Worker::spawn(Server::new(dev, vec![0u8; disk_bytes as usize])?)?;

    let mut vdpa = None;
    let mut outcome = attach_and_run(args, &mut vdpa);
    if args.reopen && outcome == Ok(0) {
        // Simulate a daemon restart: close /dev/vduse/NAME, open it again, carry on.
        let mut old = worker.finish()?;
        log(format!(
            "closing the device after {} requests",
            old.requests
        ));
        let disk = std::mem::take(&mut old.disk);
        drop(old);
        let dev = VduseDevice::open(&args.name).map_err(|e| e.to_string())?;
        log("re-opened the existing device");
        let mut server = Server::new(dev, disk)?;
        server.resume()?;
        worker = Worker::spawn(server)?;
        outcome = run_command(args, &find_node(args)?);
    }

    // Tear down in the kernel's order: detach, close, destroy.
    let del = match &mut vdpa {
        Some(client) => client.del_device(&args.name).map_err(|e| e.to_string()),
        None => Ok(()),
    };
    let server = worker.finish()?;
    log(format!("served {} requests", server.requests));
    drop(server);
    let mut destroyed = ctl.destroy_device(&args.name);
    for _ in 0..50 {
        if destroyed.is_ok() {
            break;
        }
        thread::sleep(Duration::from_millis(100));
        destroyed = ctl.destroy_device(&args.name);
    }
    destroyed.map_err(|e| e.to_string())?;
    log(format!("destroyed {}", args.name));
    let code = outcome?;
    del?;
    Ok(code)
}

fn find_node(args: &Args) -> Result<PathBuf, String> {
    let node = wait_for_node(&args.name, Duration::from_secs(30))?;
    log(format!("device node {}", node.display()));
    Ok(node)
}

fn run_command(args: &Args, node: &std::path::Path) -> Result<u8, String> {
    if args.command.is_empty() {
        return Ok(0);
    }
    let status = Command::new(&args.command[0])
        .args(&args.command[1..])
        .env("VDUSE_DEV", node)
        .status()
        .map_err(|e| format!("run {:?}: {e}", args.command))?;
    log(format!("command exited with {status}"));
    Ok(status.code().unwrap_or(1).clamp(0, 255) as u8)
}

/// Attaches the device (leaving the client in `vdpa` once it is attached), waits for its
/// node and runs the command.
fn attach_and_run(args: &Args, vdpa: &mut Option<VdpaClient>) -> Result<u8, String> {
    let mut client = VdpaClient::open().map_err(|e| e.to_string())?;
    for m in client.list_mgmt_devices().map_err(|e| e.to_string())? {
        log(format!("mgmtdev {m:?}"));
    }
    client
        .add_device(&args.name, "vduse")
        .map_err(|e| e.to_string())?;
    let client = vdpa.insert(client);
    for d in client.list_devices().map_err(|e| e.to_string())? {
        log(format!("vdpa dev {d:?}"));
    }
    if args.vhost {
        vdpa::bind_driver(&args.name, Driver::Vhost).map_err(|e| e.to_string())?;
    }
    run_command(args, &find_node(args)?)
}
