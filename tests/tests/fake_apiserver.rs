//! The fake apiserver (crate `fake-apiserver`) speaks the protocol kube-rs
//! expects: every case drives it with the real `kube::Client` (built from the
//! kubeconfig the fake writes) and `kube::runtime::watcher`, client and server
//! both inside a fresh private network namespace with only loopback up.

use std::future::Future;
use std::net::{Ipv4Addr, TcpListener};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fake_apiserver::{FakeApiServer, ResourceKind};
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, ObjectReference, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::{Client, Config, Resource, ResourceExt};
use lb_tests::netns::{bind_in_netns, in_named_netns, in_private_netns, NamedNetns};
use lb_tests::objects::{self, ServicePort};
use lb_tests::{require_privileges, test_name};
use serde_json::{json, Value};

/// SEMANTICS W1.
const W1: &str = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";
const WAIT: Duration = Duration::from_secs(10);

/// Runs `f` against a fresh fake apiserver and a kube client from its
/// kubeconfig, both in a new private network namespace (test traffic never
/// leaves it), on a current-thread runtime, bounded to 40 s. `name` (the
/// test's) names its temp directory and a timeout.
fn run<F, Fut>(name: &str, f: F)
where
    F: FnOnce(Arc<FakeApiServer>, Client) -> Fut + Send,
    Fut: Future<Output = ()>,
{
    in_private_netns(|| {
        let server = Arc::new(FakeApiServer::start(
            TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"),
        ));
        let dir =
            std::env::temp_dir().join(format!("lb-fake-apiserver-{}-{name}", std::process::id()));
        let path = server.write_kubeconfig(&dir);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let kubeconfig = Kubeconfig::read_from(&path).expect("kubeconfig parses");
            let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .expect("kube config from the kubeconfig");
            assert!(config.cluster_url.to_string().starts_with(&server.url()));
            let client = Client::try_from(config).expect("kube client");
            tokio::time::timeout(Duration::from_secs(40), f(server.clone(), client))
                .await
                .unwrap_or_else(|_| panic!("{name}: timed out"));
        });
        drop(rt);
        let _ = std::fs::remove_dir_all(&dir);
    });
}

/// Service `ns/name` at 10.96.0.10, port 80, with `labels` (the watches
/// here select on them: [`W1`]).
fn svc(ns: &str, name: &str, labels: &[(&str, &str)]) -> Service {
    let mut b = objects::service(name, Ipv4Addr::new(10, 96, 0, 10))
        .namespace(ns)
        .port(ServicePort::tcp("http", 80, 80));
    for (k, v) in labels {
        b = b.label(k, v);
    }
    b.build()
}

fn node(name: &str, labels: &[(&str, &str)]) -> Node {
    let mut b = objects::node(name);
    for (k, v) in labels {
        b = b.label(k, v);
    }
    b.build()
}

/// A short name for a watcher event: `Init`, `InitApply(ns/name)`, `Apply(..)`.
fn show<K: Resource>(e: &watcher::Event<K>) -> String {
    let id = |o: &K| match o.meta().namespace.as_deref() {
        Some(ns) => format!("{ns}/{}", o.meta().name.as_deref().unwrap_or("")),
        None => o.meta().name.clone().unwrap_or_default(),
    };
    match e {
        watcher::Event::Init => "Init".into(),
        watcher::Event::InitApply(o) => format!("InitApply({})", id(o)),
        watcher::Event::InitDone => "InitDone".into(),
        watcher::Event::Apply(o) => format!("Apply({})", id(o)),
        watcher::Event::Delete(o) => format!("Delete({})", id(o)),
    }
}

/// The next successful watcher event (errors are skipped and counted).
async fn next_ok<K, S>(s: &mut S, errors: &mut usize) -> watcher::Event<K>
where
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Unpin,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, s.next()).await {
            Err(_) => panic!("no watcher event within {WAIT:?}"),
            Ok(None) => panic!("watcher stream ended"),
            Ok(Some(Ok(e))) => return e,
            Ok(Some(Err(e))) => {
                eprintln!("watcher error (expected in some cases): {e}");
                *errors += 1;
            }
        }
    }
}

