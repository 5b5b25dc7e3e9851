//! The test beds of the end-to-end bench (see [`super::e2e`] for the
//! layout): the Services of each service count and their three renderings
//! (lb's manifest, kube-proxy's iptables and nftables layouts), building
//! and checking one bed, and running the load generator and the packet
//! generator against it.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use lb_tests::objects::{
    self, endpoint_slice, service, Endpoint, Object, ServicePort, ServiceType,
};
use lb_tests::topology::{run, Pod, Topology};

use super::blast::BlastReport;
use super::e2e::{
    check_stop, thousands, Key, Mode, Settings, BACKENDS, CLIENT, CLUSTER_CIDR, HTTP_NODE_PORT,
    HTTP_PORT, HTTP_TARGET_PORT, NAMESPACE, NFT_LOAD_TIMEOUT, NODE1, NODE2, SERVICE_CIDR,
    UDP_NODE_PORT, UDP_PORT, XDP_AGENT_ARGS,
};
use super::kubeproxy::{self, Config};
use super::loadgen::LoadReport;

/// The Services of a bed with `n` Services, and the one exercised.
pub struct Workload {
    pub n: u32,
    pub services: Vec<Service>,
    pub slices: Vec<EndpointSlice>,
    pub vip: Ipv4Addr,
}

fn cluster_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 10)) + i)
}

/// Endpoints of the Services nobody calls: addresses in the nodes' pod
/// CIDRs (two on node1, one on node2, like the exercised one) that no pod has.
fn filler_endpoints(i: u32) -> [Endpoint; 3] {
    let host = |k: u32| 10 + (k % 240) as u8;
    [
        Endpoint::new(Ipv4Addr::new(10, 244, 1, host(2 * i)), NODE1),
        Endpoint::new(Ipv4Addr::new(10, 244, 1, host(2 * i + 1)), NODE1),
        Endpoint::new(Ipv4Addr::new(10, 244, 2, host(i)), NODE2),
    ]
}

/// `n` Services; number n/2 (the middle of kube-proxy's linear
/// KUBE-SERVICES chain) is the exercised NodePort Service of `backends`.
pub fn workload(n: u32, backends: &[Pod]) -> Workload {
    let exercised = n / 2;
    let mut services = Vec::with_capacity(n as usize);
    let mut slices = Vec::with_capacity(n as usize);
    for i in 0..n {
        let name = format!("svc-{i}");
        let slice_name = format!("svc-{i}-bench");
        if i == exercised {
            let ports = [
                ServicePort::tcp("http", HTTP_PORT, HTTP_TARGET_PORT).node_port(HTTP_NODE_PORT),
                ServicePort::udp("sink", UDP_PORT, UDP_PORT).node_port(UDP_NODE_PORT),
            ];
            services.push(
                service(&name, cluster_ip(i))
                    .namespace(NAMESPACE)
                    .service_type(ServiceType::NodePort)
                    .ports(&ports)
                    .build(),
            );
            slices.push(
                endpoint_slice(&name, &slice_name)
                    .namespace(NAMESPACE)
                    .ports_of(&ports)
                    .endpoints(backends.iter().map(Endpoint::of))
                    .build(),
            );
        } else {
            let ports = [ServicePort::tcp("http", HTTP_PORT, HTTP_TARGET_PORT)];
            services.push(
                service(&name, cluster_ip(i))
                    .namespace(NAMESPACE)
                    .ports(&ports)
                    .build(),
            );
            slices.push(
                endpoint_slice(&name, &slice_name)
                    .namespace(NAMESPACE)
                    .ports_of(&ports)
                    .endpoints(filler_endpoints(i))
                    .build(),
            );
        }
    }
    Workload {
        n,
        services,
        slices,
        vip: cluster_ip(exercised),
    }
}

impl Workload {
    fn manifest(&self) -> String {
        let objs: Vec<Object> = self
            .services
            .iter()
            .cloned()
            .map(Object::from)
            .chain(self.slices.iter().cloned().map(Object::from))
            .collect();
        objects::manifest(&objs)
    }

    fn kube_proxy_config(node: Ipv4Addr) -> Config {
        Config {
            cluster_cidr: CLUSTER_CIDR.to_string(),
            service_cidr: SERVICE_CIDR.to_string(),
            node_ips: vec![node],
            masquerade_mark: "0x4000",
        }
    }
}

