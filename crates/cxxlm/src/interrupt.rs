//! Ctrl-C and SIGTERM ask running work to stop at the next safe point; outputs written
//! so far stay valid and a rerun resumes. A second signal ends the process at once
//! (work blocked where it cannot look at the flag would otherwise hold it): outputs are
//! written under temporary names and renamed, so this too leaves them valid.

use std::sync::atomic::{AtomicBool, Ordering};

pub static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(signal: libc::c_int) {
    if STOP.swap(true, Ordering::Relaxed) {
        const SAID: &[u8] = b"\nsecond interrupt: exiting now; rerun the same command to resume\n";
        // SAFETY: write(2) and _exit(2) are async-signal-safe.
        unsafe {
            libc::write(2, SAID.as_ptr().cast(), SAID.len());
            libc::_exit(128 + signal);
        }
    }
}

pub fn install() {
    // SAFETY: the handler only touches an atomic and calls async-signal-safe functions.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}

pub fn requested() -> bool {
    STOP.load(Ordering::Relaxed)
}
