//! SIGTERM/SIGINT as events on the main loop's channel (`serve` and `run`).

use std::sync::mpsc::Sender;

use anyhow::Context;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::device::Event;

/// Forward SIGTERM/SIGINT to the main loop's channel.
pub fn forward_signals(events: Sender<Event>) -> anyhow::Result<()> {
    let mut signals = Signals::new([SIGTERM, SIGINT]).context("cannot install signal handlers")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            crate::confine::enter_service_thread();
            for sig in signals.forever() {
                if events.send(Event::Signal(sig)).is_err() {
                    break;
                }
            }
        })
        .context("cannot start the signal thread")?;
    Ok(())
}
