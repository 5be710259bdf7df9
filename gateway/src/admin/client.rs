//! The admin API's client side: `poolgate status`, `drain` and `undrain`.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper::header::{AUTHORIZATION, HOST};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::api::VmView;

/// A failed admin call, worded for the command line.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing answers at the address.
    #[error(
        "cannot reach the admin API at {addr}: {reason} (is the gateway running? set --admin ADDR)"
    )]
    Unreachable {
        /// Address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// Token missing or wrong.
    #[error(
        "the admin API refused the request: it needs the bearer token (pass --token-file FILE)"
    )]
    Unauthorized,
    /// The API answered with an error.
    #[error("{0}")]
    Api(String),
    /// The token file could not be read.
    #[error("{path}: {reason}")]
    Token {
        /// File.
        path: String,
        /// Why.
        reason: String,
    },
}

/// Reads a bearer token file (first line, trimmed).
pub fn read_token(path: &Path) -> Result<String, ClientError> {
    let text = std::fs::read_to_string(path).map_err(|e| ClientError::Token {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    Ok(text.lines().next().unwrap_or_default().trim().to_string())
}

async fn call(
    addr: SocketAddr,
    token: Option<&str>,
    method: &str,
    path: &str,
) -> Result<(u16, String), ClientError> {
    let unreachable = |reason: String| ClientError::Unreachable { addr, reason };
    let exchange = async {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        tokio::spawn(connection);
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, addr.to_string());
        if let Some(token) = token {
            request = request.header(AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = request
            .body(Empty::<Bytes>::new())
            .map_err(|e| ClientError::Api(e.to_string()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| unreachable(e.to_string()))?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    let (status, body) = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| unreachable("no answer within 10 s".into()))??;
    match status {
        200..=299 => Ok((status, body)),
        401 => Err(ClientError::Unauthorized),
        _ => {
            let message = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
                .unwrap_or(body);
            Err(ClientError::Api(message))
        }
    }
}

/// `GET /api/v1/vms`.
pub async fn vms(addr: SocketAddr, token: Option<&str>) -> Result<Vec<VmView>, ClientError> {
    let (_, body) = call(addr, token, "GET", "/api/v1/vms").await?;
    serde_json::from_str(&body)
        .map_err(|e| ClientError::Api(format!("unexpected answer from the admin API: {e}")))
}

/// `POST /api/v1/vms/{vm}/drain` or `…/undrain`.
pub async fn set_drain(
    addr: SocketAddr,
    token: Option<&str>,
    vm: &str,
    drain: bool,
) -> Result<VmView, ClientError> {
    let action = if drain { "drain" } else { "undrain" };
    if !vm
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(ClientError::Api(format!("{vm:?} is not a VM name")));
    }
    let (_, body) = call(addr, token, "POST", &format!("/api/v1/vms/{vm}/{action}")).await?;
    serde_json::from_str(&body)
        .map_err(|e| ClientError::Api(format!("unexpected answer from the admin API: {e}")))
}

/// The health of each side the gateway serves (`ssh up · web up`; `web up` for a browser-only
/// gateway).
fn health_cell(vm: &VmView) -> String {
    let sides = [("ssh", &vm.protocols.ssh), ("web", &vm.protocols.http)];
    let served: Vec<String> = sides
        .iter()
        .filter(|(_, side)| side.served)
        .map(|(name, side)| format!("{name} {}", side.health))
        .collect();
    if served.is_empty() {
        vm.health.clone()
    } else {
        served.join(" · ")
    }
}

/// Where the gateway sends sessions: the sshd, or the web port for a browser-only gateway.
fn address_cell(vm: &VmView) -> String {
    let port = if !vm.protocols.ssh.served && vm.protocols.http.served {
        vm.http_port
    } else {
        vm.ssh_port
    };
    format!("{}:{port}", vm.host)
}

/// The pool as a text table.
pub fn table(vms: &[VmView]) -> String {
    let mut rows = vec![[
        "VM".to_string(),
        "STATE".into(),
        "SSH".into(),
        "HTTP".into(),
        "LOAD".into(),
        "HEALTH".into(),
        "ADDRESS".into(),
    ]];
    for vm in vms {
        rows.push([
            vm.name.clone(),
            if vm.leaving {
                format!("{} (leaving: removed from the pool)", vm.state)
            } else if vm.busy == Some(true) {
                format!("{} (kept: work running)", vm.state)
            } else {
                vm.state.clone()
            },
            vm.sessions.ssh.to_string(),
            vm.sessions.http.to_string(),
            format!("{}/{}", vm.sessions.total, vm.max_sessions),
            health_cell(vm),
            address_cell(vm),
        ]);
    }
    let mut widths = [0usize; 7];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    let ssh: u32 = vms.iter().map(|v| v.sessions.ssh).sum();
    let http: u32 = vms.iter().map(|v| v.sessions.http).sum();
    let healthy = vms.iter().filter(|v| v.state == "healthy").count();
    out.push_str(&format!(
        "{} VMs, {healthy} healthy; {ssh} SSH and {http} browser sessions\n",
        vms.len()
    ));
    out
}