/// Reads one whole initial list: `Init`, the `InitApply`s (sorted), `InitDone`.
async fn init_list<K: Resource, S>(s: &mut S, errors: &mut usize) -> Vec<String>
where
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Unpin,
{
    let first = next_ok(s, errors).await;
    assert_eq!(show(&first), "Init");
    let mut applied = Vec::new();
    loop {
        let e = next_ok(s, errors).await;
        match e {
            watcher::Event::InitApply(_) => applied.push(show(&e)),
            watcher::Event::InitDone => break,
            other => panic!("unexpected during the initial list: {}", show(&other)),
        }
    }
    applied.sort();
    applied
}

/// Polls the watcher for `d` and asserts it yields nothing (it still runs:
/// bookmarks and re-watches happen inside).
async fn quiet<K: Resource, S>(s: &mut S, d: Duration)
where
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Unpin,
{
    if let Ok(Some(Ok(e))) = tokio::time::timeout(d, s.next()).await {
        panic!("unexpected watcher event {}", show(&e));
    }
}

fn names(list: &[Service]) -> Vec<String> {
    list.iter()
        .map(|s| format!("{}/{}", s.namespace().unwrap_or_default(), s.name_any()))
        .collect()
}

#[test]
fn list_with_selectors_get_and_discovery() {
    require_privileges!();
    run(test_name!(), |server, client| async move {
        // A typed k8s-openapi object, JSON and YAML all go in.
        let typed = objects::service("web", Ipv4Addr::new(10, 96, 0, 20))
            .port(ServicePort::tcp("http", 80, 8080))
            .build();
        let stored = server.apply(&typed);
        assert_eq!(stored["metadata"]["generation"], 1);
        assert!(stored["metadata"]["uid"]
            .as_str()
            .is_some_and(|u| u.len() == 36));
        server.apply(&json!({
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {
                    "name": "proxied",
                    "namespace": "default",
                    "labels": {"service.kubernetes.io/service-proxy-name": "other-proxy"},
                },
                "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]},
            }));
        server.apply(&svc(
            "default",
            "headless",
            &[("service.kubernetes.io/headless", "")],
        ));
        server.apply_yaml(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: dns\n  namespace: kube-system\n  labels:\n    k8s-app: kube-dns\nspec:\n  clusterIP: 10.96.0.10\n---\n",
        );

        let all: Api<Service> = Api::all(client.clone());
        let list = all.list(&ListParams::default().labels(W1)).await.unwrap();
        assert_eq!(names(&list.items), ["default/web", "kube-system/dns"]);
        assert_eq!(
            list.metadata.resource_version,
            Some(server.resource_version().to_string())
        );
        let every = all.list(&ListParams::default()).await.unwrap();
        assert_eq!(every.items.len(), 4);

        let default: Api<Service> = Api::namespaced(client.clone(), "default");
        let l = default
            .list(&ListParams::default().labels(W1))
            .await
            .unwrap();
        assert_eq!(names(&l.items), ["default/web"]);
        let l = default
            .list(&ListParams::default().labels("service.kubernetes.io/headless"))
            .await
            .unwrap();
        assert_eq!(names(&l.items), ["default/headless"]);
        let l = all
            .list(&ListParams::default().labels("k8s-app in (kube-dns, coredns)"))
            .await
            .unwrap();
        assert_eq!(names(&l.items), ["kube-system/dns"]);
        let l = all
            .list(&ListParams::default().fields("metadata.name=proxied"))
            .await
            .unwrap();
        assert_eq!(names(&l.items), ["default/proxied"]);
        let l = all
            .list(&ListParams::default().fields("metadata.namespace!=default"))
            .await
            .unwrap();
        assert_eq!(names(&l.items), ["kube-system/dns"]);
        assert_eq!(server.list_count(ResourceKind::Service), 7);

        // Bad selectors are 400s, as from kube-apiserver.
        let err = all
            .list(&ListParams::default().fields("spec.clusterIP=1.2.3.4"))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, kube::Error::Api(s) if s.code == 400 && s.reason == "BadRequest"),
            "{err:?}"
        );

        // Single GET, and a proper 404 Status.
        let web = default.get("web").await.unwrap();
        assert_eq!(web.spec.unwrap().cluster_ip.as_deref(), Some("10.96.0.20"));
        let err = default.get("nope").await.unwrap_err();
        assert!(
            matches!(&err, kube::Error::Api(s) if s.code == 404 && s.reason == "NotFound"
                && s.message == "services \"nope\" not found"),
            "{err:?}"
        );
        assert!(default.get_opt("nope").await.unwrap().is_none());

        // Discovery and version.
        let v = client.apiserver_version().await.unwrap();
        assert_eq!((v.major.as_str(), v.minor.as_str()), ("1", "33"));
        let groups = client.list_api_groups().await.unwrap();
        assert!(groups.groups.iter().any(|g| g.name == "discovery.k8s.io"));
        let core = client.list_core_api_versions().await.unwrap();
        assert_eq!(core.versions, ["v1"]);
        let res = client
            .list_api_group_resources("discovery.k8s.io/v1")
            .await
            .unwrap();
        assert!(res.resources.iter().any(|r| r.name == "endpointslices"));
        let err = client
            .request::<Value>(http_get("/apis/apps/v1/namespaces/default/deployments"))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, kube::Error::Api(s) if s.code == 404),
            "{err:?}"
        );

        // The same kubeconfig, merged the way KUBECONFIG is read.
        let dir = std::env::temp_dir().join(format!("lb-fake-kc-{}", std::process::id()));
        let path = server.write_kubeconfig(&dir);
        let merged = Kubeconfig::default()
            .merge(Kubeconfig::read_from(&path).unwrap())
            .unwrap();
        let config = Config::from_custom_kubeconfig(merged, &KubeConfigOptions::default())
            .await
            .unwrap();
        assert_eq!(config.default_namespace, "default");
        let again = Client::try_from(config).unwrap();
        assert_eq!(
            Api::<Service>::all(again)
                .list(&ListParams::default())
                .await
                .unwrap()
                .items
                .len(),
            4
        );
        let _ = std::fs::remove_dir_all(&dir);

        // Every request carried the kubeconfig's token (or it would be a 401).
        assert!(server
            .requests()
            .iter()
            .any(|r| r.starts_with("GET /api/v1/services?")));
    });
}

