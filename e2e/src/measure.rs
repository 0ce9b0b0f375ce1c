//! What a process has used, read from `/proc`: CPU time (user + system, every thread, live or
//! ended) and resident memory. The benchmark reads them before and after a run of one
//! separate process (the gateway, the proxy) to report CPU per call and memory per session.

use std::time::Duration;

use anyhow::Context;

/// Clock ticks per second of `/proc/<pid>/stat` times (`sysconf(_SC_CLK_TCK)`).
fn ticks_per_second() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().filter(|t| *t > 0).unwrap_or(100) as f64
}

/// CPU time `pid` has used so far.
pub fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("read /proc/{pid}/stat"))?;
    // The command name is in parentheses and may hold spaces: count fields after its end.
    let rest = stat.rsplit_once(')').context("a /proc stat line")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, utime 14 and stime 15 (1-based over the whole line).
    let ticks = |n: usize| -> anyhow::Result<f64> { Ok(fields.get(n - 3).context("a stat field")?.parse::<f64>()?) };
    Ok(Duration::from_secs_f64((ticks(14)? + ticks(15)?) / ticks_per_second()))
}

/// A `kB` field of `/proc/<pid>/status`, in bytes.
fn status_bytes(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).with_context(|| format!("read /proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with(field)).with_context(|| format!("{field} in /proc status"))?;
    let kib: u64 = line.split_whitespace().nth(1).context("a kB value")?.parse()?;
    Ok(kib * 1024)
}

/// Resident memory of `pid`, in bytes.
pub fn resident_bytes(pid: u32) -> anyhow::Result<u64> {
    status_bytes(pid, "VmRSS:")
}

/// The most resident memory `pid` has used so far (its high-water mark), in bytes.
pub fn peak_resident_bytes(pid: u32) -> anyhow::Result<u64> {
    status_bytes(pid, "VmHWM:")
}

/// CPU used by `pid` while `work` runs.
pub async fn cpu_during<T>(pid: u32, work: impl std::future::Future<Output = T>) -> anyhow::Result<(T, Duration)> {
    let before = cpu_time(pid)?;
    let output = work.await;
    Ok((output, cpu_time(pid)?.saturating_sub(before)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_uses_cpu_and_memory() {
        let pid = std::process::id();
        let before = cpu_time(pid).unwrap();
        let started = std::time::Instant::now();
        let mut x = 0u64;
        while started.elapsed() < Duration::from_millis(200) {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        assert!(x > 0);
        assert!(cpu_time(pid).unwrap() > before, "200 ms of spinning shows as CPU time");
        assert!(resident_bytes(pid).unwrap() > 1 << 20);
    }
}
