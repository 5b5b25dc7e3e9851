//! The Helm chart (charts/lb-agent) and the container image's Dockerfile.
//!
//! The chart is linted and rendered by the real Helm SDK (helm-python-sdk,
//! Helm v4's Go code; tests/chart/render.py drives it), every rendered object
//! is deserialized into its k8s-openapi type and serialized back (a field that
//! vanishes is one Kubernetes does not know: a typo the API server would drop
//! or reject), and what makes the agent work is asserted on the typed objects.
//!
//! Needs no privileges, and never skips: without the SDK it fails and says to
//! run `cargo xtask setup` (which installs tests/chart/requirements.txt into
//! $CARGO_HOME/lb-helm-venv; LB_HELM_PYTHON names another interpreter).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Container, PodSpec, ServiceAccount, Toleration};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

const RELEASE: &str = "lb";
const NAMESPACE: &str = "kube-system";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn chart_dir() -> PathBuf {
    repo_root().join("charts/lb-agent")
}

fn helper_script() -> PathBuf {
    repo_root().join("tests/chart/render.py")
}

fn custom_values() -> PathBuf {
    repo_root().join("tests/chart/values-custom.yaml")
}

/// The Python that has the Helm SDK: LB_HELM_PYTHON, or the venv `cargo xtask
/// setup` makes under $CARGO_HOME.
fn helm_python() -> PathBuf {
    let python = match std::env::var_os("LB_HELM_PYTHON").filter(|p| !p.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => std::env::var_os("CARGO_HOME")
            .filter(|h| !h.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                    .join(".cargo")
            })
            .join("lb-helm-venv/bin/python3"),
    };
    assert!(
        python.exists(),
        "the Helm SDK is not installed ({} is missing): run `cargo xtask setup` \
         (or set LB_HELM_PYTHON to a python3 that can `import helm_python`)",
        python.display()
    );
    python
}

/// Runs render.py; returns its exit code and its JSON output.
fn helper(args: &[&str], chart: &Path, values: Option<&Path>) -> (i32, Value) {
    let mut c = Command::new(helm_python());
    c.arg(helper_script()).arg(args[0]).arg(chart);
    if let Some(v) = values {
        c.arg(v);
    }
    c.args(&args[1..]);
    let out = c.output().expect("running tests/chart/render.py");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let code = out.status.code().unwrap_or(-1);
    assert_ne!(
        code, 3,
        "the Helm SDK cannot be imported: run `cargo xtask setup`\n{stderr}"
    );
    let json: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "render.py {args:?} printed no JSON ({e}); exit {code}\nstderr:\n{stderr}\nstdout:\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    (code, json)
}

/// `helm lint` findings as (severity, "path: message"); severity 1 info, 2
/// warning, 3 error.
fn lint(chart: &Path, values: Option<&Path>) -> Vec<(u64, String)> {
    let (code, report) = helper(&["lint", "--namespace", NAMESPACE], chart, values);
    assert_eq!(code, 0, "lint: {report}");
    assert_eq!(report["total_charts_linted"], 1, "lint: {report}");
    let mut found: Vec<(u64, String)> = report["messages"]
        .as_array()
        .expect("lint messages")
        .iter()
        .map(|m| {
            (
                m["severity"].as_u64().unwrap_or(0),
                format!(
                    "{}: {}",
                    m["path"].as_str().unwrap_or(""),
                    m["error"].as_str().unwrap_or("")
                ),
            )
        })
        .collect();
    for e in report["errors"].as_array().into_iter().flatten() {
        found.push((3, e.as_str().unwrap_or("").to_string()));
    }
    found
}

/// `helm template`: every rendered object (NOTES.txt and empty documents left
/// out) as (template, JSON), or the render error.
fn render(chart: &Path, values: Option<&Path>) -> Result<Vec<(String, Value)>, String> {
    let (code, out) = helper(
        &["render", "--name", RELEASE, "--namespace", NAMESPACE],
        chart,
        values,
    );
    if code != 0 {
        return Err(out["error"].as_str().unwrap_or("?").to_string());
    }
    let mut objects = Vec::new();
    for (template, text) in out["manifests"].as_object().expect("manifests") {
        if template.ends_with("NOTES.txt") {
            continue;
        }
        let text = text.as_str().expect("manifest text");
        let docs: Vec<Value> = serde_saphyr::from_multiple(text)
            .unwrap_or_else(|e| panic!("{template} is not YAML: {e}\n{text}"));
        for v in docs {
            if !v.is_null() {
                objects.push((template.clone(), v));
            }
        }
    }
    Ok(objects)
}

fn drop_nulls(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), drop_nulls(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(drop_nulls).collect()),
        other => other.clone(),
    }
}

/// Where `back` (the re-serialized object) differs from `orig` (the rendered one).
fn diff(orig: &Value, back: &Value, path: &str, out: &mut Vec<String>) {
    match (orig, back) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, va) in a {
                let p = format!("{path}.{k}");
                match b.get(k) {
                    None => out.push(format!("{p}: unknown field (dropped by the typed object)")),
                    Some(vb) => diff(va, vb, &p, out),
                }
            }
            for k in b.keys().filter(|k| !a.contains_key(*k)) {
                out.push(format!("{path}.{k}: added by the typed object"));
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (va, vb)) in a.iter().zip(b).enumerate() {
                diff(va, vb, &format!("{path}[{i}]"), out);
            }
        }
        _ if orig == back => {}
        _ => out.push(format!("{path}: rendered {orig}, typed object has {back}")),
    }
}

