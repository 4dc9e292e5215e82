//! The Helm chart: `helm lint --strict` and every rendered manifest valid for Kubernetes 1.33,
//! for the default values and the variants in `charts/kiln/ci/`; the schema rejects wrong types;
//! the Role grants exactly what the autoscaler calls; and the binaries run with the configuration
//! and environment the chart gives them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use base64::Engine;
use kiln_tests::{binary, eventually, free_port, pg};
use serde_yaml_ng::Value;

const MINUTE: Duration = Duration::from_secs(60);

fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/kiln")
}

/// Runs a chart tool (helm, kubernetes-validate); `scripts/test` installs them in target/tools.
fn tool(name: &str) -> Command {
    let tools = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tools/bin");
    let path = format!("{}:{}", tools.display(), std::env::var("PATH").unwrap_or_default());
    let mut command = Command::new(name);
    command.env("PATH", path);
    command
}

fn run(mut command: Command, stdin: Option<&[u8]>) -> Output {
    use std::io::Write;
    let mut child =
        command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap_or_else(|e| {
            panic!("{command:?}: {e} (run scripts/test, which installs helm and kubernetes-validate)")
        });
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input).unwrap();
    }
    drop(child.stdin.take());
    child.wait_with_output().unwrap()
}

fn variants() -> Vec<Option<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(chart().join("ci"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 4, "{files:?}");
    std::iter::once(None).chain(files.into_iter().map(Some)).collect()
}

fn template(values: Option<&Path>, extra: &[&str]) -> Output {
    let mut helm = tool("helm");
    helm.args(["template", "kiln", "--namespace", "ci"]).arg(chart());
    if let Some(values) = values {
        helm.arg("-f").arg(values);
    }
    helm.args(extra);
    run(helm, None)
}

fn documents(text: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|doc| <Value as serde::Deserialize>::deserialize(doc).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name_suffix: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"].as_str().is_some_and(|n| n.ends_with(name_suffix)))
        .unwrap_or_else(|| panic!("no {kind} named *{name_suffix}"))
}

