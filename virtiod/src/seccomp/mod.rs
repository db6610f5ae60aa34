//! Seccomp filters per thread role, installed by each transport thread as it starts.
//!
//! The threads that read what a driver or a frontend wrote — queue threads (rings and
//! buffers) and message threads (vhost-user messages, VDUSE requests) — and backend threads
//! (a tap's reader, which copies frames into the device) call
//! [`virtiod_core::confine::enter`] with their role; the hook set here installs that role's
//! allow-list with `seccompiler`. A call outside it is trapped: the SIGSYS handler writes one
//! line naming the system call and the process exits (status 159), so a compromised thread
//! cannot go on. `--seccomp log` lets such calls through and has the kernel log them (audit
//! type 1326, in `dmesg` or the audit log: `syscall=NR comm="vu-queue-0"`), to learn a list;
//! `--seccomp off` installs nothing.
//!
//! Not confined: the main thread and the control socket's workers, which create devices
//! (open images, VDUSE ioctls, netlink) for a local root user; see docs/security.md.

mod names;

use std::collections::BTreeMap;
use std::sync::OnceLock;

use anyhow::Context;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use virtiod_core::confine::{self, ThreadRole};

/// What `--seccomp` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Install the filters; a call outside a thread's list ends the process.
    On,
    /// Install the filters, but let calls outside the lists through and have the kernel log them.
    Log,
    /// Install nothing (debugging).
    Off,
}

/// The compiled filters, one per role.
struct Filters {
    queue: BpfProgram,
    /// Queue threads: opening files fails with EACCES instead of ending the process (glibc's
    /// malloc opens `/proc/sys/vm/overcommit_memory` the first time it shrinks a thread's
    /// heap, and copes with a refusal).
    queue_no_open: BpfProgram,
    message: BpfProgram,
    backend: BpfProgram,
}

static FILTERS: OnceLock<Filters> = OnceLock::new();

/// Environment variable that makes every confined queue thread issue a system call outside
/// its list right after confining itself: the test of the trap (see docs/security.md). With
/// the value `open` the thread opens a file instead, which is refused (EACCES) but not fatal.
pub const FORBIDDEN_CALL_ENV: &str = "VIRTIOD_DEBUG_FORBIDDEN_SYSCALL";

/// Compile the filters for `mode` and set the hook that transport threads call; call once,
/// before any device starts.
pub fn install(mode: Mode) -> anyhow::Result<()> {
    let mismatch = match mode {
        Mode::Off => return Ok(()),
        Mode::On => SeccompAction::Trap,
        Mode::Log => SeccompAction::Log,
    };
    let compile =
        |rules: BTreeMap<i64, Vec<SeccompRule>>, role: &str| -> anyhow::Result<BpfProgram> {
            let filter = SeccompFilter::new(rules, mismatch.clone(), SeccompAction::Allow, arch())
                .with_context(|| format!("building the seccomp filter of {role} threads"))?;
            BpfProgram::try_from(filter)
                .with_context(|| format!("compiling the seccomp filter of {role} threads"))
        };
    let no_open = SeccompFilter::new(
        [libc::SYS_openat, libc::SYS_open]
            .into_iter()
            .map(|nr| (nr, Vec::new()))
            .collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EACCES as u32),
        arch(),
    )
    .context("building the no-open seccomp filter of queue threads")?;
    let filters = Filters {
        queue: compile(queue_rules()?, "queue")?,
        queue_no_open: BpfProgram::try_from(no_open)
            .context("compiling the no-open seccomp filter of queue threads")?,
        message: compile(message_rules(), "message")?,
        backend: compile(backend_rules()?, "backend")?,
    };
    if mode == Mode::On {
        install_sigsys_handler()?;
    }
    let _ = FILTERS.set(filters);
    confine::set_thread_hook(enter);
    Ok(())
}