/// Deserializes `v` into its k8s-openapi type and checks that nothing was lost
/// on the way: k8s-openapi ignores unknown fields, so one that does not come
/// back is misspelled or misplaced.
fn typed<T: DeserializeOwned + Serialize>(v: &Value) -> Result<T, String> {
    let t: T = serde_json::from_value(v.clone()).map_err(|e| format!("does not parse: {e}"))?;
    let back = serde_json::to_value(&t).map_err(|e| e.to_string())?;
    let mut diffs = Vec::new();
    diff(&drop_nulls(v), &drop_nulls(&back), "", &mut diffs);
    if diffs.is_empty() {
        Ok(t)
    } else {
        Err(diffs.join("\n"))
    }
}

/// The objects one render produced, typed.
#[derive(Default)]
struct Release {
    daemonsets: Vec<DaemonSet>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
}

fn parse_release(objects: &[(String, Value)]) -> Release {
    fn strict<T: DeserializeOwned + Serialize>(template: &str, kind: &str, v: &Value) -> T {
        typed(v).unwrap_or_else(|e| panic!("{template}: not a valid {kind}:\n{e}"))
    }
    let mut r = Release::default();
    for (template, v) in objects {
        let api_version = v["apiVersion"].as_str().unwrap_or("");
        let kind = v["kind"].as_str().unwrap_or("");
        match (api_version, kind) {
            ("apps/v1", "DaemonSet") => r.daemonsets.push(strict(template, kind, v)),
            ("v1", "ServiceAccount") => r.service_accounts.push(strict(template, kind, v)),
            ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
                r.cluster_roles.push(strict(template, kind, v))
            }
            ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                r.bindings.push(strict(template, kind, v))
            }
            _ => panic!("{template}: unexpected object {api_version} {kind}"),
        }
    }
    r
}

fn render_release(values: Option<&Path>) -> Release {
    let objects = render(&chart_dir(), values).unwrap_or_else(|e| panic!("render failed: {e}"));
    parse_release(&objects)
}

impl Release {
    fn daemonset(&self) -> &DaemonSet {
        assert_eq!(self.daemonsets.len(), 1, "exactly one DaemonSet");
        &self.daemonsets[0]
    }
    fn pod(&self) -> &PodSpec {
        self.daemonset()
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .expect("pod spec")
    }
    fn agent(&self) -> &Container {
        let pod = self.pod();
        assert_eq!(pod.containers.len(), 1, "one container");
        assert!(pod.init_containers.is_none(), "no init containers");
        &pod.containers[0]
    }
}