#[test]
fn the_chart_lints_and_renders_valid_manifests_for_every_variant() {
    for values in variants() {
        let mut lint = tool("helm");
        lint.args(["lint", "--strict"]).arg(chart());
        if let Some(values) = &values {
            lint.arg("-f").arg(values);
        }
        let out = run(lint, None);
        assert!(out.status.success(), "helm lint {values:?}:\n{}", String::from_utf8_lossy(&out.stdout));
        let rendered = template(values.as_deref(), &[]);
        assert!(rendered.status.success(), "{values:?}: {}", String::from_utf8_lossy(&rendered.stderr));
        let mut validate = tool("kubernetes-validate");
        validate.args(["--strict", "-k", "1.33.0", "-"]);
        let out = run(validate, Some(&rendered.stdout));
        assert!(
            out.status.success(),
            "kubernetes-validate {values:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn the_schema_rejects_wrong_types() {
    for bad in ["master.replicas=two", "pools[0].min=-1", "ingress.enabled=maybe", "pools[0].name=Not_A_Name"] {
        let out = template(None, &["--set", bad]);
        assert!(!out.status.success(), "{bad} was accepted");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("schema"),
            "{bad}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn the_role_grants_exactly_what_the_autoscaler_calls() {
    let docs = documents(&String::from_utf8(template(None, &[]).stdout).unwrap());
    let role = find(&docs, "Role", "-master");
    let mut granted: Vec<(String, String, Vec<String>)> = Vec::new();
    for rule in role["rules"].as_sequence().unwrap() {
        let strings = |key: &str| -> Vec<String> {
            rule[key].as_sequence().unwrap().iter().map(|v| v.as_str().unwrap().to_owned()).collect()
        };
        for group in strings("apiGroups") {
            for resource in strings("resources") {
                granted.push((group.clone(), resource, strings("verbs")));
            }
        }
    }
    let wanted: Vec<(String, String, Vec<String>)> = kiln_master::pool::kubernetes::RBAC_RULES
        .iter()
        .map(|(g, r, v)| (g.to_string(), r.to_string(), v.iter().map(|s| s.to_string()).collect()))
        .collect();
    assert_eq!(granted, wanted);
    assert_eq!(docs.iter().filter(|d| d["kind"] == "ClusterRole").count(), 0, "nothing cluster-wide");
    // Scaling reaches the worker Deployments by name, and nothing else.
    let workers: Vec<&str> = docs
        .iter()
        .filter(|d| d["kind"] == "Deployment" && d["metadata"]["labels"]["app.kubernetes.io/component"] == "worker")
        .map(|d| d["metadata"]["name"].as_str().unwrap())
        .collect();
    assert!(!workers.is_empty());
    let scale = role["rules"].as_sequence().unwrap().iter().find(|r| r["resources"][0] == "deployments/scale").unwrap();
    let names: Vec<&str> = scale["resourceNames"].as_sequence().unwrap().iter().map(|n| n.as_str().unwrap()).collect();
    assert_eq!(names, workers, "deployments/scale is narrowed to the worker Deployments");
}

#[test]
fn worker_tls_from_a_secret_reaches_the_master_config_and_the_workers() {
    let out = template(None, &["--set", "workerTLS.secretName=kiln-worker-tls"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let docs = documents(&String::from_utf8(out.stdout).unwrap());
    let config: Value =
        serde_yaml_ng::from_str(find(&docs, "ConfigMap", "-config")["data"]["config.yaml"].as_str().unwrap()).unwrap();
    assert_eq!(config["workers"]["tls"]["cert"], "/etc/kiln-tls/tls.crt");
    assert_eq!(config["workers"]["tls"]["key"], "/etc/kiln-tls/tls.key");
    let master = &find(&docs, "Deployment", "-master")["spec"]["template"]["spec"];
    assert!(master["volumes"].as_sequence().unwrap().iter().any(|v| v["secret"]["secretName"] == "kiln-worker-tls"));
    let worker = &find(&docs, "Deployment", "-worker-default")["spec"]["template"]["spec"];
    let env = worker["containers"][0]["env"].as_sequence().unwrap();
    let value = |name: &str| env.iter().find(|e| e["name"] == name).map(|e| e["value"].as_str().unwrap().to_owned());
    assert_eq!(value("KILN_MASTER").as_deref(), Some("https://kiln-master:9989"));
    assert_eq!(value("KILN_MASTER_CA").as_deref(), Some("/etc/kiln-tls/ca.crt"));
    // Workers get the CA only, never the master's key.
    let volume = worker["volumes"].as_sequence().unwrap().iter().find(|v| v["name"] == "tls").unwrap();
    assert_eq!(volume["secret"]["items"][0]["key"], "ca.crt");
    assert_eq!(volume["secret"]["items"].as_sequence().unwrap().len(), 1);
}

/// A pool of `kind: buildbot` runs Buildbot's own worker image with its name from the pod, the
/// master's address and protocol, and the worker token as its password; the master's config
/// admits the pool's pods by their Deployment's name and counts them in the pool.
#[test]
fn a_buildbot_pool_runs_buildbot_worker_pods_the_master_admits() {
    let out = template(Some(&chart().join("ci/buildbot-pool.yaml")), &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let docs = documents(&String::from_utf8(out.stdout).unwrap());
    let pod = &find(&docs, "Deployment", "-worker-legacy")["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(container["image"], "buildbot/buildbot-worker:v4.3.0");
    let env = container["env"].as_sequence().unwrap();
    let var = |name: &str| env.iter().find(|e| e["name"] == name).unwrap_or_else(|| panic!("{name} missing"));
    assert_eq!(var("BUILDMASTER_PROTOCOL")["value"], "msgpack_experimental_v7");
    assert_eq!(var("BUILDMASTER")["value"], "kiln-master");
    assert_eq!(var("BUILDMASTER_PORT")["value"], "9989");
    assert_eq!(var("WORKERNAME")["valueFrom"]["fieldRef"]["fieldPath"], "metadata.name");
    assert_eq!(var("WORKERPASS")["valueFrom"]["secretKeyRef"]["key"], "worker-token");
    let kiln_pod = &find(&docs, "Deployment", "-worker-default")["spec"]["template"]["spec"];
    assert!(kiln_pod["containers"][0]["env"].as_sequence().unwrap().iter().any(|e| e["name"] == "KILN_MASTER"));

    let text = find(&docs, "ConfigMap", "-config")["data"]["config.yaml"].as_str().unwrap().to_owned();
    let config: Value = serde_yaml_ng::from_str(&text).unwrap();
    let admitted = &config["workers"]["buildbot"][0];
    assert_eq!(admitted["name_prefix"], "kiln-worker-legacy-", "{text}");
    assert_eq!(
        (admitted["pool"].as_str(), admitted["password_env"].as_str()),
        (Some("legacy"), Some("KILN_WORKER_TOKEN"))
    );
    // SAFETY: set before the config is read; no other test of this binary reads it.
    unsafe {
        std::env::set_var("KILN_WORKER_TOKEN", "from-the-secret");
        std::env::set_var("KILN_API_TOKEN", "from-the-secret");
    }
    let parsed = kiln_master::config::Config::parse("config.yaml", &text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert!(parsed.workers.buildbot[0].admits("kiln-worker-legacy-6d4f9c7b8-x2x9q"), "a pod of the pool");
    assert!(!parsed.workers.buildbot[0].admits("kiln-worker-default-6d4f9c7b8-x2x9q"), "a pod of another pool");

    let refused = template(Some(&chart().join("ci/buildbot-pool.yaml")), &["--set", "workerTLS.secretName=tls"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("Buildbot worker pools connect in plain text"));
}

/// Links in commit statuses point at the Ingress's host (https when it has TLS) unless the
/// config names `buildbotURL` itself.
#[test]
fn the_web_ui_address_comes_from_the_ingress_unless_configured() {
    let url = |extra: &[&str]| {
        let out = template(None, extra);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let docs = documents(&String::from_utf8(out.stdout).unwrap());
        let text = find(&docs, "ConfigMap", "-config")["data"]["config.yaml"].as_str().unwrap().to_owned();
        let config: Value = serde_yaml_ng::from_str(&text).unwrap();
        config["buildbotURL"].as_str().map(str::to_owned)
    };
    assert_eq!(url(&[]), None, "no Ingress, no address to guess");
    let ingress = ["--set", "ingress.enabled=true", "--set", "ingress.host=ci.example.org"];
    assert_eq!(url(&ingress).as_deref(), Some("http://ci.example.org/"));
    let tls = [
        &ingress[..],
        &["--set", "ingress.tls[0].secretName=ci-tls", "--set", "ingress.tls[0].hosts[0]=ci.example.org"],
    ]
    .concat();
    assert_eq!(url(&tls).as_deref(), Some("https://ci.example.org/"));
    let named = [&ingress[..], &["--set", "master.config.buildbotURL=https://kiln.internal/"]].concat();
    assert_eq!(url(&named).as_deref(), Some("https://kiln.internal/"));
}

/// The environment a container gets from its manifest: literal values, the pod's name, and
/// Secret keys (decoded), with `overrides` for what only a cluster provides.
fn container_env(container: &Value, secret: &Value, pod: &str, overrides: &[(&str, String)]) -> Vec<(String, String)> {
    container["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|var| {
            let name = var["name"].as_str().unwrap().to_owned();
            if let Some((_, value)) = overrides.iter().find(|(n, _)| *n == name) {
                return (name, value.clone());
            }
            let value = if let Some(value) = var["value"].as_str() {
                value.to_owned()
            } else if var["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name" {
                pod.to_owned()
            } else {
                let key = var["valueFrom"]["secretKeyRef"]["key"].as_str().unwrap();
                let encoded = secret["data"][key].as_str().unwrap_or_else(|| panic!("secret key {key}"));
                String::from_utf8(base64::engine::general_purpose::STANDARD.decode(encoded).unwrap()).unwrap()
            };
            (name, value)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binaries_run_with_what_the_chart_gives_them() {
    let docs = documents(&String::from_utf8(template(None, &[]).stdout).unwrap());
    let secret = find(&docs, "Secret", "-secrets");
    let config_map = find(&docs, "ConfigMap", "-config");
    let master = &find(&docs, "Deployment", "-master")["spec"]["template"]["spec"]["containers"][0];
    let worker = &find(&docs, "Deployment", "-worker-default")["spec"]["template"]["spec"]["containers"][0];

    // The master: the rendered config, with loopback listeners and a local data directory.
    let dir = tempfile::tempdir().unwrap();
    let (http, grpc) = (free_port(), free_port());
    let config = config_map["data"]["config.yaml"]
        .as_str()
        .unwrap()
        .replace("0.0.0.0:8010", &format!("127.0.0.1:{http}"))
        .replace("0.0.0.0:9989", &format!("127.0.0.1:{grpc}"))
        .replace("/var/lib/kiln", &dir.path().join("data").display().to_string());
    std::fs::write(dir.path().join("config.yaml"), &config).unwrap();
    let args: Vec<String> = master["args"].as_sequence().unwrap().iter().map(|a| a.as_str().unwrap().into()).collect();
    assert_eq!(args, ["--config", "/etc/kiln/config.yaml"]);
    // No cluster here: the API server is unreachable, and the master must keep building anyway.
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: 'http://127.0.0.1:1'}}]\nusers: [{name: u, user: {}}]\ncontexts: [{name: x, context: {cluster: c, user: u, namespace: ci}}]\ncurrent-context: x\n",
    )
    .unwrap();
    let database = pg::fresh_database().await;
    let master_env = container_env(master, secret, "kiln-master-0", &[("KILN_DATABASE_URL", database)]);
    let api_token = master_env.iter().find(|(n, _)| n == "KILN_API_TOKEN").map(|(_, v)| v.clone());
    let api_token = api_token.expect("the chart gives the master an API token");
    assert!(api_token.len() >= 32, "a generated token is long: {api_token:?}");
    let _master = tokio::process::Command::new(binary("kiln-master"))
        .arg("--config")
        .arg(dir.path().join("config.yaml"))
        .envs(master_env)
        .env("KUBECONFIG", &kubeconfig)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("master.log")).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let client = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{http}");
    eventually("the master to be ready", MINUTE, || async {
        let response = client.get(format!("{base}/readyz")).send().await.ok()?;
        (response.status() == 200).then_some(())
    })
    .await;

    // A worker of the pool, as its pod would run it.
    let probes = free_port();
    let worker_env = container_env(
        worker,
        secret,
        "kiln-worker-default-7c9f-x2x4z",
        &[
            ("KILN_MASTER", format!("http://127.0.0.1:{grpc}")),
            ("KILN_WORKER_BASEDIR", dir.path().join("builds").display().to_string()),
            ("KILN_WORKER_CACHE_DIR", dir.path().join("shared/cache").display().to_string()),
            ("KILN_WORKER_HTTP_LISTEN", format!("127.0.0.1:{probes}")),
        ],
    );
    assert!(worker_env.iter().any(|(n, v)| n == "KILN_POOL" && v == "default"), "{worker_env:?}");
    let _worker = tokio::process::Command::new(binary("kiln-worker"))
        .envs(worker_env)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("worker.log")).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    eventually("the worker to be ready", MINUTE, || async {
        let response = client.get(format!("http://127.0.0.1:{probes}/readyz")).send().await.ok()?;
        (response.status() == 200).then_some(())
    })
    .await;
    let anonymous = serde_json::json!({ "jsonrpc": "2.0", "method": "force", "id": 1, "params": {} });
    let refused = client.post(format!("{base}/api/v2/forceschedulers/force")).json(&anonymous).send().await.unwrap();
    assert_eq!(refused.status(), 401, "control actions need the chart's API token");
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(reqwest::header::AUTHORIZATION, format!("Bearer {api_token}").parse().unwrap());
    let client = reqwest::Client::builder().default_headers(headers).build().unwrap();
    let brid = kiln_tests::process::force(&client, &base).await;
    let request = kiln_tests::process::wait_request(&client, &base, brid).await;
    assert_eq!(request["results"], 0, "the chart's example build succeeds");
    // The worker registered under its pod's name and pool.
    let workers: serde_json::Value =
        client.get(format!("{base}/api/v2/workers")).send().await.unwrap().json().await.unwrap();
    assert_eq!(workers["workers"][0]["name"], "kiln-worker-default-7c9f-x2x4z");
    assert_eq!(workers["workers"][0]["workerinfo"]["pool"], "default");
}

/// Whether `account` (namespace, name) may `verb` the `resource` of `group` named `name` in
/// `namespace`, by the rendered Roles and bindings, as Kubernetes' RBAC decides it: a
/// RoleBinding grants its Role's rules in the binding's own namespace, a ClusterRoleBinding its
/// ClusterRole's everywhere; a rule applies when its apiGroups, resources (a subresource such as
/// `deployments/scale` is a resource of its own), verbs and, when it lists any, resourceNames
/// all match, `*` matching anything. Objects without a namespace are in `release`'s.
fn allowed(docs: &[Value], release: &str, account: (&str, &str), request: (&str, &str, &str, &str, &str)) -> bool {
    let (verb, group, resource, namespace, name) = request;
    let list = |v: &Value| -> Vec<String> {
        v.as_sequence().map(|s| s.iter().filter_map(|x| x.as_str().map(str::to_owned)).collect()).unwrap_or_default()
    };
    let matches = |values: Vec<String>, wanted: &str| values.iter().any(|v| v == "*" || v == wanted);
    let namespace_of = |d: &Value| d["metadata"]["namespace"].as_str().unwrap_or(release).to_owned();
    docs.iter().filter(|d| d["kind"] == "RoleBinding" || d["kind"] == "ClusterRoleBinding").any(|binding| {
        let cluster_wide = binding["kind"] == "ClusterRoleBinding";
        if !cluster_wide && namespace_of(binding) != namespace {
            return false;
        }
        let bound = binding["subjects"].as_sequence().into_iter().flatten().any(|s| {
            s["kind"] == "ServiceAccount" && s["name"] == account.1 && s["namespace"].as_str() == Some(account.0)
        });
        if !bound {
            return false;
        }
        let role_kind = binding["roleRef"]["kind"].as_str().unwrap_or_default();
        let role_name = binding["roleRef"]["name"].as_str().unwrap_or_default();
        let role = docs.iter().find(|d| {
            d["kind"] == role_kind
                && d["metadata"]["name"] == role_name
                && (role_kind == "ClusterRole" || namespace_of(d) == namespace_of(binding))
        });
        role.and_then(|r| r["rules"].as_sequence()).into_iter().flatten().any(|rule| {
            let names = list(&rule["resourceNames"]);
            matches(list(&rule["apiGroups"]), group)
                && matches(list(&rule["resources"]), resource)
                && matches(list(&rule["verbs"]), verb)
                && (names.is_empty() || (!name.is_empty() && names.iter().any(|n| n == name)))
        })
    })
}

/// What the master's ServiceAccount can and cannot do, request by request: scale the worker
/// Deployments and list, watch and annotate their pods; not scale or change anything else, read
/// Secrets, exec into or delete pods. With the workers in a namespace of their own, its pod rights
/// no longer reach its own pod or the database's.
#[test]
fn the_masters_account_reaches_the_worker_deployments_and_pods_and_nothing_else() {
    let account = ("ci", "kiln-master");
    for (variant, workers) in [(None, "ci"), (Some(chart().join("ci/worker-namespace.yaml")), "kiln-workers")] {
        let out = template(variant.as_deref(), &[]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let docs = documents(&String::from_utf8(out.stdout).unwrap());
        let worker = find(&docs, "Deployment", "-worker-default");
        assert_eq!(worker["metadata"]["namespace"], workers);
        let can = |request| allowed(&docs, "ci", account, request);
        for request in [
            ("get", "apps", "deployments/scale", workers, "kiln-worker-default"),
            ("patch", "apps", "deployments/scale", workers, "kiln-worker-default"),
            ("list", "", "pods", workers, ""),
            ("watch", "", "pods", workers, ""),
            ("patch", "", "pods", workers, "kiln-worker-default-7d9f-abcde"),
        ] {
            assert!(can(request), "{variant:?}: the autoscaler needs {request:?}");
        }
        for request in [
            ("patch", "apps", "deployments/scale", "ci", "kiln-master"),
            ("patch", "apps", "deployments/scale", workers, "kiln-master"),
            ("patch", "apps", "deployments/scale", "elsewhere", "kiln-worker-default"),
            ("update", "apps", "deployments/scale", workers, "kiln-worker-default"),
            ("patch", "apps", "deployments", workers, "kiln-worker-default"),
            ("patch", "apps", "statefulsets", "ci", "kiln-postgresql"),
            ("create", "", "pods", workers, ""),
            ("delete", "", "pods", workers, "kiln-worker-default-7d9f-abcde"),
            ("create", "", "pods/exec", workers, "kiln-worker-default-7d9f-abcde"),
            ("get", "", "secrets", "ci", "kiln-secrets"),
            ("get", "", "secrets", workers, "kiln-worker-token"),
            ("list", "", "secrets", workers, ""),
            ("patch", "", "pods", "elsewhere", "a-pod"),
        ] {
            assert!(!can(request), "{variant:?}: the master must not {request:?}");
        }
        let own_pods = can(("patch", "", "pods", "ci", "kiln-postgresql-0"));
        assert_eq!(own_pods, variant.is_none(), "{variant:?}: patching the database's pod");
    }
}

/// With the workers in a namespace of their own and cert-manager issuing both certificates, each
/// piece points at the others: the pools' namespace, the master's qualified name, the token copy,
/// the Certificates' names, HTTPS probes and scrapes.
#[test]
fn workers_in_their_own_namespace_and_cert_manager_tls_fit_together() {
    let out = template(Some(&chart().join("ci/worker-namespace.yaml")), &["--api-versions", SERVICE_MONITOR]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let docs = documents(&String::from_utf8(out.stdout).unwrap());
    let config: Value =
        serde_yaml_ng::from_str(find(&docs, "ConfigMap", "-config")["data"]["config.yaml"].as_str().unwrap()).unwrap();
    assert_eq!(config["pools"][0]["kubernetes"]["namespace"], "kiln-workers");
    assert_eq!(config["workers"]["tls"]["cert"], "/etc/kiln-tls/tls.crt");
    assert_eq!(config["http"]["tls"]["cert"], "/etc/kiln-api-tls/tls.crt");
    let worker = &find(&docs, "Deployment", "-worker-default")["spec"]["template"]["spec"];
    let env = worker["containers"][0]["env"].as_sequence().unwrap();
    let entry = |name: &str| env.iter().find(|e| e["name"] == name).unwrap().clone();
    assert_eq!(entry("KILN_MASTER")["value"], "https://kiln-master.ci.svc:9989");
    let token_secret = entry("KILN_WORKER_TOKEN")["valueFrom"]["secretKeyRef"]["name"].as_str().unwrap().to_owned();
    let copy = find(&docs, "Secret", &token_secret);
    assert_eq!(copy["metadata"]["namespace"], "kiln-workers");
    assert_eq!(copy["data"]["worker-token"], find(&docs, "Secret", "-secrets")["data"]["worker-token"]);
    assert_eq!(copy["data"].as_mapping().unwrap().len(), 1, "only the worker token crosses over");
    for (suffix, mount) in [("-worker-tls", "tls"), ("-api-tls", "api-tls")] {
        let certificate = find(&docs, "Certificate", suffix);
        let names: Vec<&str> =
            certificate["spec"]["dnsNames"].as_sequence().unwrap().iter().map(|n| n.as_str().unwrap()).collect();
        assert!(names.contains(&"kiln-master") && names.contains(&"kiln-master.ci.svc"), "{names:?}");
        let secret = certificate["spec"]["secretName"].as_str().unwrap();
        let master = &find(&docs, "Deployment", "-master")["spec"]["template"]["spec"];
        let volume = master["volumes"].as_sequence().unwrap().iter().find(|v| v["name"] == mount).unwrap();
        assert_eq!(volume["secret"]["secretName"], secret);
    }
    let master = &find(&docs, "Deployment", "-master")["spec"]["template"]["spec"]["containers"][0];
    for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
        assert_eq!(master[probe]["httpGet"]["scheme"], "HTTPS", "{probe}");
    }
    assert_eq!(find(&docs, "ServiceMonitor", "-master")["spec"]["endpoints"][0]["scheme"], "https");
    let policy = find(&docs, "NetworkPolicy", "-master");
    assert_eq!(
        policy["spec"]["ingress"][0]["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
        "kiln-workers"
    );
}

/// The Prometheus Operator's API, as `helm template --api-versions` names it.
const SERVICE_MONITOR: &str = "monitoring.coreos.com/v1/ServiceMonitor";

#[test]
fn an_operator_meets_no_surprise_on_reinstall_without_the_operator_or_on_a_root_owned_volume() {
    let monitoring = chart().join("ci/monitoring.yaml");
    // The Secret outlives `helm uninstall`, as the database volume does, so a re-install keeps
    // the password the database knows.
    let docs = documents(&String::from_utf8(template(Some(&monitoring), &[]).stdout).unwrap());
    let secret = find(&docs, "Secret", "-secrets");
    assert_eq!(secret["metadata"]["annotations"]["helm.sh/resource-policy"], "keep");
    // A ServiceMonitor only where the cluster has the API; without, the install goes ahead.
    assert!(!docs.iter().any(|d| d["kind"] == "ServiceMonitor"), "rendered without the CRD");
    let with_api = documents(
        &String::from_utf8(template(Some(&monitoring), &["--api-versions", SERVICE_MONITOR]).stdout).unwrap(),
    );
    assert_eq!(find(&with_api, "ServiceMonitor", "-master")["kind"], "ServiceMonitor");
    // The opt-in ownership fix: an init container, root with CHOWN alone, on the shared volume.
    let worker = |extra: &[&str]| {
        let docs = documents(&String::from_utf8(template(None, extra).stdout).unwrap());
        find(&docs, "Deployment", "-worker-default")["spec"]["template"]["spec"].clone()
    };
    assert!(worker(&[])["initContainers"].is_null(), "off by default");
    // Without a live Deployment to read (a new install), a pool starts at its min, not at
    // Kubernetes' default of one pod.
    assert_eq!(worker(&[])["replicas"], Value::Null, "replicas is on the Deployment's spec, not the pod's");
    let docs = documents(&String::from_utf8(template(None, &[]).stdout).unwrap());
    assert_eq!(find(&docs, "Deployment", "-worker-default")["spec"]["replicas"], 0, "the default pool's min");
    let fixed = worker(&["--set", "sharedVolume.fixOwnership=true"]);
    let init = &fixed["initContainers"][0];
    assert_eq!(init["securityContext"]["runAsUser"], 0);
    assert_eq!(init["securityContext"]["capabilities"]["add"][0], "CHOWN");
    assert_eq!(init["securityContext"]["capabilities"]["drop"][0], "ALL");
    let command = init["command"][2].as_str().unwrap();
    assert!(command.contains("chown 1000:1000 /shared /shared/cache"), "{command}");
    assert_eq!(init["volumeMounts"][0]["mountPath"], "/shared");
}
