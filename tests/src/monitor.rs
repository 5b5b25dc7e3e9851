//! `lbctl monitor` under BPF_PROG_TEST_RUN: the eBPF object loaded with the
//! monitor switch (`LB_MONITOR`) set as the agent sets it, its ring buffer
//! drained as lbctl drains it, and the size of the verified programs.

use anyhow::{Context, Result};
use aya::maps::RingBuf;
use aya::programs::SchedClassifier;
use aya::EbpfLoader;
use lb_common::monitor::{MonitorEvent, EVENTS_MAP, EVENT_VERSION, SWITCH_GLOBAL};
use lb_common::{program_names, DatapathConfig, DATAPATH_CONFIG_GLOBAL};

use crate::artifacts;
use crate::datapath::Datapath;

/// Every TC program, with `switches` (`lb_common::monitor::switch` bits)
/// patched into `LB_MONITOR` before verification.
pub fn load(switches: u8) -> Result<Datapath> {
    let bytes = artifacts::ebpf_object_bytes();
    let mut ebpf = EbpfLoader::new()
        .override_global(DATAPATH_CONFIG_GLOBAL, &DatapathConfig::DEFAULT, true)
        .override_global(SWITCH_GLOBAL, &switches, true)
        .load(&bytes)
        .context("load the eBPF object")?;
    for name in program_names::ALL {
        let p: &mut SchedClassifier = ebpf
            .program_mut(name)
            .with_context(|| format!("no program {name}"))?
            .try_into()?;
        p.load()
            .with_context(|| format!("load {name} with LB_MONITOR={switches}"))?;
    }
    Ok(Datapath { ebpf })
}

/// Every event in the ring buffer now, oldest first (consumed: a second
/// call returns only newer ones).
pub fn drain(dp: &mut Datapath) -> Vec<MonitorEvent> {
    let map = dp.ebpf.map_mut(EVENTS_MAP).expect("no ring buffer map");
    let mut ring = RingBuf::try_from(map).expect("ring buffer");
    let mut out = Vec::new();
    while let Some(item) = ring.next() {
        assert!(item.len() >= size_of::<MonitorEvent>(), "short event");
        // SAFETY: at least size_of::<MonitorEvent>() bytes, and any bit
        // pattern is a MonitorEvent (Pod).
        let ev: MonitorEvent =
            unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<MonitorEvent>()) };
        assert_eq!(ev.version, EVENT_VERSION);
        out.push(ev);
    }
    out
}

/// The instruction count of a loaded program as the kernel runs it after
/// verification (`bpftool prog dump xlated` counts the same): 8 bytes per
/// instruction, a 64-bit immediate load taking two.
pub fn xlated_insns(dp: &Datapath, prog: &str) -> u32 {
    let p: &SchedClassifier = dp
        .ebpf
        .program(prog)
        .unwrap_or_else(|| panic!("no program {prog}"))
        .try_into()
        .unwrap();
    let info = p.info().expect("program info");
    info.size_translated().expect("xlated size") / 8
}