fn env_value(c: &Container, name: &str) -> Option<String> {
    c.env
        .iter()
        .flatten()
        .find(|e| e.name == name)
        .and_then(|e| e.value.clone())
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// The RBAC grants as (group, resource, verb) triples.
fn grants(role: &ClusterRole) -> BTreeSet<(String, String, String)> {
    let mut g = BTreeSet::new();
    for rule in role.rules.iter().flatten() {
        assert!(rule.resource_names.is_none(), "no resourceNames: {rule:?}");
        assert!(
            rule.non_resource_urls.is_none(),
            "no nonResourceURLs: {rule:?}"
        );
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    g.insert((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    g
}

/// What every render must have, whatever the values: the privileges, mounts
/// and wiring without which the agent cannot work.
/// `cgroup_host`: the host cgroup hierarchy mounted for socket LB (F2),
/// `None` when socket LB is off (nothing mounted).
fn assert_node_agent_basics(
    r: &Release,
    bpffs_host: &str,
    cgroup_host: Option<&str>,
    healthz_port: i32,
) {
    let ds = r.daemonset();
    assert_eq!(ds.metadata.namespace.as_deref(), Some(NAMESPACE));
    let spec = ds.spec.as_ref().unwrap();
    let selector = spec.selector.match_labels.as_ref().expect("matchLabels");
    let pod_labels = spec.template.metadata.as_ref().unwrap().labels.as_ref();
    for (k, v) in selector {
        assert_eq!(
            pod_labels.and_then(|l| l.get(k)),
            Some(v),
            "the selector matches the pod template ({k})"
        );
    }
    let strategy = spec.update_strategy.as_ref().expect("updateStrategy");
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));

    let pod = r.pod();
    assert_eq!(pod.host_network, Some(true), "hostNetwork");
    assert_eq!(pod.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
    assert_ne!(pod.automount_service_account_token, Some(false));

    let c = r.agent();
    assert_eq!(c.command, Some(s(&["lb-agent"])));
    let sc = c.security_context.as_ref().expect("securityContext");
    assert_eq!(sc.privileged, Some(true), "privileged");
    assert_ne!(sc.run_as_non_root, Some(true));

    // NODE_NAME from the downward API, and handed to the agent.
    let node_name = c
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "NODE_NAME")
        .expect("NODE_NAME");
    let field = node_name
        .value_from
        .as_ref()
        .and_then(|f| f.field_ref.as_ref())
        .expect("NODE_NAME from a fieldRef");
    assert_eq!(field.field_path, "spec.nodeName");
    assert!(node_name.value.is_none());
    let args = c.args.clone().unwrap_or_default();
    assert_eq!(
        args.first().map(String::as_str),
        Some("--node-name=$(NODE_NAME)")
    );

    // bpffs: the host's, Bidirectional; cgroup: the host's, read-only, at
    // the same path (over the container's own cgroup view).
    let volumes: BTreeMap<&str, _> = pod
        .volumes
        .iter()
        .flatten()
        .map(|v| (v.name.as_str(), v))
        .collect();
    let mounts: BTreeMap<&str, _> = c
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| (m.name.as_str(), m))
        .collect();
    let host_path = |name: &str| {
        volumes
            .get(name)
            .and_then(|v| v.host_path.as_ref())
            .unwrap_or_else(|| panic!("volume {name} is a hostPath"))
            .path
            .clone()
    };
    assert_eq!(host_path("bpffs"), bpffs_host);
    assert_eq!(mounts["bpffs"].mount_path, bpffs_host);
    assert_eq!(
        mounts["bpffs"].mount_propagation.as_deref(),
        Some("Bidirectional")
    );
    assert_ne!(mounts["bpffs"].read_only, Some(true));
    match cgroup_host {
        Some(cgroup_host) => {
            assert_eq!(host_path("cgroup"), cgroup_host);
            assert_eq!(mounts["cgroup"].mount_path, cgroup_host);
            assert_eq!(mounts["cgroup"].read_only, Some(true));
            assert!(!args.iter().any(|a| a == "--no-socket-lb"));
        }
        None => {
            assert!(!volumes.contains_key("cgroup"), "no cgroup volume");
            assert!(!mounts.contains_key("cgroup"), "no cgroup mount");
            assert!(args.iter().any(|a| a == "--no-socket-lb"));
        }
    }

    // Probes on the configured healthz port.
    let probe = |p: Option<&k8s_openapi::api::core::v1::Probe>, what: &str| {
        let get = p
            .and_then(|p| p.http_get.as_ref())
            .unwrap_or_else(|| panic!("{what} probe is an httpGet"));
        (get.path.clone().unwrap_or_default(), get.port.clone())
    };
    assert_eq!(
        probe(c.liveness_probe.as_ref(), "liveness"),
        ("/livez".to_string(), IntOrString::Int(healthz_port))
    );
    assert_eq!(
        probe(c.readiness_probe.as_ref(), "readiness"),
        ("/healthz".to_string(), IntOrString::Int(healthz_port))
    );
    let healthz = c
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some("healthz"))
        .expect("healthz port");
    assert_eq!(healthz.container_port, healthz_port);
}

#[test]
fn lint_is_clean() {
    for values in [None, Some(custom_values())] {
        let findings = lint(&chart_dir(), values.as_deref());
        let bad: Vec<_> = findings.iter().filter(|(sev, _)| *sev != 1).collect();
        assert!(
            bad.is_empty(),
            "helm lint ({values:?}) reports more than information: {bad:#?}"
        );
    }
}

