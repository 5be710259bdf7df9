//! What `/proc` says about the processes and sockets under test: memory, open files, command
//! lines, and the server side of TCP connections.

/// `VmRSS` of a process in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Open file descriptors of a process (0 when it is gone).
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// The pids of processes whose command line starts with `prefix` (to find a remote process the
/// test started, by an argv[0] marker).
pub fn pids_with_cmdline_prefix(prefix: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if std::fs::read(e.path().join("cmdline"))
                .is_ok_and(|c| c.starts_with(prefix.as_bytes()))
            {
                pids.push(pid);
            }
        }
    }
    pids
}

/// Where the threads of `pid` named `name` wait in the kernel (`/proc/PID/task/TID/wchan`:
/// `anon_pipe_write` or `pipe_write` for a write to a full pipe, `0` for a running thread).
pub fn thread_wchans(pid: u32, name: &str) -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter(|task| {
            std::fs::read_to_string(task.path().join("comm")).is_ok_and(|comm| comm.trim() == name)
        })
        .filter_map(|task| std::fs::read_to_string(task.path().join("wchan")).ok())
        .collect()
}

/// Bytes waiting unread in the receive queues of established TCP connections whose local port
/// is `port` (the server side, as `/proc/net/tcp` shows it): one entry per connection. A
/// stopped server leaves what its clients sent there.
pub fn unread_bytes_on_port(port: u16) -> Vec<u64> {
    let text = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local_port = u16::from_str_radix(f.get(1)?.rsplit_once(':')?.1, 16).ok()?;
            let established = *f.get(3)? == "01";
            let rx = u64::from_str_radix(f.get(4)?.split_once(':')?.1, 16).ok()?;
            (local_port == port && established).then_some(rx)
        })
        .collect()
}

/// The TCP ports process `pid` listens on: its socket inodes (`/proc/PID/fd`) matched with the
/// LISTEN entries (state `0A`) of `/proc/net/tcp` and `/proc/net/tcp6`.
pub fn listening_ports(pid: u32) -> std::collections::BTreeSet<u16> {
    let inodes: std::collections::BTreeSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the process's fds")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|target| {
            let t = target.to_string_lossy().into_owned();
            Some(t.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect();
    let mut ports = std::collections::BTreeSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            let (Some(local), Some(state), Some(inode)) =
                (fields.get(1), fields.get(3), fields.get(9))
            else {
                continue;
            };
            if *state != "0A" || !inodes.contains(*inode) {
                continue;
            }
            let port = local.rsplit(':').next().unwrap_or_default();
            if let Ok(port) = u16::from_str_radix(port, 16) {
                ports.insert(port);
            }
        }
    }
    ports
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sees_this_process() {
        let me = std::process::id();
        assert!(rss_kib(me).is_some_and(|kib| kib > 0));
        assert!(fd_count(me) >= 3);
        assert!(!pids_with_cmdline_prefix("").is_empty());
        let name = std::fs::read_to_string(format!("/proc/{me}/comm")).unwrap();
        assert!(!thread_wchans(me, name.trim()).is_empty());
    }
}