fn http_get(path: &str) -> hyper::Request<Vec<u8>> {
    hyper::Request::get(path).body(Vec::new()).unwrap()
}

#[test]
fn pagination_is_consistent() {
    require_privileges!();
    run(test_name!(), |server, client| async move {
        for i in 0..5 {
            server.apply(&svc("default", &format!("s{i}"), &[]));
        }
        let api: Api<Service> = Api::all(client.clone());
        let first = api.list(&ListParams::default().limit(2)).await.unwrap();
        assert_eq!(names(&first.items), ["default/s0", "default/s1"]);
        assert_eq!(first.metadata.remaining_item_count, Some(3));
        let token = first.metadata.continue_.clone().expect("a continue token");
        // Changes between pages do not show: pages are at the first page's RV.
        server.apply(&svc("default", "s5", &[]));
        server.delete(ResourceKind::Service, "default", "s3");
        let mut all = names(&first.items);
        let mut token = Some(token);
        let mut pages = 1;
        while let Some(t) = token {
            let page = api
                .list(&ListParams::default().limit(2).continue_token(&t))
                .await
                .unwrap();
            assert_eq!(
                page.metadata.resource_version,
                first.metadata.resource_version
            );
            all.extend(names(&page.items));
            token = page.metadata.continue_.filter(|c| !c.is_empty());
            pages += 1;
            assert!(pages <= 3);
        }
        assert_eq!(
            all,
            [
                "default/s0",
                "default/s1",
                "default/s2",
                "default/s3",
                "default/s4"
            ]
        );
        let now = api.list(&ListParams::default()).await.unwrap();
        assert_eq!(
            names(&now.items),
            [
                "default/s0",
                "default/s1",
                "default/s2",
                "default/s4",
                "default/s5"
            ]
        );

        // The watcher pages too (page_size 2 over 5 objects: 3 LISTs).
        let before = server.list_count(ResourceKind::Service);
        let mut errors = 0;
        let mut w = watcher(
            api.clone(),
            watcher::Config::default().labels(W1).page_size(2),
        )
        .boxed();
        let got = init_list(&mut w, &mut errors).await;
        assert_eq!(
            got,
            [
                "InitApply(default/s0)",
                "InitApply(default/s1)",
                "InitApply(default/s2)",
                "InitApply(default/s4)",
                "InitApply(default/s5)"
            ]
        );
        assert_eq!(server.list_count(ResourceKind::Service) - before, 3);
        assert!(server
            .requests()
            .iter()
            .any(|r| r.contains("limit=2") && r.contains("continue=")));

        // A continue token from before a compaction is 410 Expired.
        let first = api.list(&ListParams::default().limit(2)).await.unwrap();
        server.apply(&svc("default", "s6", &[]));
        server.compact();
        let err = api
            .list(
                &ListParams::default()
                    .limit(2)
                    .continue_token(first.metadata.continue_.as_deref().unwrap()),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(&err, kube::Error::Api(s) if s.code == 410 && s.reason == "Expired"),
            "{err:?}"
        );
        assert_eq!(errors, 0);
    });
}

