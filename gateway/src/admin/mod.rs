//! Admin listener: `/metrics`, `/healthz`, `/status` and the JSON API under `/api/v1`.

pub mod api;
pub mod client;
pub mod server;
pub mod status_page;

pub use api::{AdminState, Reply};
