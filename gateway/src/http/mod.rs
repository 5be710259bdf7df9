//! HTTP(S) frontend for JupyterHub pools: TLS termination, signed sticky sessions, websockets.
//! (Being built: see issue 4.)

use std::sync::Arc;

use poolgate_config::Config;
use router_core::Pool;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::ssh::FailureHook;

/// What the HTTP frontend needs from the rest of the gateway.
pub struct HttpParts {
    /// The validated configuration (`[http]`, `[tls]`, `[listen]`).
    pub config: Config,
    /// The pool.
    pub pool: Arc<Pool>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Passive health feedback: a request could not reach the VM.
    pub on_vm_failure: FailureHook,
}

/// Serves `listen.http` (and `listen.https` when `[tls]` is set) until `shutdown` turns true.
pub async fn serve(
    parts: HttpParts,
    http: TcpListener,
    https: Option<TcpListener>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let _ = (parts, http, https);
    while !*shutdown.borrow() {
        if shutdown.changed().await.is_err() {
            break;
        }
    }
    Ok(())
}
