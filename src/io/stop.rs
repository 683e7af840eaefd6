//! How a member process ends: on SIGTERM or SIGINT, or on a fatal error, and always within
//! [`STOP_DEADLINE`].
//!
//! A clean stop syncs the WAL, writes what the apply loop staged and flushes the backend. Any of
//! those can block for good on a failed disk (sled waits on a condvar for a flush that an
//! ENOSPC made impossible), and a blocked flush can hold both runtime workers, so that no task
//! runs, not even the one waiting for the signal. So the signals are taken by a thread of their
//! own, outside the runtime, and once a stop begins a second thread ends the process when the
//! deadline passes, whatever the runtime is doing. `std::process::exit` runs no destructor; the
//! kernel releases the backend's file lock with the process.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use tokio::sync::Notify;

/// The longest a stop may take, from the signal or the fatal error to the process's end.
pub const STOP_DEADLINE: Duration = Duration::from_secs(9);

static SIGNALLED: OnceLock<Notify> = OnceLock::new();
static DEADLINE_ARMED: AtomicBool = AtomicBool::new(false);
static TAKEN: AtomicBool = AtomicBool::new(false);

fn signalled() -> &'static Notify {
    SIGNALLED.get_or_init(Notify::new)
}

/// Takes SIGTERM and SIGINT away from every thread started after this call and hands them to a
/// thread of their own. Call it before any other thread starts (the runtime's workers inherit
/// the mask). Returns `false` where that is not possible; [`signal`] then falls back to tokio's
/// handlers.
pub fn take_signals() -> bool {
    #[cfg(unix)]
    {
        // SAFETY: `set` is a plain C struct initialised by `sigemptyset` before any other use;
        // the calls only read and write it and the calling thread's signal mask.
        let set = unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::sigaddset(&mut set, libc::SIGINT);
            if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
                return false;
            }
            set
        };
        let spawned = std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || loop {
                let mut number: libc::c_int = 0;
                // SAFETY: `set` was initialised above; `number` is a valid out pointer.
                if unsafe { libc::sigwait(&set, &mut number) } != 0 {
                    continue;
                }
                let name = if number == libc::SIGINT {
                    "SIGINT"
                } else {
                    "SIGTERM"
                };
                if DEADLINE_ARMED.load(Ordering::SeqCst) {
                    tracing::warn!("received {name} again while stopping; exiting now");
                    std::process::exit(1);
                }
                tracing::info!("received {name}, shutting down");
                arm_deadline("the clean stop");
                signalled().notify_one();
            });
        if spawned.is_ok() {
            TAKEN.store(true, Ordering::SeqCst);
            return true;
        }
        // SAFETY: as above; unblocks what was blocked, as no thread will take it.
        unsafe {
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        }
    }
    false
}

/// Ends when SIGTERM or SIGINT arrives (from the signal thread of [`take_signals`] when it
/// runs, else from tokio's handlers).
pub async fn signal() {
    if TAKEN.load(Ordering::SeqCst) {
        signalled().notified().await;
        return;
    }
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            tokio::select! {
                _ = term.recv() => tracing::info!("received SIGTERM, shutting down"),
                _ = int.recv() => tracing::info!("received SIGINT, shutting down"),
            }
            arm_deadline("the clean stop");
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
    arm_deadline("the clean stop");
}

/// From now on the process ends within [`STOP_DEADLINE`]: if it is still running then, it
/// logs that `what` did not finish and exits with status 1. Later calls change nothing.
pub fn arm_deadline(what: &'static str) {
    if DEADLINE_ARMED.swap(true, Ordering::SeqCst) {
        return;
    }
    let armed = std::thread::Builder::new()
        .name("stop-deadline".into())
        .spawn(move || {
            std::thread::sleep(STOP_DEADLINE);
            tracing::error!(
                deadline = ?STOP_DEADLINE,
                "{what} did not finish in time (a disk that does not answer?); exiting"
            );
            std::process::exit(1);
        });
    if armed.is_err() {
        // No thread for the deadline: better no clean stop than a process that may never end.
        tracing::error!("cannot start the stop deadline's thread; exiting");
        std::process::exit(1);
    }
}