#[test]
fn watcher_sees_init_apply_delete_and_selector_transitions() {
    require_privileges!();
    run(test_name!(), |server, client| async move {
        server.apply(&svc("default", "a", &[]));
        server.apply(&svc("kube-system", "b", &[]));
        server.apply(&svc(
            "default",
            "hl",
            &[("service.kubernetes.io/headless", "")],
        ));
        let api: Api<Service> = Api::all(client);
        let mut errors = 0;
        let mut w = watcher(api, watcher::Config::default().labels(W1)).boxed();
        assert_eq!(
            init_list(&mut w, &mut errors).await,
            ["InitApply(default/a)", "InitApply(kube-system/b)"]
        );
        let mut next = async || show(&next_ok(&mut w, &mut errors).await);

        server.apply(&svc("default", "c", &[]));
        assert_eq!(next().await, "Apply(default/c)");
        let mut a = svc("default", "a", &[]);
        a.spec.as_mut().unwrap().cluster_ip = Some("10.96.0.99".into());
        let stored = server.apply(&a);
        assert_eq!(stored["metadata"]["generation"], 2);
        assert_eq!(next().await, "Apply(default/a)");
        // An identical apply is a no-op: no event, same RV.
        let rv = server.resource_version();
        server.apply(&a);
        assert_eq!(server.resource_version(), rv);
        server.delete(ResourceKind::Service, "kube-system", "b");
        assert_eq!(next().await, "Delete(kube-system/b)");
        // Not selected: no event.
        server.apply(&svc(
            "default",
            "hl2",
            &[("service.kubernetes.io/headless", "")],
        ));
        server.apply(&node("n1", &[]));
        // Starts matching: ADDED; stops matching: DELETED (as kube-apiserver).
        server.apply(&svc("default", "hl", &[]));
        assert_eq!(next().await, "Apply(default/hl)");
        server.apply(&svc(
            "default",
            "a",
            &[("service.kubernetes.io/service-proxy-name", "other")],
        ));
        assert_eq!(next().await, "Delete(default/a)");
        server.apply(&svc("default", "a", &[]));
        assert_eq!(next().await, "Apply(default/a)");
        server.delete(ResourceKind::Service, "default", "hl2");
        server.delete(ResourceKind::Service, "default", "c");
        assert_eq!(next().await, "Delete(default/c)");
        assert_eq!(errors, 0);

        let watches: Vec<String> = server
            .requests()
            .into_iter()
            .filter(|r| r.contains("watch=true"))
            .collect();
        assert_eq!(watches.len(), 1, "{watches:?}");
        let w = &watches[0];
        assert!(w.starts_with("GET /api/v1/services?"), "{w}");
        for p in [
            "labelSelector=%21service.kubernetes.io%2Fservice-proxy-name%2C%21service.kubernetes.io%2Fheadless",
            "allowWatchBookmarks=true",
            "timeoutSeconds=290",
            "resourceVersion=",
        ] {
            assert!(w.contains(p), "{w} lacks {p}");
        }
    });
}

