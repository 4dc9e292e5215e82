//! TLS on the master's listeners, with a throwaway CA made here: a worker that trusts the CA
//! builds over TLS; one that trusts another CA, or speaks plain text, is refused with a clear
//! error; a rotated certificate is served without a restart; the HTTP API serves HTTPS.

use std::sync::Arc;
use std::time::Duration;

use kiln_master::config::Config;
use kiln_tests::eventually;
use kiln_tests::system::{TOKEN, TestMaster, config_text, spawn_worker_env};
use kiln_tests::tls::Ca;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

const MINUTE: Duration = Duration::from_secs(60);

const SETUP: &str = "builders:\n  - name: b\n    steps:\n      - shell: {command: [echo, hello over tls]}\nschedulers:\n  - {type: force, name: force, builderNames: [b]}\n";

/// Opens a TLS connection to `port` trusting `ca`; returns the certificate the server presented.
async fn presented(
    port: u16,
    ca: &str,
    alpn: &[u8],
) -> Result<(Vec<u8>, tokio_rustls::client::TlsStream<tokio::net::TcpStream>), String> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.map_err(|e| e.to_string())?;
    let stream = connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await.map_err(|e| e.to_string())?;
    let cert = stream.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    Ok((cert, stream))
}

/// The names of the workers that registered with `master`.
async fn worker_names(master: &TestMaster) -> Vec<String> {
    let (workers, _) = master
        .master
        .store
        .list(kiln_master::store::Resource::Workers, &kiln_master::store::ListQuery::default())
        .await
        .unwrap();
    workers.iter().filter_map(|w| w["name"].as_str().map(str::to_owned)).collect()
}

fn der(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap().to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_and_the_api_speak_tls_with_a_certificate_read_again_when_it_changes() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, stranger) = (Ca::new("kiln test CA"), Ca::new("someone else's CA"));
    let (cert, key, first_pem) = ca.issue(dir.path(), "master");
    let (trusted, untrusted) = (ca.write(dir.path(), "ca.pem"), stranger.write(dir.path(), "stranger.pem"));
    let database = format!("sqlite://{}", dir.path().join("kiln.sqlite").display());
    let tls = format!("  tls: {{cert: \"{}\", key: \"{}\"}}\n", cert.display(), key.display());
    let text = config_text(&database, dir.path(), SETUP)
        .replace("workers:\n  listen: 127.0.0.1:0\n", &format!("workers:\n  listen: 127.0.0.1:0\n{tls}"))
        .replace("  auth: open\n", &format!("  auth:\n    tokens: [{{name: ci, value: s3cret}}]\n{tls}"));
    let master = TestMaster::start_with(Config::parse("tls.yaml", &text).unwrap(), dir.path()).await;
    let url = format!("https://localhost:{}", master.grpc.port());
    let ca_env = trusted.display().to_string();
    let _worker = spawn_worker_env(&url, "trusting", TOKEN, dir.path(), &[("KILN_MASTER_CA", &ca_env)]);
    let stranger_env = untrusted.display().to_string();
    let _refused = spawn_worker_env(&url, "distrusting", TOKEN, dir.path(), &[("KILN_MASTER_CA", &stranger_env)]);
    let plain = format!("http://127.0.0.1:{}", master.grpc.port());
    let _plain = spawn_worker_env(&plain, "plain", TOKEN, dir.path(), &[]);
    master.wait_workers(1).await;

    // The API, over HTTPS only; a control action with its token builds on the TLS worker.
    let request = json!({ "jsonrpc": "2.0", "method": "force", "id": 1, "params": {} }).to_string();
    let post = format!(
        "POST /api/v2/forceschedulers/force HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer s3cret\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{request}",
        request.len()
    );
    let (_, mut https) = presented(master.http.port(), &ca.pem, b"http/1.1").await.unwrap();
    https.write_all(post.as_bytes()).await.unwrap();
    let mut reply = String::new();
    https.read_to_string(&mut reply).await.unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    let plain_http = reqwest::get(format!("http://127.0.0.1:{}/healthz", master.http.port())).await;
    assert!(plain_http.is_err() || plain_http.unwrap().status() != 200, "no plain HTTP beside HTTPS");

    let build = eventually("the build over TLS", MINUTE, || async {
        let (builds, _) = master
            .master
            .store
            .list(kiln_master::store::Resource::Builds, &kiln_master::store::ListQuery::default())
            .await
            .ok()?;
        builds.into_iter().find(|b| b["complete"] == true)
    })
    .await;
    assert_eq!(build["results"], 0, "{build}");
    let names = worker_names(&master).await;
    assert_eq!(names, ["trusting"], "only the worker that trusts the CA registered");
    let log = dir.path().join("distrusting.log");
    eventually("the distrusting worker to say why it cannot connect", MINUTE, || async {
        std::fs::read_to_string(&log).ok()?.contains("invalid peer certificate").then_some(())
    })
    .await;

    // A rotated certificate (same files, new content) is served without a restart.
    assert_eq!(presented(master.grpc.port(), &ca.pem, b"h2").await.unwrap().0, der(&first_pem));
    let rotated = dir.path().join("rotated");
    std::fs::create_dir_all(&rotated).unwrap();
    let (new_cert, new_key, new_pem) = ca.issue(&rotated, "master");
    std::fs::rename(new_key, &key).unwrap();
    std::fs::rename(new_cert, &cert).unwrap();
    eventually("the rotated certificate", MINUTE, || async {
        let (served, _) = presented(master.grpc.port(), &ca.pem, b"h2").await.ok()?;
        (served == der(&new_pem)).then_some(())
    })
    .await;
    assert!(presented(master.grpc.port(), &stranger.pem, b"h2").await.is_err(), "a client of another CA refuses it");
    master.stop().await;
}

