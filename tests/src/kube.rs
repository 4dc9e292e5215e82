//! A mock Kubernetes API for the master's Kubernetes backend: a tower service behind a real kube
//! `Client`, holding one Deployment (served through its `scale` subresource) and its Pods
//! (list, watch and merge-patch). Every call is recorded so tests can check the exact requests.
//! There is no controller: the test plays the ReplicaSet by adding and deleting pods.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Either, Full, StreamBody, combinators::UnsyncBoxBody};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnboundedReceiverStream;

/// One API call as the mock saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub method: String,
    /// The path without the query.
    pub path: String,
    pub query: String,
    pub body: Value,
    /// When the mock received it.
    pub at: std::time::Instant,
}

#[derive(Debug, Default)]
struct State {
    replicas: i64,
    resource_version: u64,
    pods: BTreeMap<String, Value>,
    calls: Vec<Call>,
    watchers: Vec<mpsc::UnboundedSender<Bytes>>,
    /// Calls to the scale subresource that fail with 500 before one succeeds.
    failing_scale_calls: u32,
}

/// The mock API; clone it freely.
#[derive(Debug, Clone)]
pub struct FakeKube {
    pub namespace: String,
    pub deployment: String,
    pub selector: String,
    state: Arc<Mutex<State>>,
}

type Body = Either<Full<Bytes>, UnsyncBoxBody<Bytes, Infallible>>;

