//! Bad input never gets a 5xx: a table of requests a client may get wrong — NUL bytes in every
//! kind of text, an order by a constant field, an unknown JSON-RPC method — sent to a master on
//! SQLite and on PostgreSQL. Each answers 4xx naming what was wrong (or, where the input is
//! valid after all, 200), the same on both databases, and stores nothing.

use kiln_tests::pg;
use kiln_tests::system::TestMaster;
use serde_json::{Value, json};

const SETUP: &str = r#"
change_hooks:
  base: true
builders:
  - name: b
    steps:
      - shell: {name: job, command: "true"}
schedulers:
  - {type: force, name: force, builderNames: [b]}
"#;

/// One request of the table: what is sent, the status expected, and a text the answer names.
struct Case {
    what: &'static str,
    method: &'static str,
    path: &'static str,
    body: Option<Body>,
    status: u16,
    names: &'static str,
}

enum Body {
    Json(Value),
    Form(&'static str),
}

fn rpc(method: &str, params: Value) -> Option<Body> {
    Some(Body::Json(json!({ "jsonrpc": "2.0", "method": method, "id": 1, "params": params })))
}

fn cases() -> Vec<Case> {
    let force = |field: &str| {
        let mut params = json!({ "builderNames": ["b"] });
        params[field] = Value::from("a\u{0}b");
        rpc("force", params)
    };
    vec![
        Case {
            what: "force reason",
            method: "POST",
            path: "/api/v2/forceschedulers/force",
            body: force("reason"),
            status: 400,
            names: "params.reason",
        },
        Case {
            what: "force username",
            method: "POST",
            path: "/api/v2/forceschedulers/force",
            body: force("username"),
            status: 400,
            names: "params.username",
        },
        Case {
            what: "force branch",
            method: "POST",
            path: "/api/v2/forceschedulers/force",
            body: force("branch"),
            status: 400,
            names: "params.branch",
        },
        Case {
            what: "force property",
            method: "POST",
            path: "/api/v2/forceschedulers/force",
            body: force("custom"),
            status: 400,
            names: "params.custom",
        },
        Case {
            what: "worker name in the path",
            method: "POST",
            path: "/api/v2/workers/a%00b",
            body: rpc("pause", json!({})),
            status: 400,
            names: "path",
        },
        Case {
            what: "builder name in the path",
            method: "GET",
            path: "/api/v2/builders/a%00b",
            body: None,
            status: 400,
            names: "path",
        },
        Case {
            what: "filter value",
            method: "GET",
            path: "/api/v2/builds?state_string=a%00b",
            body: None,
            status: 400,
            names: "state_string",
        },
        Case {
            what: "filter by contains",
            method: "GET",
            path: "/api/v2/builds?state_string__contains=%00",
            body: None,
            status: 400,
            names: "state_string",
        },
        Case {
            what: "change hook field",
            method: "POST",
            path: "/change_hook/base",
            body: Some(Body::Form("author=a%00b&branch=main")),
            status: 400,
            names: "author",
        },
        Case {
            what: "change hook comments",
            method: "POST",
            path: "/change_hook/base",
            body: Some(Body::Form("author=a&comments=x%00&branch=main")),
            status: 400,
            names: "comments",
        },
        Case {
            what: "order by a constant field",
            method: "GET",
            path: "/api/v2/builds?order=locks_duration_s",
            body: None,
            status: 200,
            names: "builds",
        },
        Case {
            what: "order by a constant field, descending",
            method: "GET",
            path: "/api/v2/builds?order=-locks_duration_s",
            body: None,
            status: 200,
            names: "builds",
        },
        Case {
            what: "unknown JSON-RPC method",
            method: "POST",
            path: "/api/v2/builds/1",
            body: rpc("frobnicate", json!({})),
            status: 400,
            names: "-32601",
        },
        Case {
            what: "a time beyond the milliseconds the database keeps",
            method: "GET",
            path: "/api/v2/builds?started_at__gt=9223372036854775807",
            body: None,
            status: 400,
            names: "started_at",
        },
        Case {
            what: "unknown worker action",
            method: "POST",
            path: "/api/v2/workers/w",
            body: rpc("frobnicate", json!({})),
            status: 400,
            names: "-32601",
        },
    ]
}

async fn table(database: String) {
    let dir = tempfile::tempdir().unwrap();
    let master = TestMaster::start(&database, dir.path(), SETUP).await;
    let mut failures = Vec::new();
    for case in cases() {
        let url = master.url(case.path);
        let request = match case.method {
            "GET" => master.client.get(&url),
            _ => master.client.post(&url),
        };
        let request = match case.body {
            Some(Body::Json(body)) => request.json(&body),
            Some(Body::Form(form)) => request.header("Content-Type", "application/x-www-form-urlencoded").body(form),
            None => request,
        };
        let response = request.send().await.expect("the master answers");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        if status != case.status || !text.contains(case.names) {
            failures.push(format!("{}: {status} {text} (expected {} naming {:?})", case.what, case.status, case.names));
        }
    }
    assert!(failures.is_empty(), "{database}:\n{}", failures.join("\n"));
    // Nothing was stored.
    assert_eq!(master.get("/api/v2/changes").await["meta"]["total"], 0);
    assert_eq!(master.get("/api/v2/buildrequests").await["meta"]["total"], 0);
    master.stop().await;
}

#[tokio::test]
async fn bad_input_gets_a_4xx_naming_it_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    table(format!("sqlite://{}", dir.path().join("kiln.sqlite").display())).await;
}

#[tokio::test]
async fn bad_input_gets_a_4xx_naming_it_on_postgres() {
    table(pg::fresh_database().await).await;
}
