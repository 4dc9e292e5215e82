//! The Kubernetes backend: a Deployment of workers whose replica count the master sets through
//! the `scale` subresource, whose pods it watches (pod name = worker name), and whose scale-downs
//! it steers with `controller.kubernetes.io/pod-deletion-cost` so the ReplicaSet removes the idle
//! workers the master chose and drained.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::{Notify, watch};
use tracing::{info, warn};

use super::MasterPort;
use crate::scaling::Member;

/// The User-Agent of every call the master makes to the Kubernetes API, so that audit logs and
/// API priority rules can tell the master apart.
pub const USER_AGENT: &str = concat!("kiln-master/", env!("CARGO_PKG_VERSION"));

/// A Kubernetes API error as a person reads it: the API server's message, code and reason, not the
/// client's debug dump of them.
pub fn describe(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) => describe_status(status),
        other => other.to_string(),
    }
}

/// A watch's error, as [`describe`] does.
pub fn describe_watch(error: &watcher::Error) -> String {
    match error {
        watcher::Error::InitialListFailed(e) => format!("listing pods: {}", describe(e)),
        watcher::Error::WatchStartFailed(e) => format!("starting the watch: {}", describe(e)),
        watcher::Error::WatchFailed(e) => format!("the watch failed: {}", describe(e)),
        watcher::Error::WatchError(status) => format!("the watch failed: {}", describe_status(status)),
        other => other.to_string(),
    }
}

fn describe_status(status: &kube::core::Status) -> String {
    match (status.code, status.reason.as_str()) {
        (0, "") => status.message.clone(),
        (0, reason) => format!("{} ({reason})", status.message),
        (code, "") => format!("{} ({code})", status.message),
        (code, reason) => format!("{} ({code} {reason})", status.message),
    }
}

/// The annotation the ReplicaSet controller reads to choose which pods to remove first.
pub const DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";

/// Every Kubernetes API call the master makes, as RBAC rules: (API group, resource, verbs).
/// The chart's Role is generated from the same list, and a test holds the two together.
pub const RBAC_RULES: &[(&str, &str, &[&str])] =
    &[("apps", "deployments/scale", &["get", "patch"]), ("", "pods", &["list", "watch", "patch"])];

/// How long a drained victim may stay before the master concludes the ReplicaSet kept it (the
/// deletion cost is best-effort) and returns it to service.
const KEPT_VICTIM: Duration = Duration::from_secs(60);

/// A pod of the pool as the watch last saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodView {
    /// The pod's Ready condition: the worker is connected to a master.
    pub ready: bool,
    /// Being deleted: no longer capacity.
    pub terminating: bool,
    /// The deletion cost currently annotated, if any.
    pub deletion_cost: Option<i32>,
}

impl PodView {
    pub fn of(pod: &Pod) -> Option<(String, PodView)> {
        let name = pod.metadata.name.clone()?;
        let ready = pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        let deletion_cost =
            pod.metadata.annotations.as_ref().and_then(|a| a.get(DELETION_COST)).and_then(|v| v.parse().ok());
        Some((name, PodView { ready, terminating: pod.metadata.deletion_timestamp.is_some(), deletion_cost }))
    }
}

/// A Deployment of workers.
pub struct KubernetesPool {
    pool: String,
    deployment: String,
    deployments: Api<Deployment>,
    pods_api: Api<Pod>,
    state: Mutex<State>,
    changed: Notify,
}

#[derive(Debug, Default)]
struct State {
    /// `spec.replicas` of the Deployment, as last read or written.
    replicas: Option<u32>,
    /// The label selector of the Deployment's pods (from the scale subresource).
    selector: Option<String>,
    pods: BTreeMap<String, PodView>,
    /// Victims drained for a scale-down, and when.
    drained: HashMap<String, Instant>,
}

impl std::fmt::Debug for KubernetesPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubernetesPool").field("pool", &self.pool).field("deployment", &self.deployment).finish()
    }
}

