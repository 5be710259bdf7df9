//! HTTP/1.1 upgrades (websockets: kernel channels, terminals): the upgrade request goes to the
//! VM on a dedicated connection; on `101 Switching Protocols` both upgraded streams are relayed
//! by [`super::relay`] (back-pressured both ways, no buffer held while idle).

use std::time::Duration;

use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tracing::Instrument;

use super::Body;

/// How long an upgraded connection stays open once one side has closed it, for the other to
/// close too (see [`super::relay`]).
const HALF_CLOSED_GRACE: Duration = Duration::from_secs(5);

/// Why an upgrade request got no response from the VM.
pub(super) enum UpgradeError {
    /// Connecting failed; the client's upgrade handle is returned to try another VM.
    Connect(String, OnUpgrade),
    /// No response headers within the timeout.
    Timeout,
    /// The VM failed after the connection was made.
    Failed(String),
}

/// Sends the upgrade request `req` (origin-form target, `Connection: upgrade` kept) to
/// `authority` and, on `101`, relays the upgraded streams in a background task that calls
/// `on_done(up, down)` with the byte counts when either side closes. The background tasks log
/// in `span`, the client connection's.
pub(super) async fn forward(
    span: &tracing::Span,
    authority: &str,
    req: Request<Body>,
    client: OnUpgrade,
    connect_timeout: Duration,
    header_timeout: Duration,
    on_done: impl FnOnce(u64, u64) + Send + 'static,
) -> Result<Response<Incoming>, UpgradeError> {
    let stream = match super::upstream::connect_tcp(authority, connect_timeout).await {
        Ok(s) => s,
        Err(detail) => return Err(UpgradeError::Connect(detail, client)),
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| UpgradeError::Failed(e.to_string()))?;
    tokio::spawn(
        async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!("upstream upgrade connection: {e}");
            }
        }
        .instrument(span.clone()),
    );
    let mut resp = match tokio::time::timeout(header_timeout, sender.send_request(req)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Err(UpgradeError::Failed(e.to_string())),
        Err(_) => return Err(UpgradeError::Timeout),
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let upstream = hyper::upgrade::on(&mut resp);
        tokio::spawn(
            async move {
                let (c, u) = match tokio::join!(client, upstream) {
                    (Ok(c), Ok(u)) => (c, u),
                    (Err(e), _) | (_, Err(e)) => {
                        tracing::debug!("upgrade not completed: {e}");
                        return;
                    }
                };
                let mut c = TokioIo::new(c);
                let mut u = TokioIo::new(u);
                match super::relay::relay(&mut c, &mut u, HALF_CLOSED_GRACE).await {
                    Ok((up, down)) => on_done(up, down),
                    Err(e) => tracing::debug!("upgraded stream ended: {e}"),
                }
            }
            .instrument(span.clone()),
        );
    }
    Ok(resp)
}
