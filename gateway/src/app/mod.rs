//! The composition root: the only module that knows every part. It maps the configuration to
//! each part's settings ([`settings`]), builds every part before anything is bound
//! ([`GatewayBuilder`]), binds the listeners and supervises the long-running tasks until
//! shutdown (`serve`), and applies configuration reloads ([`reload`]).

mod build;
mod busy;
pub mod cluster;
mod handover;
mod reload;
mod serve;
pub mod settings;
mod state;
mod wake;

pub use build::{Gateway, GatewayBuilder, check_startup, host_policy, provider, user_ca};
pub use handover::Inherited;
pub use reload::reload;
pub use serve::BindError;
pub use settings::autoscale_policy;

#[cfg(test)]
mod tests {
    use super::*;
    use poolgate_config::Config;

    #[test]
    fn check_startup_finds_a_tls_pair_that_does_not_match() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.ssh.backend_known_hosts = Some(dir.path().join("known_hosts"));
        std::fs::write(dir.path().join("known_hosts"), "").unwrap();
        assert_eq!(check_startup(&config), Vec::<String>::new());
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let other = rcgen::KeyPair::generate().unwrap();
        std::fs::write(dir.path().join("cert.pem"), cert.cert.pem()).unwrap();
        std::fs::write(dir.path().join("key.pem"), other.serialize_pem()).unwrap();
        config.tls = Some(poolgate_config::Tls {
            cert: dir.path().join("cert.pem"),
            key: dir.path().join("key.pem"),
            ..poolgate_config::Tls::default()
        });
        // [tls] without listen.https is not loaded by `run`, so not checked either.
        assert_eq!(check_startup(&config), Vec::<String>::new());
        config.listen.https = Some(([127, 0, 0, 1], 0).into());
        let problems = check_startup(&config);
        assert_eq!(problems.len(), 1, "{problems:#?}");
        assert!(
            problems[0].starts_with("tls: the key in ") && problems[0].contains("does not belong"),
            "{problems:#?}"
        );
        config.ssh.backend_known_hosts = Some(dir.path().join("missing"));
        let problems = check_startup(&config);
        assert_eq!(problems.len(), 2, "{problems:#?}");
        assert!(
            problems[1].starts_with("ssh.backend_known_hosts: "),
            "{problems:#?}"
        );
    }
}
