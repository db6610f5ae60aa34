//! One queue's requests in flight in librbd: each is boxed with its tag and handed to an
//! `rbd_aio_*` call as the completion's argument; librbd's callback (on its own thread) takes
//! the box back, parks the [`Completion`] and signals the queue's eventfd.

use std::ffi::{c_int, c_void};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{sys, Image};
use crate::{BackendQueue, Completion, Error, IoRequest, Op, Result};

/// How long dropping a queue waits for its requests still in librbd.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
struct State {
    done: Vec<Completion>,
    in_flight: usize,
}

/// What the queue thread and librbd's callbacks share.
#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    cond: Condvar,
    event: EventFd,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Park a completion and wake the queue thread.
    fn complete(&self, completion: Completion, was_in_flight: bool) {
        let mut st = self.lock();
        if was_in_flight {
            st.in_flight -= 1;
        }
        st.done.push(completion);
        drop(st);
        self.cond.notify_all();
        // A full counter still leaves the fd readable: nothing is lost.
        let _ = self.event.write(1);
    }
}

/// A request in librbd: the box given to the completion callback as its argument.
struct InFlight {
    api: &'static sys::Api,
    req: IoRequest,
    tag: u32,
    /// Bytes reported on success.
    bytes: u32,
    shared: Arc<Shared>,
}

/// librbd's completion callback, on one of its threads.
///
/// # Safety
/// `arg` is the pointer `Box::into_raw` made of an [`InFlight`] in [`RbdQueue::submit`], and
/// `c` the completion created with it; librbd calls this exactly once per completion.
unsafe extern "C" fn on_complete(c: sys::rbd_completion_t, arg: *mut c_void) {
    // SAFETY: per this function's contract, `arg` is an `InFlight` box given up by `submit`
    // and not touched since; it is taken back once.
    let op = unsafe { Box::from_raw(arg.cast::<InFlight>()) };
    // SAFETY: `c` is the live completion of this callback; it is released once, here.
    let ret = unsafe {
        let ret = (op.api.rbd_aio_get_return_value)(c);
        (op.api.rbd_aio_release)(c);
        ret
    };
    let InFlight {
        api: _,
        req,
        tag,
        bytes,
        shared,
    } = *op;
    let result = if ret < 0 {
        Err(i32::try_from(-ret).unwrap_or(libc::EIO))
    } else {
        Ok(bytes)
    };
    shared.complete(Completion::new(tag, result, req), true);
}

/// The per-queue context of an [`super::RbdBackend`].
pub(super) struct RbdQueue {
    image: Arc<Image>,
    shared: Arc<Shared>,
    read_only: bool,
}

impl RbdQueue {
    pub(super) fn new(image: Arc<Image>, read_only: bool, depth: u32) -> Result<Self> {
        let event = EventFd::new(EFD_NONBLOCK).map_err(Error::Submit)?;
        let state = State {
            done: Vec::with_capacity(depth as usize),
            in_flight: 0,
        };
        Ok(Self {
            image,
            shared: Arc::new(Shared {
                state: Mutex::new(state),
                cond: Condvar::new(),
                event,
            }),
            read_only,
        })
    }

    fn complete_now(&self, req: IoRequest, tag: u32, result: std::result::Result<u32, i32>) {
        self.shared
            .complete(Completion::new(tag, result, req), false);
    }

