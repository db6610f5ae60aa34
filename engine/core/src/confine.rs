//! Confining the threads a transport starts: a hook the embedding program sets once.
//!
//! Transports start their threads themselves (a thread per queue, a thread for the control
//! messages). A seccomp filter can only be installed by the thread it applies to, so each of
//! those threads calls [`enter`] with its role first thing; the program that embeds the
//! transports (the `virtiod` daemon) decides what that does — it installs the role's seccomp
//! filter. Without a hook [`enter`] does nothing, so library users pay nothing.

use std::sync::OnceLock;

/// What a thread does, and so which system calls it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadRole {
    /// Serves one virtqueue: reads the driver's rings and buffers (hostile input), runs the
    /// device's queue handler and its backend I/O, sends interrupts.
    Queue,
    /// Handles a transport's control messages (vhost-user frontend messages, VDUSE requests):
    /// maps driver memory, starts and stops queue threads, creates backend queues.
    Message,
    /// A backend's own thread that moves data between its configured peer and the device (a
    /// tap's reader): reads and writes descriptors it was given, nothing else.
    Backend,
}

static HOOK: OnceLock<fn(ThreadRole)> = OnceLock::new();

/// Set the function every transport thread calls at its start with its role. It can be set
/// once per process; returns false if it was set already.
pub fn set_thread_hook(hook: fn(ThreadRole)) -> bool {
    HOOK.set(hook).is_ok()
}

/// Called by a transport thread first thing: runs the hook, if any, for `role`.
pub fn enter(role: ThreadRole) {
    if let Some(hook) = HOOK.get() {
        hook(role);
    }
}