#[test]
fn watcher_recovers_after_disconnect_and_after_compaction() {
    require_privileges!();
    run(test_name!(), |server, client| async move {
        server.apply(&svc("default", "a", &[]));
        let api: Api<Service> = Api::all(client);
        let (reader, writer) = reflector::store();
        let mut w = reflector(writer, watcher(api, watcher::Config::default().labels(W1)))
            .default_backoff()
            .boxed();
        let mut errors = 0;
        assert_eq!(
            init_list(&mut w, &mut errors).await,
            ["InitApply(default/a)"]
        );
        quiet(&mut w, Duration::from_millis(200)).await;
        assert_eq!(server.open_watches(), 1);

        // A cut stream: the watcher re-watches from its RV; no relist.
        // (Client and test share one thread: the client cannot act between
        // these calls, so the change can only come through a new watch.)
        server.disconnect_watches();
        server.apply(&svc("default", "b", &[]));
        assert_eq!(
            show(&next_ok(&mut w, &mut errors).await),
            "Apply(default/b)"
        );
        assert_eq!(server.list_count(ResourceKind::Service), 1);
        assert_eq!(server.watch_count_of(ResourceKind::Service), 2);

        // Cut, changes, compaction: the re-watch's RV is too old, the server
        // sends a 410 ERROR event, the watcher relists.
        server.disconnect_watches();
        server.apply(&svc("default", "c", &[]));
        server.delete(ResourceKind::Service, "default", "a");
        server.compact();
        let relist = init_list(&mut w, &mut errors).await;
        assert_eq!(relist, ["InitApply(default/b)", "InitApply(default/c)"]);
        assert_eq!(errors, 1, "the 410 surfaces as one watcher error");
        assert_eq!(server.expired_watch_count(), 1);
        assert_eq!(server.list_count(ResourceKind::Service), 2);
        let mut state: Vec<String> = reader.state().iter().map(|s| s.name_any()).collect();
        state.sort();
        assert_eq!(state, ["b", "c"]);

        // And it keeps watching.
        server.apply(&svc("default", "d", &[]));
        assert_eq!(
            show(&next_ok(&mut w, &mut errors).await),
            "Apply(default/d)"
        );
        assert_eq!(reader.state().len(), 3);
    });
}

#[test]
fn bookmarks_are_sent_and_used() {
    require_privileges!();
    run(test_name!(), |server, client| async move {
        server.set_bookmark_interval(Some(Duration::from_millis(200)));
        server.apply(&svc("default", "a", &[]));
        let api: Api<Service> = Api::all(client.clone());

        // Raw watch from "0": synthetic ADDED, then periodic bookmarks.
        let mut raw = api
            .watch(&WatchParams::default().labels(W1).timeout(10), "0")
            .await
            .unwrap()
            .boxed();
        let mut next = async || {
            tokio::time::timeout(WAIT, raw.next())
                .await
                .expect("watch event in time")
                .expect("stream open")
                .expect("event parses")
        };
        match next().await {
            WatchEvent::Added(s) => assert_eq!(s.name_any(), "a"),
            e => panic!("{e:?}"),
        }
        match next().await {
            WatchEvent::Bookmark(b) => {
                assert_eq!(
                    b.metadata.resource_version,
                    server.resource_version().to_string()
                );
                assert_eq!(
                    (b.types.api_version.as_str(), b.types.kind.as_str()),
                    ("v1", "Service")
                );
                assert!(b.metadata.annotations.is_empty());
            }
            e => panic!("{e:?}"),
        }
        server.set_bookmark_interval(None);
        server.apply(&node("n1", &[])); // another kind: moves the RV only
        server.send_bookmarks();
        // (A periodic bookmark may still have been on its way.)
        let want = server.resource_version().to_string();
        for _ in 0..3 {
            match next().await {
                WatchEvent::Bookmark(b) if b.metadata.resource_version == want => break,
                WatchEvent::Bookmark(_) => continue,
                e => panic!("{e:?}"),
            }
        }
        drop(raw);

        // Streaming list: initial events end with the annotated bookmark.
        let mut errors = 0;
        let mut s = watcher(
            api.clone(),
            watcher::Config::default().labels(W1).streaming_lists(),
        )
        .boxed();
        assert_eq!(
            init_list(&mut s, &mut errors).await,
            ["InitApply(default/a)"]
        );
        server.apply(&svc("default", "b", &[]));
        assert_eq!(
            show(&next_ok(&mut s, &mut errors).await),
            "Apply(default/b)"
        );
        assert!(server
            .requests()
            .iter()
            .any(|r| r.contains("sendInitialEvents=true")
                && r.contains("resourceVersionMatch=NotOlderThan")));
        drop(s);

        // A watcher takes the bookmark's RV: after other kinds move the RV and
        // history is compacted, a re-watch from the bookmark needs no relist.
        server.set_bookmark_interval(Some(Duration::from_millis(100)));
        let mut w = watcher(api, watcher::Config::default().labels(W1)).boxed();
        assert_eq!(
            init_list(&mut w, &mut errors).await,
            ["InitApply(default/a)", "InitApply(default/b)"]
        );
        let lists = server.list_count(ResourceKind::Service);
        for i in 0..3 {
            server.apply(&node(&format!("m{i}"), &[]));
        }
        quiet(&mut w, Duration::from_millis(600)).await; // bookmarks flow in
        server.compact();
        server.disconnect_watches();
        server.apply(&svc("default", "c", &[]));
        assert_eq!(
            show(&next_ok(&mut w, &mut errors).await),
            "Apply(default/c)"
        );
        assert_eq!(server.list_count(ResourceKind::Service), lists, "no relist");
        assert_eq!(server.expired_watch_count(), 0);
        assert_eq!(errors, 0);
    });
}

