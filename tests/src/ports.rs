//! Free ports on 127.0.0.1 and waiting for a port to open, close or speak SSH.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::process::Backoff;

/// A TCP port on 127.0.0.1 that was free a moment ago: binds `127.0.0.1:0`, reads the port the
/// kernel chose and closes the socket. Another process may still take it before you bind it, so
/// fixtures that can (e.g. [`crate::SshdVm`]) retry on "address already in use".
///
/// No port is handed out twice within [`RESERVATION`]: not within one test process (the kernel
/// may well offer a port it just gave, its choice is random, and a test that asks for an SSH,
/// an HTTP and an admin port would then configure two listeners on one port), nor across the
/// test processes nextest runs side by side, which reserve ports with marker files in
/// `$TMPDIR/poolgate-test-ports/`.
pub fn free_port() -> u16 {
    static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(PoisonError::into_inner);
    for _ in 0..1000 {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .expect("bind 127.0.0.1:0 to find a free port");
        let port = listener
            .local_addr()
            .expect("local address of a bound listener")
            .port();
        if !handed_out.contains(&port) && reserve_across_processes(port) {
            handed_out.insert(port);
            return port;
        }
    }
    panic!("the kernel offered only ports already handed out, 1000 times over")
}

/// How long a port handed out by [`free_port`] stays reserved for the test that asked for it.
pub const RESERVATION: Duration = Duration::from_secs(120);

/// Claims `port` for this process unless another test process claimed it less than
/// [`RESERVATION`] ago. A marker directory that cannot be written means no cross-process
/// reservation, not a failure: the in-process check still holds.
fn reserve_across_processes(port: u16) -> bool {
    let dir = std::env::temp_dir().join("poolgate-test-ports");
    if std::fs::create_dir_all(&dir).is_err() {
        return true;
    }
    let marker = dir.join(port.to_string());
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&marker)
    {
        Ok(_) => true,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let stale = std::fs::metadata(&marker)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > RESERVATION);
            // A stale marker is renewed by rewriting it; two processes renewing the same
            // stale marker at once is the only race left, and it needs the kernel to offer
            // both of them that very port.
            stale
                && std::fs::OpenOptions::new()
                    .write(true)
                    .open(&marker)
                    .and_then(|f| f.set_modified(std::time::SystemTime::now()))
                    .is_ok()
        }
        Err(_) => true,
    }
}

/// Polls until `addr` accepts a TCP connection; panics after `timeout` naming the address.
pub fn wait_for_port(addr: SocketAddr, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let mut backoff = Backoff::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match TcpStream::connect_timeout(&addr, left.clamp(Duration::from_millis(1), CONNECT)) {
            Ok(_) => return,
            Err(e) if Instant::now() >= deadline => {
                panic!(
                    "{addr} did not accept a TCP connection within {timeout:?} (last error: {e})"
                )
            }
            Err(_) => backoff.sleep_until(deadline),
        }
    }
}

/// Polls until connecting to `addr` is refused (nothing listens any more); panics after
/// `timeout`.
pub fn wait_for_port_closed(addr: SocketAddr, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let mut backoff = Backoff::new();
    loop {
        if TcpStream::connect_timeout(&addr, CONNECT).is_err() {
            return;
        }
        if Instant::now() >= deadline {
            panic!("{addr} still accepts TCP connections after {timeout:?}");
        }
        backoff.sleep_until(deadline);
    }
}

/// Polls until `addr` accepts a connection and sends an `SSH-2.0-` identification line, which
/// it returns (without the line ending). Panics after `timeout` with the last thing seen.
pub fn wait_for_ssh_banner(addr: SocketAddr, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    let mut backoff = Backoff::new();
    loop {
        let last = match read_banner(addr, deadline) {
            Ok(banner) => return banner,
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            panic!("no SSH-2.0- banner from {addr} within {timeout:?}: {last}");
        }
        backoff.sleep_until(deadline);
    }
}

/// Whether a TCP connection to `addr` is refused (nothing listens any more).
pub fn refused(addr: SocketAddr) -> bool {
    matches!(
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

const CONNECT: Duration = Duration::from_millis(500);

/// One attempt: does `addr` accept a TCP connection (within 500 ms)?
pub fn accepts(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, CONNECT).is_ok()
}

/// One attempt: connect and read lines until an `SSH-2.0-` one, giving up at `deadline`.
pub(crate) fn read_banner(addr: SocketAddr, deadline: Instant) -> Result<String, String> {
    let stream = TcpStream::connect_timeout(&addr, CONNECT).map_err(|e| format!("connect: {e}"))?;
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(100));
    stream
        .set_read_timeout(Some(left))
        .map_err(|e| e.to_string())?;
    // RFC 4253 allows other lines before the identification line.
    let mut reader = BufReader::new(stream);
    for _ in 0..16 {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) => return Err("connection closed before a banner".into()),
            Ok(_) if line.starts_with("SSH-2.0-") => return Ok(line.trim_end().to_string()),
            Ok(_) => continue,
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    Err("16 lines without an SSH-2.0- banner".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_port_can_be_bound_and_waited_for() {
        let port = free_port();
        assert_ne!(port, 0);
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let listener = TcpListener::bind(addr).expect("bind the free port");
        wait_for_port(addr, Duration::from_secs(5));
        drop(listener);
        wait_for_port_closed(addr, Duration::from_secs(5));
    }

    #[test]
    fn free_port_never_hands_out_a_port_twice_in_one_process() {
        let ports: Vec<u16> = (0..300).map(|_| free_port()).collect();
        let distinct: BTreeSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len());
    }

    #[test]
    #[should_panic(expected = "did not accept a TCP connection within")]
    fn waiting_for_a_closed_port_fails_clearly() {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
        wait_for_port(addr, Duration::from_millis(200));
    }
}