/// How long a bed's Services took to be programmed, per node.
#[derive(Clone, Debug)]
pub struct LoadTime {
    pub what: &'static str,
    pub per_node: Vec<Duration>,
    pub note: String,
}

/// One test bed.
pub struct Bed {
    pub key: Key,
    pub topo: Topology,
    pub vip: Ipv4Addr,
    pub load: Option<LoadTime>,
}

/// The nginx of a backend pod: one process, no logs, answers its name.
fn nginx_conf(dir: &std::path::Path, pod: &str) -> String {
    let d = dir.join(format!("nginx-{pod}"));
    let d = d.display();
    format!(
        r#"daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_timeout 0;
    server {{
        listen {HTTP_TARGET_PORT} backlog=4096;
        location / {{
            default_type text/plain;
            return 200 "backend={pod}\n";
        }}
    }}
}}
"#
    )
}

fn wait_listening(
    topo: &Topology,
    pod: &str,
    proc_name: &str,
    flag: &str,
    port: u16,
) -> Result<()> {
    let filter = format!("sport = :{port}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = topo.exec(pod, &["ss", flag, &filter], Duration::from_secs(5))?;
        if out.success() && !out.stdout.trim().is_empty() {
            return Ok(());
        }
        topo.check_running(proc_name)?;
        if Instant::now() >= deadline {
            bail!("{proc_name} does not listen on {port} in {pod}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The pods' processes and settings, alike in every bed.
fn prepare_pods(topo: &Topology, exe: &str) -> Result<()> {
    // A wide ephemeral range: tens of thousands of connections per round.
    topo.sh(
        CLIENT,
        "sysctl -q -w net.ipv4.ip_local_port_range='1024 65535' net.ipv4.tcp_tw_reuse=1",
    )?;
    for (pod, _) in BACKENDS {
        let conf = topo.dir().join(format!("nginx-{pod}.conf"));
        std::fs::create_dir_all(topo.dir().join(format!("nginx-{pod}")))?;
        std::fs::write(&conf, nginx_conf(topo.dir(), pod))?;
        topo.sh(
            pod,
            "sysctl -q -w net.core.somaxconn=4096 net.ipv4.tcp_max_syn_backlog=4096",
        )?;
        let conf_s = conf.to_string_lossy();
        let name = format!("nginx-{pod}");
        topo.spawn(pod, &name, &["nginx", "-e", "stderr", "-c", &conf_s])?;
        let sink = format!("sink-{pod}");
        let port = UDP_PORT.to_string();
        topo.spawn(pod, &sink, &[exe, "sink", "--port", &port])?;
        wait_listening(topo, pod, &name, "-Hltn", HTTP_TARGET_PORT)?;
        wait_listening(topo, pod, &sink, "-Hlun", UDP_PORT)?;
    }
    Ok(())
}

fn build_topology() -> Result<Topology> {
    Topology::builder()
        .node(NODE1, &[CLIENT, "web1", "web2"])
        .node(NODE2, &["web3"])
        .build()
}

fn backend_pods(topo: &Topology) -> Vec<Pod> {
    BACKENDS.iter().map(|(p, _)| topo.pod(p).clone()).collect()
}

/// Runs `argv` on both nodes at once, each timed.
fn on_both_nodes(
    topo: &Topology,
    argv: &[Vec<String>; 2],
    timeout: Duration,
) -> Result<Vec<Duration>> {
    std::thread::scope(|s| {
        let handles: Vec<_> = [NODE1, NODE2]
            .iter()
            .zip(argv)
            .map(|(node, argv)| {
                s.spawn(move || -> Result<Duration> {
                    let started = Instant::now();
                    let a: Vec<&str> = argv.iter().map(String::as_str).collect();
                    topo.exec(node, &a, timeout)?.ok()?;
                    Ok(started.elapsed())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow!("loader thread panicked"))?)
            .collect()
    })
}

/// Polls lbctl on `node` until every frontend is in the maps and the
/// exercised ClusterIP has its three backends.
fn wait_lb_programmed(
    topo: &Topology,
    node: &str,
    w: &Workload,
    since: Instant,
) -> Result<Duration> {
    let want = w.n as usize + 3; // every ClusterIP, the UDP ClusterIP, two NodePorts
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let last = match topo.lbctl_json(node, "services") {
            Ok(v) => {
                let list = v.as_array().cloned().unwrap_or_default();
                let vip = w.vip.to_string();
                let exercised = list.iter().find(|s| {
                    s["address"].as_str() == Some(vip.as_str())
                        && s["port"].as_u64() == Some(u64::from(HTTP_PORT))
                });
                let backends = exercised
                    .and_then(|s| s["backends"].as_array().map(Vec::len))
                    .unwrap_or(0);
                if list.len() >= want && backends == BACKENDS.len() {
                    return Ok(since.elapsed());
                }
                format!(
                    "{} of {want} frontends, exercised has {backends} backends",
                    list.len()
                )
            }
            Err(e) => format!("{e:#}"),
        };
        topo.check_running(&format!("agent-{node}"))?;
        if Instant::now() >= deadline {
            bail!("{node}: lb did not program the Services within 120 s; last: {last}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The rule texts of one service count, written once.
pub struct Texts {
    manifest: String,
    iptables: String,
    nftables: [String; 2],
}

impl Texts {
    pub fn new(w: &Workload, node_ips: [Ipv4Addr; 2]) -> Result<Self> {
        let ports = kubeproxy::service_ports(&w.services, &w.slices)?;
        // The iptables layout does not depend on the node's address.
        let iptables =
            kubeproxy::iptables::restore_input(&Workload::kube_proxy_config(node_ips[0]), &ports);
        let nftables = node_ips
            .map(|ip| kubeproxy::nftables::transaction(&Workload::kube_proxy_config(ip), &ports));
        Ok(Self {
            manifest: w.manifest(),
            iptables,
            nftables,
        })
    }
}

/// The workloads and rule texts per service count, made once from the
/// first bed's pods (every topology assigns the same addresses; checked).
pub type Workloads = BTreeMap<u32, (Workload, Texts)>;

/// Builds and checks one bed.
pub fn build_bed(key: Key, workloads: &mut Workloads, s: &Settings, exe: &str) -> Result<Bed> {
    check_stop()?;
    let topo = build_topology()?;
    prepare_pods(&topo, exe)?;
    let node_addr = |n: &str| topo.node(n).address;
    let pods = backend_pods(&topo);
    if key.mode != Mode::Direct {
        if let std::collections::btree_map::Entry::Vacant(e) = workloads.entry(key.services) {
            let w = workload(key.services, &pods);
            let texts = Texts::new(&w, [node_addr(NODE1), node_addr(NODE2)])?;
            e.insert((w, texts));
        }
        let want: Vec<Ipv4Addr> = workloads[&key.services]
            .0
            .slices
            .iter()
            .flat_map(|sl| sl.endpoints.iter())
            .filter(|e| e.target_ref.is_some())
            .filter_map(|e| e.addresses[0].parse().ok())
            .collect();
        let have: Vec<Ipv4Addr> = pods.iter().map(|p| p.ip).collect();
        if want != have {
            bail!("pod addresses differ between topologies: {want:?} vs {have:?}");
        }
    }
    let wt = workloads.get(&key.services);
    let (w, texts) = (wt.map(|x| &x.0), wt.map(|x| &x.1));
    let mut load = None;
    let vip = w.map(|w| w.vip).unwrap_or(Ipv4Addr::UNSPECIFIED);
    match key.mode {
        Mode::Lb | Mode::LbXdp => {
            let (w, t) = (w.context("workload")?, texts.context("texts")?);
            topo.write_manifests(&t.manifest)?;
            let started = Instant::now();
            let mut args = vec!["--cluster-cidr", CLUSTER_CIDR];
            args.extend(s.agent_args.iter().map(String::as_str));
            if key.mode == Mode::LbXdp {
                args.extend(XDP_AGENT_ARGS.context("XDP is not implemented")?.iter());
            }
            for node in [NODE1, NODE2] {
                topo.start_agent(node, &args)?;
            }
            let per_node = [NODE1, NODE2]
                .iter()
                .map(|n| wait_lb_programmed(&topo, n, w, started))
                .collect::<Result<Vec<_>>>()?;
            load = Some(LoadTime {
                what: "lb-agent start -> all frontends in the maps (lbctl)",
                per_node,
                note: format!("manifest {:.1} MiB", t.manifest.len() as f64 / 1048576.0),
            });
        }
        Mode::Iptables => {
            let t = texts.context("texts")?;
            let file = topo.dir().join("kube-proxy.iptables");
            std::fs::write(&file, &t.iptables)?;
            let lines = t.iptables.lines().filter(|l| l.starts_with("-A ")).count();
            let script = format!(
                "sysctl -q -w net.ipv4.conf.all.route_localnet=1 && {} --noflush --counters < {}",
                s.iptables.restore(),
                file.display()
            );
            let argv = ["sh", "-c", script.as_str()].map(str::to_string).to_vec();
            let per_node = on_both_nodes(&topo, &[argv.clone(), argv], Duration::from_secs(120))?;
            load = Some(LoadTime {
                what: s.iptables.restore(),
                per_node,
                note: format!("{} rules", thousands(lines as u64)),
            });
        }
        Mode::Nftables => {
            let t = texts.context("texts")?;
            let mut argv: [Vec<String>; 2] = Default::default();
            for (i, node) in [NODE1, NODE2].iter().enumerate() {
                let file = topo.dir().join(format!("kube-proxy-{node}.nft"));
                std::fs::write(&file, &t.nftables[i])?;
                argv[i] = vec!["nft".into(), "-f".into(), file.display().to_string()];
            }
            let lines = t.nftables[0]
                .lines()
                .filter(|l| l.starts_with("add "))
                .count();
            let per_node = on_both_nodes(&topo, &argv, NFT_LOAD_TIMEOUT)
                .context("loading kube-proxy's nftables transaction")?;
            load = Some(LoadTime {
                what: "nft -f",
                per_node,
                note: format!("{} statements", thousands(lines as u64)),
            });
        }
        Mode::Direct => {
            // The packet test sends from outside straight to the pods.
            topo.add_route("ext", "10.244.0.0/16", node_addr(NODE1))?;
        }
    }
    let bed = Bed {
        key,
        topo,
        vip,
        load,
    };
    // A short run that must reach every backend without an error.
    let probe = run_client(&bed, s, exe, Duration::ZERO, Duration::from_millis(500), 8)?;
    if probe.errors > 0 || probe.backends.len() != BACKENDS.len() {
        bail!(
            "{}: probe run failed: {} ok, {} errors {:?}, backends {:?}",
            key.label(),
            probe.connections,
            probe.errors,
            probe.error_kinds,
            probe.backends
        );
    }
    Ok(bed)
}

/// The load generator in the client pod against a bed.
pub fn run_client(
    bed: &Bed,
    s: &Settings,
    exe: &str,
    warmup: Duration,
    duration: Duration,
    concurrency: usize,
) -> Result<LoadReport> {
    check_stop()?;
    let targets: Vec<String> = match bed.key.mode {
        Mode::Direct => BACKENDS
            .iter()
            .map(|(p, _)| SocketAddrV4::new(bed.topo.pod(p).ip, HTTP_TARGET_PORT).to_string())
            .collect(),
        _ => vec![SocketAddrV4::new(bed.vip, HTTP_PORT).to_string()],
    };
    let targets = targets.join(",");
    let (c, t) = (concurrency.to_string(), s.client_threads.to_string());
    let (w, d) = (
        warmup.as_millis().to_string(),
        duration.as_millis().to_string(),
    );
    let argv = [
        exe,
        "client",
        "--targets",
        &targets,
        "--concurrency",
        &c,
        "--threads",
        &t,
        "--warmup-ms",
        &w,
        "--duration-ms",
        &d,
    ];
    let out = bed
        .topo
        .exec(CLIENT, &argv, warmup + duration + Duration::from_secs(30))?
        .ok()?;
    let line = out.lines().last().unwrap_or_default();
    serde_json::from_str(line).with_context(|| format!("client printed {out:?}"))
}

/// rx packets of a pod's eth0.
fn rx_packets(topo: &Topology, pod: &str) -> Result<u64> {
    let ns = topo.pod(pod).netns.clone();
    let out = run(
        &["ip", "-n", &ns, "-s", "-j", "link", "show", "dev", "eth0"],
        Duration::from_secs(10),
    )?
    .ok()?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    v[0]["stats64"]["rx"]["packets"]
        .as_u64()
        .ok_or_else(|| anyhow!("no rx packets in {out}"))
}

fn mac_of(topo: &Topology, who: &str) -> Result<String> {
    let ns = topo.netns(who);
    let out = run(
        &["ip", "-n", &ns, "-j", "link", "show", "dev", "eth0"],
        Duration::from_secs(10),
    )?
    .ok()?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    v[0]["address"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow!("no MAC in {out}"))
}

/// One packet-rate sample: sent and delivered packets per second.
#[derive(Clone, Debug, Default)]
pub struct PpsSample {
    pub sent_pps: f64,
    pub delivered_pps: f64,
    pub cpu_ns_per_pkt: f64,
    pub per_backend: Vec<u64>,
}

/// The packet generator in the external namespace against a bed's
/// NodePort (the backends directly for "direct").
pub fn run_blast(bed: &Bed, s: &Settings, exe: &str) -> Result<PpsSample> {
    check_stop()?;
    let topo = &bed.topo;
    let dsts: Vec<String> = match bed.key.mode {
        Mode::Direct => BACKENDS
            .iter()
            .map(|(p, _)| SocketAddrV4::new(topo.pod(p).ip, UDP_PORT).to_string())
            .collect(),
        _ => vec![SocketAddrV4::new(topo.node(NODE1).address, UDP_NODE_PORT).to_string()],
    };
    let src_mac = mac_of(topo, "ext")?;
    let dst_mac = mac_of(topo, NODE1)?;
    let before = BACKENDS
        .iter()
        .map(|(p, _)| rx_packets(topo, p))
        .collect::<Result<Vec<_>>>()?;
    let ext_ip = lb_tests::topology::EXTERNAL_IP.to_string();
    let (flows, threads) = (s.pps_flows.to_string(), s.pps_threads.to_string());
    let ms = s.pps_round.as_millis().to_string();
    let dsts = dsts.join(",");
    let argv = [
        exe,
        "blast",
        "--iface",
        "eth0",
        "--src-mac",
        &src_mac,
        "--dst-mac",
        &dst_mac,
        "--src",
        &ext_ip,
        "--dsts",
        &dsts,
        "--flows",
        &flows,
        "--threads",
        &threads,
        "--duration-ms",
        &ms,
    ];
    let out = topo
        .exec("ext", &argv, s.pps_round + Duration::from_secs(30))?
        .ok()?;
    let report: BlastReport = serde_json::from_str(out.lines().last().unwrap_or_default())
        .with_context(|| format!("blast printed {out:?}"))?;
    // Let the last packets land.
    std::thread::sleep(Duration::from_millis(100));
    let after = BACKENDS
        .iter()
        .map(|(p, _)| rx_packets(topo, p))
        .collect::<Result<Vec<_>>>()?;
    let per_backend: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    let delivered: u64 = per_backend.iter().sum();
    Ok(PpsSample {
        sent_pps: report.sent as f64 / report.secs,
        delivered_pps: delivered as f64 / report.secs,
        cpu_ns_per_pkt: report.cpu.busy_s * 1e9 / (delivered.max(1) as f64),
        per_backend,
    })
}

/// CPU seconds (user + system) used so far by the lb-agent processes of a
/// bed (found by name among the processes of its nodes' namespaces).
pub(crate) fn agent_cpu_secs(topo: &Topology) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut total = 0.0;
    for node in [NODE1, NODE2] {
        let ns = topo.node(node).netns.clone();
        let Ok(out) = run(&["ip", "netns", "pids", &ns], Duration::from_secs(5)) else {
            continue;
        };
        for pid in out.stdout.split_whitespace() {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() != "lb-agent" {
                continue;
            }
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // Fields after the command (which may hold spaces) end with ')'.
            let fields: Vec<&str> = stat
                .rsplit_once(')')
                .map(|(_, r)| r.split_whitespace().collect())
                .unwrap_or_default();
            // utime and stime are fields 14 and 15; fields[0] is field 3.
            let ticks: u64 = [11, 12]
                .iter()
                .filter_map(|i| fields.get(*i).and_then(|f| f.parse::<u64>().ok()))
                .sum();
            total += ticks as f64 / hz;
        }
    }
    total
}