#[test]
fn default_values() {
    let r = render_release(None);
    assert_node_agent_basics(&r, "/sys/fs/bpf", Some("/sys/fs/cgroup"), 10256);

    let ds = r.daemonset();
    assert_eq!(ds.metadata.name.as_deref(), Some("lb-agent"));
    let strategy = ds.spec.as_ref().unwrap().update_strategy.as_ref().unwrap();
    assert_eq!(
        strategy
            .rolling_update
            .as_ref()
            .and_then(|u| u.max_unavailable.clone()),
        Some(IntOrString::Int(1))
    );

    let pod = r.pod();
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert_eq!(
        pod.tolerations.as_deref(),
        Some(
            &[Toleration {
                operator: Some("Exists".into()),
                ..Default::default()
            }][..]
        ),
        "tolerates every taint"
    );

    let c = r.agent();
    assert_eq!(c.image.as_deref(), Some("lb-agent:0.1.0"));
    // Every flag with the agent's own default, nothing else (no --kubeconfig:
    // in-cluster service account; no --uplink: the default route's).
    assert_eq!(
        c.args.clone().unwrap_or_default(),
        s(&[
            "--node-name=$(NODE_NAME)",
            "--pod-iface-pattern=^(veth|lxc|cali)",
            "--bpffs=/sys/fs/bpf/lb",
            "--healthz-bind-address=0.0.0.0:10256",
            "--metrics-bind-address=127.0.0.1:10249",
            "--conntrack-tcp-timeout-established=24h",
            "--conntrack-tcp-timeout-close-wait=1h",
            "--conntrack-udp-timeout=30s",
            "--conntrack-udp-timeout-stream=120s",
            "--conntrack-gc-interval=30s",
            "--snat-port-range=10000-29999",
            "--sync-period=30s",
            "--log-level=info",
        ])
    );
    assert_eq!(
        c.env
            .iter()
            .flatten()
            .map(|e| e.name.as_str())
            .collect::<Vec<_>>(),
        ["NODE_NAME"]
    );
    let live = c.liveness_probe.as_ref().unwrap();
    assert!(live.http_get.as_ref().unwrap().host.is_none());
    assert_eq!(live.failure_threshold, Some(6));

    // ServiceAccount, wired into the DaemonSet and the binding.
    assert_eq!(r.service_accounts.len(), 1, "one ServiceAccount");
    let sa = &r.service_accounts[0];
    assert_eq!(sa.metadata.name.as_deref(), Some("lb-agent"));
    assert_eq!(sa.metadata.namespace.as_deref(), Some(NAMESPACE));
    assert_eq!(pod.service_account_name.as_deref(), Some("lb-agent"));

    // The narrowest ClusterRole that works, and nothing more.
    assert_eq!(r.cluster_roles.len(), 1, "one ClusterRole");
    let role = &r.cluster_roles[0];
    let want: BTreeSet<(String, String, String)> = [
        ("", "services", "get"),
        ("", "services", "list"),
        ("", "services", "watch"),
        ("", "nodes", "get"),
        ("", "nodes", "list"),
        ("", "nodes", "watch"),
        ("discovery.k8s.io", "endpointslices", "get"),
        ("discovery.k8s.io", "endpointslices", "list"),
        ("discovery.k8s.io", "endpointslices", "watch"),
        ("", "events", "create"),
        ("", "events", "patch"),
        ("events.k8s.io", "events", "create"),
        ("events.k8s.io", "events", "patch"),
    ]
    .iter()
    .map(|(g, r, v)| (g.to_string(), r.to_string(), v.to_string()))
    .collect();
    assert_eq!(grants(role), want);

    assert_eq!(r.bindings.len(), 1, "one ClusterRoleBinding");
    let b = &r.bindings[0];
    assert_eq!(b.role_ref.kind, "ClusterRole");
    assert_eq!(b.role_ref.api_group, "rbac.authorization.k8s.io");
    assert_eq!(Some(&b.role_ref.name), role.metadata.name.as_ref());
    let subjects = b.subjects.as_deref().unwrap_or_default();
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(subjects[0].name, "lb-agent");
    assert_eq!(subjects[0].namespace.as_deref(), Some(NAMESPACE));
}

