//! What /proc says about processes and the machine: a process's resident memory and the
//! connections it holds, and CPU time sampled before and after a window.

use std::collections::{BTreeMap, HashMap, HashSet};

use anyhow::{Context, Result};

/// Linux's USER_HZ, the unit of utime and stime in /proc/PID/stat (100 on every mainstream
/// architecture).
const CLOCK_TICKS_PER_SEC: f64 = 100.0;

/// Resident memory of a process, in bytes.
pub fn rss_bytes(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|line| line.starts_with("VmRSS:"))
        .context("no VmRSS")?;
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .context("VmRSS value")?
        .parse()?;
    Ok(kib * 1024)
}

/// Established TCP connections a process holds whose local port is one of `ports`: its clients'
/// connections to the tested URLs, without its listeners, its own outgoing connections (Redis) or
/// short-lived ones on other ports (probes of its internal port), whose coming and going would
/// otherwise blur the count.
pub fn connection_count(pid: u32, ports: &[u16]) -> Result<u64> {
    let inodes: HashSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("reading /proc/{pid}/fd"))?
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter_map(|target| {
            let target = target.to_str()?;
            target
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect();
    let mut count = 0;
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        // Columns: sl local_address rem_address st … inode (the tenth); state 01 is ESTABLISHED.
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(&"01"), Some(inode)) =
                (fields.get(1), fields.get(3), fields.get(9))
            else {
                continue;
            };
            let port = local
                .rsplit(':')
                .next()
                .and_then(|port| u16::from_str_radix(port, 16).ok());
            if port.is_some_and(|port| ports.contains(&port))
                && inode
                    .parse::<u64>()
                    .is_ok_and(|inode| inodes.contains(&inode))
            {
                count += 1;
            }
        }
    }
    Ok(count)
}

/// CPU counters at one moment: of each watched process, of the whole machine and of every
/// process alive.
pub struct CpuSample {
    watched: Vec<Option<u64>>,
    machine: Option<u64>,
    all: HashMap<u32, u64>,
}

impl CpuSample {
    /// Reads the counters of `watched` (NAME, PID), the machine's and every process's.
    pub fn take(watched: &[(String, u32)]) -> CpuSample {
        CpuSample {
            watched: watched.iter().map(|(_, pid)| cpu_ticks(*pid)).collect(),
            machine: machine_busy_ticks(),
            all: all_cpu_ticks(),
        }
    }
}

/// CPU used between two samples, percent of one core.
pub struct CpuUse {
    /// Per watched process, by name (a process gone by either sample is left out).
    pub by_name: BTreeMap<String, f64>,
    /// The whole machine's busy time.
    pub machine: Option<f64>,
    /// Every process alive at `after` that is not watched.
    pub others: f64,
}

/// CPU used between `before` and `after`, `window_secs` apart, by the processes `watched` (the
/// list both samples were taken with).
pub fn cpu_use(
    watched: &[(String, u32)],
    before: &CpuSample,
    after: &CpuSample,
    window_secs: u64,
) -> CpuUse {
    let percent = |ticks: u64| {
        let secs = ticks as f64 / CLOCK_TICKS_PER_SEC;
        (secs / window_secs as f64 * 1000.0).round() / 10.0
    };
    let mut by_name = BTreeMap::new();
    for (index, (name, _)) in watched.iter().enumerate() {
        if let (Some(before), Some(after)) = (before.watched[index], after.watched[index]) {
            by_name.insert(name.clone(), percent(after.saturating_sub(before)));
        }
    }
    let machine = match (before.machine, after.machine) {
        (Some(before), Some(after)) => Some(percent(after.saturating_sub(before))),
        _ => None,
    };
    let others = percent(
        after
            .all
            .iter()
            .filter(|(pid, _)| !watched.iter().any(|(_, watched)| watched == *pid))
            .map(|(pid, ticks)| ticks.saturating_sub(before.all.get(pid).copied().unwrap_or(0)))
            .sum(),
    );
    CpuUse {
        by_name,
        machine,
        others,
    }
}

/// Busy CPU time of the whole machine (every state but idle and iowait), in clock ticks.
fn machine_busy_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|line| line.starts_with("cpu "))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|field| field.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user already).
    let busy = |index: usize| ticks.get(index).copied().unwrap_or(0);
    Some(busy(0) + busy(1) + busy(2) + busy(5) + busy(6) + busy(7))
}

/// CPU time of every process on the machine, by pid.
fn all_cpu_ticks() -> HashMap<u32, u64> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Default::default();
    };
    entries
        .filter_map(|entry| {
            let pid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
            Some((pid, cpu_ticks(pid)?))
        })
        .collect()
}

/// CPU time (user + system, all threads) a process has used, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let mut fields = stat.get(stat.rfind(')')? + 2..)?.split_whitespace();
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}
