//! The node process's memory as the kernel reports it (`/proc/PID/status`), for tests that bound
//! what a client can make the node hold.

use anyhow::{Context, Result};

use crate::NodeProcess;

/// One memory field of `/proc/PID/status` (`VmRSS`, `VmHWM`, `VmPeak`, ...), in bytes; read at
/// once, no waiting.
pub fn process_memory(node: &NodeProcess, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", node.pid()))?;
    let line = status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .with_context(|| format!("{field} in /proc/PID/status"))?;
    let kib: u64 = line.trim().trim_end_matches("kB").trim().parse()?;
    Ok(kib * 1024)
}
