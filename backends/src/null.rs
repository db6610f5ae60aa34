//! `null:SIZE`: reads return zeroes, writes are dropped.

use std::os::fd::RawFd;

use crate::{Backend, BackendInfo, BackendQueue, Completion, IoRequest, Op, Result};

/// A backend that stores nothing: the benchmark backend.
#[derive(Debug)]
pub struct NullBackend {
    size: u64,
    read_only: bool,
}

impl NullBackend {
    /// A null device of `size` bytes.
    pub fn new(size: u64, read_only: bool) -> Self {
        Self { size, read_only }
    }
}

impl Backend for NullBackend {
    fn info(&self) -> BackendInfo {
        BackendInfo {
            capacity: self.size,
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
}

struct NullQueue {
    done: Vec<Completion>,
}

impl BackendQueue for NullQueue {
    unsafe fn submit(&mut self, req: &IoRequest<'_>, tag: u32) -> Result<()> {
        let len = match req.op {
            Op::Read => {
                for iov in req.iovecs {
                    // SAFETY: the caller guarantees each iovec is valid, writable driver
                    // memory of iov_len bytes until this request is reaped.
                    unsafe { std::ptr::write_bytes(iov.iov_base.cast::<u8>(), 0, iov.iov_len) };
                }
                req.len
            }
            Op::Write => req.len,
            _ => 0,
        };
        self.done.push((tag, Ok(len as u32)));
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
