//! Upgrades: pinned maps carry a layout version, and an agent never adopts
//! maps it would misread: a different version, a map of another shape, or
//! maps from before versions existed are refused with a message that names
//! the map and the command to run. After that command the agent starts
//! clean.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use lb_tests::artifacts;
use lb_tests::objects::{manifest, service, Object, ServicePort};
use lb_tests::require_privileges;
use lb_tests::topology::Topology;

fn one_node() -> Topology {
    Topology::builder()
        .node("node1", &["client1"])
        .without_external_client()
        .build()
        .expect("building the topology")
}

/// Starts the agent once (it pins and stamps its maps), then stops it.
fn pinned_by_an_agent(t: &Topology) {
    t.start_agents(&manifest(&[])).unwrap();
    let layout = t.node("node1").bpffs.join(lb_common::map_names::LAYOUT);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !t.log("agent-node1").contains("datapath loaded") {
        assert!(Instant::now() < deadline, "{}", t.log("agent-node1"));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(layout.exists());
    t.stop_agent("node1").unwrap();
}

/// Runs the agent on `node1` in the foreground; it must exit at once with
/// an error. Returns what it printed.
fn agent_refuses(t: &Topology) -> String {
    let n = t.node("node1");
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", n.netns))
        .arg("--")
        .arg(artifacts::lb_agent_bin())
        .arg("--manifest")
        .arg(t.manifest_path("node1"))
        .args(["--node-name", "node1", "--no-socket-lb", "--bpffs"])
        .arg(&n.bpffs)
        .args(["--healthz-bind-address", "", "--metrics-bind-address", ""])
        .output()
        .expect("running lb-agent");
    assert!(!out.status.success(), "the agent adopted the maps");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn bpftool(args: &[&str]) {
    let out = Command::new("bpftool").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "bpftool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn path(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

#[test]
fn maps_of_another_layout_version_are_refused_and_cleanup_starts_over() {
    require_privileges!();
    let t = one_node();
    pinned_by_an_agent(&t);
    let dir = t.node("node1").bpffs.clone();
    // An agent of layout 1 made these maps.
    let layout = path(&dir.join(lb_common::map_names::LAYOUT));
    bpftool(&[
        "map", "update", "pinned", &layout, "key", "0", "0", "0", "0", "value", "1", "0", "0", "0",
    ]);
    let err = agent_refuses(&t);
    assert!(
        err.contains("are of map layout 1")
            && err.contains(&format!("lb-agent --cleanup --bpffs {}", dir.display())),
        "{err}"
    );
    // The command it names works, and the agent then starts clean.
    let out = Command::new(artifacts::lb_agent_bin())
        .args(["--cleanup", "--bpffs"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    pinned_by_an_agent(&t);
}

#[test]
fn a_pinned_map_of_another_shape_is_refused_naming_it() {
    require_privileges!();
    let t = one_node();
    pinned_by_an_agent(&t);
    let dir = t.node("node1").bpffs.clone();
    // LB_BACKENDS as an older agent made it: 8-byte values.
    let backends = dir.join(lb_common::map_names::BACKENDS);
    std::fs::remove_file(&backends).unwrap();
    bpftool(&[
        "map",
        "create",
        &path(&backends),
        "type",
        "hash",
        "key",
        "4",
        "value",
        "8",
        "entries",
        "262144",
        "name",
        "LB_BACKENDS",
        "flags",
        "1",
    ]);
    let err = agent_refuses(&t);
    assert!(
        err.contains(&format!("pinned map {}", backends.display()))
            && err.contains("value 8 bytes")
            && err.contains("value 12 bytes"),
        "{err}"
    );
}

#[test]
fn maps_from_before_layout_versions_are_refused() {
    require_privileges!();
    let t = one_node();
    pinned_by_an_agent(&t);
    let dir = t.node("node1").bpffs.clone();
    std::fs::remove_file(dir.join(lb_common::map_names::LAYOUT)).unwrap();
    let err = agent_refuses(&t);
    assert!(
        err.contains("made before map layouts were versioned"),
        "{err}"
    );
}

/// Runs the agent on `node1` in the foreground with `args`; returns its exit
/// status and what it printed, or kills it after `wait` if it runs.
fn agent_with(t: &Topology, args: &[&str]) -> String {
    let n = t.node("node1");
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", n.netns))
        .arg("--")
        .arg(artifacts::lb_agent_bin())
        .arg("--manifest")
        .arg(t.manifest_path("node1"))
        .args(["--node-name", "node1", "--no-socket-lb", "--bpffs"])
        .arg(&n.bpffs)
        .args(["--healthz-bind-address", "", "--metrics-bind-address", ""])
        .args(args)
        .output()
        .expect("running lb-agent");
    assert!(!out.status.success(), "the agent adopted the maps");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn map_sizes_are_flags_a_full_map_refuses_only_what_does_not_fit_and_a_resize_is_refused() {
    require_privileges!();
    let t = one_node();
    // 60 Services of one port each: 60 frontends; with 64 entries the
    // planner fills 56 (an eighth stays free for puts before deletes).
    let objects: Vec<Object> = (0..60u8)
        .map(|i| {
            service(
                &format!("s{i:02}"),
                std::net::Ipv4Addr::new(10, 96, 5, i + 1),
            )
            .port(ServicePort::tcp("http", 80, 8080))
            .into()
        })
        .collect();
    t.write_manifests(&manifest(&objects)).unwrap();
    t.start_agent("node1", &["--max-frontends", "64"]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = t.log("agent-node1");
        if log.contains("lb-agent ready") {
            assert!(
                log.contains("the LB_SERVICES map would exceed its 56 entries"),
                "{log}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "{log}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let services = t.lbctl_json("node1", "services").unwrap();
    assert_eq!(services.as_array().map(Vec::len), Some(56), "{services}");
    let dir = t.node("node1").bpffs.clone();
    let info = Command::new("bpftool")
        .args(["map", "show", "pinned"])
        .arg(dir.join(lb_common::map_names::SERVICES))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&info.stdout).contains("max_entries 64"),
        "{}",
        String::from_utf8_lossy(&info.stdout)
    );
    t.stop_agent("node1").unwrap();
    // Another size for pinned maps is refused, naming the map.
    let err = agent_with(&t, &["--max-frontends", "128"]);
    assert!(
        err.contains(&format!(
            "pinned map {}",
            dir.join(lb_common::map_names::SERVICES).display()
        )) && err.contains("64 entries")
            && err.contains("128 entries"),
        "{err}"
    );
    // And a size that cannot work is refused before anything is touched.
    let err = agent_with(&t, &["--max-conntrack", "8"]);
    assert!(
        err.contains("--max-*: LB_CONNTRACK: 8 entries is too small"),
        "{err}"
    );
}
