//! Reading replies on a queue's connection: simple replies, and structured reply chunks
//! (READ data and holes copied into the request's buffers, errors), each checked against
//! the request it answers: the server is not trusted to stay inside it.

use std::io::Read;
use std::sync::MutexGuard;

use super::proto::{self, Chunk, ChunkBody, ReplyStart};
use super::{Owner, Part, Shared, State, Stream};
use crate::Completion;

impl Shared {
    pub(super) fn read_reply(
        &self,
        stream: &mut Stream,
        payload: &mut Vec<u8>,
    ) -> std::result::Result<(), String> {
        let mut head = [0u8; proto::CHUNK_LEN];
        let (start, rest) = head.split_at_mut(proto::REPLY_LEN);
        stream.read_exact(start).map_err(|e| e.to_string())?;
        let start: &[u8; proto::REPLY_LEN] = (&*start).try_into().expect("16 bytes");
        let reply = match ReplyStart::decode(start, self.info.structured)? {
            ReplyStart::Simple(reply) => reply,
            ReplyStart::Chunk => {
                stream.read_exact(rest).map_err(|e| e.to_string())?;
                return self.read_chunk(stream, Chunk::decode(&head), payload);
            }
        };
        let part = self
            .lock()
            .parts
            .remove(&reply.cookie)
            .ok_or_else(|| format!("reply for unknown cookie {}", reply.cookie))?;
        if self.info.structured && part.read_len > 0 && reply.error == 0 {
            return Err("simple reply to a READ after structured replies were agreed".into());
        }
        let errno = reply.errno();
        // Simple replies carry a READ's data only on success.
        let data_len = if errno == 0 {
            part.read_len as usize
        } else {
            0
        };
        payload.resize(data_len, 0);
        stream.read_exact(payload).map_err(|e| e.to_string())?;
        let mut st = self.lock();
        if errno == 0 && data_len > 0 {
            if let Owner::Request(id) = part.owner {
                if let Some(p) = st.requests.get_mut(&id) {
                    if p.req
                        .buffers
                        .copy_from_slice(part.buf_offset, payload)
                        .is_err()
                    {
                        p.errno = libc::EFAULT;
                    }
                }
            }
        }
        self.part_done(st, reply.cookie, part, errno);
        Ok(())
    }

    /// One structured reply chunk: READ data or a hole copied into the request's buffers
    /// (bounds checked against the part: the server is not trusted to stay inside it), an
    /// error recorded; the part completes with the chunk that carries `REPLY_FLAG_DONE`.
    fn read_chunk(
        &self,
        stream: &mut Stream,
        chunk: Chunk,
        payload: &mut Vec<u8>,
    ) -> std::result::Result<(), String> {
        let part = *self
            .lock()
            .parts
            .get(&chunk.cookie)
            .ok_or_else(|| format!("reply chunk for unknown cookie {}", chunk.cookie))?;
        // A data chunk holds at most the part's bytes and its offset; others are small.
        let limit = (part.read_len as usize + 8).max(MAX_CHUNK_PAYLOAD);
        if chunk.length as usize > limit {
            return Err(format!("reply chunk of {} bytes too long", chunk.length));
        }
        payload.resize(chunk.length as usize, 0);
        stream.read_exact(payload).map_err(|e| e.to_string())?;
        let body = proto::parse_chunk(chunk.kind, payload)?;
        let mut st = self.lock();
        let Owner::Request(id) = part.owner else {
            // A FLUSH of flush_sync: only errors and NONE may come.
            return match body {
                ChunkBody::Error { error, .. } => {
                    if chunk.done() {
                        st.parts.remove(&chunk.cookie);
                        self.part_done(st, chunk.cookie, part, proto::errno(error));
                    } else if let Some(p) = st.parts.get_mut(&chunk.cookie) {
                        p.covered = u32::MAX; // remember the error for the final chunk
                    }
                    Ok(())
                }
                ChunkBody::None | ChunkBody::Other if chunk.done() => {
                    st.parts.remove(&chunk.cookie);
                    let errno = if part.covered == u32::MAX {
                        libc::EIO
                    } else {
                        0
                    };
                    self.part_done(st, chunk.cookie, part, errno);
                    Ok(())
                }
                ChunkBody::None | ChunkBody::Other => Ok(()),
                ChunkBody::Data { .. } | ChunkBody::Hole { .. } => {
                    Err("READ data in the reply to a FLUSH".into())
                }
            };
        };
        let part_start = st
            .requests
            .get(&id)
            .map(|p| p.req.offset + part.buf_offset as u64);
        let mut covered = 0u32;
        match body {
            ChunkBody::Data { offset, data } => {
                let at = chunk_range(part_start, part.read_len, offset, data.len() as u64)?;
                covered = data.len() as u32;
                if let (Some(at), Some(p)) = (at, st.requests.get_mut(&id)) {
                    if p.req
                        .buffers
                        .copy_from_slice(part.buf_offset + at, data)
                        .is_err()
                    {
                        p.errno = libc::EFAULT;
                    }
                }
            }
            ChunkBody::Hole { offset, len } => {
                let at = chunk_range(part_start, part.read_len, offset, u64::from(len))?;
                covered = len;
                if let (Some(at), Some(p)) = (at, st.requests.get_mut(&id)) {
                    if p.req
                        .buffers
                        .fill_zeroes(part.buf_offset + at, len as usize)
                        .is_err()
                    {
                        p.errno = libc::EFAULT;
                    }
                }
            }
            ChunkBody::Error { error, message } => {
                tracing::debug!(export = %self.name, error, "NBD request failed: {message}");
                if let Some(p) = st.requests.get_mut(&id) {
                    p.errno = proto::errno(error);
                }
            }
            ChunkBody::None | ChunkBody::Other => {}
        }
        let entry = st.parts.get_mut(&chunk.cookie).expect("looked up above");
        entry.covered = entry.covered.saturating_add(covered);
        if !chunk.done() {
            return Ok(());
        }
        let part = st.parts.remove(&chunk.cookie).expect("looked up above");
        let mut errno = 0;
        if let Some(p) = st.requests.get(&id) {
            // A successful READ must be covered exactly once by data and holes.
            if p.errno == 0 && part.covered != part.read_len {
                tracing::warn!(export = %self.name, "NBD READ reply covered {} of {} bytes", part.covered, part.read_len);
                errno = libc::EIO;
            }
        }
        self.part_done(st, chunk.cookie, part, errno);
        Ok(())
    }