    /// Hand `op` to librbd; on failure returns the errno (the request was not started).
    fn start(&self, op: Box<InFlight>) -> std::result::Result<(), (Box<InFlight>, i32)> {
        let (api, image) = (self.image.api, self.image.image);
        let (kind, offset, len) = (op.req.op, op.req.offset, op.req.len);
        let iovecs = op.req.buffers.iovecs();
        let (iov, iovcnt) = (iovecs.as_ptr(), iovecs.len());
        let Ok(iovcnt) = c_int::try_from(iovcnt) else {
            return Err((op, libc::EINVAL));
        };
        let Ok(zero_len) = usize::try_from(len) else {
            return Err((op, libc::EINVAL));
        };
        let arg = Box::into_raw(op);
        let mut c: sys::rbd_completion_t = std::ptr::null_mut();
        // SAFETY: `arg` stays valid until the callback takes it back (or we do, below, when
        // librbd refused the completion or the request and so never calls back).
        let ret = unsafe { (api.rbd_aio_create_completion)(arg.cast(), on_complete, &mut c) };
        if ret < 0 {
            // SAFETY: librbd did not take `arg`: it is ours again.
            return Err((unsafe { Box::from_raw(arg) }, -ret));
        }
        self.shared.lock().in_flight += 1;
        // SAFETY: the image is open (`self.image` keeps it); `iov` points to the request's
        // iovec array and the host ranges it lists, both owned by the `InFlight` box through
        // its `IoBuffers` (which keep the driver memory mapped) until `on_complete` drops it,
        // after librbd is done with them. librbd writes into them only for a READ, whose
        // buffers the engine built as `DeviceWrites`. After a successful call the box may
        // already be freed by the callback: nothing below touches it then.
        let ret = unsafe {
            match kind {
                Op::Read => (api.rbd_aio_readv)(image, iov, iovcnt, offset, c),
                Op::Write => (api.rbd_aio_writev)(image, iov, iovcnt, offset, c),
                Op::Flush => (api.rbd_aio_flush)(image, c),
                Op::Discard => (api.rbd_aio_discard)(image, offset, len, c),
                Op::WriteZeroes { unmap } => {
                    let flags = if unmap {
                        0
                    } else {
                        sys::RBD_WRITE_ZEROES_FLAG_THICK_PROVISION
                    };
                    (api.rbd_aio_write_zeroes)(image, offset, zero_len, c, flags, 0)
                }
            }
        };
        if ret < 0 {
            self.shared.lock().in_flight -= 1;
            // SAFETY: librbd refused the request before queueing it, so it never calls
            // back: the completion and `arg` are ours to release.
            let op = unsafe {
                (api.rbd_aio_release)(c);
                Box::from_raw(arg)
            };
            return Err((op, -ret));
        }
        Ok(())
    }
}

impl BackendQueue for RbdQueue {
    fn submit(&mut self, req: IoRequest, tag: u32) -> Result<()> {
        if self.read_only && req.op != Op::Read {
            // Nothing to make durable on a read-only image; the rest changes it.
            let result = if req.op == Op::Flush {
                Ok(0)
            } else {
                Err(libc::EROFS)
            };
            self.complete_now(req, tag, result);
            return Ok(());
        }
        let bytes = match req.op {
            Op::Read | Op::Write => match u32::try_from(req.buffers.len()) {
                Ok(0) => {
                    self.complete_now(req, tag, Ok(0));
                    return Ok(());
                }
                Ok(n) => n,
                Err(_) => {
                    self.complete_now(req, tag, Err(libc::EINVAL));
                    return Ok(());
                }
            },
            _ => 0,
        };
        let op = Box::new(InFlight {
            api: self.image.api,
            req,
            tag,
            bytes,
            shared: self.shared.clone(),
        });
        if let Err((op, errno)) = self.start(op) {
            tracing::debug!(errno, "librbd refused a request");
            let InFlight { req, tag, .. } = *op;
            self.complete_now(req, tag, Err(errno));
        }
        Ok(())
    }

    fn commit(&mut self) -> Result<()> {
        // Every request started in `submit`: librbd queues it to its own threads.
        Ok(())
    }

    fn completion_fd(&self) -> Option<RawFd> {
        Some(self.shared.event.as_raw_fd())
    }

    fn ack_completion_event(&mut self) {
        let _ = self.shared.event.read();
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        out.append(&mut self.shared.lock().done);
    }

    fn wait(&mut self) -> Result<()> {
        let mut st = self.shared.lock();
        while st.done.is_empty() && st.in_flight > 0 {
            st = self.shared.cond.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        Ok(())
    }
}

impl Drop for RbdQueue {
    /// Wait (bounded) for the requests still in librbd, so none outlives the image's users.
    fn drop(&mut self) {
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        let mut st = self.shared.lock();
        while st.in_flight > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!(
                    in_flight = st.in_flight,
                    "RBD requests still in flight after {} s: the queue goes away without them",
                    DRAIN_TIMEOUT.as_secs()
                );
                return;
            }
            st = self
                .shared
                .cond
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}