impl FakeKube {
    /// A Deployment `deployment` in `namespace` with `replicas` and no pods.
    pub fn new(namespace: &str, deployment: &str, replicas: i64) -> FakeKube {
        FakeKube {
            namespace: namespace.to_owned(),
            deployment: deployment.to_owned(),
            selector: format!("app=kiln-worker,deployment={deployment}"),
            state: Arc::new(Mutex::new(State { replicas, resource_version: 1, ..State::default() })),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("fake kube state")
    }

    /// A kube client talking to this mock.
    pub fn client(&self) -> kube::Client {
        let fake = self.clone();
        let service = tower::service_fn(move |request: Request<kube::client::Body>| {
            let fake = fake.clone();
            async move { Ok::<_, Infallible>(fake.handle(request).await) }
        });
        kube::Client::new(service, self.namespace.clone())
    }

    /// The Deployment's `spec.replicas`.
    pub fn replicas(&self) -> i64 {
        self.state().replicas
    }

    /// The recorded calls, oldest first.
    pub fn calls(&self) -> Vec<Call> {
        self.state().calls.clone()
    }

    /// The recorded calls that changed something (PATCHes).
    pub fn patches(&self) -> Vec<Call> {
        self.calls().into_iter().filter(|c| c.method == "PATCH").collect()
    }

    /// Makes the next `count` calls to the scale subresource fail with 500.
    pub fn fail_scale_calls(&self, count: u32) {
        self.state().failing_scale_calls = count;
    }

    /// The pods' deletion-cost annotations.
    pub fn deletion_costs(&self) -> BTreeMap<String, Option<String>> {
        self.state()
            .pods
            .iter()
            .map(|(name, pod)| {
                let cost = pod["metadata"]["annotations"]["controller.kubernetes.io/pod-deletion-cost"]
                    .as_str()
                    .map(str::to_owned);
                (name.clone(), cost)
            })
            .collect()
    }

    /// Adds (or replaces) a pod of the Deployment, as the ReplicaSet would, and tells watchers.
    pub fn put_pod(&self, name: &str, ready: bool) {
        let mut state = self.state();
        state.resource_version += 1;
        let existing = state.pods.get(name).cloned();
        let annotations = existing.as_ref().map_or(json!({}), |p| p["metadata"]["annotations"].clone());
        let pod = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": self.namespace,
                "resourceVersion": state.resource_version.to_string(),
                "labels": { "app": "kiln-worker", "deployment": self.deployment },
                "annotations": annotations,
            },
            "status": {
                "phase": "Running",
                "conditions": [{ "type": "Ready", "status": if ready { "True" } else { "False" } }],
            },
        });
        state.pods.insert(name.to_owned(), pod.clone());
        let kind = if existing.is_some() { "MODIFIED" } else { "ADDED" };
        broadcast(&mut state, kind, &pod);
    }

    /// Deletes a pod for good, as the kubelet does once its containers have exited.
    pub fn delete_pod(&self, name: &str) {
        let mut state = self.state();
        state.resource_version += 1;
        if let Some(mut pod) = state.pods.remove(name) {
            pod["metadata"]["resourceVersion"] = json!(state.resource_version.to_string());
            broadcast(&mut state, "DELETED", &pod);
        }
    }

    /// The pod the ReplicaSet would remove first on a scale-down: the lowest deletion cost.
    pub fn lowest_cost_pod(&self) -> Option<String> {
        self.deletion_costs()
            .into_iter()
            .min_by_key(|(name, cost)| (cost.as_deref().and_then(|c| c.parse::<i64>().ok()).unwrap_or(0), name.clone()))
            .map(|(name, _)| name)
    }

    fn scale(&self, state: &State) -> Value {
        json!({
            "apiVersion": "autoscaling/v1",
            "kind": "Scale",
            "metadata": { "name": self.deployment, "namespace": self.namespace },
            "spec": { "replicas": state.replicas },
            "status": { "replicas": state.pods.len(), "selector": self.selector },
        })
    }

    async fn handle(&self, request: Request<kube::client::Body>) -> Response<Body> {
        let (parts, body) = request.into_parts();
        let bytes = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        let path = parts.uri.path().to_owned();
        let query = parts.uri.query().unwrap_or_default().to_owned();
        let mut state = self.state();
        state.calls.push(Call {
            method: parts.method.to_string(),
            path: path.clone(),
            query: query.clone(),
            body: body.clone(),
            at: std::time::Instant::now(),
        });
        let scale_path = format!("/apis/apps/v1/namespaces/{}/deployments/{}/scale", self.namespace, self.deployment);
        let pods_path = format!("/api/v1/namespaces/{}/pods", self.namespace);
        if path == scale_path {
            if state.failing_scale_calls > 0 {
                state.failing_scale_calls -= 1;
                return status(StatusCode::INTERNAL_SERVER_ERROR, "injected failure");
            }
            if parts.method == Method::PATCH
                && let Some(replicas) = body["spec"]["replicas"].as_i64()
            {
                state.replicas = replicas;
            }
            return json_response(&self.scale(&state));
        }
        if path == pods_path && parts.method == Method::GET {
            if query.split('&').any(|p| p == "watch=true") {
                let (tx, rx) = mpsc::unbounded_channel();
                state.watchers.push(tx);
                let stream = UnboundedReceiverStream::new(rx).map(|b| Ok::<_, Infallible>(Frame::data(b)));
                return Response::builder()
                    .header("content-type", "application/json")
                    .body(Either::Right(StreamBody::new(stream).boxed_unsync()))
                    .expect("response");
            }
            let list = json!({
                "apiVersion": "v1",
                "kind": "PodList",
                "metadata": { "resourceVersion": state.resource_version.to_string() },
                "items": state.pods.values().collect::<Vec<_>>(),
            });
            return json_response(&list);
        }
        if let Some(name) = path.strip_prefix(&format!("{pods_path}/"))
            && parts.method == Method::PATCH
        {
            let name = name.to_owned();
            let Some(mut pod) = state.pods.get(&name).cloned() else {
                return status(StatusCode::NOT_FOUND, "no such pod");
            };
            if let Some(annotations) = body["metadata"]["annotations"].as_object() {
                for (key, value) in annotations {
                    pod["metadata"]["annotations"][key] = value.clone();
                }
            }
            state.resource_version += 1;
            pod["metadata"]["resourceVersion"] = json!(state.resource_version.to_string());
            state.pods.insert(name, pod.clone());
            broadcast(&mut state, "MODIFIED", &pod);
            return json_response(&pod);
        }
        status(StatusCode::NOT_FOUND, "not served by the mock")
    }
}

fn broadcast(state: &mut State, kind: &str, object: &Value) {
    let mut line = serde_json::to_vec(&json!({ "type": kind, "object": object })).expect("json");
    line.push(b'\n');
    let line = Bytes::from(line);
    state.watchers.retain(|w| w.send(line.clone()).is_ok());
}

fn json_response(value: &Value) -> Response<Body> {
    Response::builder()
        .header("content-type", "application/json")
        .body(Either::Left(Full::new(Bytes::from(serde_json::to_vec(value).expect("json")))))
        .expect("response")
}

fn status(code: StatusCode, message: &str) -> Response<Body> {
    let body = json!({
        "apiVersion": "v1", "kind": "Status", "status": "Failure",
        "message": message, "reason": "InternalError", "code": code.as_u16(),
    });
    let mut response = json_response(&body);
    *response.status_mut() = code;
    response
}
