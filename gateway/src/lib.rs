//! poolgate's gateway: SSH and HTTP frontends, health checks, admin API, autoscaler driver.
//!
//! The binary `poolgate` (`main.rs`) is a thin CLI over this library; tests drive the library
//! in-process as well as the binary.

pub mod admin;
pub mod app;
pub mod autoscale;
pub mod cli;
pub mod cluster;
#[cfg(feature = "demo")]
pub mod demo;
pub mod health;
pub mod html;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod placement;
pub mod proxy_header;
pub mod secrets;
pub mod simulate;
pub mod ssh;
pub mod wake;
