//! Several gateway replicas sharing state in a real `redis-server`, in front of real sshd VMs,
//! optionally behind a real HAProxy in TCP mode: counts, affinity and drains cross replicas, a
//! replica killed with `kill -9` stops counting within one lease, a Redis outage costs no login,
//! and a burst of logins through the balancer spreads over the pool.

// Test code: a failed step should abort the test at once (as in tests/src/lib.rs).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use poolgate_tests::*;
use serde_json::Value;

const STEP: Duration = Duration::from_secs(30);

/// `poolgate keys init DIR/keys`, as an operator makes the key set every replica is given.
fn keys_init(dir: &Path) -> PathBuf {
    let keys = dir.join("keys");
    let out = run_with_timeout(
        Command::new(poolgate_bin())
            .arg("keys")
            .arg("init")
            .arg(&keys),
        STEP,
    );
    assert!(out.status.success(), "poolgate keys init: {out:?}");
    keys
}

/// A file holding `secret`, created 0600.
fn secret_file(path: &Path, secret: &str) {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    std::io::Write::write_all(&mut f, format!("{secret}\n").as_bytes()).unwrap();
}

/// `GET path` on the admin listener at `port`, as JSON; `Null` when it does not answer.
fn admin_json(port: u16, path: &str) -> Value {
    try_http_request(admin_addr(port), "GET", path, &[])
        .ok()
        .and_then(|r| serde_json::from_str(&r.body).ok())
        .unwrap_or(Value::Null)
}

/// `GET /metrics` on the admin listener at `port` (empty when it does not answer).
fn admin_metrics(port: u16) -> String {
    try_http_request(admin_addr(port), "GET", "/metrics", &[])
        .map(|r| r.body)
        .unwrap_or_default()
}