#[test]
fn custom_values_reach_the_objects() {
    let r = render_release(Some(&custom_values()));
    assert_node_agent_basics(&r, "/sys/fs/bpf", Some("/run/lb/cgroupv2"), 20256);

    // serviceAccount.create=false, rbac.create=false: only the DaemonSet,
    // running as the named existing account.
    assert!(r.service_accounts.is_empty(), "no ServiceAccount");
    assert!(r.cluster_roles.is_empty(), "no ClusterRole");
    assert!(r.bindings.is_empty(), "no ClusterRoleBinding");

    let ds = r.daemonset();
    assert_eq!(ds.metadata.name.as_deref(), Some("lb-custom"));
    let spec = ds.spec.as_ref().unwrap();
    assert_eq!(
        spec.update_strategy
            .as_ref()
            .and_then(|s| s.rolling_update.as_ref())
            .and_then(|u| u.max_unavailable.clone()),
        Some(IntOrString::String("10%".into()))
    );
    let meta = spec.template.metadata.as_ref().unwrap();
    assert_eq!(
        meta.annotations
            .as_ref()
            .and_then(|a| a.get("prometheus.io/scrape")),
        Some(&"true".to_string())
    );
    assert_eq!(
        meta.labels.as_ref().and_then(|l| l.get("team")),
        Some(&"net".to_string())
    );

    let pod = r.pod();
    assert_eq!(pod.service_account_name.as_deref(), Some("lb-existing-sa"));
    assert_eq!(pod.priority_class_name.as_deref(), Some("lb-critical"));
    assert_eq!(pod.termination_grace_period_seconds, Some(45));
    assert_eq!(
        pod.image_pull_secrets
            .iter()
            .flatten()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>(),
        ["regcred"]
    );
    assert_eq!(
        pod.tolerations.as_deref(),
        Some(
            &[Toleration {
                key: Some("dedicated".into()),
                operator: Some("Equal".into()),
                value: Some("network".into()),
                effect: Some("NoSchedule".into()),
                ..Default::default()
            }][..]
        )
    );
    let selector = pod.node_selector.as_ref().expect("nodeSelector");
    assert_eq!(
        selector.get("lb.example.com/enabled").map(String::as_str),
        Some("true")
    );
    assert!(pod
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .is_some());
    assert!(pod.volumes.iter().flatten().any(|v| v.name == "kubeconfig"
        && v.secret.as_ref().and_then(|s| s.secret_name.as_deref()) == Some("lb-kubeconfig")));

    let c = r.agent();
    assert_eq!(
        c.image.as_deref(),
        Some("registry.example.com/net/lb-agent:v9.9.9-test")
    );
    assert_eq!(c.image_pull_policy.as_deref(), Some("Always"));
    assert_eq!(
        c.args.clone().unwrap_or_default(),
        s(&[
            "--node-name=$(NODE_NAME)",
            "--kubeconfig=/etc/lb/kubeconfig",
            "--uplink=eth0",
            "--uplink=bond0.100",
            "--pod-iface-pattern=^(veth|gke)",
            "--bpffs=/sys/fs/bpf/lb-test",
            "--nodeport-addresses=192.0.2.0/24,198.51.100.0/25",
            "--healthz-bind-address=[::]:20256",
            "--metrics-bind-address=0.0.0.0:20249",
            "--conntrack-tcp-timeout-established=12h",
            "--conntrack-tcp-timeout-close-wait=1h",
            "--conntrack-tcp-transient-timeout=90s",
            "--conntrack-udp-timeout=45s",
            "--conntrack-udp-timeout-stream=120s",
            "--conntrack-gc-interval=15s",
            "--snat-port-range=10000-29999",
            "--sync-period=5m",
            "--poll-interval=2s",
            "--log-level=debug",
            "--cluster-cidr=10.244.0.0/16",
            "--hairpin-address=169.254.1.1",
            "--monitor",
            "--datapath-debug-log",
            "--max-conntrack=1048576",
            "--max-frontends=65536",
            "--cgroup-path=/run/lb/cgroupv2/unified",
            "--some-future-flag=1",
        ])
    );
    assert_eq!(
        env_value(c, "KUBERNETES_SERVICE_HOST").as_deref(),
        Some("192.0.2.10")
    );
    assert_eq!(
        env_value(c, "KUBERNETES_SERVICE_PORT").as_deref(),
        Some("8443")
    );
    assert_eq!(
        env_value(c, "RUST_LOG").as_deref(),
        Some("lb_userspace=trace,info")
    );
    assert!(c
        .volume_mounts
        .iter()
        .flatten()
        .any(|m| m.name == "kubeconfig" && m.mount_path == "/etc/lb"));
    let metrics = c
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some("metrics"))
        .expect("metrics port");
    assert_eq!(metrics.container_port, 20249);
    let res = c.resources.as_ref().expect("resources");
    assert_eq!(
        res.requests
            .as_ref()
            .and_then(|r| r.get("cpu"))
            .map(|q| q.0.as_str()),
        Some("250m")
    );
    assert_eq!(
        res.limits
            .as_ref()
            .and_then(|r| r.get("memory"))
            .map(|q| q.0.as_str()),
        Some("1Gi")
    );
    let live = c.liveness_probe.as_ref().unwrap();
    assert_eq!(
        (
            live.initial_delay_seconds,
            live.period_seconds,
            live.timeout_seconds,
            live.failure_threshold
        ),
        (Some(20), Some(15), Some(2), Some(4))
    );
    let ready = c.readiness_probe.as_ref().unwrap();
    assert_eq!(
        (
            ready.initial_delay_seconds,
            ready.period_seconds,
            ready.timeout_seconds,
            ready.failure_threshold
        ),
        (Some(1), Some(7), Some(1), Some(2))
    );
}

/// A scratch directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let p = std::env::temp_dir().join(format!("lb-chart-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).expect("creating a temp dir");
        TempDir(p)
    }
    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).expect("writing a temp file");
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn service_account_name_is_wired_everywhere() {
    let tmp = TempDir::new("sa");
    let values = tmp.write(
        "values.yaml",
        "serviceAccount:\n  name: lb-sa-custom\nagent:\n  healthz:\n    bindAddress: 127.0.0.1\n",
    );
    let r = render_release(Some(&values));
    assert_eq!(r.service_accounts.len(), 1);
    assert_eq!(
        r.service_accounts[0].metadata.name.as_deref(),
        Some("lb-sa-custom")
    );
    assert_eq!(
        r.pod().service_account_name.as_deref(),
        Some("lb-sa-custom")
    );
    let subjects = r.bindings[0].subjects.as_deref().unwrap_or_default();
    assert_eq!(
        subjects
            .iter()
            .map(|s| (s.kind.as_str(), s.name.as_str(), s.namespace.as_deref()))
            .collect::<Vec<_>>(),
        [("ServiceAccount", "lb-sa-custom", Some(NAMESPACE))]
    );
    // healthz on loopback: the kubelet must probe that address, not the node's.
    let c = r.agent();
    for p in [&c.liveness_probe, &c.readiness_probe] {
        let get = p.as_ref().and_then(|p| p.http_get.as_ref()).unwrap();
        assert_eq!(get.host.as_deref(), Some("127.0.0.1"));
    }
}

/// agent.socketLB=false: `--no-socket-lb`, and the host's cgroup hierarchy
/// is not mounted (nor is agent.cgroupPath passed).
#[test]
fn socket_lb_off_mounts_no_cgroup() {
    let tmp = TempDir::new("socketlb");
    let values = tmp.write(
        "values.yaml",
        "agent:\n  socketLB: false\n  cgroupPath: /sys/fs/cgroup/unified\n",
    );
    let r = render_release(Some(&values));
    assert_node_agent_basics(&r, "/sys/fs/bpf", None, 10256);
    let args = r.agent().args.clone().unwrap_or_default();
    assert!(
        !args.iter().any(|a| a.starts_with("--cgroup-path")),
        "{args:?}"
    );
}