fn arch() -> TargetArch {
    #[cfg(target_arch = "x86_64")]
    return TargetArch::x86_64;
    #[cfg(target_arch = "aarch64")]
    return TargetArch::aarch64;
}

/// The hook: install the role's filter on the calling thread. A thread that cannot be
/// confined must not serve: the process exits.
fn enter(role: ThreadRole) {
    let Some(filters) = FILTERS.get() else {
        return;
    };
    let program = match role {
        ThreadRole::Queue => &filters.queue,
        ThreadRole::Message => &filters.message,
        ThreadRole::Backend => &filters.backend,
    };
    if let Err(e) = drop_capabilities() {
        eprintln!("virtiod: error: cannot drop the capabilities of a {role:?} thread: {e}: run with --seccomp off to serve without confinement");
        std::process::exit(1);
    }
    // Filters stack and the strictest answer wins: the queue filter lets openat through to
    // this one, which refuses it with EACCES (installed first: the queue filter has no seccomp).
    let no_open = match role {
        ThreadRole::Queue | ThreadRole::Backend => Some(&filters.queue_no_open),
        ThreadRole::Message => None,
    };
    if let Err(e) = no_open
        .map_or(Ok(()), |p| seccompiler::apply_filter(p))
        .and_then(|()| seccompiler::apply_filter(program))
    {
        eprintln!("virtiod: error: cannot install the seccomp filter of a {role:?} thread: {e}: run with --seccomp off to serve without it");
        std::process::exit(1);
    }
    match std::env::var(FORBIDDEN_CALL_ENV) {
        Ok(what) if role == ThreadRole::Queue && what == "open" => {
            // Refused with EACCES, not fatal: the thread goes on serving.
            let result = std::fs::File::open("/proc/self/status").map(drop);
            eprintln!("virtiod: debug: a queue thread opening a file: {result:?}");
        }
        Ok(_) if role == ThreadRole::Queue => {
            // SYSLOG_ACTION_SIZE_BUFFER: harmless where allowed; no virtiod thread may call it.
            // SAFETY: syslog(10, NULL, 0) only returns the size of the kernel log buffer.
            unsafe { libc::syscall(libc::SYS_syslog, 10, std::ptr::null_mut::<u8>(), 0) };
        }
        _ => {}
    }
}

/// Confined threads need no capability (what they touch is open already): clear them all
/// for this thread (capabilities are per thread; the threads it starts inherit the empty sets).
fn drop_capabilities() -> Result<(), caps::errors::CapsError> {
    if caps::read(None, caps::CapSet::Permitted)?.is_empty() {
        return Ok(()); // an unprivileged daemon, or a thread started by a confined one
    }
    // The ambient set may not exist on old kernels: nothing to clear there.
    let _ = caps::clear(None, caps::CapSet::Ambient);
    caps::clear(None, caps::CapSet::Effective)?;
    caps::clear(None, caps::CapSet::Inheritable)?;
    caps::clear(None, caps::CapSet::Permitted)
}

/// Calls every confined thread makes: memory, futexes, time, signals for panics, exiting.
const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_mprotect,
    libc::SYS_brk,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigaction,
    libc::SYS_sigaltstack,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_sched_yield,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    // The kernel itself makes this call to resume a sleep, timed poll or futex wait that a
    // signal interrupted without a handler running in this thread (it only continues the
    // interrupted call, which the list allows). Seen after a failed upgrade: the old daemon
    // reaps the new process while its threads sleep.
    libc::SYS_restart_syscall,
    libc::SYS_clock_gettime,
    libc::SYS_gettimeofday,
    libc::SYS_getrandom,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_tgkill,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_lseek,
    libc::SYS_fcntl,
    libc::SYS_io_uring_enter,
    libc::SYS_fdatasync,
    libc::SYS_fsync,
    libc::SYS_fallocate,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_shutdown,
    libc::SYS_sched_getaffinity,
    libc::SYS_rseq,
    libc::SYS_msync,
];

