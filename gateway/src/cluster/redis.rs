//! The shared store on Redis (Redis 7, Valkey, Azure Managed Redis) through redis-rs.
//!
//! Every key sits under `{<key_prefix>}:v1:` — one hash tag, so one slot on a Redis Cluster, and
//! a schema version so a later layout can live beside this one:
//!
//! | key | type | content |
//! |---|---|---|
//! | `boot` | string | the store's identity: set once; a store that lost its data gets a new one |
//! | `replicas` | sorted set | replica id → the Redis time (ms) its lease ends |
//! | `replica:<id>` | string, expires with the lease | the replica's record (JSON, [`ReplicaRecord`]) |
//! | `load:<id>` | hash, expires with the lease | VM → `"<ssh> <http>"` sessions that replica holds, `"<ssh> <http> <tentative>"` when it sent browsers there whose cookie has not come back; `~waiting` → connections it holds while the pool wakes |
//! | `drain` | hash | VM → who drained it, when, and whether for scale-in (JSON; no expiry: an operator's intent, or a scale-in the next leader finishes) |
//! | `leader` | string, expires with the lease | `<id>:<epoch>` of the replica that runs the autoscaler |
//! | `epoch` | counter | fencing token: one more for every new leader |
//! | `aff:<user>` | string, expires after `routing.affinity_ttl` | the VM of the user's latest session |
//!
//! Times and expiries use the Redis server's clock (`TIME`, `PX`), so replicas' clocks need not
//! agree. One replica's whole sync — publish its counts and drains, renew or take the
//! leadership, read everyone's counts and drains — is one script, one round trip.

use std::collections::BTreeMap;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Script};
use router_core::LoadCounts;
use serde::{Deserialize, Serialize};

/// One replica as it describes itself to the others.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct ReplicaRecord {
    /// `cluster.replica_id`.
    pub id: String,
    /// poolgate version.
    pub version: String,
    /// Start time, seconds since the Unix epoch.
    pub started_unix: u64,
    /// Fingerprint of the SSH host keys (SHA-256 of their public keys): replicas must agree.
    pub host_keys: String,
    /// Fingerprint of the cookie secret (SHA-256 of a keyed digest, never the secret): replicas
    /// must agree.
    pub cookie_secret: String,
}

/// What one sync sends.
#[derive(Debug, Clone, Default)]
pub struct SyncRequest {
    /// This replica's record.
    pub record: ReplicaRecord,
    /// VM → what this replica holds there (VMs without anything may be left out).
    pub load: BTreeMap<String, LoadCounts>,
    /// Connections held while the pool wakes, (SSH, HTTP).
    pub waiting: (u32, u32),
    /// Drains to record (VM → JSON of who and when).
    pub drain_set: Vec<(String, String)>,
    /// Drains to lift.
    pub drain_clear: Vec<String>,
    /// The leader epoch this replica holds (0: none).
    pub epoch: u64,
    /// Whether this replica takes the leadership when nobody holds it.
    pub want_lead: bool,
}

/// What one sync returns.
#[derive(Debug, Clone, Default)]
pub struct SyncReply {
    /// The store's identity ([`boot` key](self)); changes when the store lost its data.
    pub boot: String,
    /// The epoch this replica leads under, 0 when it does not lead.
    pub epoch: u64,
    /// `<id>:<epoch>` of the leader, if any.
    pub leader: Option<String>,
    /// Live replicas, with their counts.
    pub replicas: Vec<ReplicaLoad>,
    /// Drained VMs: name → who drained it and why (JSON, as written by the replica).
    pub drained: BTreeMap<String, String>,
}

/// One live replica and what it holds.
#[derive(Debug, Clone, Default)]
pub struct ReplicaLoad {
    /// Its record (id from the store even if the record cannot be read).
    pub record: ReplicaRecord,
    /// VM → what it holds there.
    pub load: BTreeMap<String, LoadCounts>,
    /// Held connections, (SSH, HTTP).
    pub waiting: (u32, u32),
}

/// A store call failed or took longer than `cluster.op_timeout`.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Redis answered with an error or the connection failed.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// No answer within the timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// The field of a load hash that holds waiting connections (VM names cannot start with `~`).
const WAITING_FIELD: &str = "~waiting";

const SYNC: &str = r"
local p, rid, lease, record, epoch, want = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5], ARGV[6] == '1'
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local boot = redis.call('GET', p .. 'boot')
if not boot then
  boot = rid .. '@' .. now
  redis.call('SET', p .. 'boot', boot)
