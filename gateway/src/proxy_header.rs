//! The PROXY protocol header (HAProxy's, text version 1 and binary version 2) that a load
//! balancer puts in front of a connection's bytes to say which client it carries
//! (`listen.proxy_protocol`). It is read, to its last byte and not one further, before SSH or
//! HTTP sees the connection; the parsing is the `ppp` crate's.
//!
//! The protocol in brief: version 1 is one text line, `PROXY TCP4 SRC DST SPORT DPORT\r\n` (or
//! `PROXY UNKNOWN…\r\n`), at most 107 bytes. Version 2 starts with a fixed 12-byte signature,
//! then a version/command byte, a family byte and a 2-byte length of the rest (addresses, then
//! optional TLVs). Command `LOCAL` is a connection the balancer opens itself (its health
//! checks): it carries no client, and the socket's own peer stands.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

/// How long a connection may take to send its header: a balancer sends it with the
/// connection's first bytes.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Version 2's signature.
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The longest version 1 line, CRLF included (the protocol's own bound).
const V1_MAX: usize = 107;
/// The longest version 2 header taken: the addresses with room for the TLVs balancers add
/// (AWS's endpoint id, HAProxy's unique id and TLS details). The format allows 64 KiB; a
/// connection is not made to hold that much before it is known to be one.
const V2_MAX: usize = 4096;

/// A connection that did not start with a usable header.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    /// The first bytes are not a header: the balancer does not send one (HAProxy without
    /// `send-proxy-v2`), or a client reached the listener directly.
    #[error("no PROXY protocol header: the connection starts with {0}")]
    Missing(String),
    /// The header is there but cannot be read.
    #[error("invalid PROXY protocol header: {0}")]
    Invalid(String),
    /// The connection ended, or failed, in the middle of the header.
    #[error("the connection ended before its PROXY protocol header did: {0}")]
    Io(#[from] std::io::Error),
    /// The header started but did not end within [`HEADER_TIMEOUT`].
    #[error("no complete PROXY protocol header within {HEADER_TIMEOUT:?}")]
    Timeout,
    /// The connection closed before sending a byte (a balancer's TCP health check does that).
    #[error("the connection closed before sending anything: {0}")]
    Closed(std::io::Error),
    /// Nothing came within [`HEADER_TIMEOUT`].
    #[error("nothing sent within {HEADER_TIMEOUT:?}")]
    Silent,
}

impl HeaderError {
    /// Whether the connection sent nothing at all: what TCP health checks and port scans do,
    /// not a sign of a misconfigured balancer.
    pub fn sent_nothing(&self) -> bool {
        matches!(self, Self::Closed(_) | Self::Silent)
    }
}

/// Whom a balancer's connection carries, as its header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Proxied {
    /// The client's address.
    pub client: SocketAddr,
    /// The address the client connected to: the balancer's (its port is the one users see).
    pub destination: SocketAddr,
}

/// Reads the header at the start of `stream` within [`HEADER_TIMEOUT`] and returns whom it
/// names: `None` when it names no one (a balancer's own connection, `LOCAL`; `UNKNOWN`; a
/// unix socket), in which case the socket's own addresses stand.
pub async fn read<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Option<Proxied>, HeaderError> {
    let mut got_any = false;
    match tokio::time::timeout(HEADER_TIMEOUT, read_header(stream, &mut got_any)).await {
        Ok(Err(HeaderError::Io(e))) if !got_any => Err(HeaderError::Closed(e)),
        Ok(result) => result,
        Err(_) if !got_any => Err(HeaderError::Silent),
        Err(_) => Err(HeaderError::Timeout),
    }
}

async fn read_header<S: AsyncRead + Unpin>(
    stream: &mut S,
    got_any: &mut bool,
) -> Result<Option<Proxied>, HeaderError> {
    // Five bytes tell the versions apart ("PROXY" or the signature's start) and are never more
    // than a header: the shortest, "PROXY UNKNOWN\r\n", has 15. The first is read on its own,
    // so that a connection closed or silent before sending anything is told apart.
    let mut buf = vec![0u8; 5];
    stream.read_exact(&mut buf[..1]).await?;
    *got_any = true;
    stream.read_exact(&mut buf[1..]).await?;
    if buf == b"PROXY" {
        // Byte by byte to the line's end, so that nothing after it is taken from the
        // connection; a line is about fifty bytes.
        while !buf.ends_with(b"\r\n") {
            if buf.len() == V1_MAX {
                return Err(HeaderError::Invalid(format!(
                    "a version 1 line longer than {V1_MAX} bytes"
                )));
            }
            buf.push(stream.read_u8().await?);
        }
        return v1_client(&buf);
    }
    if buf[..] != V2_SIGNATURE[..5] {
        return Err(HeaderError::Missing(printable(&buf)));
    }
    buf.resize(16, 0);
    stream.read_exact(&mut buf[5..]).await?;
    if buf[..12] != V2_SIGNATURE {
        return Err(HeaderError::Missing(printable(&buf)));
    }
    let rest = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if 16 + rest > V2_MAX {
        return Err(HeaderError::Invalid(format!(
            "a version 2 header of {} bytes (at most {V2_MAX} taken)",
            16 + rest
        )));
    }
    buf.resize(16 + rest, 0);
    stream.read_exact(&mut buf[16..]).await?;
    v2_client(&buf)
}

