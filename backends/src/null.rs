//! `null:SIZE`: reads return zeroes, writes are dropped.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::{Backend, BackendInfo, BackendQueue, Completion, IoRequest, Op, Result};

/// A backend that stores nothing: the benchmark backend.
#[derive(Debug)]
pub struct NullBackend {
    size: AtomicU64,
    read_only: bool,
}

impl NullBackend {
    /// A null device of `size` bytes.
    pub fn new(size: u64, read_only: bool) -> Self {
        Self {
            size: AtomicU64::new(size),
            read_only,
        }
    }
}

impl Backend for NullBackend {
    fn info(&self) -> BackendInfo {
        BackendInfo {
            capacity: self.size.load(Ordering::Acquire),
            read_only: self.read_only,
            block_size: 512,
            discard: true,
            write_zeroes: true,
        }
    }

    fn queue(&self, depth: u32) -> Result<Box<dyn BackendQueue>> {
        Ok(Box::new(NullQueue {
            done: Vec::with_capacity(depth as usize),
        }))
    }

    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }

    /// Any size: nothing is stored.
    fn resize(&self, capacity: u64) -> Result<()> {
        self.size.store(capacity, Ordering::Release);
        Ok(())
    }
}

struct NullQueue {
    done: Vec<Completion>,
}

impl BackendQueue for NullQueue {
    fn submit(&mut self, mut req: IoRequest, tag: u32) -> Result<()> {
        let result = match req.op {
            Op::Read => {
                let len = req.buffers.len();
                match req.buffers.fill_zeroes(0, len) {
                    Ok(()) => Ok(req.len as u32),
                    Err(_) => Err(libc::EFAULT),
                }
            }
            Op::Write => Ok(req.len as u32),
            _ => Ok(0),
        };
        self.done.push(Completion::new(tag, result, req));
        Ok(())
    }

    fn commit(&mut self) -> Result<()> {
        Ok(())
    }

    fn completion_fd(&self) -> Option<RawFd> {
        None
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        out.append(&mut self.done);
    }

    fn wait(&mut self) -> Result<()> {
        Ok(())
    }
}
