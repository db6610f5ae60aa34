//! SIGTERM/SIGINT (stop) and SIGUSR2 (upgrade in place) as events on the main loop's channel
//! (`serve` and `run`).

use std::sync::mpsc::Sender;

use anyhow::Context;
use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR2};
use signal_hook::iterator::Signals;

use crate::device::Event;

/// Forward SIGTERM/SIGINT and SIGUSR2 (an upgrade with the defaults: the binary the daemon
/// was started from) to the main loop's channel.
pub fn forward_signals(events: Sender<Event>) -> anyhow::Result<()> {
    let mut signals =
        Signals::new([SIGTERM, SIGINT, SIGUSR2]).context("cannot install signal handlers")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            crate::confine::enter_service_thread();
            for sig in signals.forever() {
                let event = if sig == SIGUSR2 {
                    Event::Upgrade(crate::upgrade::Request {
                        binary: None,
                        timeout: crate::upgrade::DEFAULT_TIMEOUT,
                        reply: None,
                    })
                } else {
                    Event::Signal(sig)
                };
                if events.send(event).is_err() {
                    break;
                }
            }
        })
        .context("cannot start the signal thread")?;
    Ok(())
}