#[test]
fn slow_server_still_works() {
    require_privileges!();
    run(test_name!(), |server, client| async move {
        server.apply(&svc("default", "a", &[]));
        server.set_latency(Duration::from_millis(300));
        let api: Api<Service> = Api::all(client);
        let t = Instant::now();
        assert_eq!(
            api.list(&ListParams::default()).await.unwrap().items.len(),
            1
        );
        assert!(
            t.elapsed() >= Duration::from_millis(300),
            "{:?}",
            t.elapsed()
        );
        let mut errors = 0;
        let t = Instant::now();
        let mut w = watcher(api, watcher::Config::default().labels(W1)).boxed();
        assert_eq!(
            init_list(&mut w, &mut errors).await,
            ["InitApply(default/a)"]
        );
        assert!(t.elapsed() >= Duration::from_millis(300));
        server.apply(&svc("default", "b", &[]));
        assert_eq!(
            show(&next_ok(&mut w, &mut errors).await),
            "Apply(default/b)"
        );
        assert!(
            t.elapsed() >= Duration::from_millis(600),
            "list + watch: two delays"
        );
        server.set_latency(Duration::ZERO);
        assert_eq!(errors, 0);
    });
}

#[test]
fn unavailable_server_makes_the_watcher_back_off_then_recover() {
    require_privileges!();
    run(test_name!(), |server, client| async move {
        server.apply(&svc("default", "a", &[]));
        let api: Api<Service> = Api::all(client);
        let mut errors = 0;
        let mut w = watcher(api.clone(), watcher::Config::default().labels(W1))
            .default_backoff()
            .boxed();
        assert_eq!(
            init_list(&mut w, &mut errors).await,
            ["InitApply(default/a)"]
        );
        quiet(&mut w, Duration::from_millis(200)).await;

        // Down: the stream is cut and reconnects fail; the watcher reports
        // errors and backs off (not a tight loop).
        let conns = server.connection_count();
        server.set_unavailable(true);
        let t = Instant::now();
        let mut seen = 0;
        while t.elapsed() < Duration::from_millis(1500) {
            if let Ok(Some(Err(e))) =
                tokio::time::timeout(Duration::from_millis(100), w.next()).await
            {
                eprintln!("while down: {e}");
                seen += 1;
            }
        }
        assert!(seen >= 1, "no watcher error while the server was down");
        let attempts = server.connection_count() - conns;
        assert!(
            attempts <= 6,
            "{attempts} connections in 1.5 s: no backoff?"
        );
        server.apply(&svc("default", "b", &[]));
        server.set_unavailable(false);
        // Resumes from its RV (history intact): the change, no relist.
        assert_eq!(
            show(&next_ok(&mut w, &mut errors).await),
            "Apply(default/b)"
        );
        assert_eq!(server.list_count(ResourceKind::Service), 1);

        // 503s: kube's client retries them itself; once the server is back
        // the call succeeds.
        server.set_error_status(Some(503));
        let before = server.requests().len();
        let lp = ListParams::default();
        let (list, ()) = tokio::join!(api.list(&lp), async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            server.set_error_status(None);
        });
        assert_eq!(list.unwrap().items.len(), 2);
        assert!(server.requests().len() - before >= 2, "no retry of the 503");
        // A non-retried status surfaces as a Status error.
        server.set_error_status(Some(500));
        let err = api.list(&ListParams::default()).await.unwrap_err();
        server.set_error_status(None);
        assert!(
            matches!(&err, kube::Error::Api(s) if s.code == 500 && s.reason == "InternalError"),
            "{err:?}"
        );
    });
}