end
redis.call('ZADD', p .. 'replicas', now + lease, rid)
redis.call('ZREMRANGEBYSCORE', p .. 'replicas', '-inf', '(' .. now)
redis.call('SET', p .. 'replica:' .. rid, record, 'PX', lease)
local i = 7
local n = tonumber(ARGV[i]); i = i + 1
local loadkey = p .. 'load:' .. rid
redis.call('DEL', loadkey)
for j = 0, n - 1 do redis.call('HSET', loadkey, ARGV[i + 2 * j], ARGV[i + 2 * j + 1]) end
if n > 0 then redis.call('PEXPIRE', loadkey, lease) end
i = i + 2 * n
n = tonumber(ARGV[i]); i = i + 1
for j = 0, n - 1 do redis.call('HSET', p .. 'drain', ARGV[i + 2 * j], ARGV[i + 2 * j + 1]) end
i = i + 2 * n
n = tonumber(ARGV[i]); i = i + 1
for j = 0, n - 1 do redis.call('HDEL', p .. 'drain', ARGV[i + j]) end
local leader = redis.call('GET', p .. 'leader')
local mine = 0
if leader and epoch ~= '0' and leader == rid .. ':' .. epoch then
  redis.call('PEXPIRE', p .. 'leader', lease)
  mine = tonumber(epoch)
elseif not leader and want then
  mine = redis.call('INCR', p .. 'epoch')
  leader = rid .. ':' .. mine
  redis.call('SET', p .. 'leader', leader, 'PX', lease)
end
local replicas = {}
for _, r in ipairs(redis.call('ZRANGEBYSCORE', p .. 'replicas', now, '+inf')) do
  local rec = redis.call('GET', p .. 'replica:' .. r)
  if rec then
    table.insert(replicas, {r, rec, redis.call('HGETALL', p .. 'load:' .. r)})
  end
end
return {boot, mine, leader or '', replicas, redis.call('HGETALL', p .. 'drain')}
";

const PEERS: &str = r"
local p = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for _, r in ipairs(redis.call('ZRANGEBYSCORE', p .. 'replicas', now, '+inf')) do
  local rec = redis.call('GET', p .. 'replica:' .. r)
  if rec then table.insert(out, rec) end
end
return out
";

const LEAVE: &str = r"
local p, rid, epoch = ARGV[1], ARGV[2], ARGV[3]
redis.call('ZREM', p .. 'replicas', rid)
redis.call('DEL', p .. 'replica:' .. rid, p .. 'load:' .. rid)
if epoch ~= '0' and redis.call('GET', p .. 'leader') == rid .. ':' .. epoch then
  redis.call('DEL', p .. 'leader')
end
return 1
";

/// The Redis store of one replica.
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    prefix: String,
    timeout: Duration,
    sync: Script,
    peers: Script,
    leave: Script,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// A store at `url` (`redis://` or `rediss://`), authenticating with `password` when given,
    /// trusting the PEM CA certificates `ca` for TLS instead of the system's roots when given,
    /// keys under `{key_prefix}:v1:`. Connects lazily, so a Redis that is down does not stop
    /// start-up; every call gives up after `timeout`.
    pub fn new(
        url: &str,
        password: Option<&str>,
        ca: Option<Vec<u8>>,
        key_prefix: &str,
        timeout: Duration,
    ) -> Result<Self, StoreError> {
        use redis::IntoConnectionInfo;
        let mut info = url.into_connection_info()?;
        if let Some(password) = password {
            let settings = info.redis_settings().clone().set_password(password);
            info = info.set_redis_settings(settings);
        }
        let client = match ca {
            Some(root_cert) => redis::Client::build_with_tls(
                info,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(root_cert),
                },
            )?,
            None => redis::Client::open(info)?,
        };
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout.max(Duration::from_millis(500))))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(2));
        let conn = ConnectionManager::new_lazy_with_config(client, config)?;
        Ok(Self {
            conn,
            prefix: format!("{{{key_prefix}}}:v1:"),
            timeout,
            sync: Script::new(SYNC),
            peers: Script::new(PEERS),
            leave: Script::new(LEAVE),
        })
    }

    async fn bounded<T>(
        &self,
        call: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(StoreError::Timeout(self.timeout)),
        }
    }

    /// Publishes this replica's state and reads everyone's (see the module docs), renewing or
    /// taking the leadership; `lease` is the lifetime of what it publishes.
    pub async fn sync(&self, req: &SyncRequest, lease: Duration) -> Result<SyncReply, StoreError> {
        let record = serde_json::to_string(&req.record).unwrap_or_default();
        let mut inv = self.sync.prepare_invoke();
        inv.arg(&self.prefix)
            .arg(&req.record.id)
            .arg(u64::try_from(lease.as_millis()).unwrap_or(u64::MAX))
            .arg(record)
            .arg(req.epoch.to_string())
            .arg(if req.want_lead { "1" } else { "0" });
        let waiting = (req.waiting != (0, 0)).then_some(req.waiting);
        let fields: Vec<(&str, String)> = req
            .load
            .iter()
            .filter(|(_, load)| **load != LoadCounts::default())
            .map(|(vm, load)| (vm.as_str(), counts_field(*load)))
            .chain(waiting.map(|(ssh, http)| {
                let held = LoadCounts {
                    ssh,
                    http,
                    tentative: 0,
                };
                (WAITING_FIELD, counts_field(held))
            }))
            .collect();
        inv.arg(fields.len());
        for (field, value) in fields {
            inv.arg(field).arg(value);
        }
        inv.arg(req.drain_set.len());
        for (vm, why) in &req.drain_set {
            inv.arg(vm).arg(why);
        }
        inv.arg(req.drain_clear.len());
        for vm in &req.drain_clear {
            inv.arg(vm);
        }
        let mut conn = self.conn.clone();
        type Raw = (
            String,
            u64,
            String,
            Vec<(String, String, Vec<String>)>,
            Vec<String>,
        );
        let (boot, epoch, leader, replicas, drained): Raw =
            self.bounded(inv.invoke_async(&mut conn)).await?;
        Ok(SyncReply {
            boot,
            epoch,
            leader: (!leader.is_empty()).then_some(leader),
            replicas: replicas
                .into_iter()
                .map(|(id, record, flat)| parse_replica(id, &record, &flat))
                .collect(),
            drained: drained
                .chunks_exact(2)
                .map(|pair| (pair[0].clone(), pair[1].clone()))
                .collect(),
        })
    }

    /// The live replicas' records (for the start-up agreement check).
    pub async fn peers(&self) -> Result<Vec<ReplicaRecord>, StoreError> {
        let mut conn = self.conn.clone();
        let mut inv = self.peers.prepare_invoke();
        inv.arg(&self.prefix);
        let raw: Vec<String> = self.bounded(inv.invoke_async(&mut conn)).await?;
        Ok(raw
            .iter()
            .filter_map(|r| serde_json::from_str(r).ok())
            .collect())
    }

    /// Removes this replica at once (graceful shutdown) and gives up the leadership it holds.
    pub async fn leave(&self, id: &str, epoch: u64) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let mut inv = self.leave.prepare_invoke();
        inv.arg(&self.prefix).arg(id).arg(epoch.to_string());
        let _: i64 = self.bounded(inv.invoke_async(&mut conn)).await?;
        Ok(())
    }

    /// The VM of `user`'s latest session through any replica.
    pub async fn affinity(&self, user: &str) -> Result<Option<String>, StoreError> {
        let mut conn = self.conn.clone();
        let key = format!("{}aff:{user}", self.prefix);
        self.bounded(conn.get(key)).await
    }

    /// Records the VMs of users' latest sessions, each valid for `ttl` from now (one round trip
    /// for the lot).
    pub async fn set_affinity(
        &self,
        entries: &[(String, String)],
        ttl: Duration,
    ) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let mut pipe = redis::pipe();
        for (user, vm) in entries {
            pipe.cmd("SET")
                .arg(format!("{}aff:{user}", self.prefix))
                .arg(vm)
                .arg("PX")
                .arg(ms)
                .ignore();
        }
        let mut conn = self.conn.clone();
        let () = self.bounded(pipe.query_async(&mut conn)).await?;
        Ok(())
    }
}

