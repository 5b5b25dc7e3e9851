//! Kubernetes Events about objects the agent cannot program (cluster mode).

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use lb_core::model::{ObjectKind, ObjectRef};
use tracing::debug;

/// Publishes Warning Events (`reason: LbRejected`). Each in its own task: a
/// slow or failing API server never holds up programming.
#[derive(Clone)]
pub struct EventSink {
    recorder: Recorder,
}

impl EventSink {
    pub fn new(client: kube::Client, node_name: &str) -> Self {
        Self {
            recorder: Recorder::new(
                client,
                Reporter {
                    controller: "lb-agent".into(),
                    instance: Some(node_name.to_string()),
                },
            ),
        }
    }

    pub fn warn(&self, kind: ObjectKind, object: &ObjectRef, note: &str) {
        let reference = ObjectReference {
            api_version: Some(kind.api_version().into()),
            kind: Some(kind.as_str().into()),
            namespace: Some(object.namespace.clone()),
            name: Some(object.name.clone()),
            uid: object.uid.clone(),
            resource_version: object.resource_version.clone(),
            ..ObjectReference::default()
        };
        let recorder = self.recorder.clone();
        // The API server limits an Event's note to 1 kB.
        let note: String = note.chars().take(1000).collect();
        tokio::spawn(async move {
            let ev = Event {
                type_: EventType::Warning,
                reason: "LbRejected".into(),
                note: Some(note),
                action: "Program".into(),
                secondary: None,
            };
            if let Err(e) = recorder.publish(&ev, &reference).await {
                debug!(error = %e, "could not publish an Event");
            }
        });
    }
}
