//! CPU time from /proc: of the servers (per process, all threads), of the load generator
//! itself, and of the whole machine, so that throughput per CPU-second can be told apart
//! from a machine that is simply full.

/// CPU seconds (user + system) used so far by `pid`; `None` if it cannot be read.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    user_system_seconds(pid).map(|(user, system)| user + system)
}

/// User and system CPU seconds used so far by `pid`, all its threads.
pub fn user_system_seconds(pid: u32) -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    let ticks = clock_ticks_per_second();
    Some((utime / ticks, stime / ticks))
}

/// User and system CPU seconds over `pids`.
pub fn total_user_system_seconds(pids: &[u32]) -> (f64, f64) {
    pids.iter()
        .filter_map(|p| user_system_seconds(*p))
        .fold((0.0, 0.0), |(u, s), (pu, ps)| (u + pu, s + ps))
}

fn clock_ticks_per_second() -> f64 {
    // Linux reports /proc times in USER_HZ, which is 100 on every mainstream architecture.
    100.0
}

/// Sum of CPU seconds over `pids`.
pub fn total_cpu_seconds(pids: &[u32]) -> f64 {
    pids.iter().filter_map(|p| cpu_seconds(*p)).sum()
}

/// Busy and total CPU seconds of the whole machine so far (all cores, from `/proc/stat`):
/// busy is everything but idle and iowait.
pub fn machine_cpu_seconds() -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|f| f.parse().ok())
        .collect();
    if ticks.len() < 5 {
        return None;
    }
    let total: f64 = ticks.iter().sum();
    let idle = ticks[3] + ticks[4];
    let hz = clock_ticks_per_second();
    Some(((total - idle) / hz, total / hz))
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_own_cpu_time() {
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        assert!(x > 0);
        assert!(super::cpu_seconds(std::process::id()).unwrap() > 0.0);
        let (busy, total) = super::machine_cpu_seconds().unwrap();
        assert!(busy > 0.0 && total >= busy);
    }
}