fn admin_addr(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// Whether the metrics text has the exact sample line `line`.
fn has_sample(metrics: &str, line: &str) -> bool {
    metrics.lines().any(|l| l == line)
}

/// One replica's listeners.
#[derive(Clone, Copy)]
struct Ports {
    ssh: u16,
    http: u16,
    admin: u16,
}

impl Ports {
    fn free() -> Self {
        Self {
            ssh: free_port(),
            http: free_port(),
            admin: free_port(),
        }
    }
}

/// A replica's whole configuration: its listeners, the shared key set in `keys`, `body` (the
/// `[ssh]` trust, `[health]`, `[pool]` … sections) and a `[cluster]` section on `url` named
/// `id` with `extra` keys.
fn replica_config(
    ports: Ports,
    keys: &Path,
    body: &str,
    url: &str,
    id: &str,
    extra: &str,
) -> String {
    format!(
        "[listen]\nssh = \"127.0.0.1:{ssh}\"\nhttp = \"127.0.0.1:{http}\"\nadmin = \"127.0.0.1:{admin}\"\n\
         \n[ssh]\nhost_keys = [\"{keys}/ssh_host_ed25519_key\"]\nuser_ca_key = \"{keys}/user_ca\"\n\
         {body}\n\
         \n[http]\ncookie_secret_file = \"{keys}/cookie_secret\"\n\
         \n[cluster]\nstore = \"redis\"\nredis_url = \"{url}\"\nreplica_id = \"{id}\"\n{extra}\n",
        ssh = ports.ssh,
        http = ports.http,
        admin = ports.admin,
        keys = keys.display(),
    )
}

/// Starts `poolgate run` with `config` in `dir`, ready once `ready` accepts; `env` is extra
/// environment for it (and the provider scripts it runs).
fn start_replica(dir: &Path, config: &str, ready: u16, env: &[(&str, &str)]) -> GatewayProcess {
    let mut builder = GatewayProcess::builder(config)
        .dir(dir)
        .env("NO_COLOR", "1")
        .wait_for(SocketAddr::from((Ipv4Addr::LOCALHOST, ready)));
    for (name, value) in env {
        builder = builder.env(name, value);
    }
    builder.start()
}

/// `config` on new free ports, as replica `id`; `replace` rewrites other lines by their key.
fn moved(config: &str, id: &str, replace: &[(&str, String)]) -> (String, Ports) {
    let ports = Ports::free();
    let text = config
        .lines()
        .map(|l| {
            let key = l.split(" = ").next().unwrap_or_default();
            match key {
                "ssh" => format!("ssh = \"127.0.0.1:{}\"", ports.ssh),
                "http" => format!("http = \"127.0.0.1:{}\"", ports.http),
                "admin" => format!("admin = \"127.0.0.1:{}\"", ports.admin),
                "replica_id" => format!("replica_id = \"{id}\""),
                _ => replace
                    .iter()
                    .find(|(k, _)| *k == key)
                    .map_or_else(|| l.to_owned(), |(k, v)| format!("{k} = {v}")),
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    (text, ports)
}

/// Replicas of one gateway (same keys, same pool, one Redis) in front of sshd VMs.
struct Replicas {
    gateways: Vec<GatewayProcess>,
    /// (SSH port, admin port) per replica.
    ports: Vec<(u16, u16)>,
    keys: BTreeMap<String, UserKey>,
    known_hosts: KnownHosts,
    host_key_line: String,
    redis: RedisServer,
    /// The VMs; kept running while the replicas serve them.
    _vms: Vec<SshdVm>,
    users: TestUsers,
    /// The private CA of a TLS Redis, kept while it runs.
    _ca: Option<poolgate_tests::jupyter::TestCa>,
    _dir: tempfile::TempDir,
}

impl Replicas {
    /// `replicas` gateways `gw-0…` over VMs `vm_names`, with `users` test users; `cluster_extra`
    /// goes into each `[cluster]` section.
    fn start(replicas: usize, vm_names: &[&str], users: usize, cluster_extra: &str) -> Self {
        Self::start_with(replicas, vm_names, users, cluster_extra, None)
    }

    /// As [`Replicas::start`], with a TLS-only Redis whose certificate a private CA signed.
    fn start_tls(replicas: usize, vm_names: &[&str], users: usize) -> Self {
        let ca = poolgate_tests::jupyter::TestCa::generate();
        let tls = RedisTls {
            cert: ca.cert_path(),
            key: ca.key_path(),
            ca: ca.ca_path(),
        };
        let extra = format!("redis_ca_file = \"{}\"\n", ca.ca_path().display());
        let mut r = Self::build(replicas, vm_names, users, &extra, None, Some(tls));
        r._ca = Some(ca);
        r
    }

    /// As [`Replicas::start`], with Redis requiring `password` (given to the replicas in a
    /// 0600 file).
    fn start_with(
        replicas: usize,
        vm_names: &[&str],
        users: usize,
        cluster_extra: &str,
        password: Option<&str>,
    ) -> Self {
        Self::build(replicas, vm_names, users, cluster_extra, password, None)
    }

    fn build(
        replicas: usize,
        vm_names: &[&str],
        users: usize,
        cluster_extra: &str,
        password: Option<&str>,
        tls: Option<RedisTls>,
    ) -> Self {
        let users = TestUsers::ensure(users);
        let dir = tempfile::Builder::new()
            .prefix("poolgate-cluster-")
            .tempdir()
            .unwrap();
        // The shared key material, written once as an operator would.
        let keys_dir = keys_init(dir.path());
        let vms: Vec<SshdVm> = vm_names
            .iter()
            .map(|name| {
                SshdVm::builder(name)
                    .trusted_user_ca_keys(keys_dir.join("user_ca.pub"))
                    .start()
            })
            .collect();
        let backend_known_hosts = KnownHosts::at(&dir.path().join("known_hosts"));
        for vm in &vms {
            backend_known_hosts.add_vm(vm);
        }
        let authorized = dir.path().join("authorized_keys");
        std::fs::create_dir_all(&authorized).unwrap();
        let mut keys = BTreeMap::new();
        for user in users.all() {
            let key = UserKey::generate(&user.name);
            std::fs::write(
                authorized.join(&user.name),
                format!("{}\n", key.public_key_line()),
            )
            .unwrap();
            keys.insert(user.name.clone(), key);
        }
        let redis = match tls {
            Some(tls) => RedisServer::start_tls(tls),
            None => RedisServer::start_with(password),
        };
        let mut cluster_extra = cluster_extra.to_owned();
        if let Some(password) = password {
            let path = dir.path().join("redis_password");
            secret_file(&path, password);
            cluster_extra += &format!("\nredis_password_file = \"{}\"\n", path.display());
        }
        // `[ssh]` trust of the VMs, quick probes and the static pool: the same on every replica.
        let mut body = format!(
            "authorized_keys = \"{authorized}/{{user}}\"\nbackend_known_hosts = \"{known}\"\n\
             \n[health]\ninterval = \"1s\"\ntimeout = \"1s\"\nrise = 1\n",
            authorized = authorized.display(),
            known = backend_known_hosts.path().display(),
        );
        for vm in &vms {
            body += &format!(
                "\n[[pool.backends]]\nname = \"{}\"\nhost = \"127.0.0.1\"\nssh_port = {}\n",
                vm.name(),
                vm.port()
            );
        }
        let mut gateways = Vec::new();
        let mut ports = Vec::new();
        for i in 0..replicas {
            let p = Ports::free();
            let id = format!("gw-{i}");
            let config = replica_config(p, &keys_dir, &body, &redis.url(), &id, &cluster_extra);
            gateways.push(start_replica(&dir.path().join(&id), &config, p.ssh, &[]));
            ports.push((p.ssh, p.admin));
        }
        let host_key_line =
            std::fs::read_to_string(keys_dir.join("ssh_host_ed25519_key.pub")).unwrap();
        let known_hosts = KnownHosts::new();
        for (ssh, _) in &ports {
            known_hosts.add_host_key(*ssh, &host_key_line);
        }
        let r = Self {
            gateways,
            ports,
            keys,
            known_hosts,
            host_key_line,
            redis,
            _vms: vms,
            users,
            _ca: None,
            _dir: dir,
        };
        for i in 0..replicas {
            wait_until(STEP, "every VM's SSH side up on every replica", || {
                r.vms_view(i)
                    .iter()
                    .all(|vm| vm["protocols"]["ssh"]["health"] == "up")
            });
            wait_until(STEP, "every replica sees the others", || {
                r.api(i, "/api/v1/replicas")["replicas"]
                    .as_array()
                    .is_some_and(|a| a.len() == replicas)
            });
        }
        r
    }

    /// `GET path` on replica `i`'s admin API, as JSON (`Null` when it does not answer).
    fn api(&self, i: usize, path: &str) -> Value {
        admin_json(self.ports[i].1, path)
    }

    fn post(&self, i: usize, path: &str) {
        let r = http_request(admin_addr(self.ports[i].1), "POST", path, &[]);
        assert_eq!(r.status, 200, "POST {path}: {}", r.body);
    }

    /// Drains `vm` through replica `from` and waits until replica `1 - from` applies it.
    fn drain_seen_by_the_other(&self, from: usize, vm: &str) {
        self.post(from, &format!("/api/v1/vms/{vm}/drain"));
        let to = 1 - from;
        wait_until(
            STEP,
            &format!("replica {to} applying replica {from}'s drain"),
            || self.vm_view(to, vm)["draining"] == true,
        );
    }

    fn metrics(&self, i: usize) -> String {
        admin_metrics(self.ports[i].1)
    }

    fn vms_view(&self, i: usize) -> Vec<Value> {
        self.api(i, "/api/v1/vms")
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    fn vm_view(&self, i: usize, vm: &str) -> Value {
        self.vms_view(i)
            .into_iter()
            .find(|v| v["name"] == vm)
            .unwrap_or(Value::Null)
    }

    /// User `n`'s client through replica `i` (or any port, e.g. the balancer's).
    fn client(&self, n: usize, port: u16) -> SshClient {
        let user = &self.users.user(n).name;
        SshClient::new(user, port, self.known_hosts.path())
            .user_key(&self.keys[user])
            .timeout(Duration::from_secs(20))
    }

    fn ssh_port(&self, i: usize) -> u16 {
        self.ports[i].0
    }

    /// Where a one-shot login of user `n` through `port` lands.
    fn lands_on(&self, n: usize, port: u16) -> String {
        let out = self.client(n, port).run("echo $POOLGATE_VM");
        assert!(out.status.success(), "ssh through {port}: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

/// A login that stays open until dropped; `vm` is where it landed.
struct Held {
    child: Child,
    vm: String,
}

impl Held {
    fn open(client: &SshClient) -> Self {
        let mut child = client
            .command("echo $POOLGATE_VM; exec sleep 120")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(!line.trim().is_empty(), "held session printed no VM");
        Self {
            child,
            vm: line.trim().to_owned(),
        }
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn total(vm: &Value) -> u64 {
    vm["sessions"]["total"].as_u64().unwrap_or(u64::MAX)
}

#[test]
fn counts_affinity_and_drains_cross_replicas_and_a_killed_replica_stops_counting() {
    require_tools!("sshd", "ssh", "ssh-keygen", "redis-server", "redis-cli");
    require_root!();
    // The smallest cluster section: store and URL (and a name per replica); lease etc. default.
    let r = Replicas::start(2, &["vm-a", "vm-b", "vm-c"], 3, "");
    let view = r.api(1, "/api/v1/replicas");
    assert_eq!(view["store"], "redis");
    assert_eq!(view["store_up"], true);
    assert_eq!(view["replica_id"], "gw-1");
    assert_eq!(
        view["leader"],
        Value::Null,
        "no autoscaler, no leader: {view}"
    );
    assert_eq!(
        view["replicas"][0]["host_keys"], view["replicas"][1]["host_keys"],
        "replicas present the same host key"
    );

    // A session through replica 0 counts on replica 1 within a sync.
    let mut held = Held::open(&r.client(1, r.ssh_port(0)));
    let on = held.vm.clone();
    let since = Instant::now();
    wait_until(STEP, "replica 1 counting replica 0's session", || {
        let vm = r.vm_view(1, &on);
        total(&vm) == 1 && vm["sessions_by_replica"]["gw-0"]["ssh"] == 1
    });
    eprintln!("replica 1 saw the session after {:?}", since.elapsed());
    // Replica 1's status page shows the whole pool: the session on its VM, held by gw-0, and
    // both replicas.
    let page = http_get(admin_addr(r.ports[1].1), "/status").body;
    assert!(
        page.contains("gw-0: 1"),
        "session by replica missing: {page}"
    );
    assert!(page.contains("Replicas (2, store redis)"), "{page}");
    assert!(
        page.contains("<b>gw-1</b> <span class=\"muted\">(this one)</span>"),
        "{page}"
    );

    // The same user through replica 1 goes back to that VM, though it is the busiest.
    assert_eq!(r.lands_on(1, r.ssh_port(1)), on, "affinity across replicas");
    // Another user through replica 1 avoids it: replica 0's session counts there.
    assert_ne!(r.lands_on(2, r.ssh_port(1)), on, "remote load counted");

    // A drain on replica 0 holds on replica 1; an undrain on replica 1 holds on replica 0.
    let other = ["vm-a", "vm-b", "vm-c"]
        .into_iter()
        .find(|v| *v != on)
        .unwrap();
    r.drain_seen_by_the_other(0, other);
    for _ in 0..4 {
        assert_ne!(r.lands_on(3, r.ssh_port(1)), other, "drained VM used");
    }
    r.post(1, &format!("/api/v1/vms/{other}/undrain"));
    wait_until(STEP, "replica 0 applying replica 1's undrain", || {
        r.vm_view(0, other)["draining"] == false
    });

    // kill -9 replica 0: its session dies with it, and replica 1 stops counting it within one
    // lease (10 s by default) plus a sync.
    let mut r = r;
    r.gateways[0].kill();
    let killed = Instant::now();
    wait_until(
        Duration::from_secs(15),
        "the killed replica's count gone",
        || total(&r.vm_view(1, &on)) == 0,
    );
    let gone = killed.elapsed();
    eprintln!("killed replica's session uncounted after {gone:?}");
    assert!(gone <= Duration::from_secs(12), "took {gone:?}");
    assert!(!held.alive(), "the killed replica's session ended");
    wait_until(STEP, "one replica left", || {
        r.api(1, "/api/v1/replicas")["replicas"]
            .as_array()
            .is_some_and(|a| a.len() == 1)
    });
    let metrics = r.metrics(1);
    for line in ["poolgate_cluster_store_up 1", "poolgate_cluster_replicas 1"] {
        assert!(metrics.lines().any(|l| l == line), "{line} missing");
    }
    drop(held);
}

#[test]
fn a_redis_outage_costs_no_login_and_state_converges_after() {
    require_tools!("sshd", "ssh", "ssh-keygen", "redis-server", "redis-cli");
    require_root!();
    let mut r = Replicas::start(2, &["vm-a", "vm-b"], 4, "");
    let killed = Instant::now();
    r.redis.kill();
    for i in 0..2 {
        wait_until(STEP, "the replica noticing Redis is gone", || {
            r.metrics(i)
                .lines()
                .any(|l| l == "poolgate_cluster_store_up 0")
        });
    }
    // Redis stays down for more than 30 s (`cluster.remote_stale_after`, after which each
    // replica drops the others' last counts): 20 logins, 10 through each replica, all at once,
    // right after it went and again once both replicas fell back to their own counts. Every
    // one succeeds.
    let burst = |when: &str| {
        let results: Vec<bool> = std::thread::scope(|s| {
            let r = &r;
            let handles: Vec<_> = (0..20)
                .map(|k| {
                    s.spawn(move || {
                        let out = r
                            .client(1 + k % 4, r.ssh_port(k % 2))
                            .run("echo $POOLGATE_VM");
                        out.status.success()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let failed = results.iter().filter(|ok| !**ok).count();
        assert_eq!(
            failed, 0,
            "{failed} of 20 logins failed while Redis was down ({when})"
        );
    };
    burst("at once");
    for i in 0..2 {
        r.gateways[i].wait_for_log(
            "other replicas' counts are too old",
            Duration::from_secs(60),
        );
    }
    burst("past remote_stale_after");
    // A replica drops the others' counts `remote_stale_after` (30 s) after its last answer
    // from Redis, which came at most one `sync_interval` (1 s) before the kill.
    eprintln!("Redis down for {:?}", killed.elapsed());
    assert!(killed.elapsed() >= Duration::from_secs(30) - Duration::from_secs(1));
    // Redis comes back empty: both replicas rejoin, share again, and said so once.
    r.redis.restart();
    for i in 0..2 {
        wait_until(STEP, "the replica back in the cluster", || {
            let m = r.metrics(i);
            m.lines().any(|l| l == "poolgate_cluster_store_up 1")
                && m.lines().any(|l| l == "poolgate_cluster_replicas 2")
        });
        // The log's own thread writes the line; the metrics may be seen first.
        r.gateways[i].wait_for_log("cluster store unreachable", STEP);
        let log = r.gateways[i].log_text();
        assert_eq!(
            log.matches("cluster store unreachable").count(),
            1,
            "the outage is logged once"
        );
        assert!(log.contains("cluster store reachable again"));
    }
    let held = Held::open(&r.client(1, r.ssh_port(0)));
    wait_until(STEP, "counts shared again", || {
        total(&r.vm_view(1, &held.vm)) == 1
    });
}

#[test]
fn twenty_logins_through_haproxy_spread_and_survive_a_killed_replica() {
    require_tools!(
        "sshd",
        "ssh",
        "ssh-keygen",
        "redis-server",
        "redis-cli",
        "haproxy"
    );
    require_root!();
    let mut r = Replicas::start(3, &["vm-a", "vm-b", "vm-c"], 20, "");
    let backends: Vec<SocketAddr> = (0..3)
        .map(|i| SocketAddr::from((Ipv4Addr::LOCALHOST, r.ssh_port(i))))
        .collect();
    let lb = Haproxy::tcp(&backends);
    r.known_hosts.add_host_key(lb.port(), &r.host_key_line);
    // 20 people at 9:00: every login through the balancer at once, each holding its session.
    let mut held: Vec<Held> = std::thread::scope(|s| {
        let r = &r;
        let port = lb.port();
        let handles: Vec<_> = (1..=20)
            .map(|n| s.spawn(move || Held::open(&r.client(n, port))))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut per_vm: BTreeMap<String, usize> = BTreeMap::new();
    for h in &held {
        *per_vm.entry(h.vm.clone()).or_default() += 1;
    }
    eprintln!("20 logins through HAProxy and 3 replicas: {per_vm:?}");
    for vm in ["vm-a", "vm-b", "vm-c"] {
        let n = per_vm.get(vm).copied().unwrap_or(0);
        assert!((5..=9).contains(&n), "{vm} got {n}: {per_vm:?}");
    }
    // Every replica sees all 20 (its own and the others').
    for i in 0..3 {
        wait_until(STEP, "every replica counting all 20 sessions", || {
            r.vms_view(i).iter().map(total).sum::<u64>() == 20
        });
    }
    // kill -9 one replica: sessions through the others go on, new logins through the balancer
    // keep succeeding.
    let on_killed = r.api(2, "/api/v1/replicas")["replicas"][0]["sessions"]["ssh"]
        .as_u64()
        .unwrap();
    assert!(on_killed > 0, "HAProxy sent no session to replica 2");
    r.gateways[2].kill();
    let results: Vec<bool> = std::thread::scope(|s| {
        let r = &r;
        let port = lb.port();
        let handles: Vec<_> = (1..=10)
            .map(|n| s.spawn(move || r.client(n, port).run("true").status.success()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(
        results.iter().all(|ok| *ok),
        "logins failed after a replica died: {results:?}"
    );
    wait_until(STEP, "the killed replica's sessions ended", || {
        held.iter_mut().map(Held::alive).filter(|a| *a).count() as u64 == 20 - on_killed
    });
}

/// Appends `line` to the actions log from a provider script.
fn logged(actions: &std::path::Path, what: &str) -> String {
    format!(
        "echo \"{what} $POOLGATE_TEST_REPLICA\" >> {}",
        actions.display()
    )
}

/// One sshd VM (running) that an exec provider's scripts start and stop, every action logged
/// with the replica that ran it, and `replicas` gateways leading its autoscaler in turn. While
/// the file `hang` exists in the test directory, a stop is logged and then hangs (exits 1 once the
/// file goes, leaving the VM alone): a leader stopped in the middle of a long stop.
/// Fields drop in order: gateways first, the test directory last.
struct LeaderPool {
    gateways: Vec<GatewayProcess>,
    /// (SSH, admin) port per replica.
    ports: Vec<(u16, u16)>,
    _cleanup: KillPidFile,
    _vm: SshdVm,
    _redis: RedisServer,
    keys_dir: PathBuf,
    actions: PathBuf,
    user: String,
    key: UserKey,
    _users: TestUsers,
    dir: tempfile::TempDir,
}

impl LeaderPool {
    fn start(name: &str, replicas: usize, vm_running: bool) -> Self {
        let users = TestUsers::ensure(1);
        let user = users.user(1).name.clone();
        let dir = tempfile::Builder::new()
            .prefix(&format!("poolgate-cluster-{name}-"))
            .tempdir()
            .unwrap();
        let keys_dir = keys_init(dir.path());
        let mut vm = SshdVm::builder("vm-a")
            .trusted_user_ca_keys(keys_dir.join("user_ca.pub"))
            .start();
        let known = KnownHosts::at(&dir.path().join("known_hosts"));
        known.add_vm(&vm);
        if !vm_running {
            vm.stop();
        }
        let pid_file = vm.pid_file();
        let cleanup = KillPidFile(pid_file.clone());
        let actions = dir.path().join("actions.log");
        std::fs::write(&actions, "").unwrap();
        let script = |name: &str, body: String| write_script(dir.path(), name, &body);
        let (pid, cfg, port) = (pid_file.display(), vm.config_path().display(), vm.port());
        let hang = dir.path().join("hang");
        let list = script(
            "list.sh",
            format!(
                "if [ -f {pid} ] && kill -0 \"$(cat {pid})\" 2>/dev/null; then s=running; else s=stopped; fi\n\
                 echo \"{{\\\"vms\\\":[{{\\\"name\\\":\\\"vm-a\\\",\\\"host\\\":\\\"127.0.0.1\\\",\\\"ssh_port\\\":{port},\\\"state\\\":\\\"$s\\\"}}]}}\""
            ),
        );
        let start = script(
            "start.sh",
            format!(
                "{}\n{} -f {cfg}",
                logged(&actions, "start"),
                tool("sshd").display()
            ),
        );
        let stop = script(
            "stop.sh",
            format!(
                "{}\nif [ -f {hang} ]; then while [ -f {hang} ]; do sleep 0.1; done; exit 1; fi\n\
                 kill \"$(cat {pid})\"\nrm -f {pid}",
                logged(&actions, "stop"),
                hang = hang.display(),
            ),
        );
        let authorized = dir.path().join("authorized_keys");
        std::fs::create_dir_all(&authorized).unwrap();
        let key = UserKey::generate(&user);
        std::fs::write(
            authorized.join(&user),
            format!("{}\n", key.public_key_line()),
        )
        .unwrap();
        let redis = RedisServer::start();
        // The VM's sshd shares this machine's process table: the busy check is off (see
        // autoscale_busy.rs for it on VMs with their own PID namespace).
        let body = format!(
            "authorized_keys = \"{authorized}/{{user}}\"\nbackend_known_hosts = \"{known}\"\n\
             [health]\ninterval = \"1s\"\ntimeout = \"1s\"\nrise = 1\n\
             [pool]\nprovider = \"exec\"\n\
             [pool.exec]\nlist = [\"{list}\"]\nstart = [\"{start}\"]\nstop = [\"{stop}\"]\n\
             poll_interval = \"1s\"\ntimeout = \"30s\"\n\
             [autoscale]\nenabled = true\nmin_vms = 0\nmax_vms = 1\nspare_vms = 0\n\
             scale_in_after = \"2s\"\nscale_to_zero_after = \"3s\"\ntick = \"1s\"\ncooldown = \"1s\"\n\
             boot_estimate = \"2s\"\nhold_connect_for = \"40s\"\nbusy_command = []\n",
            authorized = authorized.display(),
            known = known.path().display(),
        );
        let mut gateways = Vec::new();
        let mut ports = Vec::new();
        for i in 0..replicas {
            let p = Ports::free();
            let id = format!("gw-{i}");
            let config = replica_config(p, &keys_dir, &body, &redis.url(), &id, "");
            let env = [("POOLGATE_TEST_REPLICA", id.as_str())];
            gateways.push(start_replica(&dir.path().join(&id), &config, p.ssh, &env));
            ports.push((p.ssh, p.admin));
        }
        Self {
            gateways,
            ports,
            _cleanup: cleanup,
            _vm: vm,
            _redis: redis,
            keys_dir,
            actions,
            user,
            key,
            _users: users,
            dir,
        }
    }

    fn leads(&self, i: usize) -> bool {
        has_sample(
            &admin_metrics(self.ports[i].1),
            "poolgate_autoscale_leader 1",
        )
    }

    /// Waits for exactly one of two replicas to lead and returns (leader, follower).
    fn leader_of_two(&self) -> (usize, usize) {
        wait_until(STEP, "one leader", || self.leads(0) ^ self.leads(1));
        let leader = usize::from(self.leads(1));
        (leader, 1 - leader)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.actions).unwrap()
    }

    fn logged(&self, line: &str) -> bool {
        self.log().lines().any(|l| l == line)
    }
}

#[test]
fn one_leader_scales_the_pool_and_another_takes_over_when_it_dies() {
    require_tools!("sshd", "ssh", "ssh-keygen", "redis-server", "redis-cli");
    require_root!();
    let mut pool = LeaderPool::start("leader", 2, false);
    // Exactly one replica leads, and both say which.
    let (leader, follower) = pool.leader_of_two();
    for (_, admin) in &pool.ports {
        let view = admin_json(*admin, "/api/v1/replicas");
        assert_eq!(view["leader"], format!("gw-{leader}"), "{view}");
    }
    // A login through the follower to the empty pool is held; the leader starts the VM once.
    let host_line =
        std::fs::read_to_string(pool.keys_dir.join("ssh_host_ed25519_key.pub")).unwrap();
    let client_known = KnownHosts::new();
    client_known.add_host_key(pool.ports[follower].0, &host_line);
    let client = SshClient::new(&pool.user, pool.ports[follower].0, client_known.path())
        .user_key(&pool.key)
        .timeout(Duration::from_secs(50));
    let woke = Instant::now();
    let out = client.run("echo on $POOLGATE_VM");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "on vm-a");
    eprintln!("woke through the follower in {:?}", woke.elapsed());
    assert_eq!(
        pool.log().lines().collect::<Vec<_>>(),
        [format!("start gw-{leader}")],
        "one start, by the leader"
    );
    // The leader dies; the follower takes over within one lease (10 s) and, once the pool is
    // idle, stops the VM itself.
    pool.gateways[leader].kill();
    let died = Instant::now();
    wait_until(Duration::from_secs(20), "the follower leading", || {
        pool.leads(follower)
    });
    let took = died.elapsed();
    eprintln!("new leader after {took:?}");
    assert!(took <= Duration::from_secs(12), "took over after {took:?}");
    wait_until(
        Duration::from_secs(30),
        "the new leader stopping the idle VM",
        || pool.logged(&format!("stop gw-{follower}")),
    );
    let log = pool.log();
    assert!(
        !log.lines().any(|l| l == format!("stop gw-{leader}")),
        "the dead leader acted: {log}"
    );
    assert_eq!(
        log.lines().filter(|l| l.starts_with("start")).count(),
        1,
        "{log}"
    );
}

#[test]
fn a_leader_killed_while_stopping_a_vm_leaves_the_scale_in_to_the_next_leader() {
    require_tools!("sshd", "ssh", "ssh-keygen", "redis-server", "redis-cli");
    require_root!();
    // Stops hang from the start: the leader drains the idle VM for scale-in and is killed in the
    // middle of stopping it (a deallocation takes minutes on a real cloud).
    let hang = |pool: &LeaderPool| pool.dir.path().join("hang");
    let mut pool = LeaderPool::start("inherit", 2, true);
    std::fs::write(hang(&pool), "").unwrap();
    let (leader, follower) = pool.leader_of_two();
    wait_until(STEP, "the leader stopping the idle VM", || {
        pool.logged(&format!("stop gw-{leader}"))
    });
    // The drain is shared: the follower shows the VM draining, for scale-in.
    let drained = |admin: u16| {
        admin_json(admin, "/api/v1/vms")
            .as_array()
            .is_some_and(|vms| {
                vms.iter()
                    .any(|vm| vm["name"] == "vm-a" && vm["draining"] == true)
            })
    };
    wait_until(STEP, "the drain reaching the follower", || {
        drained(pool.ports[follower].1)
    });
    pool.gateways[leader].kill();
    std::fs::remove_file(hang(&pool)).unwrap();
    // The follower leads within one lease, takes the drain over, and stops the VM. Without the
    // drain's record it would take it for an operator's and leave a running VM drained forever.
    wait_until(Duration::from_secs(20), "the follower leading", || {
        pool.leads(follower)
    });
    wait_until(
        Duration::from_secs(20),
        "the new leader finishing the scale-in",
        || pool.logged(&format!("stop gw-{follower}")),
    );
    pool.gateways[follower].wait_for_log(
        "took over a scale-in drain an earlier autoscaler made",
        STEP,
    );
    let log = pool.log();
    assert_eq!(
        log.lines().collect::<Vec<_>>(),
        [format!("stop gw-{leader}"), format!("stop gw-{follower}")],
        "one interrupted stop, one finished, no start"
    );
}

#[test]
fn a_leader_paused_past_its_lease_resumes_without_acting() {
    use nix::sys::signal::Signal;
    require_tools!("sshd", "ssh", "ssh-keygen", "redis-server", "redis-cli");
    require_root!();
    let pool = LeaderPool::start("paused", 2, false);
    let hang = pool.dir.path().join("hang");
    let (leader, follower) = pool.leader_of_two();
    // The leader wakes the pool for a login through it; the session ends at once.
    let host_line =
        std::fs::read_to_string(pool.keys_dir.join("ssh_host_ed25519_key.pub")).unwrap();
    let client_known = KnownHosts::new();
    client_known.add_host_key(pool.ports[leader].0, &host_line);
    let out = SshClient::new(&pool.user, pool.ports[leader].0, client_known.path())
        .user_key(&pool.key)
        .timeout(Duration::from_secs(50))
        .run("true");
    assert!(out.status.success(), "{out:?}");
    assert!(pool.logged(&format!("start gw-{leader}")));
    // Paused (a VM freeze, a long GC pause) before its idle VM is due for scale-in, for longer
    // than its lease: the follower takes over and begins the scale-in itself; its stop hangs, so
    // the VM still runs, idle, when the old leader resumes — the very thing it would act on if
    // it trusted its stale leadership.
    std::fs::write(&hang, "").unwrap();
    let pid = pool.gateways[leader].pid().unwrap();
    let actions_before = pool.gateways[leader].log_text().matches(" result=").count();
    assert!(actions_before >= 1, "the start is in the leader's log");
    send_signal(pid, Signal::SIGSTOP);
    let resume = Resume(pid);
    wait_until(Duration::from_secs(20), "the follower leading", || {
        pool.leads(follower)
    });
    wait_until(STEP, "the new leader stopping the idle VM", || {
        pool.logged(&format!("stop gw-{follower}"))
    });
    drop(resume);
    // Resumed, it knows by its own clock that its lease is over, hears from Redis who leads,
    // and does nothing.
    pool.gateways[leader].wait_for_log("lost the autoscaler leadership", STEP);
    wait_until(STEP, "the old leader saying it does not lead", || {
        has_sample(
            &admin_metrics(pool.ports[leader].1),
            "poolgate_autoscale_leader 0",
        )
    });
    // The follower's hung stop ends (failed); it tries again and stops the VM. Only then is
    // the old leader's log read: it has been awake through all of it.
    std::fs::remove_file(&hang).unwrap();
    wait_until(STEP, "the VM stopped by the new leader", || {
        pool.log()
            .lines()
            .filter(|l| *l == format!("stop gw-{follower}"))
            .count()
            == 2
    });
    wait_until(STEP, "the pool seeing the VM stopped", || {
        admin_json(pool.ports[follower].1, "/api/v1/vms")
            .as_array()
            .is_some_and(|vms| vms.iter().any(|v| v["state"] == "stopped"))
    });
    let log = pool.log();
    assert_eq!(
        log.lines()
            .filter(|l| l.ends_with(&format!("gw-{leader}")))
            .count(),
        1,
        "the paused leader acted after it resumed: {log}"
    );
    let text = pool.gateways[leader].log_text();
    assert_eq!(
        text.matches(" result=").count(),
        actions_before,
        "autoscaler actions by the paused leader after it resumed:\n{text}"
    );
}

/// Sends SIGCONT when dropped, so that a failing test never leaves a gateway stopped.
struct Resume(u32);

impl Drop for Resume {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(self.0).unwrap_or(0)),
            nix::sys::signal::Signal::SIGCONT,
        );
    }
}

#[test]
fn a_replica_given_other_secrets_is_refused_by_check_config_and_run() {
    require_tools!("sshd", "ssh", "ssh-keygen", "redis-server", "redis-cli");
    require_root!();
    let r = Replicas::start(1, &["vm-a"], 1, "");
    let config = std::fs::read_to_string(r.gateways[0].config_path()).unwrap();
    // check-config of the running replica's own file: the store answers, nobody else is there.
    let out = run_with_timeout(
        Command::new(poolgate_bin())
            .arg("check-config")
            .arg(r.gateways[0].config_path()),
        STEP,
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("cluster: the store answers; no other live replica (this one: gw-0)"),
        "{text}"
    );
    // A second replica given a fresh key set (as if `keys init` had been run on it too).
    let dir = tempfile::tempdir().unwrap();
    let own_keys = keys_init(dir.path());
    let shared_keys = std::path::Path::new(
        config
            .lines()
            .find_map(|l| l.strip_prefix("user_ca_key = \""))
            .unwrap()
            .trim_end_matches('"'),
    )
    .parent()
    .unwrap()
    .display()
    .to_string();
    let (other, ports) = moved(
        &config.replace(&shared_keys, &own_keys.display().to_string()),
        "gw-9",
        &[],
    );
    let ssh = ports.ssh;
    let path = dir.path().join("poolgate.toml");
    std::fs::write(&path, other).unwrap();
    let out = run_with_timeout(
        Command::new(poolgate_bin()).arg("check-config").arg(&path),
        STEP,
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("cluster: replica gw-0 serves different SSH host keys"),
        "{text}"
    );
    let out = run_with_timeout(
        Command::new(poolgate_bin())
            .arg("run")
            .arg("--config")
            .arg(&path)
            .env("NO_COLOR", "1"),
        STEP,
    );
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("serves different SSH host keys"), "{text}");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", ssh)).is_err(),
        "a refused replica listens on nothing"
    );
}

#[test]
fn replicas_log_in_to_a_password_protected_redis_and_a_wrong_password_is_reported() {
    require_tools!("sshd", "ssh", "ssh-keygen", "redis-server", "redis-cli");
    require_root!();
    let password = "correct-horse-battery-staple";
    // Both replicas authenticate (start() waits until each sees the other through Redis).
    let r = Replicas::start_with(2, &["vm-a"], 1, "", Some(password));
    assert_eq!(r.redis.cli(&["PING"]), "PONG");
    // A third replica with a wrong password file serves, reports the store down, and never
    // logs the password.
    let config = std::fs::read_to_string(r.gateways[0].config_path()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let wrong = dir.path().join("redis_password");
    secret_file(&wrong, "not-the-password");
    let password_line = format!("\"{}\"", wrong.display());
    let (config, ports) = moved(
        &config,
        "gw-wrong",
        &[("redis_password_file", password_line)],
    );
    let gateway = start_replica(&dir.path().join("gw"), &config, ports.ssh, &[]);
    gateway.wait_for_log("cluster store unreachable", STEP);
    assert!(has_sample(
        &admin_metrics(ports.admin),
        "poolgate_cluster_store_up 0"
    ));
    let log = gateway.log_text();
    assert!(!log.contains("not-the-password"), "password logged");
    // The right replicas never saw it join.
    let view = r.api(0, "/api/v1/replicas");
    assert_eq!(view["replicas"].as_array().map(Vec::len), Some(2), "{view}");
}

/// The VM a `poolgate_vm` cookie value names (its first field is base64url of the name).
fn cookie_vm(value: &str) -> String {
    let first = value.split('.').next().unwrap_or("");
    let bytes = data_encoding::BASE64URL_NOPAD
        .decode(first.as_bytes())
        .unwrap();
    String::from_utf8(bytes).unwrap()
}

/// `curl` of `/api` on the HTTP listener at `port`, keeping cookies in `jar` (a browser) or
/// none (a first request that never returns its cookie); the HTTP status.
fn curl_status(port: u16, jar: Option<&Path>) -> String {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--max-time",
        "10",
    ]);
    if let Some(jar) = jar {
        cmd.arg("-c").arg(jar).arg("-b").arg(jar);
    }
    cmd.arg(format!("http://127.0.0.1:{port}/api"));
    let out = run_with_timeout(&mut cmd, STEP);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_browser_keeps_its_vm_whichever_replica_serves_it() {
    use poolgate_tests::jupyter::{JupyterServerVm, require_jupyter};
    require_tools!("redis-server", "redis-cli", "curl");
    if !require_jupyter() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let keys_dir = keys_init(dir.path());
    let vms: Vec<JupyterServerVm> = std::thread::scope(|s| {
        let h: Vec<_> = ["web-a", "web-b"]
            .into_iter()
            .map(|n| s.spawn(move || JupyterServerVm::start(n)))
            .collect();
        h.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // A web-only pool: the SSH side trusts one placeholder host key and is never used.
    let known = KnownHosts::at(&dir.path().join("known_hosts"));
    known.add_host_key(
        1,
        &std::fs::read_to_string(keys_dir.join("user_ca.pub")).unwrap(),
    );
    let redis = RedisServer::start();
    let mut body = format!(
        "backend_known_hosts = \"{known}\"\n\
         [health]\ninterval = \"1s\"\ntimeout = \"1s\"\nrise = 1\nhttp_path = \"/api\"\n",
        known = known.path().display(),
    );
    for vm in &vms {
        body += &format!(
            "\n[[pool.backends]]\nname = \"{}\"\nhost = \"127.0.0.1\"\nhttp_port = {}\n",
            vm.name(),
            vm.port()
        );
    }
    let mut gateways = Vec::new();
    let mut ports = Vec::new();
    for i in 0..2 {
        let p = Ports::free();
        let id = format!("gw-{i}");
        let config = replica_config(p, &keys_dir, &body, &redis.url(), &id, "");
        gateways.push(start_replica(&dir.path().join(&id), &config, p.http, &[]));
        ports.push((p.http, p.admin));
    }
    let api = |i: usize, path: &str| admin_json(ports[i].1, path);
    for i in 0..2 {
        wait_until(STEP, "both web sides up on every replica", || {
            api(i, "/api/v1/vms").as_array().is_some_and(|vms| {
                vms.len() == 2 && vms.iter().all(|v| v["protocols"]["http"]["health"] == "up")
            })
        });
    }
    // Each browser (a cookie jar) makes its first request through one replica and the rest
    // through the other; every request is answered, and the other replica serves the VM the
    // cookie names, counting the browser there.
    for (first, then) in [(0, 1), (1, 0)] {
        let jar = dir.path().join(format!("jar-{first}"));
        let get = |i: usize| curl_status(ports[i].0, Some(&jar));
        assert_eq!(get(first), "200");
        let cookie = std::fs::read_to_string(&jar)
            .unwrap()
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split('\t').collect();
                (f.len() == 7 && f[5] == "poolgate_vm").then(|| f[6].to_owned())
            })
            .expect("poolgate_vm cookie set");
        let vm = cookie_vm(&cookie);
        for _ in 0..3 {
            assert_eq!(get(then), "200");
        }
        wait_until(
            STEP,
            "the other replica counting the browser on its VM",
            || {
                api(then, "/api/v1/vms")
                    .as_array()
                    .and_then(|vms| vms.iter().find(|v| v["name"] == vm.as_str()).cloned())
                    .is_some_and(|v| {
                        v["sessions_by_replica"][format!("gw-{then}")]["http"].as_u64() == Some(1)
                    })
            },
        );
    }
    // Browsers that arrive through one replica weigh on the others' choices too: three first
    // requests through replica 0 that never return their cookie show as tentative load on
    // replica 1 within a sync (it orders its own new browsers by it). Nothing new goes through
    // replica 1 meanwhile, so its own tentative load can only fall.
    let tentative = |i: usize| -> u64 {
        api(i, "/api/v1/vms").as_array().map_or(0, |vms| {
            vms.iter()
                .filter_map(|v| v["sessions"]["tentative"].as_u64())
                .sum()
        })
    };
    let before = tentative(1);
    for _ in 0..3 {
        assert_eq!(curl_status(ports[0].0, None), "200");
    }
    wait_until(STEP, "replica 1 seeing replica 0's new browsers", || {
        tentative(1) >= before + 3
    });
}

#[test]
fn replicas_share_state_over_tls_to_a_redis_with_a_private_ca() {
    require_tools!("sshd", "ssh", "ssh-keygen", "redis-server", "redis-cli");
    require_root!();
    // start() waits until both replicas see each other: their syncs go over rediss://.
    let r = Replicas::start_tls(2, &["vm-a", "vm-b"], 2);
    assert!(r.redis.url().starts_with("rediss://"));
    assert_eq!(r.redis.cli(&["PING"]), "PONG");
    let held = Held::open(&r.client(1, r.ssh_port(0)));
    wait_until(STEP, "counts shared over TLS", || {
        total(&r.vm_view(1, &held.vm)) == 1
    });
    assert_eq!(r.lands_on(1, r.ssh_port(1)), held.vm, "affinity over TLS");
}

#[test]
fn a_replica_stopped_with_sigterm_keeps_counting_its_draining_session_then_leaves_at_once() {
    require_tools!("sshd", "ssh", "ssh-keygen", "redis-server", "redis-cli");
    require_root!();
    let r = Replicas::start(2, &["vm-a", "vm-b"], 1, "");
    let held = Held::open(&r.client(1, r.ssh_port(0)));
    let vm = held.vm.clone();
    wait_until(STEP, "replica 1 counting replica 0's session", || {
        total(&r.vm_view(1, &vm)) == 1
    });
    // SIGTERM: replica 0 takes no new connections but its session runs on (shutdown_grace is
    // 10 minutes by default), and the other replica keeps counting it for longer than a lease.
    let pid = r.gateways[0].pid().unwrap();
    send_signal(pid, nix::sys::signal::Signal::SIGTERM);
    r.gateways[0].wait_for_log("shutting down", STEP);
    let draining = Instant::now();
    let mut seen = Vec::new();
    while draining.elapsed() < Duration::from_secs(12) {
        seen.push(total(&r.vm_view(1, &vm)));
        std::thread::sleep(Duration::from_millis(500)); // sampling the count, not waiting for it
    }
    assert!(
        seen.iter().all(|n| *n == 1),
        "the draining replica's session stopped counting: {seen:?}"
    );
    // The session ends: the replica exits and its counts and membership go at once, well
    // before a lease would have expired them.
    drop(held);
    let ended = Instant::now();
    wait_until(STEP, "replica 0 gone from replica 1's view", || {
        r.api(1, "/api/v1/replicas")["replicas"]
            .as_array()
            .is_some_and(|a| a.len() == 1)
            && total(&r.vm_view(1, &vm)) == 0
    });
    let gone = ended.elapsed();
    eprintln!("replica 0 left {gone:?} after its last session ended");
    assert!(
        gone < Duration::from_secs(6),
        "took {gone:?} (a lease is 10 s)"
    );
    r.gateways[0].wait_for_log("left the cluster", STEP);
}

#[test]
fn a_vm_one_replica_removes_under_a_session_is_drained_there_only() {
    require_tools!("sshd", "ssh", "ssh-keygen", "redis-server", "redis-cli");
    require_root!();
    let r = Replicas::start(2, &["vm-a", "vm-b", "vm-c"], 2, "");
    let mut held = Held::open(&r.client(1, r.ssh_port(0)));
    let on = held.vm.clone();
    // Replica 0's configuration drops the VM its session runs on.
    let path = r.gateways[0].config_path().to_owned();
    let config = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, without_backend(&config, &on)).unwrap();
    send_signal(
        r.gateways[0].pid().expect("running"),
        nix::sys::signal::Signal::SIGHUP,
    );
    r.gateways[0].wait_for_log("VM removed from the pool", STEP);
    assert_eq!(
        r.vm_view(0, &on)["state"],
        "draining",
        "{}",
        r.vm_view(0, &on)
    );
    // A drain of another VM on replica 0 reaching replica 1 is a sync after the reload: the
    // removed VM's drain, replica 0's alone, did not go with it.
    let other = ["vm-a", "vm-b", "vm-c"]
        .into_iter()
        .find(|v| *v != on)
        .unwrap();
    r.drain_seen_by_the_other(0, other);
    assert_eq!(
        r.vm_view(1, &on)["draining"],
        false,
        "{}",
        r.vm_view(1, &on)
    );
    // The session ends; the VM leaves replica 0 and comes back by the next reload, undrained.
    assert!(held.alive());
    drop(held);
    wait_until(STEP, "the removed VM leaving replica 0", || {
        r.vm_view(0, &on).is_null()
    });
    std::fs::write(&path, &config).unwrap();
    send_signal(
        r.gateways[0].pid().expect("running"),
        nix::sys::signal::Signal::SIGHUP,
    );
    wait_until(STEP, "the VM back on replica 0", || {
        r.vm_view(0, &on)["state"] == "healthy"
    });
    assert_eq!(r.vm_view(1, &on)["draining"], false);
}

/// The ids `/api/v1/replicas` of replica `i` lists.
fn replica_ids(r: &Replicas, i: usize) -> Vec<String> {
    let mut ids: Vec<String> = r.api(i, "/api/v1/replicas")["replicas"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v["id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    ids.sort();
    ids
}

/// A replica upgraded in place (SIGUSR2): the new process takes its listeners and its id; the
/// old one's session, still open, is counted by every replica under an id of its own
/// (`gw-0~<pid>`) until it ends; then the old process leaves the cluster and exits 0.
#[test]
fn a_replica_upgraded_in_place_keeps_its_draining_sessions_counted_everywhere() {
    require_tools!("sshd", "ssh", "ssh-keygen", "redis-server", "redis-cli");
    require_root!();
    let mut r = Replicas::start(2, &["vm-a", "vm-b"], 3, "");
    let held = Held::open(&r.client(1, r.ssh_port(0)));
    let vm = held.vm.clone();
    let old = r.gateways[0].pid().unwrap();

    send_signal(old, nix::sys::signal::Signal::SIGUSR2);
    r.gateways[0].wait_for_log(
        "upgrade: the new process serves; this one takes no new connections",
        STEP,
    );
    let log = r.gateways[0].log_text();
    let new: u32 = log
        .lines()
        .find(|l| l.contains("upgrade: the new process serves"))
        .and_then(|l| l.split("pid=").nth(1))
        .and_then(|p| p.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .expect("the new process's pid in the log");
    let _successor = KillTreeOnDrop(new);
    let twin = format!("gw-0~{old}");
    for i in 0..2 {
        wait_until(
            STEP,
            &format!("replica {i} listing gw-0, its draining process and gw-1"),
            || replica_ids(&r, i) == ["gw-0", twin.as_str(), "gw-1"],
        );
        wait_until(
            STEP,
            &format!("replica {i} counting the open session once"),
            || {
                r.vms_view(i)
                    .iter()
                    .all(|v| total(v) == u64::from(v["name"] == vm.as_str()))
            },
        );
    }
    // The new process serves the replica's port; no warning about its own id.
    let landed = r.lands_on(2, r.ssh_port(0));
    assert!(landed.starts_with("vm-"), "{landed}");
    assert!(
        !r.gateways[0]
            .log_text()
            .contains("another live replica uses this replica_id"),
        "{}",
        r.gateways[0].log_text()
    );

    drop(held);
    let exited = r.gateways[0].wait_for_exit(STEP, "the old process to exit");
    assert!(exited.success(), "{exited}");
    wait_until(
        STEP,
        "replica 1 to list gw-0 and gw-1 only, counting nothing",
        || replica_ids(&r, 1) == ["gw-0", "gw-1"] && r.vms_view(1).iter().all(|v| total(v) == 0),
    );
}
