//! Real Jupyter as pool VMs, and a browser-like HTTPS client for them.
//!
//! - [`JupyterHubVm`]: `jupyterhub` (DummyAuthenticator, password [`HUB_PASSWORD`];
//!   SimpleLocalProcessSpawner; its `configurable-http-proxy` from npm) on free 127.0.0.1 ports
//!   in its own temp dir, ready when `/hub/health` answers, killed with its whole process tree
//!   (proxy, single-user servers, kernels) on drop.
//! - [`JupyterServerVm`]: a plain `jupyter_server` (no token) — a cheaper real web VM.
//! - [`TestCa`]: a test CA and a gateway certificate for `localhost`/`127.0.0.1`.
//! - [`Browser`]: an HTTPS/HTTP client with a path-aware cookie jar, redirects, server-sent
//!   events and websockets, so tests act as a browser would.
//!
//! Tools come from the Python venv at `$POOLGATE_VENV` (default `<workspace>/.venv`) and the
//! npm packages in `tests/js/node_modules` (`$POOLGATE_JS` overrides that folder); `tests/run`
//! installs both. Under CI a missing tool fails the test (see [`crate::require_tool`]).

mod browser;
mod ca;
mod vm;

pub use browser::{
    AsyncReadWrite, Browser, Reply, WebSocket, cookie_vm, execute, execute_request, run_code,
    ws_next_text, ws_send,
};
pub use ca::TestCa;
pub use vm::{
    HUB_PASSWORD, JupyterHubVm, JupyterServerVm, WebVm, js_bin, js_dir, require_jupyter, venv_bin,
    venv_dir,
};
