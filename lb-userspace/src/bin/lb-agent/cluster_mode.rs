//! Cluster mode: watch the API server (kube-rs) and program each event's
//! Service alone; initial lists and relists are diffed as a whole.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::Client;
use lb_userspace::cluster::{Changes, ClusterCache};
use lb_userspace::health::ServiceHealthServers;
use lb_userspace::model::{NodeContext, ObjectError};
use lb_userspace::sync::SyncError;
use lb_userspace::watch::{self, Contact, InitBuffers, Update};
use std::collections::BTreeSet;
use tokio::signal::unix::Signal;
use tokio::sync::Notify;
use tracing::{debug, error, info, warn};

use crate::node::{NodeAgent, Ticks};

pub struct ClusterSettings {
    pub client: Client,
    pub node_name: String,
    pub watch_timeout: Duration,
}

/// Publishes a Warning Event on an object the agent cannot program. Runs in
/// its own task: a slow or failing API server never holds up programming.
fn publish_warning(recorder: &Recorder, reference: ObjectReference, err: &ObjectError) {
    publish_note(recorder, reference, err.to_string());
}

fn publish_note(recorder: &Recorder, reference: ObjectReference, note: String) {
    let recorder = recorder.clone();
    tokio::spawn(async move {
        let ev = KubeEvent {
            type_: EventType::Warning,
            reason: "LbRejected".into(),
            note: Some(note.chars().take(1000).collect()),
            action: "Program".into(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&ev, &reference).await {
            debug!(error = %e, "could not publish an Event");
        }
    });
}

#[allow(clippy::too_many_arguments)]
pub async fn run(
    mut node: NodeAgent,
    settings: ClusterSettings,
    health_servers: ServiceHealthServers,
    mut ticks: Ticks,
    changed: Arc<Notify>,
    mut term: Signal,
    mut int: Signal,
) -> Result<()> {
    let recorder = Recorder::new(
        settings.client.clone(),
        Reporter {
            controller: "lb-agent".into(),
            instance: Some(settings.node_name.clone()),
        },
    );
    let (mut updates, _watchers) = watch::spawn_watchers(
        settings.client.clone(),
        &settings.node_name,
        settings.watch_timeout,
    );
    let mut cache = ClusterCache::new(NodeContext::new(settings.node_name.clone(), None));
    let mut bufs = InitBuffers::default();
    let mut connected = false;
    let mut pending_full = true;
    // Planner errors already published as Events.
    let mut reported: BTreeSet<String> = BTreeSet::new();
    // When the oldest change not yet programmed was seen.
    let mut pending_since: Option<Instant> = None;
    node.metrics.set_apiserver_connected(false);
    loop {
        let mut got_updates = false;
        tokio::select! {
            u = updates.recv() => {
                let Some(u) = u else { anyhow::bail!("the watchers stopped") };
                let seen = Instant::now();
                let mut batch = vec![u];
                // Take whatever else is already queued: one plan per burst.
                while batch.len() < 4096 {
                    match updates.try_recv() {
                        Ok(u) => batch.push(u),
                        Err(_) => break,
                    }
                }
                for u in batch {
                    let failed = matches!(u, Update::Failed { .. });
                    // A1: /healthz turns 503 while this node is being deleted.
                    if let Update::Node(
                        kube::runtime::watcher::Event::Apply(n)
                        | kube::runtime::watcher::Event::InitApply(n),
                    ) = &u
                    {
                        node.health.sync_node(n);
                    }
                    let contact = watch::apply_update(&mut cache, &mut bufs, u);
                    let now_connected = contact == Contact::Ok;
                    if now_connected != connected {
                        connected = now_connected;
                        node.metrics.set_apiserver_connected(connected);
                        if connected {
                            info!("API server reachable");
                        }
                    }
                    if !failed {
                        got_updates = true;
                    }
                }
                if got_updates {
                    pending_since.get_or_insert(seen);
                    node.health.queued_update();
                }
            }
            _ = ticks.poll.tick() => {}
            _ = changed.notified() => debug!("netlink change"),
            _ = ticks.gc.tick() => { node.collect_conntrack(); continue; }
            _ = ticks.refresh.tick() => {
                node.refresh_metrics();
                // Nothing pending and in contact: record a (no-op) sync, as
                // kube-proxy's periodic sync does, so lastUpdated advances.
                if connected && pending_since.is_none() && bufs.synced() {
                    node.health.updated();
                }
                continue;
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
        match node.reconcile_interfaces() {
            Ok(true) => {
                if let Err(e) = node.apply_node_addrs() {
                    error!(
                        error = format!("{e:#}"),
                        "NodePort address sync failed; will retry"
                    );
                }
            }
            Ok(false) => {}
            Err(e) => error!(
                error = format!("{e:#}"),
                "interface sync failed; will retry"
            ),
        }
        if !bufs.synced() {
            continue; // never program from half a picture
        }
        let t_model = Instant::now();
        let changes = cache.take_changes_for_plan();
        let model_time = t_model.elapsed();
        if changes.is_empty() && !pending_full {
            if pending_since.take().is_some() {
                // Events that changed nothing count as programmed.
                node.health.updated();
            }
            continue;
        }
        report_errors(&node, &recorder, &changes);
        let started = pending_since.take().unwrap_or_else(Instant::now);
        let full = changes.full || pending_full;
        let result = node.resync_if_needed().and_then(|()| {
            let (plan, scope) = if full {
                let t_plan = Instant::now();
                let p = node
                    .sync
                    .plan_full_ports(cache.desired_ports(), &node.node_addrs)
                    .context("planning")?;
                info!(
                    services = cache.service_count(),
                    slices = cache.slice_count(),
                    since_seen_ms = started.elapsed().as_secs_f64() * 1e3,
                    model_ms = model_time.as_secs_f64() * 1e3,
                    plan_ms = t_plan.elapsed().as_secs_f64() * 1e3,
                    "full diff planned"
                );
                (p, "full")
            } else {
                (
                    node.sync.plan_ports(&changes.ports).context("planning")?,
                    "ports",
                )
            };
            let errors = plan.errors.clone();
            let n = node.apply(plan, started, scope)?;
            report_plan_errors(&node, &recorder, &cache, &errors, &mut reported, full);
            Ok(n)
        });
        match result {
            Ok(_) => {
                pending_full = false;
                for e in health_servers.sync(&cache.health_checks()).await {
                    warn!("{e}");
                }
            }
            Err(e) => {
                // Whatever the failed plan covered is redone as a full diff.
                pending_full = true;
                pending_since.get_or_insert(started);
                error!(error = format!("{e:#}"), "map sync failed; will retry");
            }
        }
    }
    Ok(())
}

/// The planner's rejections (a frontend already taken, more backends than a
/// map holds) get a Warning Event on their Service, once while they last.
fn report_plan_errors(
    node: &NodeAgent,
    recorder: &Recorder,
    cache: &ClusterCache,
    errors: &[SyncError],
    reported: &mut BTreeSet<String>,
    full: bool,
) {
    let now: BTreeSet<String> = errors.iter().map(ToString::to_string).collect();
    for e in errors {
        let text = e.to_string();
        if reported.contains(&text) {
            continue;
        }
        let Some((ns, name)) = e.service_ref() else {
            continue;
        };
        node.metrics.inc_rejected_object("Service");
        if let Some(reference) = cache.service_reference(&ns, &name) {
            publish_note(recorder, reference, text.clone());
        }
    }
    if full {
        // A full plan sees every error that still holds.
        *reported = now;
    } else {
        reported.extend(now);
    }
}

fn report_errors(node: &NodeAgent, recorder: &Recorder, changes: &Changes) {
    for (reference, err) in &changes.new_errors {
        warn!(object = %format!("{}/{}", reference.namespace.as_deref().unwrap_or(""), reference.name.as_deref().unwrap_or("")), "{err}");
        node.metrics
            .inc_rejected_object(reference.kind.as_deref().unwrap_or("unknown"));
        publish_warning(recorder, reference.clone(), err);
    }
}