/// #9 item 4/5: every conntrack lifetime value and the SNAT port range
/// become the agent's flags (kube-proxy's names where it has them).
#[test]
fn conntrack_lifetimes_and_snat_port_range_become_flags() {
    let tmp = TempDir::new("conntrack");
    let values = tmp.write(
        "values.yaml",
        "agent:\n  snatPortRange: 40000-49999\n  conntrack:\n    tcpEstablishedTimeout: 2h\n    \
         tcpCloseWaitTimeout: 30m\n    tcpSynSentTimeout: 11s\n    tcpSynRecvTimeout: 12s\n    \
         tcpFinWaitTimeout: 13s\n    tcpTimeWaitTimeout: 14s\n    tcpCloseTimeout: 15s\n    \
         tcpTransientTimeout: 16s\n    udpTimeout: 17s\n    udpStreamTimeout: 18s\n    \
         gcInterval: 19s\n",
    );
    let r = render_release(Some(&values));
    let args = r.agent().args.clone().unwrap_or_default();
    let ct: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| a.starts_with("--conntrack-") || a.starts_with("--snat-"))
        .collect();
    assert_eq!(
        ct,
        [
            "--conntrack-tcp-timeout-established=2h",
            "--conntrack-tcp-timeout-close-wait=30m",
            "--conntrack-tcp-timeout-syn-sent=11s",
            "--conntrack-tcp-timeout-syn-recv=12s",
            "--conntrack-tcp-timeout-fin-wait=13s",
            "--conntrack-tcp-timeout-time-wait=14s",
            "--conntrack-tcp-timeout-close=15s",
            "--conntrack-tcp-transient-timeout=16s",
            "--conntrack-udp-timeout=17s",
            "--conntrack-udp-timeout-stream=18s",
            "--conntrack-gc-interval=19s",
            "--snat-port-range=40000-49999",
        ]
    );
}

#[test]
fn values_that_would_break_the_agent_are_refused() {
    let tmp = TempDir::new("refuse");
    let cases = [
        // Pins outside the host's bpffs would die with the container.
        ("agent:\n  bpffs: /var/run/lb\n", "hostPaths.bpffs"),
        // Granting the role to the namespace's default account.
        (
            "serviceAccount:\n  create: false\nrbac:\n  create: true\n",
            "serviceAccount.name",
        ),
        (
            "agent:\n  healthz:\n    port: 70000\n",
            "between 1 and 65535",
        ),
        // Socket LB on a cgroup directory the container does not have.
        ("agent:\n  cgroupPath: /run/elsewhere\n", "hostPaths.cgroup"),
    ];
    for (i, (yaml, want)) in cases.iter().enumerate() {
        let values = tmp.write(&format!("v{i}.yaml"), yaml);
        match render(&chart_dir(), Some(&values)) {
            Ok(_) => panic!("rendering with {yaml:?} should fail"),
            Err(e) => assert!(e.contains(want), "error for {yaml:?} names {want:?}: {e}"),
        }
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), &dest).unwrap();
        }
    }
}

/// The lint step can fail: a copy of the chart with a broken template is
/// reported with an error, and does not render.
#[test]
fn lint_catches_a_broken_template() {
    let tmp = TempDir::new("broken");
    let chart = tmp.0.join("lb-agent");
    copy_dir(&chart_dir(), &chart);
    let ds = chart.join("templates/daemonset.yaml");
    let text = std::fs::read_to_string(&ds).unwrap();
    std::fs::write(
        &ds,
        text.replace(
            "{{ .Values.image.pullPolicy }}",
            "{{ .Values.image.pullPolicy",
        ),
    )
    .unwrap();
    let findings = lint(&chart, None);
    assert!(
        findings
            .iter()
            .any(|(sev, msg)| *sev == 3 && msg.contains("daemonset.yaml")),
        "lint reports the broken template: {findings:#?}"
    );
    assert!(render(&chart, None).is_err());
}

/// The round-trip check is what catches misspelled fields: make sure it does.
#[test]
fn typed_round_trip_detects_unknown_fields() {
    let objects = render(&chart_dir(), None).expect("render");
    let (_, ds) = objects
        .iter()
        .find(|(_, v)| v["kind"] == "DaemonSet")
        .expect("a DaemonSet");
    typed::<DaemonSet>(ds).expect("the rendered DaemonSet is clean");

    let mut typo = ds.clone();
    let pod = typo["spec"]["template"]["spec"].as_object_mut().unwrap();
    let host_network = pod.remove("hostNetwork").unwrap();
    pod.insert("hostNetwrok".into(), host_network);
    let err = typed::<DaemonSet>(&typo).unwrap_err();
    assert!(err.contains(".spec.template.spec.hostNetwrok"), "{err}");

    let mut misplaced = ds.clone();
    misplaced["spec"]["template"]["spec"]["containers"][0]["privileged"] = Value::Bool(true);
    let err = typed::<DaemonSet>(&misplaced).unwrap_err();
    assert!(err.contains("containers[0].privileged"), "{err}");
}