#[test]
fn missing_certificate_files_are_a_configuration_error_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let database = format!("sqlite://{}", dir.path().join("kiln.sqlite").display());
    let text = config_text(&database, dir.path(), SETUP).replace(
        "workers:\n  listen: 127.0.0.1:0\n",
        "workers:\n  listen: 127.0.0.1:0\n  tls: {cert: /nonexistent/tls.crt, key: /nonexistent/tls.key}\n",
    );
    let error = Config::parse("tls.yaml", &text).unwrap_err();
    assert_eq!(error.key, "workers.tls.cert", "{error}");
}

/// The test configuration with the worker endpoint serving a certificate of `ca` and admitting
/// clients of `ca` (written as `ca.pem` in `dir`); the workers' token is still in it.
fn client_ca_config(dir: &std::path::Path, ca: &Ca) -> String {
    let (cert, key, _) = ca.issue(dir, "master");
    let trusted = ca.write(dir, "ca.pem");
    let database = format!("sqlite://{}", dir.join("kiln.sqlite").display());
    let tls = format!(
        "  tls: {{cert: \"{}\", key: \"{}\", client_ca: \"{}\"}}\n",
        cert.display(),
        key.display(),
        trusted.display()
    );
    config_text(&database, dir, SETUP)
        .replace("workers:\n  listen: 127.0.0.1:0\n", &format!("workers:\n  listen: 127.0.0.1:0\n{tls}"))
}

/// With `workers.tls.client_ca`, a certificate from that CA admits a worker without a token, but
/// only under a name the certificate carries; no certificate, or one of another CA, is refused
/// at the handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_admits_a_worker_under_its_own_name_instead_of_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, stranger) = (Ca::new("kiln test CA"), Ca::new("someone else's CA"));
    let trusted = dir.path().join("ca.pem");
    let text =
        client_ca_config(dir.path(), &ca).replace(&format!("  tokens:\n    - name: test\n      value: {TOKEN}\n"), "");
    assert!(!text.contains("tokens"), "the workers have no token: {text}");
    let master = TestMaster::start_with(Config::parse("mtls.yaml", &text).unwrap(), dir.path()).await;
    let url = format!("https://localhost:{}", master.grpc.port());
    let ca_env = trusted.display().to_string();
    let with_cert = |issuer: &Ca, stem: &str, names: &[&str]| {
        let (cert, key, _) = issuer.issue_for(dir.path(), stem, names);
        (cert.display().to_string(), key.display().to_string())
    };
    let spawn = |name: &str, identity: Option<&(String, String)>, token: &str| {
        let mut env = vec![("KILN_MASTER_CA", ca_env.as_str())];
        if let Some((cert, key)) = identity {
            env.extend([("KILN_WORKER_CERT", cert.as_str()), ("KILN_WORKER_KEY", key.as_str())]);
        }
        spawn_worker_env(&url, name, token, dir.path(), &env)
    };
    let own = with_cert(&ca, "certified", &["certified"]);
    let _certified = spawn("certified", Some(&own), "");
    let other = with_cert(&ca, "borrowed", &["someone-else"]);
    let _impostor = spawn("impostor", Some(&other), "");
    let stray = with_cert(&stranger, "stray", &["stray"]);
    let _stray = spawn("stray", Some(&stray), "");
    let _token_only = spawn("token-only", None, TOKEN);
    master.wait_workers(1).await;

    let brid = master.force_request("force", json!({})).await;
    let build = master.wait_build_of_request(brid, MINUTE).await;
    assert_eq!(build["results"], 0, "{build}");
    let names = worker_names(&master).await;
    assert_eq!(names, ["certified"], "only the worker whose certificate names it registered");
    let log = dir.path().join("impostor.log");
    eventually("the impostor to be told its certificate does not name it", MINUTE, || async {
        std::fs::read_to_string(&log).ok()?.contains("the client certificate does not name the worker").then_some(())
    })
    .await;
    for refused in ["stray", "token-only"] {
        let log = std::fs::read_to_string(dir.path().join(format!("{refused}.log"))).unwrap();
        assert!(!log.contains("registered with the master"), "{refused} registered:\n{log}");
    }
    master.stop().await;
}

#[test]
fn certificates_or_tokens_admit_workers_not_both() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("kiln test CA");
    let text = client_ca_config(dir.path(), &ca);
    let error = Config::parse("mtls.yaml", &text).unwrap_err();
    assert_eq!(error.key, "workers.tokens", "{error}");
}