#[test]
fn events_are_stored() {
    require_privileges!();
    run(test_name!(), |server, client| async move {
        let stored = server.apply(&svc("default", "web", &[]));
        let web: Service = serde_json::from_value(stored).unwrap();
        let reference = web.object_ref(&());
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: "lb-agent".into(),
                instance: Some("node-1".into()),
            },
        );
        let ev = Event {
            type_: EventType::Warning,
            reason: "NoEndpoints".into(),
            note: Some("no usable endpoint".into()),
            action: "Program".into(),
            secondary: None,
        };
        recorder.publish(&ev, &reference).await.unwrap();
        recorder.publish(&ev, &reference).await.unwrap(); // a series: PATCH
        let evs = server.events();
        assert_eq!(evs.len(), 1, "{evs:#?}");
        let e = &evs[0];
        assert_eq!(e["apiVersion"], "events.k8s.io/v1");
        assert_eq!(e["reason"], "NoEndpoints");
        assert_eq!(e["type"], "Warning");
        assert_eq!(e["reportingController"], "lb-agent");
        assert_eq!(e["regarding"]["name"], "web");
        assert_eq!(e["series"]["count"], 2);
        let reqs = server.requests();
        assert!(reqs
            .iter()
            .any(|r| r.starts_with("POST /apis/events.k8s.io/v1/namespaces/default/events")));
        assert!(reqs
            .iter()
            .any(|r| r.starts_with("PATCH /apis/events.k8s.io/v1/namespaces/default/events/web.")));

        // core/v1 Events too.
        let core: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client, "default");
        let created = core
            .create(
                &PostParams::default(),
                &k8s_openapi::api::core::v1::Event {
                    metadata: ObjectMeta {
                        generate_name: Some("web-".into()),
                        ..Default::default()
                    },
                    involved_object: ObjectReference {
                        kind: Some("Service".into()),
                        name: Some("web".into()),
                        namespace: Some("default".into()),
                        ..Default::default()
                    },
                    reason: Some("Synced".into()),
                    type_: Some("Normal".into()),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert!(created.name_any().starts_with("web-"));
        assert!(created.metadata.resource_version.is_some());
        let evs = server.events();
        assert_eq!(evs.len(), 2);
        assert_eq!(evs[1]["involvedObject"]["name"], "web");
        // Creating it again is a 409.
        let again = core
            .create(&PostParams::default(), &created)
            .await
            .unwrap_err();
        assert!(
            matches!(&again, kube::Error::Api(s) if s.code == 409),
            "{again:?}"
        );
    });
}

#[test]
fn node_watch_with_field_selector() {
    require_privileges!();
    run(test_name!(), |server, client| async move {
        server.apply(&node("n1", &[]));
        server.apply(&node("n2", &[]));
        let nodes: Api<Node> = Api::all(client);
        let mut errors = 0;
        let mut w = watcher(
            nodes.clone(),
            watcher::Config::default().fields("metadata.name=n1"),
        )
        .boxed();
        assert_eq!(init_list(&mut w, &mut errors).await, ["InitApply(n1)"]);
        server.apply(&node("n2", &[("x", "1")])); // not selected
        server.apply(&node("n1", &[("x", "1")]));
        let e = next_ok(&mut w, &mut errors).await;
        assert_eq!(show(&e), "Apply(n1)");
        if let watcher::Event::Apply(n) = e {
            assert_eq!(n.labels().get("x").map(String::as_str), Some("1"));
        }
        server.delete(ResourceKind::Node, "", "n1");
        assert_eq!(show(&next_ok(&mut w, &mut errors).await), "Delete(n1)");
        assert_eq!(errors, 0);
        assert!(server
            .requests()
            .iter()
            .any(|r| r.starts_with("GET /api/v1/nodes?")
                && r.contains("fieldSelector=metadata.name%3Dn1")
                && r.contains("watch=true")));
        // The node itself by name.
        assert!(nodes.get_opt("n2").await.unwrap().is_some());
    });
}