    /// A part got its final reply (`errno` 0 or an error): a synchronous FLUSH is answered;
    /// a request whose last part this was completes.
    fn part_done(&self, mut st: MutexGuard<'_, State>, cookie: u64, part: Part, errno: i32) {
        let id = match part.owner {
            Owner::Sync => {
                st.sync_done.insert(cookie, errno);
                drop(st);
                self.cond.notify_all();
                return;
            }
            Owner::Request(id) => id,
        };
        let Some(p) = st.requests.get_mut(&id) else {
            return; // failed already
        };
        if errno != 0 {
            p.errno = errno;
        }
        p.parts_left -= 1;
        if p.parts_left == 0 {
            let p = st.requests.remove(&id).expect("present");
            let result = if p.errno == 0 {
                Ok(p.bytes)
            } else {
                Err(p.errno)
            };
            st.done.push(Completion::new(p.tag, result, p.req));
            drop(st);
            self.signal();
        }
    }
}

/// Largest payload of a chunk that carries no READ data (errors with their message).
const MAX_CHUNK_PAYLOAD: usize = 64 << 10;

/// Where a data or hole chunk at export `offset`, `len` bytes, lands inside a part that
/// starts at export offset `part_start` and reads `read_len` bytes: its offset in the part,
/// or a protocol error if it leaves the part. `None` when the request is gone (failed).
pub(in crate::nbd) fn chunk_range(
    part_start: Option<u64>,
    read_len: u32,
    offset: u64,
    len: u64,
) -> std::result::Result<Option<usize>, String> {
    let Some(start) = part_start else {
        return Ok(None);
    };
    let end = start.saturating_add(u64::from(read_len));
    match offset.checked_add(len) {
        Some(chunk_end) if offset >= start && chunk_end <= end && len > 0 => {
            Ok(Some((offset - start) as usize))
        }
        _ => Err(format!(
            "reply chunk [{offset}, +{len}) outside the request's [{start}, {end})"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::chunk_range;

    #[test]
    fn chunks_must_stay_inside_their_part() {
        // A part reading 4096 bytes at export offset 8192.
        let part = Some(8192);
        assert_eq!(chunk_range(part, 4096, 8192, 4096), Ok(Some(0)));
        assert_eq!(chunk_range(part, 4096, 12288 - 512, 512), Ok(Some(3584)));
        for (offset, len) in [
            (8192 - 512, 512),    // before the part
            (12288 - 512, 1024),  // runs past its end
            (12288, 1),           // after it
            (8192, 0),            // empty
            (u64::MAX - 10, 100), // wraps around
        ] {
            assert!(
                chunk_range(part, 4096, offset, len).is_err(),
                "{offset} +{len}"
            );
        }
        // The request failed already: nothing to copy, no error.
        assert_eq!(chunk_range(None, 4096, 0, 1), Ok(None));
    }
}
