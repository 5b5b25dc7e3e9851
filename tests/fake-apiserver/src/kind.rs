//! The resource types the fake serves, and how URLs, `apiVersion`/`kind` and
//! Status messages name them.

/// The resource types the fake serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResourceKind {
    /// core/v1 Service (namespaced).
    Service,
    /// discovery.k8s.io/v1 EndpointSlice (namespaced).
    EndpointSlice,
    /// core/v1 Node (cluster-scoped).
    Node,
    /// core/v1 Event (namespaced).
    CoreEvent,
    /// events.k8s.io/v1 Event (namespaced; what kube's `Recorder` writes).
    Event,
}

impl ResourceKind {
    pub const ALL: [ResourceKind; 5] = [
        ResourceKind::Service,
        ResourceKind::EndpointSlice,
        ResourceKind::Node,
        ResourceKind::CoreEvent,
        ResourceKind::Event,
    ];

    /// API group ("" for core).
    pub fn group(self) -> &'static str {
        match self {
            ResourceKind::Service | ResourceKind::Node | ResourceKind::CoreEvent => "",
            ResourceKind::EndpointSlice => "discovery.k8s.io",
            ResourceKind::Event => "events.k8s.io",
        }
    }

    /// `apiVersion` of objects of this kind.
    pub fn api_version(self) -> &'static str {
        match self {
            ResourceKind::Service | ResourceKind::Node | ResourceKind::CoreEvent => "v1",
            ResourceKind::EndpointSlice => "discovery.k8s.io/v1",
            ResourceKind::Event => "events.k8s.io/v1",
        }
    }

    /// `kind` of objects of this kind.
    pub fn kind(self) -> &'static str {
        match self {
            ResourceKind::Service => "Service",
            ResourceKind::EndpointSlice => "EndpointSlice",
            ResourceKind::Node => "Node",
            ResourceKind::CoreEvent | ResourceKind::Event => "Event",
        }
    }

    /// The resource name in URLs.
    pub fn plural(self) -> &'static str {
        match self {
            ResourceKind::Service => "services",
            ResourceKind::EndpointSlice => "endpointslices",
            ResourceKind::Node => "nodes",
            ResourceKind::CoreEvent | ResourceKind::Event => "events",
        }
    }

    pub fn namespaced(self) -> bool {
        self != ResourceKind::Node
    }

    /// The kind from an object's `apiVersion` and `kind`.
    pub fn from_type(api_version: &str, kind: &str) -> Option<ResourceKind> {
        ResourceKind::ALL
            .into_iter()
            .find(|k| k.api_version() == api_version && k.kind() == kind)
    }

    pub(crate) fn from_path(group: &str, version: &str, plural: &str) -> Option<ResourceKind> {
        ResourceKind::ALL
            .into_iter()
            .find(|k| k.group() == group && version == "v1" && k.plural() == plural)
    }

    /// `services`, `endpointslices.discovery.k8s.io`: how Status messages name it.
    pub(crate) fn qualified(self) -> String {
        if self.group().is_empty() {
            self.plural().to_string()
        } else {
            format!("{}.{}", self.plural(), self.group())
        }
    }

    pub(crate) fn list_kind(self) -> String {
        format!("{}List", self.kind())
    }
}
