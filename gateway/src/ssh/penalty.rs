//! Per-source-address back-off against password and key guessing.
//!
//! Each password a VM refuses counts as a failure for its source address, and so does each
//! connection that ends without logging in after trying, unless a refused password in it
//! counted already. More than [`Penalties::threshold`] failures within
//! [`Penalties::window`] put the address in the penalty box: its new connections are dropped at
//! accept for a penalty that starts at [`Penalties::base`] and doubles with each further offence,
//! up to [`Penalties::max`]. A successful login clears the address's record.
//!
//! [`UnauthSlots`] bounds connections that have not logged in yet: `ssh.max_unauthenticated` in
//! all, and a quarter of that (at least one) per source address, so one address flooding the
//! listener with stalled handshakes cannot keep everyone else out (OpenSSH's
//! `PerSourceMaxStartups` does the same).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Why a new connection got no unauthenticated slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoSlot {
    /// `ssh.max_unauthenticated` connections are authenticating.
    Full,
    /// This address holds its share already.
    AddressShare,
}

/// Slots for connections still authenticating: a global limit and a per-address share.
#[derive(Debug)]
pub struct UnauthSlots {
    global: Arc<Semaphore>,
    per_address: Arc<DashMap<IpAddr, usize>>,
    share: usize,
}

impl UnauthSlots {
    /// `max` slots in all; one address may hold `max / 4` of them (rounded up).
    pub fn new(max: usize) -> Self {
        let max = max.max(1);
        Self {
            global: Arc::new(Semaphore::new(max)),
            per_address: Arc::new(DashMap::new()),
            share: max.div_ceil(4),
        }
    }

    /// How many slots one address may hold.
    pub fn share(&self) -> usize {
        self.share
    }

    /// A slot for a connection from `ip`, released when the returned permit drops.
    pub fn acquire(&self, ip: IpAddr) -> Result<UnauthPermit, NoSlot> {
        // The address's share first: an address over it is turned away without touching the
        // global count (its slot is given back on every path, being taken first).
        let address = self.take_share(ip)?;
        Ok(UnauthPermit {
            _global: self.acquire_unnamed()?,
            _address: address,
        })
    }

    /// A slot of the global limit alone, for a connection whose client is not known yet (its
    /// PROXY protocol header is still to come); [`Self::name`] then takes the client's share.
    pub fn acquire_unnamed(&self) -> Result<OwnedSemaphorePermit, NoSlot> {
        self.global
            .clone()
            .try_acquire_owned()
            .map_err(|_| NoSlot::Full)
    }

    /// Makes a global slot the permit of a connection from `ip`, within the address's share.
    pub fn name(&self, global: OwnedSemaphorePermit, ip: IpAddr) -> Result<UnauthPermit, NoSlot> {
        Ok(UnauthPermit {
            _address: self.take_share(ip)?,
            _global: global,
        })
    }

    fn take_share(&self, ip: IpAddr) -> Result<AddressSlot, NoSlot> {
        let mut held = self.per_address.entry(ip).or_insert(0);
        if *held >= self.share {
            return Err(NoSlot::AddressShare);
        }
        *held += 1;
        Ok(AddressSlot {
            map: self.per_address.clone(),
            ip,
        })
    }
}

/// One unauthenticated slot; dropping it (login or disconnect) frees it.
#[derive(Debug)]
pub struct UnauthPermit {
    _global: OwnedSemaphorePermit,
    _address: AddressSlot,
}

#[derive(Debug)]
struct AddressSlot {
    map: Arc<DashMap<IpAddr, usize>>,
    ip: IpAddr,
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        // The entry goes when its count reaches zero, so the map holds only live addresses.
        self.map.remove_if_mut(&self.ip, |_, held| {
            *held = held.saturating_sub(1);
            *held == 0
        });
    }
}

#[derive(Debug, Clone, Copy)]
struct Record {
    failures: u32,
    window_start: Instant,
    offences: u32,
    blocked_until: Option<Instant>,
}

/// The penalty box.
#[derive(Debug)]
pub struct Penalties {
    records: DashMap<IpAddr, Record>,
    /// Failures tolerated per window.
    pub threshold: u32,
    /// The counting window.
    pub window: Duration,
    /// First penalty.
    pub base: Duration,
    /// Longest penalty.
    pub max: Duration,
}

impl Default for Penalties {
    fn default() -> Self {
        Self::new(
            10,
            Duration::from_secs(60),
            Duration::from_secs(30),
            Duration::from_secs(600),
        )
    }
}