/// The cleanup DaemonSet the chart's README tells operators to apply after
/// `helm uninstall`.
#[test]
fn cleanup_manifest_is_a_valid_daemonset() {
    let path = repo_root().join("charts/lb-agent-cleanup.yaml");
    let text = std::fs::read_to_string(&path).expect("charts/lb-agent-cleanup.yaml");
    let v: Value = serde_saphyr::from_str(&text).expect("YAML");
    let ds: DaemonSet = typed(&v).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let pod = ds.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true));
    let init = pod.init_containers.as_deref().unwrap_or_default();
    assert_eq!(init.len(), 1);
    let c = &init[0];
    let argv: Vec<String> = c
        .command
        .iter()
        .flatten()
        .chain(c.args.iter().flatten())
        .cloned()
        .collect();
    assert_eq!(
        argv,
        s(&["lb-agent", "--cleanup", "--bpffs=/sys/fs/bpf/lb"])
    );
    assert_eq!(
        c.security_context.as_ref().and_then(|s| s.privileged),
        Some(true)
    );
    let m = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == "/sys/fs/bpf")
        .expect("bpffs mount");
    let vol = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == m.name)
        .unwrap();
    assert_eq!(
        vol.host_path.as_ref().map(|h| h.path.as_str()),
        Some("/sys/fs/bpf")
    );
    assert_eq!(
        pod.tolerations.as_deref(),
        Some(
            &[Toleration {
                operator: Some("Exists".into()),
                ..Default::default()
            }][..]
        )
    );
}

/// The Dockerfile needs a registry (rust:1.95.0-bookworm), so it is not built
/// here: check its shape. The image it gives is built and run here by
/// `cargo xtask image` (tests/image.rs), whose Containerfile is the runtime
/// stage below (xtask/src/image.rs checks that).
#[test]
fn dockerfile_is_multi_stage_and_minimal() {
    let text = std::fs::read_to_string(repo_root().join("Dockerfile")).expect("Dockerfile");
    // Instructions, with continuation lines joined and comments dropped.
    let mut instructions: Vec<String> = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && cur.is_empty()) {
            continue;
        }
        match t.strip_suffix('\\') {
            Some(part) => {
                cur.push_str(part);
                cur.push(' ');
            }
            None => {
                cur.push_str(t);
                if !cur.trim().is_empty() {
                    instructions.push(cur.trim().to_string());
                }
                cur.clear();
            }
        }
    }
    let keyword = |i: &str| i.split_whitespace().next().unwrap_or("").to_uppercase();
    let stages: Vec<usize> = instructions
        .iter()
        .enumerate()
        .filter(|(_, i)| keyword(i) == "FROM")
        .map(|(n, _)| n)
        .collect();
    assert!(stages.len() >= 2, "multi-stage: {instructions:#?}");
    let builder = &instructions[stages[0]..stages[stages.len() - 1]];
    let runtime = &instructions[*stages.last().unwrap()..];

    assert!(
        builder[0].starts_with("FROM rust:1.95")
            && builder[0].to_lowercase().contains(" as builder"),
        "the build stage is rust:1.95, named builder: {}",
        builder[0]
    );
    let build_text = builder.join("\n");
    for want in [
        "rust-src",
        "bpf-linker",
        "LLVM_PREFIX",
        "x86_64-unknown-linux-musl",
        "cargo xtask image --context-only",
    ] {
        assert!(build_text.contains(want), "the build stage has {want}");
    }

    let from = &runtime[0];
    assert_eq!(from, "FROM scratch", "static binaries, no base image");
    let run_text = runtime.join("\n");
    for tool in [
        "cargo",
        "rustc",
        "rustup",
        "gcc",
        "clang",
        "llvm",
        "build-essential",
        "make",
        "bpf-linker",
    ] {
        for i in runtime.iter().filter(|i| keyword(i) == "RUN") {
            assert!(!i.contains(tool), "the runtime stage has no {tool}: {i}");
        }
    }
    assert!(
        runtime.iter().any(|i| keyword(i) == "COPY"
            && i.contains("--from=builder")
            && i.contains("target/image/rootfs/")),
        "the runtime stage copies the rootfs of `cargo xtask image` (lb-agent, lbctl, CA bundle) from the builder:\n{run_text}"
    );
    let entry = runtime
        .iter()
        .rev()
        .find(|i| keyword(i) == "ENTRYPOINT")
        .expect("an ENTRYPOINT");
    assert!(entry.contains("lb-agent"), "{entry}");
    assert!(
        entry.contains('['),
        "exec form (SIGTERM reaches the agent): {entry}"
    );

    let ignore = std::fs::read_to_string(repo_root().join(".dockerignore")).expect(".dockerignore");
    assert!(
        ignore
            .lines()
            .any(|l| l.trim().trim_matches('/') == "target"),
        ".dockerignore leaves out target/"
    );
}

