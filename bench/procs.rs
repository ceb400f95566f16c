//! What the benches read about processes on this machine: CPU time from /proc and the
//! local stack's JVMs by their main class.

#![allow(dead_code)] // each bench uses a part

/// CPU seconds (user + system) a process has used so far, from /proc; 0 when it is gone.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit_once(") ").map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// The first process whose command line contains `pattern` (`kafka.Kafka`,
/// `CassandraDaemon`), when visible.
pub fn pid_of(pattern: &str) -> Option<u32> {
    let out = std::process::Command::new("pgrep").args(["-f", pattern]).output().ok()?;
    String::from_utf8_lossy(&out.stdout).lines().next()?.trim().parse().ok()
}

/// CPU seconds of each of `pids` so far (0 for `None`).
pub fn cpu_of(pids: &[Option<u32>]) -> Vec<f64> {
    pids.iter().map(|p| p.map(cpu_seconds).unwrap_or(0.0)).collect()
}
