//! The autoscaler as the frontends' wake-on-connect owner (`crate::wake::Wake`): the frontends
//! never see the driver itself.

use std::time::Duration;

use router_core::Protocol;

use crate::autoscale::Driver;
use crate::wake::{Waiting, Wake};

impl Wake for std::sync::Arc<Driver> {
    fn holds_connections(&self) -> bool {
        self.wakes_on_connect()
    }

    fn hold_for(&self) -> Duration {
        Driver::hold_for(self)
    }

    fn boot_estimate(&self) -> Duration {
        Driver::boot_estimate(self)
    }

    fn register(&self, protocol: Protocol) -> Waiting {
        Waiting::new(self.wait_guard(protocol))
    }

    fn spread_below(&self) -> Option<u32> {
        self.vms_on_their_way().then(|| self.sessions_per_vm())
    }
}