fn v1_client(line: &[u8]) -> Result<Option<Proxied>, HeaderError> {
    let header = ppp::v1::Header::try_from(line)
        .map_err(|e| HeaderError::Invalid(format!("{e} in {}", printable(line))))?;
    Ok(match header.addresses {
        ppp::v1::Addresses::Tcp4(a) => Some(from_v4(&a)),
        ppp::v1::Addresses::Tcp6(a) => Some(from_v6(&a)),
        ppp::v1::Addresses::Unknown => None,
    })
}

fn v2_client(bytes: &[u8]) -> Result<Option<Proxied>, HeaderError> {
    let header =
        ppp::v2::Header::try_from(bytes).map_err(|e| HeaderError::Invalid(e.to_string()))?;
    if header.command == ppp::v2::Command::Local {
        return Ok(None);
    }
    Ok(match header.addresses {
        ppp::v2::Addresses::IPv4(a) => Some(from_v4(&a)),
        ppp::v2::Addresses::IPv6(a) => Some(from_v6(&a)),
        ppp::v2::Addresses::Unix(_) | ppp::v2::Addresses::Unspecified => None,
    })
}

/// How often a refused connection is logged at most (a balancer sending no header fails every
/// connection, and a flood of them must not flood the log too).
const REFUSED_LOG_EVERY: Duration = Duration::from_secs(60);

/// Logs a connection closed for its header: a WARN at most every [`REFUSED_LOG_EVERY`] with
/// how many went unlogged since, DEBUG otherwise. A connection that sent nothing at all (a
/// balancer's TCP health check, a port scan) is only DEBUG: it is what such checks do.
pub fn refused(listener: &str, peer: SocketAddr, error: &HeaderError) {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Instant;
    static LAST: Mutex<Option<Instant>> = Mutex::new(None);
    static SINCE: AtomicU64 = AtomicU64::new(0);
    let probe = error.sent_nothing();
    let due = !probe
        && LAST.lock().is_ok_and(|mut last| {
            let now = Instant::now();
            let due = last.is_none_or(|at| now.duration_since(at) >= REFUSED_LOG_EVERY);
            if due {
                *last = Some(now);
            }
            due
        });
    if due {
        let unlogged = SINCE.swap(0, Ordering::Relaxed);
        tracing::warn!(
            listener,
            peer = %peer,
            unlogged_since = unlogged,
            "{error}; connection closed (listen.proxy_protocol = true: every connection must come \
             through the load balancer, which must send the header: HAProxy `send-proxy-v2` on \
             each server line)"
        );
    } else {
        if !probe {
            SINCE.fetch_add(1, Ordering::Relaxed);
        }
        tracing::debug!(listener, peer = %peer, "{error}; connection closed");
    }
}

/// The addresses of a TCP-over-IPv4 header (the same type in both versions).
fn from_v4(a: &ppp::v1::IPv4) -> Proxied {
    Proxied {
        client: SocketAddr::from((a.source_address, a.source_port)),
        destination: SocketAddr::from((a.destination_address, a.destination_port)),
    }
}

/// The addresses of a TCP-over-IPv6 header (the same type in both versions).
fn from_v6(a: &ppp::v1::IPv6) -> Proxied {
    Proxied {
        client: SocketAddr::from((a.source_address, a.source_port)),
        destination: SocketAddr::from((a.destination_address, a.destination_port)),
    }
}