impl KubernetesPool {
    pub fn new(client: kube::Client, namespace: Option<&str>, deployment: &str, pool: &str) -> KubernetesPool {
        let (deployments, pods_api) = match namespace {
            Some(ns) => (Api::namespaced(client.clone(), ns), Api::namespaced(client, ns)),
            None => (Api::default_namespaced(client.clone()), Api::default_namespaced(client)),
        };
        KubernetesPool {
            pool: pool.to_owned(),
            deployment: deployment.to_owned(),
            deployments,
            pods_api,
            state: Mutex::new(State::default()),
            changed: Notify::new(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("kubernetes pool state poisoned")
    }

    /// Wakes the scaler: the pods changed.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    /// Reads the Deployment's scale: its replica count and pod selector.
    pub async fn refresh(&self) -> Result<u32, kube::Error> {
        let scale = self.deployments.get_scale(&self.deployment).await?;
        let replicas = scale.spec.and_then(|s| s.replicas).unwrap_or(0).max(0) as u32;
        let selector = scale.status.and_then(|s| s.selector);
        let mut state = self.state();
        state.replicas = Some(replicas);
        if selector.is_some() {
            state.selector = selector;
        }
        Ok(replicas)
    }

    /// The Deployment's `spec.replicas`, reading it first if it is not known yet.
    pub async fn replicas(&self) -> Result<u32, kube::Error> {
        let known = self.state().replicas;
        match known {
            Some(replicas) => Ok(replicas),
            None => self.refresh().await,
        }
    }

    /// Sets the Deployment's replica count through the scale subresource.
    pub async fn set_replicas(&self, replicas: u32) -> Result<(), kube::Error> {
        let patch = serde_json::json!({ "spec": { "replicas": replicas } });
        let result =
            self.deployments.patch_scale(&self.deployment, &PatchParams::default(), &Patch::Merge(&patch)).await;
        match result {
            Ok(scale) => {
                self.state().replicas = Some(scale.spec.and_then(|s| s.replicas).map_or(replicas, |r| r.max(0) as u32));
                Ok(())
            }
            Err(error) => {
                // The count may or may not have changed: read it again next time.
                self.state().replicas = None;
                Err(error)
            }
        }
    }

    /// Pods that count as the pool's workers, as a scale-down sees them: not being deleted, and
    /// not already chosen by an earlier scale-down (the ReplicaSet may not have marked it yet).
    pub fn members(&self, master: &MasterPort, running: &HashMap<String, (u32, i64)>) -> Vec<Member> {
        let now = master.store.now_ms();
        let state = self.state();
        state
            .pods
            .iter()
            .filter(|(name, pod)| !pod.terminating && !state.drained.contains_key(*name))
            .map(|(name, pod)| {
                let (db, since) = running.get(name).copied().unwrap_or((0, now));
                let here = master.workers.builds_on(name);
                Member {
                    name: name.clone(),
                    starting: !pod.ready && here == 0 && db == 0,
                    running: db.max(here),
                    busy_for_secs: ((now - since).max(0) / 1000) as u64,
                }
            })
            .collect()
    }

    /// Annotates deletion costs so the ReplicaSet removes the victims: only pods whose cost must
    /// change are patched (a victim that is not lowest yet, an idle pod still marked busy, a
    /// busy pod not marked busy), so a scale-down costs a few calls, not one per pod.
    pub async fn apply_deletion_costs(&self, costs: &[(String, i32)]) -> Result<usize, kube::Error> {
        let current: HashMap<String, Option<i32>> =
            self.state().pods.iter().map(|(n, p)| (n.clone(), p.deletion_cost)).collect();
        let mut patched = 0;
        for (name, cost) in costs {
            let now = current.get(name).copied().flatten();
            let needed = match (*cost, now) {
                (c, Some(n)) if c == n => false,
                // Busy pods only need to be above every idle one.
                (c, Some(n)) if c >= 10 && n >= 10 => false,
                // Unannotated pods count as 0.
                (0, None) => false,
                _ => true,
            };
            if !needed {
                continue;
            }
            let patch = serde_json::json!({ "metadata": { "annotations": { DELETION_COST: cost.to_string() } } });
            self.pods_api.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
            if let Some(pod) = self.state().pods.get_mut(name) {
                pod.deletion_cost = Some(*cost);
            }
            patched += 1;
        }
        Ok(patched)
    }

    /// Remembers the victims of a scale-down.
    pub fn note_drained(&self, victims: &[String]) {
        let now = Instant::now();
        let mut state = self.state();
        for victim in victims {
            state.drained.insert(victim.clone(), now);
        }
    }

    /// Forgets victims of a failed scale-down, so they can be returned to service.
    pub fn forget_drained(&self, victims: &[String]) {
        let mut state = self.state();
        for victim in victims {
            state.drained.remove(victim);
        }
    }

    /// Victims that the ReplicaSet kept for longer than it should take to remove them: the
    /// deletion cost is best-effort, so they go back into service rather than stay idle forever.
    pub fn kept_victims(&self) -> Vec<String> {
        let mut state = self.state();
        let State { drained, pods, .. } = &mut *state;
        let kept: Vec<String> = drained
            .iter()
            .filter(|(name, since)| since.elapsed() > KEPT_VICTIM && pods.get(*name).is_some_and(|p| !p.terminating))
            .map(|(name, _)| name.clone())
            .collect();
        for name in &kept {
            drained.remove(name);
        }
        kept
    }

    /// Watches the pool's pods until `shutdown`: keeps the pod table current and tells the master
    /// when a pod is gone, so the builds of its worker are retried at once. Errors back off.
    pub async fn watch(&self, master: &MasterPort, mut shutdown: watch::Receiver<bool>) {
        let mut delay = Duration::from_millis(500);
        let selector = loop {
            if *shutdown.borrow() {
                return;
            }
            match self.refresh().await {
                Ok(_) => {
                    if let Some(selector) = self.state().selector.clone() {
                        break selector;
                    }
                    warn!(pool = %self.pool, deployment = %self.deployment, "the scale subresource has no pod selector");
                }
                Err(error) => {
                    crate::telemetry::pool_api_error(&self.pool);
                    let error = describe(&error);
                    warn!(pool = %self.pool, deployment = %self.deployment, %error, "cannot read the deployment's scale");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.changed() => return,
            }
            delay = (delay * 2).min(Duration::from_secs(30));
        };
        info!(pool = %self.pool, deployment = %self.deployment, %selector, "watching the pool's pods");
        let stream = watcher(self.pods_api.clone(), watcher::Config::default().labels(&selector)).default_backoff();
        let mut stream = std::pin::pin!(stream);
        let mut listing: Option<BTreeMap<String, PodView>> = None;
        loop {
            let event = tokio::select! {
                event = stream.next() => event,
                _ = shutdown.changed() => return,
            };
            let gone = match event {
                None => return,
                Some(Err(error)) => {
                    crate::telemetry::pool_api_error(&self.pool);
                    let error = describe_watch(&error);
                    warn!(pool = %self.pool, %error, "watching pods failed; retrying");
                    continue;
                }
                Some(Ok(event)) => self.apply(event, &mut listing),
            };
            for name in gone {
                // A scale-down pause stays: should the process of a deleted pod still reach the
                // master (a partitioned node), it must not be given work again. Pod names of a
                // Deployment are never reused.
                master.workers.gone(&name).await;
                self.state().drained.remove(&name);
            }
            self.changed.notify_one();
        }
    }

    /// Applies one watch event to the pod table; returns the pods that disappeared.
    fn apply(&self, event: watcher::Event<Pod>, listing: &mut Option<BTreeMap<String, PodView>>) -> Vec<String> {
        match event {
            watcher::Event::Init => {
                *listing = Some(BTreeMap::new());
                Vec::new()
            }
            watcher::Event::InitApply(pod) => {
                if let (Some(list), Some((name, view))) = (listing.as_mut(), PodView::of(&pod)) {
                    list.insert(name, view);
                }
                Vec::new()
            }
            watcher::Event::InitDone => {
                let fresh = listing.take().unwrap_or_default();
                let mut state = self.state();
                let gone = state.pods.keys().filter(|n| !fresh.contains_key(*n)).cloned().collect();
                state.pods = fresh;
                gone
            }
            watcher::Event::Apply(pod) => {
                if let Some((name, view)) = PodView::of(&pod) {
                    self.state().pods.insert(name, view);
                }
                Vec::new()
            }
            watcher::Event::Delete(pod) => match pod.metadata.name {
                Some(name) => {
                    self.state().pods.remove(&name);
                    vec![name]
                }
                None => Vec::new(),
            },
        }
    }

    /// The pods as last seen, for status and tests.
    pub fn pods(&self) -> BTreeMap<String, PodView> {
        self.state().pods.clone()
    }
}