/// Queue threads: [`COMMON`], `ftruncate` (a qcow2 image grows as clusters are allocated),
/// `openat` (refused with EACCES by the no-open filter stacked on this one), plus only the
/// VDUSE ioctls of a queue (interrupts, re-mapping the IOTLB, the queue's state).
fn queue_rules() -> anyhow::Result<BTreeMap<i64, Vec<SeccompRule>>> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = COMMON
        .iter()
        .chain(&[libc::SYS_ftruncate, libc::SYS_openat, libc::SYS_open])
        .map(|&nr| (nr, Vec::new()))
        .collect();
    let mut ioctls = Vec::new();
    for cmd in [
        vduse::sys::VDUSE_VQ_INJECT_IRQ,
        vduse::sys::VDUSE_IOTLB_GET_FD,
        vduse::sys::VDUSE_VQ_GET_INFO,
    ] {
        let cond = SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, cmd)
            .context("a seccomp ioctl condition")?;
        ioctls.push(SeccompRule::new(vec![cond]).context("a seccomp ioctl rule")?);
    }
    rules.insert(libc::SYS_ioctl, ioctls);
    Ok(rules)
}

/// Backend threads (a tap's reader): [`COMMON`] (read frames, write eventfds, epoll), plus
/// `openat` (refused with EACCES by the no-open filter stacked on this one, as for queue
/// threads) and one ioctl, `TUNSETOFFLOAD` (the offloads the driver negotiated).
fn backend_rules() -> anyhow::Result<BTreeMap<i64, Vec<SeccompRule>>> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = COMMON
        .iter()
        .chain(&[libc::SYS_openat, libc::SYS_open])
        .map(|&nr| (nr, Vec::new()))
        .collect();
    let cond = SeccompCondition::new(
        1,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        libc::TUNSETOFFLOAD,
    )
    .context("a seccomp ioctl condition")?;
    rules.insert(
        libc::SYS_ioctl,
        vec![SeccompRule::new(vec![cond]).context("a seccomp ioctl rule")?],
    );
    Ok(rules)
}

/// Message threads: [`COMMON`], plus what serving a frontend or a VDUSE device takes: its
/// socket and fds, mapping memory, in-flight regions, starting queue threads, creating backend
/// queues (io_uring rings, NBD connections), device ioctls.
fn message_rules() -> BTreeMap<i64, Vec<SeccompRule>> {
    const MESSAGE: &[i64] = &[
        libc::SYS_ioctl,
        libc::SYS_accept4,
        libc::SYS_recvmsg,
        libc::SYS_sendmsg,
        libc::SYS_socket,
        libc::SYS_connect,
        libc::SYS_setsockopt,
        libc::SYS_getsockopt,
        libc::SYS_getsockname,
        libc::SYS_getpeername,
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_register,
        libc::SYS_clone,
        libc::SYS_clone3,
        libc::SYS_set_robust_list,
        libc::SYS_prctl,
        libc::SYS_memfd_create,
        libc::SYS_ftruncate,
        libc::SYS_openat,
        libc::SYS_dup,
        libc::SYS_dup3,
        libc::SYS_eventfd2,
        libc::SYS_epoll_create1,
        libc::SYS_timerfd_create,
        libc::SYS_timerfd_settime,
        libc::SYS_unlink,
        libc::SYS_unlinkat,
        libc::SYS_pipe2,
        libc::SYS_uname,
        libc::SYS_getuid,
        libc::SYS_geteuid,
        libc::SYS_munlock,
        libc::SYS_mlock,
        libc::SYS_sched_getparam,
        libc::SYS_sched_setaffinity,
        libc::SYS_socketpair,
        libc::SYS_fstatfs,
        libc::SYS_capget,
        // A queue thread installs its own filter on top of the one it inherits from here.
        libc::SYS_seccomp,
    ];
    COMMON
        .iter()
        .chain(MESSAGE)
        .map(|&nr| (nr, Vec::new()))
        .collect()
}

