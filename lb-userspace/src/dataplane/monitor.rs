//! The agent's side of `lbctl monitor` and of the datapath's debug lines:
//! the load-time switch (`LB_MONITOR`), the ring buffer's size and pin, and
//! the reader that forwards aya-log records to tracing.
//!
//! Both are off by default and then cost nothing per packet: the switch is
//! a global in `.rodata` that the verifier folds (lb-ebpf/src/monitor.rs).
//! Turning either on or off takes an agent restart, which swaps the newly
//! verified programs into the pinned links without a gap.

use std::io;
use std::path::{Path, PathBuf};

use aya::maps::{MapData, MapType};
use aya::{Ebpf, EbpfLoader};
use lb_common::monitor::{switch, EVENTS_BYTES, EVENTS_BYTES_OFF, EVENTS_MAP, SWITCH_GLOBAL};
use tracing::{info, warn};

use super::{error_chain, io_err, DataplaneError};

/// aya-log-ebpf's ring buffer (a map of every object that logs).
const AYA_LOGS: &str = "AYA_LOGS";
/// Its size without `--datapath-debug-log`: nothing is ever written.
const AYA_LOGS_BYTES_OFF: u32 = 4096;

/// What the agent turns on for observing the datapath.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Observe {
    /// `--monitor`: events into the pinned ring buffer for `lbctl monitor`.
    pub events: bool,
    /// `--datapath-debug-log`: aya-log debug lines, logged by the agent at
    /// debug level under the target `datapath`.
    pub debug_log: bool,
}

impl Observe {
    /// The value of `LB_MONITOR` (`lb_common::monitor::switch` bits).
    pub fn switches(&self) -> u8 {
        let mut s = 0;
        if self.events {
            s |= switch::EVENTS;
        }
        if self.debug_log {
            s |= switch::DEBUG_LOG;
        }
        s
    }
}

/// Where the ring buffer is pinned (while the agent runs with `--monitor`).
pub fn events_pin(dir: &Path) -> PathBuf {
    dir.join(EVENTS_MAP)
}

/// Sets the switch, the ring buffers' sizes and the events pin on `loader`.
///
/// With `--monitor` the ring buffer is pinned and an earlier agent's pin is
/// reused, so that an `lbctl monitor` that is running keeps its stream
/// across an agent restart; a pin of another kind or size (another
/// release's) is replaced. Without it, a pin left from an earlier
/// `--monitor` agent is removed: lbctl then says that monitoring is off
/// instead of waiting on a buffer nothing writes into.
pub(super) fn configure<'a>(
    loader: &mut EbpfLoader<'a>,
    dir: &Path,
    observe: &Observe,
    switches: &'a u8,
) -> Result<(), DataplaneError> {
    let pin = events_pin(dir);
    let pin = pin.as_path();
    loader.override_global(SWITCH_GLOBAL, switches, true);
    if !observe.debug_log {
        loader.map_max_entries(AYA_LOGS, AYA_LOGS_BYTES_OFF);
    }
    if !observe.events {
        loader.map_max_entries(EVENTS_MAP, EVENTS_BYTES_OFF);
        remove_pin(pin)?;
        return Ok(());
    }
    loader.map_max_entries(EVENTS_MAP, EVENTS_BYTES);
    if pin.exists() {
        let fits = MapData::from_pin(pin).and_then(|m| m.info()).map(|i| {
            i.map_type().ok() == Some(MapType::RingBuf) && i.max_entries() == EVENTS_BYTES
        });
        match fits {
            Ok(true) => {}
            Ok(false) => {
                info!(pin = %pin.display(), "replacing a monitor ring buffer of another size");
                remove_pin(pin)?;
            }
            Err(e) => {
                warn!(pin = %pin.display(), error = %error_chain(&e), "unreadable monitor ring buffer pin; replacing it");
                remove_pin(pin)?;
            }
        }
    }
    loader.map_pin_path(EVENTS_MAP, pin.to_path_buf());
    info!(dir = %dir.display(), "datapath events on: `lbctl monitor` reads them");
    Ok(())
}

/// Removes the events pin (`--cleanup`, and agents without `--monitor`).
pub(super) fn remove_pin(pin: &Path) -> Result<(), DataplaneError> {
    match std::fs::remove_file(pin) {
        Ok(()) => {
            info!(pin = %pin.display(), "unpinned the monitor ring buffer");
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(pin)(e)),
    }
}

/// `--datapath-debug-log`: reads aya-log's ring buffer on the tokio runtime
/// and logs each record with tracing (debug level, target `datapath`).
pub(super) fn start_debug_log(ebpf: &mut Ebpf) -> Result<(), DataplaneError> {
    let logger = aya_log::EbpfLogger::init_with_logger(ebpf, ToTracing)
        .map_err(|e| DataplaneError::DebugLog(e.to_string()))?;
    // SAFETY: the logger owns its ring buffer's descriptor, which stays
    // open and the same for as long as the logger lives (inside the
    // AsyncFd).
    let mut fd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    }
    .map_err(|e| DataplaneError::DebugLog(e.to_string()))?;
    tokio::spawn(async move {
        loop {
            let mut guard = match fd.readable_mut().await {
                Ok(g) => g,
                Err(e) => {
                    warn!(error = %e, "datapath debug log reader stopped");
                    return;
                }
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
    info!("datapath debug log on: lines at debug level, target `datapath`");
    Ok(())
}

/// aya-log hands records to a `log::Log`; the agent logs with tracing.
struct ToTracing;

impl log::Log for ToTracing {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        tracing::debug!(target: "datapath", "{}", record.args());
    }

    fn flush(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switches_are_the_shared_bits() {
        assert_eq!(Observe::default().switches(), 0);
        let both = Observe {
            events: true,
            debug_log: true,
        };
        assert_eq!(both.switches(), switch::EVENTS | switch::DEBUG_LOG);
        assert_eq!(
            Observe {
                events: true,
                debug_log: false
            }
            .switches(),
            switch::EVENTS
        );
    }
}