/// The chart README's values table lists every value of values.yaml, with the
/// same default for every scalar and empty one.
#[test]
fn readme_documents_every_value() {
    let values: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(chart_dir().join("values.yaml")).expect("values.yaml"),
    )
    .expect("values.yaml is YAML");
    let readme = std::fs::read_to_string(chart_dir().join("README.md")).expect("README.md");
    // key -> default cell, from rows like "| `key` | `default` | ... |".
    let rows: BTreeMap<String, String> = readme
        .lines()
        .filter_map(|l| {
            let l = l.replace("\\|", "\u{1}");
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let key = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
            let default = cells.get(2)?.trim_matches('`').replace('\u{1}', "|");
            Some((key.to_string(), default))
        })
        .collect();

    fn walk(path: &str, v: &Value, rows: &BTreeMap<String, String>, problems: &mut Vec<String>) {
        if let Some(default) = rows.get(path) {
            let want = match v {
                Value::String(s) if s.is_empty() => Some("\"\"".to_string()),
                Value::String(s) => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                Value::Bool(b) => Some(b.to_string()),
                Value::Array(a) if a.is_empty() => Some("[]".to_string()),
                Value::Object(m) if m.is_empty() => Some("{}".to_string()),
                _ => None, // a compound default, written out by hand
            };
            if let Some(want) = want {
                if *default != want {
                    problems.push(format!("{path}: README says {default}, values.yaml {want}"));
                }
            }
            return;
        }
        match v {
            Value::Object(m) if !m.is_empty() => {
                for (k, child) in m {
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    walk(&p, child, rows, problems);
                }
            }
            _ => problems.push(format!("{path}: not in the README's values table")),
        }
    }
    let mut problems = Vec::new();
    walk("", &values, &rows, &mut problems);
    assert!(problems.is_empty(), "{problems:#?}");
}

/// agent.tcAttach becomes `--tc-attach` right after `--bpffs`; empty (the
/// default) leaves it out (the agent's own default, auto); anything but
/// auto, tcx or netlink is refused at render time.
#[test]
fn tc_attach_value_becomes_the_flag_and_bad_values_are_refused() {
    let default_args = render_release(None)
        .agent()
        .args
        .clone()
        .unwrap_or_default();
    assert!(
        !default_args.iter().any(|a| a.starts_with("--tc-attach")),
        "{default_args:?}"
    );
    let tmp = TempDir::new("tcattach");
    for mode in ["auto", "tcx", "netlink"] {
        let values = tmp.write(
            &format!("{mode}.yaml"),
            &format!("agent:\n  tcAttach: {mode}\n"),
        );
        let r = render_release(Some(&values));
        let args = r.agent().args.clone().unwrap_or_default();
        let at = args
            .iter()
            .position(|a| a.starts_with("--bpffs="))
            .expect("--bpffs");
        assert_eq!(
            args.get(at + 1).map(String::as_str),
            Some(format!("--tc-attach={mode}").as_str()),
            "{args:?}"
        );
    }
    let values = tmp.write("bad.yaml", "agent:\n  tcAttach: clsact\n");
    match render(&chart_dir(), Some(&values)) {
        Ok(_) => panic!("agent.tcAttach=clsact should be refused"),
        Err(e) => assert!(e.contains("agent.tcAttach"), "{e}"),
    }
}

/// The cleanup DaemonSet undoes what the chart's agent does on a node: the
/// same image, the same pin directory (`--cleanup --bpffs` = the agent's
/// `--bpffs`) on the same host bpffs, and the node's network namespace
/// (hostNetwork: clsact filters and qdiscs are found on the node's
/// interfaces), privileged as root.
#[test]
fn cleanup_manifest_matches_what_the_chart_runs() {
    let r = render_release(None);
    let agent = r.agent();
    let agent_bpffs = agent
        .args
        .iter()
        .flatten()
        .find(|a| a.starts_with("--bpffs="))
        .cloned()
        .expect("the agent's --bpffs");
    let agent_mount = agent
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == "bpffs")
        .expect("the agent's bpffs mount");

    let path = repo_root().join("charts/lb-agent-cleanup.yaml");
    let text = std::fs::read_to_string(&path).expect("charts/lb-agent-cleanup.yaml");
    let v: Value = serde_saphyr::from_str(&text).expect("YAML");
    let ds: DaemonSet = typed(&v).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let pod = ds.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.host_network, r.pod().host_network);
    assert_eq!(pod.host_network, Some(true));
    let c = &pod.init_containers.as_deref().unwrap_or_default()[0];
    assert_eq!(c.image, agent.image, "the chart's image (set both alike)");
    let args: Vec<&str> = c.args.iter().flatten().map(String::as_str).collect();
    assert!(args.contains(&"--cleanup"), "{args:?}");
    assert!(
        args.contains(&agent_bpffs.as_str()),
        "{args:?} vs {agent_bpffs}"
    );
    let sc = c.security_context.as_ref().expect("securityContext");
    assert_eq!((sc.privileged, sc.run_as_user), (Some(true), Some(0)));
    let m = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == agent_mount.mount_path)
        .expect("the host bpffs, where the agent mounts it");
    assert_eq!(m.mount_propagation, agent_mount.mount_propagation);
    let host_path = |p: &PodSpec, name: &str| {
        p.volumes
            .iter()
            .flatten()
            .find(|v| v.name == name)
            .and_then(|v| v.host_path.as_ref())
            .map(|h| h.path.clone())
    };
    assert_eq!(
        host_path(&pod, &m.name),
        host_path(r.pod(), &agent_mount.name)
    );
}
