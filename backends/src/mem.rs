//! `mem:SIZE`: a RAM-backed disk, for tests.

use std::os::fd::RawFd;
use std::sync::{Arc, RwLock};

use crate::{Backend, BackendInfo, BackendQueue, Completion, IoRequest, Op, Result};

/// A disk held in this process's memory. Contents are lost when the process exits.
#[derive(Debug, Clone)]
pub struct MemBackend {
    data: Arc<RwLock<Vec<u8>>>,
    read_only: bool,
}

impl MemBackend {
    /// A zero-filled RAM disk of `size` bytes.
    pub fn new(size: u64, read_only: bool) -> Self {
        Self {
            data: Arc::new(RwLock::new(vec![0; size as usize])),
            read_only,
        }
    }

    /// A copy of the disk's contents (tests).
    pub fn snapshot(&self) -> Vec<u8> {
        self.data.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Backend for MemBackend {
    fn info(&self) -> BackendInfo {
        let len = self.data.read().unwrap_or_else(|e| e.into_inner()).len();
        BackendInfo {
            capacity: len as u64,
            read_only: self.read_only,
            block_size: 512,
            discard: true,
            write_zeroes: true,
        }
    }

    fn queue(&self, depth: u32) -> Result<Box<dyn BackendQueue>> {
        Ok(Box::new(MemQueue {
            disk: self.clone(),
            done: Vec::with_capacity(depth as usize),
        }))
    }

    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }

    /// Grows (zero-filled) or shrinks the RAM disk.
    fn resize(&self, capacity: u64) -> Result<()> {
        let len = usize::try_from(capacity)
            .map_err(|_| crate::Error::Resize(format!("{capacity} bytes do not fit in memory")))?;
        let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
        let more = len.saturating_sub(data.len());
        data.try_reserve(more)
            .map_err(|e| crate::Error::Resize(format!("cannot allocate {capacity} bytes: {e}")))?;
        data.resize(len, 0);
        Ok(())
    }
}

struct MemQueue {
    disk: MemBackend,
    done: Vec<Completion>,
}

impl MemQueue {
    /// Execute one request; the range was checked by the engine but is checked again here.
    fn execute(&self, req: &mut IoRequest) -> std::result::Result<u32, i32> {
        let start = usize::try_from(req.offset).map_err(|_| libc::EINVAL)?;
        let data_end = start.checked_add(req.buffers.len()).ok_or(libc::EINVAL)?;
        let copied = match req.op {
            Op::Read => {
                let data = self.disk.data.read().unwrap_or_else(|e| e.into_inner());
                let src = data.get(start..data_end).ok_or(libc::EINVAL)?;
                req.buffers.copy_from_slice(0, src)
            }
            Op::Write => {
                let mut data = self.disk.data.write().unwrap_or_else(|e| e.into_inner());
                let dst = data.get_mut(start..data_end).ok_or(libc::EINVAL)?;
                req.buffers.copy_to_slice(0, dst)
            }
            Op::Flush => return Ok(0),
            Op::Discard | Op::WriteZeroes { .. } => {
                let mut data = self.disk.data.write().unwrap_or_else(|e| e.into_inner());
                let end = start.checked_add(req.len as usize).ok_or(libc::EINVAL)?;
                data.get_mut(start..end).ok_or(libc::EINVAL)?.fill(0);
                return Ok(0);
            }
        };
        copied.map_err(|_| libc::EFAULT)?;
        Ok(req.buffers.len() as u32)
    }
}

impl BackendQueue for MemQueue {
    fn submit(&mut self, mut req: IoRequest, tag: u32) -> Result<()> {
        let result = self.execute(&mut req);
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