impl Penalties {
    /// A penalty box with these limits.
    pub fn new(threshold: u32, window: Duration, base: Duration, max: Duration) -> Self {
        Self {
            records: DashMap::new(),
            threshold,
            window,
            base,
            max,
        }
    }

    /// How long `ip` is still blocked, if it is.
    pub fn blocked_for(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        let record = self.records.get(&ip)?;
        let until = record.blocked_until?;
        (until > now).then(|| until - now)
    }

    /// Records a failure; returns the penalty when this failure starts one.
    pub fn failure(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        let mut record = self.records.entry(ip).or_insert(Record {
            failures: 0,
            window_start: now,
            offences: 0,
            blocked_until: None,
        });
        if now.saturating_duration_since(record.window_start) > self.window {
            record.failures = 0;
            record.window_start = now;
        }
        record.failures += 1;
        if record.failures <= self.threshold {
            return None;
        }
        let penalty = self
            .base
            .saturating_mul(1u32 << record.offences.min(16))
            .min(self.max);
        record.offences += 1;
        record.failures = 0;
        record.window_start = now;
        record.blocked_until = Some(now + penalty);
        Some(penalty)
    }

    /// A successful login: forget the address.
    pub fn success(&self, ip: IpAddr) {
        self.records.remove(&ip);
    }

    /// Drops records that can no longer matter (call now and then).
    pub fn expire(&self, now: Instant) {
        self.records.retain(|_, r| {
            r.blocked_until.is_some_and(|until| until > now)
                || now.saturating_duration_since(r.window_start) <= self.window
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unauthenticated_slots_have_a_per_address_share_and_a_global_limit() {
        let slots = UnauthSlots::new(8);
        assert_eq!(slots.share(), 2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let held_a: Vec<_> = (0..2).map(|_| slots.acquire(a).unwrap()).collect();
        assert_eq!(slots.acquire(a).unwrap_err(), NoSlot::AddressShare);
        let mut others = Vec::new();
        for i in 2..5 {
            let ip: IpAddr = format!("192.0.2.{i}").parse().unwrap();
            others.push(slots.acquire(ip).unwrap());
            others.push(slots.acquire(ip).unwrap());
        }
        let late: IpAddr = "192.0.2.9".parse().unwrap();
        assert_eq!(slots.acquire(late).unwrap_err(), NoSlot::Full);
        // A refusal for `Full` gave its address count back.
        assert!(slots.per_address.get(&late).is_none_or(|n| *n == 0));
        drop(held_a);
        assert!(slots.per_address.get(&a).is_none(), "entry removed at zero");
        let _again = slots.acquire(late).unwrap();
        assert_eq!(UnauthSlots::new(1).share(), 1);
    }

    #[test]
    fn blocks_after_threshold_and_doubles() {
        let p = Penalties::new(
            3,
            Duration::from_secs(60),
            Duration::from_secs(10),
            Duration::from_secs(25),
        );
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(p.failure(ip, t0), None);
        }
        assert_eq!(p.failure(ip, t0), Some(Duration::from_secs(10)));
        assert_eq!(
            p.blocked_for(ip, t0 + Duration::from_secs(4)),
            Some(Duration::from_secs(6))
        );
        assert_eq!(p.blocked_for(ip, t0 + Duration::from_secs(11)), None);
        let t1 = t0 + Duration::from_secs(11);
        for _ in 0..3 {
            p.failure(ip, t1);
        }
        assert_eq!(p.failure(ip, t1), Some(Duration::from_secs(20)));
        for _ in 0..3 {
            p.failure(ip, t1);
        }
        assert_eq!(p.failure(ip, t1), Some(Duration::from_secs(25)), "capped");
        p.success(ip);
        assert_eq!(p.blocked_for(ip, t1), None);
    }

    #[test]
    fn failures_outside_the_window_do_not_add_up() {
        let p = Penalties::new(
            2,
            Duration::from_secs(10),
            Duration::from_secs(10),
            Duration::from_secs(60),
        );
        let ip: IpAddr = "192.0.2.2".parse().unwrap();
        let t0 = Instant::now();
        for i in 0..10 {
            assert_eq!(p.failure(ip, t0 + Duration::from_secs(11 * i)), None);
        }
        p.expire(t0 + Duration::from_secs(500));
        assert!(p.records.is_empty());
    }
}
