//! One master runs each pool's scaler when several share PostgreSQL, and a standby takes over
//! when the leader dies: two real `kiln-master` processes, the leader killed with SIGKILL.

use std::time::Duration;

use kiln_tests::eventually;
use kiln_tests::pg;
use kiln_tests::process::{MasterProcess, force};
use serde_json::Value;

const BODY: &str = "  tokens: [{name: t, value: token}]\ncollapseRequests: false\npools:\n  - {name: ci, backend: static, min: 0, max: 8, scale_down_delay: 60}\nbuilders:\n  - {name: b, steps: [{shell: {command: \"true\"}}]}\nschedulers:\n  - {type: force, name: force, builderNames: [b]}\n";

async fn pool(client: &reqwest::Client, base: &str) -> Option<Value> {
    let reply: Value = client.get(format!("{base}/api/v2/pools")).send().await.ok()?.json().await.ok()?;
    reply["pools"].get(0).cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_master_takes_over_the_scaler_when_the_leader_dies() {
    let database = pg::fresh_database().await;
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let client = reqwest::Client::new();
    let leader = MasterProcess::start(&database, dir_a.path(), BODY, 0).await;
    eventually("the first master to lead", Duration::from_secs(30), || async {
        (pool(&client, &leader.base).await?["leader"] == true).then_some(())
    })
    .await;
    let standby = MasterProcess::start(&database, dir_b.path(), BODY, 0).await;
    // The standby keeps trying, and keeps failing while the leader lives.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(pool(&client, &standby.base).await.unwrap()["leader"], false);

    for _ in 0..3 {
        force(&client, &standby.base).await;
    }
    eventually("the leader to want three workers", Duration::from_secs(30), || async {
        (pool(&client, &leader.base).await?["desired"] == 3).then_some(())
    })
    .await;
    assert_eq!(pool(&client, &standby.base).await.unwrap()["desired"], 0, "the standby does not scale");

    let killed = std::time::Instant::now();
    leader.kill().await;
    eventually("the standby to lead", Duration::from_secs(30), || async {
        let status = pool(&client, &standby.base).await?;
        (status["leader"] == true && status["desired"] == 3).then_some(())
    })
    .await;
    let took = killed.elapsed();
    assert!(took < Duration::from_secs(10), "failover took {took:?}");
    println!("failover took {took:?}");
    standby.stop().await;
}
