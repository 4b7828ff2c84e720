//! What the benchmarks read of a process from `/proc` (Linux): its CPU time
//! and its peak resident memory.

use std::path::Path;

use anyhow::{Context, Result};

/// User plus system CPU seconds process `pid` has used so far
/// (`utime + stime` of `/proc/<pid>/stat`, in clock ticks of
/// `sysconf(_SC_CLK_TCK)`).
///
/// # Errors
/// If the process is gone or the file cannot be parsed.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    cpu_seconds_of(Path::new(&format!("/proc/{pid}/stat")))
}

fn cpu_seconds_of(path: &Path) -> Result<f64> {
    let stat = std::fs::read_to_string(path)?;
    // Fields after the command name (which may hold spaces) in parentheses;
    // utime and stime are fields 14 and 15 of the whole line.
    let rest = stat.rsplit_once(')').context("/proc/<pid>/stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| -> Result<f64> {
        fields
            .get(i)
            .context("short /proc/<pid>/stat")?
            .parse()
            .context("utime/stime")
    };
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100.0, |t| t as f64);
    Ok((field(11)? + field(12)?) / ticks)
}

/// CPU seconds the threads of process `pid` whose name starts with `prefix`
/// have used so far (the sum of [`cpu_seconds`] over the matching
/// `/proc/<pid>/task/<tid>`): e.g. `"C2 CompilerThre"`, a JVM's JIT.
///
/// # Errors
/// If the process is gone.
pub fn threads_cpu_seconds(pid: u32, prefix: &str) -> Result<f64> {
    let mut total = 0.0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let task = task?.path();
        let Ok(comm) = std::fs::read_to_string(task.join("comm")) else {
            continue; // the thread ended
        };
        if comm.starts_with(prefix) {
            total += cpu_seconds_of(&task.join("stat")).unwrap_or(0.0);
        }
    }
    Ok(total)
}

/// Peak resident set size of process `pid` in KiB (`VmHWM` of
/// `/proc/<pid>/status`, what `/usr/bin/time -v` reports).
///
/// # Errors
/// If the process is gone or the file has no `VmHWM`.
pub fn peak_rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM in /proc/<pid>/status")
}