#[test]
fn writes_through_the_api() {
    require_privileges!();
    run(test_name!(), |server, client| async move {
        let api: Api<Service> = Api::namespaced(client, "default");
        let mut w = watcher(api.clone(), watcher::Config::default().labels(W1)).boxed();
        let mut errors = 0;
        assert!(init_list(&mut w, &mut errors).await.is_empty());
        let created = api
            .create(&PostParams::default(), &svc("default", "a", &[]))
            .await
            .unwrap();
        assert_eq!(
            show(&next_ok(&mut w, &mut errors).await),
            "Apply(default/a)"
        );
        let patched = api
            .patch(
                "a",
                &PatchParams::default(),
                &Patch::Merge(
                    json!({"metadata": {"labels": {"service.kubernetes.io/headless": ""}}}),
                ),
            )
            .await
            .unwrap();
        assert_eq!(patched.metadata.uid, created.metadata.uid);
        assert_eq!(
            show(&next_ok(&mut w, &mut errors).await),
            "Delete(default/a)"
        );
        // A replace with a stale resourceVersion is a 409 Conflict.
        let err = api
            .replace("a", &PostParams::default(), &created)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, kube::Error::Api(s) if s.code == 409 && s.reason == "Conflict"),
            "{err:?}"
        );
        let mut fresh = api.get("a").await.unwrap();
        fresh.metadata.labels = None;
        api.replace("a", &PostParams::default(), &fresh)
            .await
            .unwrap();
        assert_eq!(
            show(&next_ok(&mut w, &mut errors).await),
            "Apply(default/a)"
        );
        api.delete("a", &Default::default()).await.unwrap();
        assert_eq!(
            show(&next_ok(&mut w, &mut errors).await),
            "Delete(default/a)"
        );
        assert!(server.get(ResourceKind::Service, "default", "a").is_none());
        let err = api.delete("a", &Default::default()).await.unwrap_err();
        assert!(
            matches!(&err, kube::Error::Api(s) if s.code == 404),
            "{err:?}"
        );
        assert_eq!(errors, 0);

        // timeoutSeconds ends a raw watch cleanly.
        let t = Instant::now();
        let mut raw = api
            .watch(&WatchParams::default().timeout(1), "0")
            .await
            .unwrap()
            .boxed();
        let end = tokio::time::timeout(WAIT, async {
            while let Some(e) = raw.next().await {
                e.unwrap();
            }
        })
        .await;
        assert!(end.is_ok(), "the watch did not end");
        assert!(
            t.elapsed() >= Duration::from_millis(900),
            "{:?}",
            t.elapsed()
        );
    });
}

#[test]
fn server_bound_in_a_named_netns() {
    require_privileges!();
    let netns = NamedNetns::create(&format!("lbfake{}", std::process::id())).unwrap();
    // Bound from a thread that entered the namespace; served from a thread of
    // the root namespace: the socket keeps its namespace.
    let server = FakeApiServer::start(bind_in_netns(
        Some(netns.name()),
        "127.0.0.1:0".parse().unwrap(),
    ));
    server.apply(&svc("default", "a", &[]));
    let dir = std::env::temp_dir().join(format!("lb-fake-named-{}", std::process::id()));
    let path = server.write_kubeconfig(&dir);
    // The client lives in the same namespace (never the root one).
    let n = in_named_netns(netns.name(), || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let config = Config::from_custom_kubeconfig(
                Kubeconfig::read_from(&path).unwrap(),
                &KubeConfigOptions::default(),
            )
            .await
            .unwrap();
            let api: Api<Service> = Api::all(Client::try_from(config).unwrap());
            tokio::time::timeout(WAIT, api.list(&ListParams::default()))
                .await
                .expect("list in time")
                .unwrap()
                .items
                .len()
        })
    });
    assert_eq!(n, 1);
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}
