//! What the benches read about processes on this machine: CPU time from /proc, and the
//! local stack's JVMs from the stack's own pid files (`$HERALD_STACK_DIR/run/<c>.pid`, as
//! `scripts/stack` writes them), so a second stack on the machine is never measured.

#![allow(dead_code)] // each bench uses a part

/// CPU seconds (user + system) a process has used so far, from /proc; 0 when it is gone.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit_once(") ").map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// The pid of the local stack's `component` (`kafka`, `cassandra`, `registry`) from its
/// pid file, when it is running.
pub fn stack_pid(component: &str) -> Option<u32> {
    // The same defaults as scripts/stack: $HERALD_STACK_DIR, else $HERALD_CACHE/stack.
    let cache = std::env::var_os("HERALD_CACHE")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cache/herald")))?;
    let dir = std::env::var_os("HERALD_STACK_DIR").map(std::path::PathBuf::from).unwrap_or_else(|| cache.join("stack"));
    let file = dir.join("run").join(format!("{component}.pid"));
    let pid = std::fs::read_to_string(&file)
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
        .filter(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists());
    if pid.is_none() {
        eprintln!("bench: no running {component} in {} (set HERALD_STACK_DIR to the stack in use): its CPU reads as 0", file.display());
    }
    pid
}

/// CPU seconds of each of `pids` so far (0 for `None`).
pub fn cpu_of(pids: &[Option<u32>]) -> Vec<f64> {
    pids.iter().map(|p| p.map(cpu_seconds).unwrap_or(0.0)).collect()
}