/// The bytes as a log shows them: text where they are text (`"SSH-2.0-Open"`, `"GET / "`),
/// escapes elsewhere.
fn printable(bytes: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The client the header names, and what is left after it.
    async fn parse(input: &[u8]) -> (Result<Option<SocketAddr>, HeaderError>, Vec<u8>) {
        let mut stream = input;
        let result = read(&mut stream).await.map(|p| p.map(|p| p.client));
        (result, stream.to_vec())
    }

    #[tokio::test]
    async fn the_destination_is_the_balancers_address_users_reached() {
        let mut stream = &b"PROXY TCP4 192.0.2.7 203.0.113.5 50412 443\r\n"[..];
        let proxied = read(&mut stream).await.unwrap().unwrap();
        assert_eq!(proxied.destination, "203.0.113.5:443".parse().unwrap());
    }

    #[tokio::test]
    async fn a_connection_that_sends_nothing_is_told_apart_from_a_broken_header() {
        // Closed at once (a TCP health check).
        let (result, _) = parse(b"").await;
        assert!(
            result.as_ref().is_err_and(HeaderError::sent_nothing),
            "{result:?}"
        );
        // Closed in the middle of a header.
        let (result, _) = parse(b"PROX").await;
        assert!(matches!(result, Err(HeaderError::Io(_))), "{result:?}");
        assert!(!result.unwrap_err().sent_nothing());
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_times_out_as_sending_nothing_and_a_stalled_header_does_not() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let silent = read(&mut server).await.unwrap_err();
        assert!(silent.sent_nothing(), "{silent}");
        tokio::io::AsyncWriteExt::write_all(&mut client, b"PROXY TCP4 ")
            .await
            .unwrap();
        let stalled = read(&mut server).await.unwrap_err();
        assert!(matches!(stalled, HeaderError::Timeout), "{stalled}");
    }

    #[tokio::test]
    async fn version_1_names_the_client_and_leaves_the_rest() {
        let (client, rest) =
            parse(b"PROXY TCP4 192.0.2.7 10.0.0.5 50412 2222\r\nSSH-2.0-OpenSSH_9.2\r\n").await;
        assert_eq!(client.unwrap(), Some("192.0.2.7:50412".parse().unwrap()));
        assert_eq!(rest, b"SSH-2.0-OpenSSH_9.2\r\n");
        let (client, rest) = parse(b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 443\r\nGET /").await;
        assert_eq!(client.unwrap(), Some("[2001:db8::1]:4000".parse().unwrap()));
        assert_eq!(rest, b"GET /");
        let (client, rest) = parse(b"PROXY UNKNOWN\r\nX").await;
        assert_eq!(client.unwrap(), None);
        assert_eq!(rest, b"X");
    }

    #[tokio::test]
    async fn version_2_names_the_client_and_local_names_none() {
        let header = ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            (
                "198.51.100.9:61000".parse::<SocketAddr>().unwrap(),
                "10.0.0.5:8080".parse::<SocketAddr>().unwrap(),
            ),
        )
        .write_tlv(ppp::v2::Type::UniqueId, b"abc")
        .unwrap()
        .build()
        .unwrap();
        let mut input = header.clone();
        input.extend_from_slice(b"GET / HTTP/1.1\r\n");
        let (client, rest) = parse(&input).await;
        assert_eq!(client.unwrap(), Some("198.51.100.9:61000".parse().unwrap()));
        assert_eq!(rest, b"GET / HTTP/1.1\r\n");

        let local = ppp::v2::Builder::new(
            ppp::v2::Version::Two | ppp::v2::Command::Local,
            ppp::v2::AddressFamily::Unspecified | ppp::v2::Protocol::Unspecified,
        )
        .build()
        .unwrap();
        let (client, rest) = parse(&[&local[..], b"SSH-"].concat()).await;
        assert_eq!(client.unwrap(), None);
        assert_eq!(rest, b"SSH-");
    }

    #[tokio::test]
    async fn a_connection_without_a_header_or_with_a_bad_one_is_refused() {
        let (result, _) = parse(b"SSH-2.0-OpenSSH_9.2\r\n").await;
        let e = result.unwrap_err();
        assert!(matches!(e, HeaderError::Missing(_)), "{e}");
        assert!(e.to_string().contains("\"SSH-2\""), "{e}");
        let (result, _) = parse(b"PROXY TCP4 not-an-address 10.0.0.5 1 2\r\n").await;
        assert!(matches!(result, Err(HeaderError::Invalid(_))), "{result:?}");
        let long = [b"PROXY TCP4 ".as_slice(), &[b'1'; 200]].concat();
        let (result, _) = parse(&long).await;
        assert!(matches!(result, Err(HeaderError::Invalid(_))), "{result:?}");
        let (result, _) = parse(b"PROXY TCP4 192.0.2.7").await;
        assert!(matches!(result, Err(HeaderError::Io(_))), "{result:?}");
        let mut huge = V2_SIGNATURE.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        let (result, _) = parse(&huge).await;
        assert!(matches!(result, Err(HeaderError::Invalid(_))), "{result:?}");
    }
}