/// Trap SIGSYS: one line naming the call, then exit.
fn install_sigsys_handler() -> anyhow::Result<()> {
    // SAFETY: a zeroed sigaction is a valid value; every field used is set below.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigsys as *const () as usize;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: installs a handler that only calls async-signal-safe functions (write, _exit).
    let ret = unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) };
    if ret != 0 {
        return Err(std::io::Error::last_os_error()).context("installing the SIGSYS handler");
    }
    Ok(())
}

/// Where `si_syscall` sits in a `siginfo_t` for SIGSYS on 64-bit Linux: after signo, errno,
/// code and padding (16 bytes), then `_call_addr` (8 bytes).
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for SA_SIGINFO handlers; for SIGSYS from
    // seccomp its _sigsys member holds the call number at SI_SYSCALL_OFFSET.
    let nr = unsafe {
        std::ptr::read_unaligned((info as *const u8).add(SI_SYSCALL_OFFSET) as *const i32)
    };
    let mut line = [0u8; 192];
    let len = format_denied(&mut line, i64::from(nr));
    // SAFETY: write(2) and _exit(2) are async-signal-safe; `line[..len]` is initialised.
    unsafe {
        libc::write(2, line.as_ptr().cast(), len);
        libc::_exit(159);
    }
}

/// "virtiod: seccomp: forbidden system call NAME (NR) in a confined thread: exiting\n" into
/// `out`, without allocating (it runs in a signal handler); returns the length.
fn format_denied(out: &mut [u8], nr: i64) -> usize {
    let mut len = 0;
    let mut put = |bytes: &[u8]| {
        let n = bytes.len().min(out.len() - len);
        out[len..len + n].copy_from_slice(&bytes[..n]);
        len += n;
    };
    put(b"virtiod: seccomp: forbidden system call ");
    put(names::name(nr).unwrap_or("unknown").as_bytes());
    put(b" (");
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut v = nr.unsigned_abs();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    put(&digits[i..]);
    put(b") in a confined thread: exiting (see docs/security.md; --seccomp log to learn, off to debug)\n");
    len
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_denied_line_names_the_call() {
        let mut buf = [0u8; 192];
        let n = format_denied(&mut buf, libc::SYS_syslog);
        let line = std::str::from_utf8(&buf[..n]).unwrap();
        assert!(
            line.starts_with(
                "virtiod: seccomp: forbidden system call syslog (103) in a confined thread"
            ),
            "{line}"
        );
        assert!(line.ends_with('\n'));
        let n = format_denied(&mut buf, 9999);
        assert!(std::str::from_utf8(&buf[..n])
            .unwrap()
            .contains("unknown (9999)"));
    }

    #[test]
    fn names_match_the_libc_numbers() {
        assert_eq!(names::name(libc::SYS_read), Some("read"));
        assert_eq!(
            names::name(libc::SYS_io_uring_enter),
            Some("io_uring_enter")
        );
        assert_eq!(names::name(libc::SYS_execve), Some("execve"));
        assert_eq!(names::name(-1), None);
    }

    #[test]
    fn the_filters_compile_and_queue_threads_get_no_process_or_file_creation() {
        let q = queue_rules().unwrap();
        // openat is let through here and refused with EACCES by the stacked no-open filter.
        assert!(q.contains_key(&libc::SYS_openat));
        for nr in [
            libc::SYS_execve,
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_ptrace,
        ] {
            assert!(!q.contains_key(&nr), "{:?}", names::name(nr));
        }
        let m = message_rules();
        assert!(!m.contains_key(&libc::SYS_execve));
        assert!(!m.contains_key(&libc::SYS_ptrace));
        for rules in [q, m] {
            let f = SeccompFilter::new(rules, SeccompAction::Trap, SeccompAction::Allow, arch())
                .unwrap();
            assert!(!BpfProgram::try_from(f).unwrap().is_empty());
        }
    }
}
