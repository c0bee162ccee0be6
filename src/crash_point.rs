//! The power cut the tests cause: `UPDATE_AGENT_CRASH_AT=<point>` makes the process kill itself
//! with SIGKILL (a real `kill -9`, nothing cleaned up) when it reaches that point. The points are
//! named where they stand (the agent's, the read-back's, the split's stream); the list is in
//! tests/power_cut.rs. Only in builds with the `test-hooks` feature (the tests'), never in a
//! device build.

/// The crash point this process was asked to stop at, if any.
pub fn requested() -> Option<String> {
    std::env::var("UPDATE_AGENT_CRASH_AT").ok()
}

/// Kills this process at the crash point `name` when it is the one requested.
pub fn at(name: &str) {
    if requested().as_deref() == Some(name) {
        crash(name);
    }
}

/// Kills this process with SIGKILL at the crash point `name`, saying so on stderr first.
pub fn crash(name: &str) -> ! {
    eprintln!("crash point {name}: killing the agent with SIGKILL");
    let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    unreachable!("SIGKILL cannot be caught");
}
