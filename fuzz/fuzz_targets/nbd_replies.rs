//! Fuzz the NBD client against a hostile server: the handshake (option replies, export
//! information, block sizes) and the reply stream (simple replies, structured chunks).
//!
//! Checked: no panic; an accepted data or hole chunk lies inside the READ it answers.
#![no_main]

use libfuzzer_sys::fuzz_target;
use virtiod_backend::nbd_fuzz;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        nbd_fuzz::handshake(rest);
    } else {
        // A READ of up to 64 KiB at a sector from the input, then the replies.
        let Some((head, replies)) = rest.split_at_checked(10) else {
            return;
        };
        let offset = u64::from_le_bytes(head[..8].try_into().unwrap()) & !511;
        let read_len = u32::from(u16::from_le_bytes([head[8], head[9]])) + 1;
        nbd_fuzz::replies(replies, mode & 2 != 0, offset, read_len);
    }
});