/// A replica's entry from the sync script: its id, record JSON and flattened load hash.
fn parse_replica(id: String, record: &str, flat: &[String]) -> ReplicaLoad {
    let mut record: ReplicaRecord = serde_json::from_str(record).unwrap_or_default();
    record.id = id;
    let mut out = ReplicaLoad {
        record,
        ..ReplicaLoad::default()
    };
    for pair in flat.chunks_exact(2) {
        let Some(counts) = parse_counts(&pair[1]) else {
            continue;
        };
        if pair[0] == WAITING_FIELD {
            out.waiting = (counts.ssh, counts.http);
        } else {
            out.load.insert(pair[0].clone(), counts);
        }
    }
    out
}

/// A load hash value: `"<ssh> <http>"`, with `" <tentative>"` when there are any (older
/// replicas read the first two numbers).
fn counts_field(c: LoadCounts) -> String {
    if c.tentative > 0 {
        format!("{} {} {}", c.ssh, c.http, c.tentative)
    } else {
        format!("{} {}", c.ssh, c.http)
    }
}

/// The inverse of [`counts_field`].
fn parse_counts(value: &str) -> Option<LoadCounts> {
    let mut parts = value.split(' ');
    let ssh = parts.next()?.parse().ok()?;
    let http = parts.next()?.parse().ok()?;
    let tentative = match parts.next() {
        Some(t) => t.parse().ok()?,
        None => 0,
    };
    parts.next().is_none().then_some(LoadCounts {
        ssh,
        http,
        tentative,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_hashes_parse_and_skip_garbage() {
        let flat: Vec<String> = [
            "vm-a", "2 1", "~waiting", "1 0", "vm-b", "x", "vm-d", "0 0 3", "vm-e", "1 2 3 4",
            "vm-c",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        let r = parse_replica("gw-2".into(), "not json", &flat);
        assert_eq!(r.record.id, "gw-2");
        let counts = |ssh, http, tentative| LoadCounts {
            ssh,
            http,
            tentative,
        };
        assert_eq!(r.load.get("vm-a"), Some(&counts(2, 1, 0)));
        assert_eq!(r.load.get("vm-d"), Some(&counts(0, 0, 3)));
        for c in [counts(2, 1, 0), counts(0, 0, 3)] {
            assert_eq!(parse_counts(&counts_field(c)), Some(c));
        }
        assert_eq!(r.load.len(), 2, "garbage skipped: {:?}", r.load);
        assert_eq!(r.waiting, (1, 0));
    }
}
